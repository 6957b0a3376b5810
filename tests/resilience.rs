//! Store outages and log hygiene (DESIGN.md §2, §3).

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::json;

#[tokio::test]
async fn redis_outage_gives_503_then_full_service_with_sessions_intact() {
    let mut h = Harness::with(ProxyOptions::default(), true).await;
    let v = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    assert_eq!(h.whoami(&at(&n)).await.status, 200);
    let plain = h.login_plain("bot").await;

    h.redis.kill();
    let killed = Instant::now();

    // Proxy tokens: 503 M_UNKNOWN with Retry-After, never 401. The token cache may still answer
    // a token it holds until it notices its lost invalidation connection: at once on the
    // connection's close, at the latest after cache.liveness_timeout (80 ms).
    let r = loop {
        let r = h.whoami(&at(&n)).await;
        if r.status != 200 || killed.elapsed() > Duration::from_millis(100) {
            break r;
        }
    };
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    assert!(r.headers.contains_key("retry-after"));
    // /refresh: 503 with a non-JSON body (SDKs log out on JSON errors from /refresh).
    let r = h.refresh(&rt(&n)).await;
    assert_eq!(r.status, 503);
    assert!(r.headers.contains_key("retry-after"));
    assert!(serde_json::from_slice::<serde_json::Value>(&r.body).is_err());
    // A refresh-token login cannot be completed without the store.
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "carol", "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 503);
    // Anonymous requests and foreign tokens still go through.
    assert_eq!(h.get("/_matrix/client/versions", None).await.status, 200);
    assert_eq!(h.whoami(&at(&plain)).await.status, 200);

    h.redis.restart();

    // Full service without a proxy restart, sessions intact.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = h.whoami(&at(&n)).await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery: {} {:?}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = h.refresh(&rt(&n)).await;
    assert_eq!(m.status, 200);
    assert_eq!(h.whoami(&at(&m.json())).await.status, 200);
    let fresh = h.login("dave").await;
    assert_eq!(h.whoami(&at(&fresh)).await.status, 200);
    assert!(h.proxy.is_running());
}

/// Issue 9.6: the homeserver logged a device in, the proxy could not store the session and
/// answers 503; the device must not stay behind, logged in with a token nobody holds.
#[tokio::test]
async fn a_login_that_cannot_be_stored_is_logged_out_upstream() {
    let mut h = Harness::start().await;
    h.login("alice").await; // the store works until now
    h.redis.kill();
    for (path, user) in [
        ("/_matrix/client/v3/login", "carol"),
        ("/_matrix/client/v3/register", "erin"),
    ] {
        h.hs.clear_requests();
        let v = if path.ends_with("/login") {
            json!({"type": "m.login.password", "user": user, "refresh_token": true})
        } else {
            json!({"username": user, "auth": {"type": "m.login.dummy"}, "refresh_token": true})
        };
        let r = h.post(path, None, v).await;
        assert_eq!(r.status, 503, "{path}: {:?}", r.body);
        assert_eq!(h.hs.requests_to(path).len(), 1, "{path}: not forwarded");
        let logouts = h.hs.requests_to("/logout");
        assert_eq!(logouts.len(), 1, "{path}: no upstream logout");
        let lt = logouts[0].bearer().expect("logout with the upstream token");
        assert!(FakeHs::is_upstream_token(&lt));
        assert!(!h.hs.is_live(&lt), "{path}: the device is still logged in");
        assert_eq!(logouts[0].method, Method::POST);
        assert!(logouts[0].path.ends_with("/_matrix/client/v3/logout"));
    }
    assert!(h.proxy.is_running());
}

#[tokio::test]
async fn no_token_ever_appears_in_the_logs() {
    let h = Harness::with_access_and_clock("1s").await;
    let mut secrets = Vec::new();
    let v = h.login("alice").await;
    secrets.extend([at(&v), rt(&v)]);
    let n = h.refresh(&rt(&v)).await.json();
    secrets.extend([at(&n), rt(&n)]);
    // A grace replay, header and query forms, a bad token, an expired token.
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
    h.whoami(&at(&n)).await;
    h.get(
        &format!("/_matrix/client/v3/sync?timeout=0&access_token={}", at(&n)),
        None,
    )
    .await;
    h.whoami("mrpat_garbage_token_value").await;
    let bad_rt = format!("{}x", rt(&n));
    h.refresh(&bad_rt).await;
    let plain = h.login_plain("bot").await;
    secrets.push(at(&plain));
    h.whoami(&at(&plain)).await;
    h.send(
        Method::GET,
        "/_matrix/client/v3/account/whoami",
        &[
            ("authorization", "Bearer mrpat_conflict"),
            ("authorization", "Bearer other"),
        ],
        body(""),
    )
    .await;
    h.advance_clock(Duration::from_millis(1100));
    h.whoami(&at(&n)).await; // expired
    let r = h
        .post("/_matrix/client/v3/logout", Some(&at(&n)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    // Every upstream token the homeserver saw.
    for r in h.hs.requests() {
        if let Some(t) = r.bearer() {
            secrets.push(t);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = h.proxy.logs();
    assert!(logs.contains("request"), "logs captured: {logs}");
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a token appears in the logs");
        // Not even a recognisable part of one of ours.
        if s.len() > 32 {
            assert!(
                !logs.contains(&s[s.len() - 16..]),
                "part of a token appears in the logs"
            );
        }
    }
    assert!(!logs.contains("mrpat_garbage"));
    assert!(!logs.to_lowercase().contains("bearer"));
}
