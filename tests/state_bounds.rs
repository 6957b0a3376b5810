//! Per-session Redis state: its fields (read by the admin API) and its bounds (issue 9).
mod common;

use common::*;

fn session_key(h: &Harness) -> String {
    let keys = h.redis.cli(&["--scan", "--pattern", "mrp:{*}:s"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 1, "one session: {keys:?}");
    keys[0].to_owned()
}

fn field(h: &Harness, key: &str, f: &str) -> u64 {
    let v = h.redis.cli(&["HGET", key, f]);
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{f} = {v:?} in {key}"))
}

#[tokio::test]
async fn session_hash_tracks_last_refresh_and_current_expiries() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let s = session_key(&h);
    let c = field(&h, &s, "c");
    assert!(c > 0);
    assert_eq!(field(&h, &s, "lr"), 0, "no refresh yet");
    let aexp = field(&h, &s, "aexp");
    let rexp = field(&h, &s, "rexp");
    // access 1h, refresh 7d (the harness defaults)
    assert!(aexp.abs_diff(c + 3_600_000) < 5_000, "aexp {aexp} c {c}");
    assert!(rexp.abs_diff(c + 7 * 86_400_000) < 5_000, "rexp {rexp} c {c}");

    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    let lr = field(&h, &s, "lr");
    assert!(lr >= c, "lr {lr} c {c}");
    assert_eq!(field(&h, &s, "c"), c, "created unchanged");
    let aexp2 = field(&h, &s, "aexp");
    assert!(aexp2.abs_diff(lr + 3_600_000) < 5_000, "aexp {aexp2} lr {lr}");
    assert!(field(&h, &s, "rexp").abs_diff(lr + 7 * 86_400_000) < 5_000);
}

#[tokio::test]
async fn session_hash_rexp_is_zero_without_refresh_expiry() {
    let h = Harness::with(
        ProxyOptions {
            refresh: "null",
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    let s = session_key(&h);
    assert_eq!(field(&h, &s, "rexp"), 0);
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
    assert_eq!(field(&h, &s, "rexp"), 0);
    assert!(field(&h, &s, "lr") > 0);
}
