//! Memory of the rate limiters: RSS after N distinct client IPs each hit the login limiter once,
//! before and after housekeeping (the sweep the proxy's housekeeping task runs).
//!
//!     cargo run --release --example ratelimit_mem            # 1,000,000 IPv4 clients
//!     cargo run --release --example ratelimit_mem -- 1000000 v6   # distinct IPv6 /64s
//!
//! Uses the default `rate_limit` config and a fake clock, so "after housekeeping" needs no
//! waiting: the clock is moved past the time a key's budget is full again (4 s for the default
//! login limit), then the sweep runs. The whole proxy under the same load is measured by the
//! ignored test `rss_after_a_million_client_ips` in tests/ratelimit.rs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use governor::clock::FakeRelativeClock;
use matrix_refresh_proxy::StoreError;
use matrix_refresh_proxy::config::Config;
use matrix_refresh_proxy::{Limited, RateLimits, SharedLimiter};

/// The local backend never asks the shared one.
struct NoShared;

impl SharedLimiter for NoShared {
    async fn acquire(
        &self,
        _: &str,
        _: Duration,
        _: u32,
    ) -> Result<Result<(), Limited>, StoreError> {
        Ok(Ok(()))
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let v6 = args.next().as_deref() == Some("v6");
    let config = Config::parse("upstream: {url: 'http://hs'}", |_| None)
        .expect("defaults parse")
        .rate_limit;
    let clock = FakeRelativeClock::default();
    let limits = RateLimits::with_clock(&config, NoShared, clock.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");

    let before = rss_kib();
    let started = Instant::now();
    rt.block_on(async {
        for i in 0..n {
            let ip = if v6 {
                // A new /64 each time (the limiter's IPv6 identity).
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8_u128 << 96) | (u128::from(i) << 64) | 1,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))
            };
            limits
                .check_login(ip)
                .await
                .expect("one login per client is allowed");
        }
    });
    let filled = started.elapsed();
    let after = rss_kib();
    let keys = limits.key_counts();

    clock.advance(Duration::from_secs(60));
    let sweep_started = Instant::now();
    limits.sweep();
    let sweep = sweep_started.elapsed();
    let swept = rss_kib();

    println!(
        "{n} distinct {} clients hit the login limiter once ({:.2}s)",
        if v6 { "IPv6 /64" } else { "IPv4" },
        filled.as_secs_f64()
    );
    println!("RSS before:              {before} KiB");
    println!(
        "RSS after the flood:     {after} KiB  (+{} KiB, {:.1} bytes per key), keys {keys:?}",
        after.saturating_sub(before),
        (after.saturating_sub(before) * 1024) as f64 / f64::from(n.max(1))
    );
    println!(
        "RSS after housekeeping:  {swept} KiB  (sweep took {:.1} ms), keys {:?}",
        sweep.as_secs_f64() * 1000.0,
        limits.key_counts()
    );
}
