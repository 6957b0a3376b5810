//! Skews a child process' wall clock: an `LD_PRELOAD` shim, built here with `cc`, that adds
//! `MRP_TEST_WALL_SKEW_S` seconds to `CLOCK_REALTIME` (`clock_gettime`, `gettimeofday`,
//! `time`). The monotonic clock (timers, timeouts) is left alone.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <sys/time.h>
#include <time.h>

static long skew(void) {
    const char *v = getenv("MRP_TEST_WALL_SKEW_S");
    return v ? atol(v) : 0;
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && ts && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += skew();
    return r;
}

int gettimeofday(struct timeval *tv, void *tz) {
    static int (*real)(struct timeval *, void *);
    if (!real) real = (int (*)(struct timeval *, void *))dlsym(RTLD_NEXT, "gettimeofday");
    int r = real(tv, tz);
    if (r == 0 && tv) tv->tv_sec += skew();
    return r;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t) *t = ts.tv_sec;
    return ts.tv_sec;
}
"#;

fn shim() -> &'static PathBuf {
    static SHIM_SO: OnceLock<PathBuf> = OnceLock::new();
    SHIM_SO.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mrp-skew-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("skew.c");
        let so = dir.join("libskew.so");
        std::fs::write(&src, SHIM).unwrap();
        let ok = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl")
            .status()
            .expect("cc (a C compiler) is needed for the wall-clock skew shim")
            .success();
        assert!(ok, "building the skew shim failed");
        so
    })
}

/// Environment for `ProxyOptions::env`: the process' wall clock runs `secs` off.
pub fn wall_clock_skew(secs: i64) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", shim().display().to_string()),
        ("MRP_TEST_WALL_SKEW_S", secs.to_string()),
    ]
}
