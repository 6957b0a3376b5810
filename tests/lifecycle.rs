//! Process lifecycle (issue 5): graceful drain on SIGTERM, a second signal exits at once,
//! systemd notifications, SIGHUP reload of token lifetimes and rate limits.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Starts a long poll of `ms` on its own task; returns its handle.
fn long_poll(
    h: &std::sync::Arc<Harness>,
    token: String,
    ms: u64,
) -> tokio::task::JoinHandle<Option<u16>> {
    let url = format!("{}/_matrix/client/v3/sync?timeout={ms}", h.proxy.url());
    tokio::spawn(async move {
        let c = client();
        let req = http::Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .body(body(""))
            .unwrap();
        c.request(req).await.ok().map(|r| r.status().as_u16())
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let h = std::sync::Arc::new(Harness::start().await);
    let v = h.login("alice").await;
    let poll = long_poll(&h, at(&v), 1500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Readiness says draining while the admin listener is still up …
    let ready = h.admin_get("/health/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["draining"], true);
    // … new connections are refused …
    assert!(
        std::net::TcpStream::connect(h.proxy.addr).is_err(),
        "still accepting after SIGTERM"
    );
    // … and the request in flight completes.
    assert_eq!(poll.await.unwrap(), Some(200));
    let mut h = std::sync::Arc::into_inner(h).expect("sole owner");
    assert_eq!(
        h.proxy.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        h.proxy.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_is_bounded_by_shutdown_timeout() {
    let h = std::sync::Arc::new(
        Harness::with(
            ProxyOptions {
                extra: "shutdown_timeout: \"1s\"\n".into(),
                ..Default::default()
            },
            false,
        )
        .await,
    );
    let v = h.login("alice").await;
    let poll = long_poll(&h, at(&v), 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    h.proxy.signal("TERM");
    let mut h = std::sync::Arc::into_inner(h).expect("sole owner");
    assert_eq!(h.proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_ne!(poll.await.unwrap(), Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_exits_at_once() {
    let h = std::sync::Arc::new(Harness::start().await);
    let v = h.login("alice").await;
    let poll = long_poll(&h, at(&v), 20_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    h.proxy.signal("INT");
    let mut h = std::sync::Arc::into_inner(h).expect("sole owner");
    let code = h.proxy.wait_exit(Duration::from_secs(5));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(code, Some(1));
    assert_ne!(poll.await.unwrap(), Some(200));
}

#[tokio::test(flavor = "multi_thread")]
async fn systemd_notifications_ready_after_redis_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // Everything that arrives within 300 ms (the watchdog keeps pinging, so never "until quiet").
    let recv_all = |sock: &UnixDatagram| {
        let mut got = String::new();
        let mut buf = [0u8; 1024];
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        got
    };

    // Redis is down at start: no READY=1 until it answers.
    let mut redis = RedisServer::start();
    redis.kill();
    let hs = FakeHs::start().await;
    let opts = ProxyOptions {
        env: vec![
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
        ..Default::default()
    };
    let mut proxy = ProxyProcess::start(&hs.url(), &redis.url(), &opts);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = recv_all(&sock);
    assert!(
        !before.contains("READY=1"),
        "READY before Redis answered: {before:?}"
    );
    assert!(
        before.contains("WATCHDOG=1"),
        "no watchdog pings: {before:?}"
    );

    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = String::new();
    while !seen.contains("READY=1") && Instant::now() < deadline {
        seen.push_str(&recv_all(&sock));
    }
    assert!(seen.contains("READY=1"), "{seen:?}");

    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(recv_all(&sock).contains("STOPPING=1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_token_lifetimes_and_rate_limits() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    assert_eq!(v["expires_in_ms"], 3_600_000);

    let path = h.proxy.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replace(
        "access_token_lifetime: \"1h\"",
        "access_token_lifetime: \"2h\"",
    ) + "rate_limit:\n  login: {per_second: 0.001, burst: 1}\n";
    std::fs::write(&path, &edited).unwrap();
    h.proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.proxy.logs().contains("token lifetimes reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", h.proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New tokens get the new lifetime; the old session keeps its expiry and works.
    let n = h.login("bob").await;
    assert_eq!(n["expires_in_ms"], 7_200_000);
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    let r = h.refresh(&rt(&v)).await.json();
    assert_eq!(r["expires_in_ms"], 7_200_000);
    // The new login limit (burst 1, already used by bob) applies.
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "carol"}),
        )
        .await;
    assert_eq!(r.status, 429);

    // A broken file changes nothing.
    std::fs::write(&path, edited.replace("\"2h\"", "soon")).unwrap();
    h.proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.proxy.logs().contains("configuration reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload error: {}",
            h.proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.refresh(&rt(&n)).await.json()["expires_in_ms"], 7_200_000);
    assert!(h.proxy.logs().contains("tokens.access_token_lifetime"));
}
