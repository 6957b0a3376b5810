//! The admin listener (metrics, health) and request logs (issue 5), black-box.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use http::Method;
use serde_json::{Value, json};

/// The value of one series in a Prometheus text scrape, labels in any order.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeSet<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, got) = match series.split_once('{') {
            Some((n, rest)) => (
                n,
                rest.trim_end_matches('}')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<BTreeSet<_>>(),
            ),
            None => (series, BTreeSet::new()),
        };
        (n == name && got == want).then(|| value.parse().unwrap())
    })
}

#[track_caller]
fn assert_metric(text: &str, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = metric(text, name, labels);
    assert_eq!(
        got,
        Some(want),
        "{name}{labels:?}: got {got:?}, want {want}\n{text}"
    );
}

/// Scrapes until `name{labels}` has `want` (responses finish streaming just after the client
/// has read them).
async fn eventually_metric(h: &Harness, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = h.metrics().await;
        if metric(&t, name, labels) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {want}:\n{t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_ready(h: &Harness, want: u16) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = h.admin_get("/health/ready").await;
        if r.status == want {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "/health/ready stayed {} {:?}, want {want}",
            r.status,
            r.json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_follow_login_refresh_request_logout() {
    let h = Harness::start().await;
    let before = h.metrics().await;
    assert_eq!(
        metric(
            &before,
            "mrp_http_requests_total",
            &[("route", "login"), ("status", "200")]
        ),
        None
    );

    let v = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    let n = n.json();
    assert_eq!(h.whoami(&at(&n)).await.status, 200);
    let r = h
        .post("/_matrix/client/v3/logout", Some(&at(&n)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    // An unknown access token: 401, counted under its route and status.
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
    // Registration is its own route class.
    let r = h
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({"username": "newbie", "password": "x", "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 200);

    eventually_metric(&h, "mrp_http_requests_in_flight", &[], 0.0).await;
    let t = h.metrics().await;
    let req = |route, status| [("route", route), ("status", status)];
    assert_metric(&t, "mrp_http_requests_total", &req("login", "200"), 1.0);
    assert_metric(&t, "mrp_http_requests_total", &req("refresh", "200"), 1.0);
    assert_metric(
        &t,
        "mrp_http_requests_total",
        &req("passthrough", "200"),
        1.0,
    );
    assert_metric(
        &t,
        "mrp_http_requests_total",
        &req("passthrough", "401"),
        1.0,
    );
    assert_metric(&t, "mrp_http_requests_total", &req("logout", "200"), 1.0);
    assert_metric(
        &t,
        "mrp_http_request_duration_seconds_count",
        &[("route", "passthrough")],
        2.0,
    );
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "ok")], 1.0);
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "grace_replay")], 0.0);
    assert_metric(&t, "mrp_sessions_minted_total", &[("route", "login")], 1.0);
    assert_metric(
        &t,
        "mrp_sessions_minted_total",
        &[("route", "register")],
        1.0,
    );
    assert_metric(&t, "mrp_http_requests_total", &req("register", "200"), 1.0);
    assert_metric(&t, "mrp_sessions_purged_total", &[("cause", "logout")], 1.0);
    assert_metric(&t, "mrp_sessions_purged_total", &[("cause", "reuse")], 0.0);
    // The homeserver saw login, whoami, logout and register; /refresh and the 401 never reach it.
    for route in ["login", "passthrough", "logout", "register"] {
        assert_metric(
            &t,
            "mrp_upstream_request_duration_seconds_count",
            &[("route", route)],
            1.0,
        );
    }
    assert_eq!(
        metric(
            &t,
            "mrp_upstream_request_duration_seconds_count",
            &[("route", "refresh")]
        ),
        None
    );
    // Redis: two creates and one rotation, every call timed, none failed.
    assert_metric(
        &t,
        "mrp_redis_command_duration_seconds_count",
        &[("op", "create")],
        2.0,
    );
    assert_metric(
        &t,
        "mrp_redis_command_duration_seconds_count",
        &[("op", "rotate")],
        1.0,
    );
    assert!(
        metric(
            &t,
            "mrp_redis_command_duration_seconds_count",
            &[("op", "lookup_access")]
        )
        .unwrap()
            >= 2.0
    );
    assert_metric(&t, "mrp_redis_errors_total", &[("op", "rotate")], 0.0);
    // Nothing was limited; the limiters track the client IP (login, refresh) and the session.
    assert_metric(
        &t,
        "mrp_rate_limited_requests_total",
        &[("route", "refresh")],
        0.0,
    );
    assert_metric(&t, "mrp_rate_limiter_keys", &[], 3.0);
    assert!(t.contains("# TYPE mrp_upstream_request_duration_seconds histogram"));
}

#[tokio::test]
async fn refresh_outcomes_are_counted() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    // Inside the grace: the same pair again.
    let again = h.refresh(&rt(&v)).await;
    assert_eq!(again.status, 200);
    assert_eq!(rt(&again.json()), rt(&n));
    // Using the new access token ends the grace; the old refresh token is now a reuse.
    assert_eq!(h.whoami(&at(&n)).await.status, 200);
    assert_unknown_token(&h.refresh(&rt(&v)).await, false);
    // The session was revoked by reuse detection.
    assert_unknown_token(&h.whoami(&at(&n)).await, false);
    // Garbage and well-formed-but-unknown refresh tokens.
    assert_unknown_token(&h.refresh("not-a-token").await, false);
    assert_unknown_token(&h.refresh(&format!("{}x", rt(&n))).await, false);
    // A body error is not a refresh outcome.
    assert_eq!(
        h.post("/_matrix/client/v3/refresh", None, json!({}))
            .await
            .status,
        400
    );

    let t = h.metrics().await;
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "ok")], 1.0);
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "grace_replay")], 1.0);
    assert_metric(
        &t,
        "mrp_refresh_total",
        &[("outcome", "reuse_detected")],
        1.0,
    );
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "unknown")], 2.0);
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "expired")], 0.0);
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "store_error")], 0.0);
    assert_metric(&t, "mrp_sessions_purged_total", &[("cause", "reuse")], 1.0);
    let req = |status| [("route", "refresh"), ("status", status)];
    assert_metric(&t, "mrp_http_requests_total", &req("200"), 2.0);
    assert_metric(&t, "mrp_http_requests_total", &req("401"), 3.0);
    assert_metric(&t, "mrp_http_requests_total", &req("400"), 1.0);
}

#[tokio::test]
async fn expired_refresh_store_errors_and_purge_causes_are_counted() {
    let mut h = Harness::with(
        ProxyOptions {
            access: "2s",
            refresh: "\"2s\"",
            test_clock: true,
            ..Default::default()
        },
        false,
    )
    .await;
    // Re-login on a named device ends its earlier session.
    let first = h.login_with("alice", json!({"device_id": "PHONE"})).await;
    let v = h.login_with("alice", json!({"device_id": "PHONE"})).await;
    assert_unknown_token(&h.whoami(&at(&first)).await, false);
    // The homeserver revoked bob's upstream token behind the proxy's back.
    let bob = h.login("bob").await;
    h.hs.answer(
        "/account/whoami",
        401,
        json!({"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}),
    );
    assert_eq!(h.whoami(&at(&bob)).await.status, 401);

    h.advance_clock(Duration::from_millis(2000));
    assert_eq!(h.refresh(&rt(&v)).await.status, 403);

    h.redis.kill();
    assert_eq!(h.refresh(&rt(&v)).await.status, 503);

    let t = h.metrics().await;
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "expired")], 1.0);
    assert_metric(&t, "mrp_refresh_total", &[("outcome", "store_error")], 1.0);
    assert_metric(
        &t,
        "mrp_sessions_purged_total",
        &[("cause", "relogin")],
        1.0,
    );
    assert_metric(
        &t,
        "mrp_sessions_purged_total",
        &[("cause", "upstream_revoked")],
        1.0,
    );
    assert_metric(&t, "mrp_sessions_minted_total", &[("route", "login")], 3.0);
    assert!(metric(&t, "mrp_redis_errors_total", &[("op", "peek_refresh")]).unwrap() >= 1.0);
}

#[tokio::test]
async fn liveness_and_readiness_follow_redis() {
    let mut h = Harness::start().await;
    let live = h.admin_get("/health/live").await;
    assert_eq!(live.status, 200);
    let r = h.admin_get("/health/ready").await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json(),
        json!({"ready": true, "checks": {"redis": "ok", "upstream": "ok"}})
    );
    assert!(!h.hs.requests_to("/_matrix/client/versions").is_empty());

    // Probes in a burst are answered from the cache: at most one check per second.
    let seen = h.hs.requests_to("/versions").len();
    for _ in 0..20 {
        assert_eq!(h.admin_get("/health/ready").await.status, 200);
    }
    assert!(h.hs.requests_to("/versions").len() <= seen + 1);

    h.redis.kill();
    let r = wait_ready(&h, 503).await;
    assert_eq!(r.json()["ready"], false);
    assert_ne!(r.json()["checks"]["redis"], "ok");
    assert_eq!(r.json()["checks"]["upstream"], "ok");
    // Liveness does not depend on Redis.
    assert_eq!(h.admin_get("/health/live").await.status, 200);
    let t = h.metrics().await;
    assert!(metric(&t, "mrp_redis_errors_total", &[("op", "ping")]).unwrap() >= 1.0);

    h.redis.restart();
    let r = wait_ready(&h, 200).await;
    assert_eq!(r.json()["checks"]["redis"], "ok");
}

#[tokio::test]
async fn readiness_follows_the_homeserver() {
    // Nothing listens where the homeserver should be.
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = spot.local_addr().unwrap();
    drop(spot);
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start(
        &format!("http://{addr}"),
        &redis.url(),
        &ProxyOptions::default(),
    );
    let client = client();
    let url = format!("{}/health/ready", proxy.admin_url());
    let r = get_url(&client, &url).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["checks"]["redis"], "ok");
    assert_eq!(r.json()["checks"]["upstream"], "unreachable");

    // The homeserver comes up.
    let hs = FakeHs::start_at(addr).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get_url(&client, &url).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {:?}", r.json());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // It answers /versions with an error: not ready.
    hs.answer(
        "/_matrix/client/versions",
        500,
        json!({"errcode": "M_UNKNOWN"}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get_url(&client, &url).await;
        if r.status == 503 {
            assert_eq!(r.json()["checks"]["upstream"], "/versions answered 500");
            break;
        }
        assert!(Instant::now() < deadline, "stayed ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = get_url(&client, &format!("{}/metrics", proxy.admin_url())).await;
    let t = String::from_utf8(t.body.to_vec()).unwrap();
    assert!(
        metric(
            &t,
            "mrp_upstream_errors_total",
            &[("route", "readiness"), ("kind", "unreachable")]
        )
        .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn admin_endpoints_live_only_on_the_admin_listener() {
    let h = Harness::start().await;
    // On the client port, /metrics is just a path forwarded to the homeserver.
    let r = h.get("/metrics", None).await;
    assert_eq!(r.json()["anonymous"], true);
    assert_eq!(h.hs.requests_to("/metrics").len(), 1);
    assert_eq!(h.admin_get("/nope").await.status, 404);
    let r = h
        .client
        .request(
            http::Request::builder()
                .method(Method::POST)
                .uri(format!("{}/metrics", h.proxy.admin_url()))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let scrape = h.admin_get("/metrics").await;
    assert!(
        scrape.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );

    // admin.listen: null disables it.
    let off = Harness::with(
        ProxyOptions {
            admin: "null",
            ..Default::default()
        },
        false,
    )
    .await;
    assert!(off.proxy.admin.is_none());
    assert!(!off.proxy.logs().contains("admin listening"));
    assert_eq!(off.get("/_matrix/client/versions", None).await.status, 200);
}

#[tokio::test]
async fn request_id_is_propagated_or_generated() {
    let h = Harness::start().await;
    let v = h.login("alice").await;

    // The client's id goes upstream and comes back.
    h.hs.clear_requests();
    let auth = format!("Bearer {}", at(&v));
    let r = h
        .send(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &[("authorization", &auth), ("x-request-id", "client-id-42")],
            body(""),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "client-id-42");
    let seen = h.hs.requests_to("/account/whoami");
    assert_eq!(seen[0].headers["x-request-id"], "client-id-42");
    assert_eq!(seen[0].headers.get_all("x-request-id").iter().count(), 1);

    // None given: one is generated, the same upstream and back.
    h.hs.clear_requests();
    let r = h.whoami(&at(&v)).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        h.hs.requests_to("/account/whoami")[0].headers["x-request-id"],
        id.as_str()
    );
    // Each request gets its own.
    let r2 = h.whoami(&at(&v)).await;
    assert_ne!(r2.headers["x-request-id"], id.as_str());

    // An unreasonable one (too long, or with spaces) is replaced.
    let long = "x".repeat(200);
    for bad in [long.as_str(), "has spaces in it"] {
        h.hs.clear_requests();
        let r = h
            .send(
                Method::GET,
                "/_matrix/client/versions",
                &[("x-request-id", bad)],
                body(""),
            )
            .await;
        let got = r.headers["x-request-id"].to_str().unwrap();
        assert_ne!(got, bad);
        assert_eq!(got.len(), 32);
        assert_eq!(
            h.hs.requests_to("/versions")[0].headers["x-request-id"],
            got
        );
    }

    // The proxy's own answers carry it too (refresh is never forwarded; errors are made here).
    let r = h
        .send(
            Method::POST,
            "/_matrix/client/v3/refresh",
            &[("x-request-id", "refresh-id")],
            body(json!({"refresh_token": rt(&v)}).to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-request-id"], "refresh-id");
    let r = h
        .send(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &[
                ("authorization", "Bearer mrpat_garbage"),
                ("x-request-id", "error-id"),
            ],
            body(""),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.headers["x-request-id"], "error-id");

    // The proxy's own whoami call (for a homeserver token on /logout/all) carries it too.
    let plain = h.login_plain("bot").await;
    h.hs.clear_requests();
    let auth = format!("Bearer {}", at(&plain));
    let r = h
        .send(
            Method::POST,
            "/_matrix/client/v3/logout/all",
            &[("authorization", &auth), ("x-request-id", "logout-all-id")],
            body("{}"),
        )
        .await;
    assert_eq!(r.status, 200);
    let whoami = h.hs.requests_to("/account/whoami");
    assert_eq!(whoami.len(), 1);
    assert_eq!(whoami[0].headers["x-request-id"], "logout-all-id");
    assert_eq!(
        h.hs.requests_to("/logout/all")[0].headers["x-request-id"],
        "logout-all-id"
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = h.proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("request_id=\"client-id-42\"") && l.contains(" route="))
        .unwrap_or_else(|| panic!("no request line with the client's id:\n{logs}"));
    assert!(line.contains("route=\"passthrough\""), "{line}");
    assert!(line.contains("user_id=\"@alice:fake.test\""), "{line}");
}

/// Every token of a login → refresh → request → logout run, and what the logs and metrics
/// show of it: JSON lines with route, status, request id and user id, and no token anywhere.
#[tokio::test]
async fn json_logs_and_metrics_carry_no_tokens() {
    let h = Harness::with(
        ProxyOptions {
            log_format: "json",
            ..Default::default()
        },
        false,
    )
    .await;
    let mut secrets = Vec::new();
    let v = h.login("alice").await;
    secrets.extend([at(&v), rt(&v)]);
    let n = h.refresh(&rt(&v)).await.json();
    secrets.extend([at(&n), rt(&n)]);
    assert_eq!(h.whoami(&at(&n)).await.status, 200);
    h.get(
        &format!("/_matrix/client/v3/sync?timeout=0&access_token={}", at(&n)),
        None,
    )
    .await;
    assert_unknown_token(&h.refresh(&rt(&v)).await, false); // reuse: session revoked
    let w = h.login("alice").await;
    secrets.extend([at(&w), rt(&w)]);
    let r = h
        .post("/_matrix/client/v3/logout", Some(&at(&w)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    for r in h.hs.requests() {
        if let Some(t) = r.bearer() {
            secrets.push(t);
        }
    }
    let metrics = h.metrics().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = h.proxy.logs();

    // Every line is a JSON object.
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let requests: Vec<&Value> = lines.iter().filter(|l| l["message"] == "request").collect();
    // login, refresh, whoami, sync, refresh (reuse), login, logout: admin scrapes are not logged.
    assert_eq!(requests.len(), 7, "{logs}");
    for l in &requests {
        assert!(l["method"].is_string(), "{l}");
        assert!(l["route"].is_string(), "{l}");
        assert!(l["status"].is_u64(), "{l}");
        assert!(l["latency_ms"].is_u64(), "{l}");
        assert!(
            l["request_id"].as_str().is_some_and(|s| !s.is_empty()),
            "{l}"
        );
        // Route classes only: never a path or query.
        assert!(!l.to_string().contains("/_matrix"), "{l}");
    }
    let find = |route: &str, status: u64| {
        requests
            .iter()
            .find(|l| l["route"] == route && l["status"] == status)
            .unwrap_or_else(|| panic!("no {route} {status} line:\n{logs}"))
    };
    let alice = "@alice:fake.test";
    assert_eq!(find("login", 200)["user_id"], alice);
    assert_eq!(find("refresh", 200)["user_id"], alice);
    assert_eq!(find("passthrough", 200)["user_id"], alice);
    assert_eq!(find("logout", 200)["user_id"], alice);
    assert_eq!(find("logout", 200)["method"], "POST");
    assert!(find("refresh", 401).get("user_id").is_none());
    // Request ids are distinct per request.
    let ids: BTreeSet<&str> = requests
        .iter()
        .map(|l| l["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), requests.len());

    for (what, text) in [("logs", &logs), ("metrics", &metrics)] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a token appears in the {what}");
            if s.len() > 32 {
                assert!(
                    !text.contains(&s[s.len() - 16..]),
                    "part of a token appears in the {what}"
                );
            }
        }
        assert!(
            !text.contains("mrpat_") && !text.contains("mrprt_"),
            "{what}"
        );
        assert!(!text.contains("syt_fake_"), "{what}");
        assert!(!text.to_lowercase().contains("bearer"), "{what}");
    }
    // Metrics carry no user ids, device ids or paths either.
    assert!(!metrics.contains("alice"));
    assert!(!metrics.contains("/_matrix"));
    assert!(!metrics.contains("DEV"));
}

#[tokio::test]
async fn abandoned_requests_are_logged_and_leave_the_in_flight_gauge() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let auth = format!("Bearer {}", at(&v));
    let headers = [
        ("authorization", auth.as_str()),
        ("x-request-id", "gave-up"),
    ];
    let sync = h.send(
        Method::GET,
        "/_matrix/client/v3/sync?timeout=5000",
        &headers,
        body(""),
    );
    // The client gives up on its long poll.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sync)
            .await
            .is_err()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.proxy.logs().contains("abandoned") {
        assert!(Instant::now() < deadline, "{}", h.proxy.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = h.proxy.logs();
    let line = logs.lines().find(|l| l.contains("abandoned")).unwrap();
    assert!(line.contains("request_id=\"gave-up\""), "{line}");
    assert!(line.contains("route=\"passthrough\""), "{line}");
    eventually_metric(&h, "mrp_http_requests_in_flight", &[], 0.0).await;
}
