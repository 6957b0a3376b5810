//! /login and /register interception (DESIGN.md §2 "/login and /register").

mod common;

use common::*;
use http::Method;
use serde_json::json;

const LOGIN_PATHS: &[&str] = &[
    "/_matrix/client/v3/login",
    "/_matrix/client/r0/login",
    "/_matrix/client/api/v1/login",
    "/_matrix/client/unstable/login",
];

#[tokio::test]
async fn login_with_flag_on_every_path_gets_proxy_pair_and_keeps_other_fields() {
    let h = Harness::start().await;
    for (i, path) in LOGIN_PATHS.iter().enumerate() {
        for flag in ["refresh_token", "org.matrix.msc2918.refresh_token"] {
            h.hs.clear_requests();
            let r = h
                .post(
                    path,
                    None,
                    json!({"type": "m.login.password", "user": format!("u{i}"), "password": "p", flag: true, "custom": 5}),
                )
                .await;
            assert_eq!(r.status, 200, "{path} {flag}");
            let v = r.json();
            let access = at(&v);
            assert!(access.starts_with("mrpat_"), "{path}: {v}");
            assert!(rt(&v).starts_with("mrprt_"));
            assert_eq!(v["expires_in_ms"], 3_600_000);
            assert_eq!(v["user_id"], format!("@u{i}:fake.test"));
            assert!(v["device_id"].is_string());
            assert_eq!(
                v["well_known"]["m.homeserver"]["base_url"],
                "https://fake.test"
            );
            assert_eq!(v["unknown_field"]["kept"], true);
            assert_eq!(r.headers["cache-control"], "no-store");
            // Upstream saw the body without any refresh flag, other fields intact.
            let seen = h.hs.requests_to("/login");
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].path, *path);
            let sent = seen[0].json();
            assert!(sent.get("refresh_token").is_none(), "{sent}");
            assert!(sent.get("org.matrix.msc2918.refresh_token").is_none());
            assert_eq!(sent["custom"], 5);
            assert_eq!(sent["password"], "p");
            // The UT never reached the client, and the proxy token works.
            assert!(!r.body.windows(9).any(|w| w == b"syt_fake_"));
            let who = h.whoami(&access).await;
            assert_eq!(who.status, 200);
            assert_eq!(who.json()["user_id"], format!("@u{i}:fake.test"));
        }
    }
}

#[tokio::test]
async fn stable_flag_wins_over_unstable() {
    let h = Harness::start().await;
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "a", "password": "p", "refresh_token": false, "org.matrix.msc2918.refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(at(&r.json()).starts_with("syt_fake_"));
    assert!(r.json().get("refresh_token").is_none());
    let sent = h.hs.requests_to("/login")[0].json();
    assert!(
        sent.get("refresh_token").is_none()
            && sent.get("org.matrix.msc2918.refresh_token").is_none()
    );
}

#[tokio::test]
async fn non_boolean_flag_is_rejected_and_nothing_forwarded() {
    let h = Harness::start().await;
    for bad in [
        json!("true"),
        json!(1),
        json!(null),
        json!({}),
        json!([true]),
    ] {
        for flag in ["refresh_token", "org.matrix.msc2918.refresh_token"] {
            let r = h
                .post(
                    "/_matrix/client/v3/login",
                    None,
                    json!({"type": "m.login.password", flag: bad}),
                )
                .await;
            assert_eq!(r.status, 400, "{flag}={bad}");
            assert_eq!(r.errcode(), "M_INVALID_PARAM");
        }
    }
    assert!(h.hs.requests_to("/login").is_empty());
    assert!(h.redis.dump().is_empty());
}

#[tokio::test]
async fn without_flag_the_upstream_response_passes_untouched() {
    let h = Harness::start().await;
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "bot", "password": "p"}),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    let ut = at(&v);
    assert!(FakeHs::is_upstream_token(&ut));
    assert!(v.get("refresh_token").is_none() && v.get("expires_in_ms").is_none());
    // The homeserver's token is forwarded untouched and never expires at the proxy.
    let who = h.whoami(&ut).await;
    assert_eq!(who.status, 200);
    assert_eq!(
        h.hs.requests_to("/whoami")[0].bearer().as_deref(),
        Some(ut.as_str())
    );
    assert!(
        h.redis.dump().is_empty(),
        "nothing stored for non-refresh logins"
    );
}

#[tokio::test]
async fn upstream_errors_and_uia_pass_through_and_nothing_is_minted() {
    let h = Harness::start().await;
    // Wrong password → 403 as is.
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "a", "password": "wrong", "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.errcode(), "M_FORBIDDEN");
    // UIA 401 on register passes with flows and session, then the final 200 is wrapped.
    let r = h
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({"username": "needs_uia", "password": "p", "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["session"], "uia-session-1");
    assert!(r.json()["flows"].is_array());
    // 429 passes through with its fields.
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/login".into(),
        status: 429,
        body: json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1234}),
        delay: None,
        times: Some(1),
    });
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "a", "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["retry_after_ms"], 1234);
    assert!(h.redis.dump().is_empty());
    // Final stage of UIA registration.
    let r = h
        .post(
            "/_matrix/client/r0/register",
            None,
            json!({"username": "needs_uia", "password": "p", "auth": {"type": "m.login.dummy", "session": "uia-session-1"}, "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(at(&r.json()).starts_with("mrpat_"));
    assert!(rt(&r.json()).starts_with("mrprt_"));
    assert_eq!(h.whoami(&at(&r.json())).await.status, 200);
}

#[tokio::test]
async fn guests_and_inhibit_login_never_get_refresh_tokens() {
    let h = Harness::start().await;
    let r = h
        .post(
            "/_matrix/client/v3/register?kind=guest",
            None,
            json!({"refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("refresh_token").is_none());
    assert!(FakeHs::is_upstream_token(&at(&r.json())));
    assert!(
        h.hs.requests_to("/register")[0]
            .json()
            .get("refresh_token")
            .is_none()
    );
    let r = h
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({"username": "quiet", "password": "p", "inhibit_login": true, "refresh_token": true}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("refresh_token").is_none() && r.json().get("access_token").is_none());
    let sent = h.hs.requests_to("/register").pop().unwrap().json();
    assert!(sent.get("refresh_token").is_none());
    assert!(h.redis.dump().is_empty());
}

#[tokio::test]
async fn proxy_tokens_on_login_are_dropped_foreign_ones_kept() {
    let h = Harness::start().await;
    let first = h.login("alice").await;
    let stale = at(&first);
    // A stale (even garbage) proxy token in the header and in the query are removed.
    let garbage = format!("mrpat_{}", "A".repeat(72));
    for tok in [stale.as_str(), garbage.as_str()] {
        h.hs.clear_requests();
        let auth = format!("Bearer {tok}");
        let r = h
            .send(
                Method::POST,
                &format!("/_matrix/client/v3/login?access_token={tok}&x=1"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body(
                    json!({"type": "m.login.password", "user": "alice", "refresh_token": true})
                        .to_string(),
                ),
            )
            .await;
        assert_eq!(r.status, 200);
        let seen = &h.hs.requests_to("/login")[0];
        assert!(seen.headers.get("authorization").is_none());
        assert_eq!(seen.query.as_deref(), Some("x=1"));
    }
    // An appservice token stays.
    h.hs.clear_requests();
    let r = h
        .send(
            Method::POST,
            "/_matrix/client/v3/login",
            &[("authorization", "Bearer as_token_xyz"), ("content-type", "application/json")],
            body(json!({"type": "m.login.application_service", "identifier": {"type": "m.id.user", "user": "bridge"}}).to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.hs.requests_to("/login")[0].bearer().as_deref(),
        Some("as_token_xyz")
    );
}

#[tokio::test]
async fn relogin_with_same_device_revokes_that_devices_earlier_sessions() {
    let h = Harness::start().await;
    let a = h.login_with("alice", json!({"device_id": "PHONE"})).await;
    let other = h.login_with("alice", json!({"device_id": "LAPTOP"})).await;
    let b = h.login_with("alice", json!({"device_id": "PHONE"})).await;
    assert_eq!(b["device_id"], "PHONE");
    assert_unknown_token(&h.whoami(&at(&a)).await, false);
    assert_unknown_token(&h.refresh(&rt(&a)).await, false);
    assert_eq!(h.whoami(&at(&b)).await.status, 200);
    assert_eq!(h.whoami(&at(&other)).await.status, 200);
    // No upstream /logout was called for it.
    assert!(h.hs.requests_to("/logout").is_empty());
}

#[tokio::test]
async fn upstream_own_refresh_token_passes_untouched() {
    let h = Harness::start().await;
    h.hs.answer(
        "/login",
        200,
        json!({"user_id": "@a:fake.test", "device_id": "D", "access_token": "up_at", "refresh_token": "up_rt", "expires_in_ms": 60000}),
    );
    let r = h.login("a").await;
    assert_eq!(r["access_token"], "up_at");
    assert_eq!(r["refresh_token"], "up_rt");
    assert_eq!(r["expires_in_ms"], 60000);
}

#[tokio::test]
async fn oversized_or_odd_login_bodies() {
    let h = Harness::start().await;
    let big = json!({"type": "m.login.password", "pad": "x".repeat(70 * 1024)});
    let r = h.post("/_matrix/client/v3/login", None, big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.errcode(), "M_TOO_LARGE");
    // Not JSON: forwarded for the homeserver to judge, nothing minted.
    let r = h
        .send(
            Method::POST,
            "/_matrix/client/v3/login",
            &[],
            body("not json"),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.hs.requests_to("/login").last().unwrap().body, "not json");
    // GET /login (flows) is forwarded.
    h.hs.answer(
        "/login",
        200,
        json!({"flows": [{"type": "m.login.password"}]}),
    );
    let r = h.get("/_matrix/client/v3/login", None).await;
    assert_eq!(r.json()["flows"][0]["type"], "m.login.password");
}
