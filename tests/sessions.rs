//! Logout and devices: sessions follow the homeserver (DESIGN.md §2 "Logout and devices").

mod common;

use std::time::Duration;

use common::*;
use http::Method;
use serde_json::{Value, json};

async fn dead(h: &Harness, s: &Value) {
    assert_unknown_token(&h.whoami(&at(s)).await, false);
    assert_unknown_token(&h.refresh(&rt(s)).await, false);
}

async fn alive(h: &Harness, s: &Value) {
    assert_eq!(h.whoami(&at(s)).await.status, 200);
}

#[tokio::test]
async fn logout_purges_the_whole_chain() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let other = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    for path in ["/_matrix/client/v3/logout", "/_matrix/client/r0/logout"] {
        let s = if path.contains("v3") {
            n.clone()
        } else {
            h.login("alice").await
        };
        h.hs.clear_requests();
        let r = h.post(path, Some(&at(&s)), json!({})).await;
        assert_eq!(r.status, 200);
        // Forwarded with the upstream token.
        assert!(FakeHs::is_upstream_token(
            &h.hs.requests_to("/logout")[0].bearer().unwrap()
        ));
        dead(&h, &s).await;
    }
    // Earlier tokens of the chain are dead too.
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
    assert_unknown_token(&h.refresh(&rt(&v)).await, false);
    alive(&h, &other).await;
}

#[tokio::test]
async fn logout_with_an_expired_access_token_still_logs_out() {
    let h = Harness::with_access_and_clock("1s").await;
    let v = h.login("alice").await;
    h.advance_clock(Duration::from_millis(1000));
    let r = h
        .post("/_matrix/client/v3/logout", Some(&at(&v)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    let ut = h.hs.requests_to("/logout")[0].bearer().unwrap();
    assert!(!h.hs.is_live(&ut), "upstream session ended");
    assert_unknown_token(&h.refresh(&rt(&v)).await, false);
    // An expired token of a revoked session is a hard logout.
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
}

#[tokio::test]
async fn purge_only_after_upstream_200() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    // Conduit answers /logout/all with 401 for normal users: nothing purged.
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/logout/all".into(),
        status: 500,
        body: json!({"errcode": "M_UNKNOWN"}),
        delay: None,
        times: Some(1),
    });
    let r = h
        .post("/_matrix/client/v3/logout/all", Some(&at(&v)), json!({}))
        .await;
    assert_eq!(r.status, 500);
    alive(&h, &v).await;
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/logout".into(),
        status: 429,
        body: json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 5}),
        delay: None,
        times: Some(1),
    });
    let r = h
        .post("/_matrix/client/v3/logout", Some(&at(&v)), json!({}))
        .await;
    assert_eq!(r.status, 429);
    alive(&h, &v).await;
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
}

#[tokio::test]
async fn logout_all_purges_every_session_of_the_user_only() {
    let h = Harness::start().await;
    let a1 = h.login("alice").await;
    let a2 = h.login("alice").await;
    let a3 = h.login("alice").await;
    let a3n = h.refresh(&rt(&a3)).await.json();
    let b = h.login("bob").await;
    let r = h
        .post("/_matrix/client/v3/logout/all", Some(&at(&a1)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &a1).await;
    dead(&h, &a2).await;
    dead(&h, &a3n).await;
    alive(&h, &b).await;
}

#[tokio::test]
async fn logout_all_with_a_homeserver_token_purges_the_users_proxy_sessions() {
    let h = Harness::start().await;
    let a1 = h.login("alice").await;
    let plain = h.login_plain("alice").await;
    let r = h
        .post(
            "/_matrix/client/v3/logout/all",
            Some(&at(&plain)),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &a1).await;
}

/// An application service acting for a user (`?user_id=`, spec "Identity assertion") ends that
/// user's sessions, not its sender's: the proxy's whoami asks about the asserted user.
#[tokio::test]
async fn logout_all_by_an_appservice_for_a_user_purges_that_users_sessions() {
    let h = Harness::start().await;
    let a = h.login("alice").await;
    let b = h.login("bob").await;
    let r = h
        .post(
            &format!(
                "/_matrix/client/v3/logout/all?user_id=%40alice%3A{}",
                fake_hs::SERVER
            ),
            Some(fake_hs::AS_TOKEN),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &a).await;
    alive(&h, &b).await;
    // The proxy's own whoami (before the logout) asked about alice.
    let asked = h.hs.requests_to("/account/whoami");
    assert_eq!(
        asked[0].query.as_deref(),
        Some("user_id=%40alice%3Afake.test")
    );
}

#[tokio::test]
async fn delete_device_with_uia_purges_that_device() {
    let h = Harness::start().await;
    let phone = h.login_with("alice", json!({"device_id": "PHONE"})).await;
    let laptop = h.login_with("alice", json!({"device_id": "LAPTOP"})).await;
    let weird = h.login_with("alice", json!({"device_id": "D H/x"})).await;
    // UIA round: 401 passes through, nothing purged.
    let r = h
        .send(
            Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            &[("authorization", &format!("Bearer {}", at(&laptop)))],
            body("{}"),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["session"], "uia-session-1");
    alive(&h, &phone).await;
    alive(&h, &laptop).await;
    let auth =
        json!({"auth": {"type": "m.login.password", "session": "uia-session-1", "password": "p"}})
            .to_string();
    let r = h
        .send(
            Method::DELETE,
            "/_matrix/client/v3/devices/PHONE",
            &[("authorization", &format!("Bearer {}", at(&laptop)))],
            body(auth.clone()),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &phone).await;
    alive(&h, &laptop).await;
    // Percent-encoded device id.
    let r = h
        .send(
            Method::DELETE,
            "/_matrix/client/r0/devices/D%20H%2Fx",
            &[("authorization", &format!("Bearer {}", at(&laptop)))],
            body(auth),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &weird).await;
    alive(&h, &laptop).await;
}

#[tokio::test]
async fn delete_devices_with_uia_purges_those_devices() {
    let h = Harness::start().await;
    let d1 = h.login_with("alice", json!({"device_id": "D1"})).await;
    let d2 = h.login_with("alice", json!({"device_id": "D2"})).await;
    let d3 = h.login_with("alice", json!({"device_id": "D3"})).await;
    let r = h
        .post(
            "/_matrix/client/v3/delete_devices",
            Some(&at(&d3)),
            json!({"devices": ["D1", "D2"]}),
        )
        .await;
    assert_eq!(r.status, 401);
    alive(&h, &d1).await;
    let r = h
        .post(
            "/_matrix/client/v3/delete_devices",
            Some(&at(&d3)),
            json!({"devices": ["D1", "D2"], "auth": {"type": "m.login.password", "session": "uia-session-1"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    // The homeserver received the body intact.
    assert_eq!(
        h.hs.requests_to("/delete_devices").last().unwrap().json()["devices"],
        json!(["D1", "D2"])
    );
    dead(&h, &d1).await;
    dead(&h, &d2).await;
    alive(&h, &d3).await;
}

#[tokio::test]
async fn password_change_keeps_the_requester_and_ends_the_others() {
    let h = Harness::start().await;
    let me = h.login_with("alice", json!({"device_id": "ME"})).await;
    let other = h.login_with("alice", json!({"device_id": "OTHER"})).await;
    let auth = json!({"type": "m.login.password", "session": "uia-session-1"});
    // logout_devices: false → nobody logged out.
    let r = h
        .post(
            "/_matrix/client/v3/account/password",
            Some(&at(&me)),
            json!({"new_password": "n", "logout_devices": false, "auth": auth}),
        )
        .await;
    assert_eq!(r.status, 200);
    alive(&h, &other).await;
    // Default true.
    let r = h
        .post(
            "/_matrix/client/v3/account/password",
            Some(&at(&me)),
            json!({"new_password": "n", "auth": auth}),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &other).await;
    alive(&h, &me).await;
    // The requester keeps its refresh token.
    assert_eq!(h.refresh(&rt(&me)).await.status, 200);
}

#[tokio::test]
async fn deactivation_purges_every_session_of_the_user() {
    let h = Harness::start().await;
    let a1 = h.login("alice").await;
    let a2 = h.login("alice").await;
    let b = h.login("bob").await;
    let r = h
        .post(
            "/_matrix/client/v3/account/deactivate",
            Some(&at(&a1)),
            json!({"auth": {"type": "m.login.password", "session": "s"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    dead(&h, &a1).await;
    dead(&h, &a2).await;
    alive(&h, &b).await;
}

#[tokio::test]
async fn odd_spellings_are_not_intercepted_and_do_not_purge() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    // The homeserver does not route these to logout; the proxy forwards them as any request.
    for p in [
        "/_matrix/client/v3/logout/",
        "/_matrix/client/v3//logout",
        "/_matrix/client/v3/%6Cogout",
    ] {
        let r = h.post(p, Some(&at(&v)), json!({})).await;
        assert_eq!(r.status, 200, "{p}");
        alive(&h, &v).await;
    }
}
