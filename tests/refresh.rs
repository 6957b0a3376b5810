//! /refresh served by the proxy (DESIGN.md §2 "/refresh").

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use http::Method;
use serde_json::json;

const REFRESH_PATHS: &[&str] = &[
    "/_matrix/client/v3/refresh",
    "/_matrix/client/r0/refresh",
    "/_matrix/client/v1/refresh",
    "/_matrix/client/unstable/refresh",
    "/_matrix/client/unstable/org.matrix.msc2918/refresh",
];

#[tokio::test]
async fn refresh_on_every_path_rotates_and_is_never_forwarded() {
    let h = Harness::start().await;
    let mut v = h.login("alice").await;
    for path in REFRESH_PATHS {
        let r = h.post(path, None, json!({"refresh_token": rt(&v)})).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json());
        let n = r.json();
        assert_ne!(at(&n), at(&v));
        assert_ne!(rt(&n), rt(&v));
        assert_eq!(n["expires_in_ms"], 3_600_000);
        assert_eq!(r.headers["cache-control"], "no-store");
        // Same user and device behind the new token.
        let who = h.whoami(&at(&n)).await;
        assert_eq!(who.json()["user_id"], "@alice:fake.test");
        assert_eq!(who.json()["device_id"], v["device_id"]);
        v["access_token"] = n["access_token"].clone();
        v["refresh_token"] = n["refresh_token"].clone();
    }
    assert!(h.hs.requests_to("/refresh").is_empty());
}

#[tokio::test]
async fn refresh_needs_no_credential_and_ignores_one() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let r = h
        .send(
            Method::POST,
            "/_matrix/client/v3/refresh?access_token=garbage",
            &[("authorization", "Bearer mrpat_nonsense")],
            body(json!({"refresh_token": rt(&v), "extra": [1]}).to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn body_errors_and_methods() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let before = h.redis.dump();
    let cases: &[(&str, u16, &str)] = &[
        ("not json", 400, "M_NOT_JSON"),
        ("", 400, "M_NOT_JSON"),
        ("{\"refresh_token\": ", 400, "M_NOT_JSON"),
        ("[1,2]", 400, "M_BAD_JSON"),
        ("\"mrprt_x\"", 400, "M_BAD_JSON"),
        ("{}", 400, "M_MISSING_PARAM"),
        ("{\"refresh_token\": 5}", 400, "M_INVALID_PARAM"),
        ("{\"refresh_token\": null}", 400, "M_INVALID_PARAM"),
        ("{\"refresh_token\": \"garbage\"}", 401, "M_UNKNOWN_TOKEN"),
        ("{\"refresh_token\": \"\"}", 401, "M_UNKNOWN_TOKEN"),
    ];
    for (b, status, code) in cases {
        let r = h
            .send(
                Method::POST,
                "/_matrix/client/v3/refresh",
                &[],
                body(b.to_string()),
            )
            .await;
        assert_eq!(r.status, *status, "{b:?}");
        assert_eq!(r.errcode(), *code, "{b:?}");
    }
    // An access token is not a refresh token; a tampered refresh token is unknown.
    let r = h.refresh(&at(&v)).await;
    assert_unknown_token(&r, false);
    let mut tampered = rt(&v);
    tampered.replace_range(10..11, if &tampered[10..11] == "A" { "B" } else { "A" });
    assert_unknown_token(&h.refresh(&tampered).await, false);
    // Oversized body.
    let r = h
        .post(
            "/_matrix/client/v3/refresh",
            None,
            json!({"refresh_token": "x".repeat(100_000)}),
        )
        .await;
    assert_eq!(r.status, 413);
    // Methods.
    let r = h
        .send(Method::OPTIONS, "/_matrix/client/v3/refresh", &[], body(""))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    assert!(r.headers.contains_key("access-control-allow-methods"));
    for m in [Method::GET, Method::PUT, Method::DELETE] {
        let r = h
            .send(m.clone(), "/_matrix/client/v3/refresh", &[], body(""))
            .await;
        assert_eq!(r.status, 405, "{m}");
        assert_eq!(r.errcode(), "M_UNRECOGNIZED");
    }
    assert_eq!(h.redis.dump(), before, "bad input changed nothing");
    // The session still works.
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
    assert!(h.hs.requests_to("/refresh").is_empty());
}

#[tokio::test]
async fn grace_replay_returns_identical_pair_until_successor_used() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let old_rt = rt(&v);
    let first = h.refresh(&old_rt).await.json();
    // Replays inside the grace: identical pair.
    for _ in 0..3 {
        let again = h.refresh(&old_rt).await;
        assert_eq!(again.status, 200);
        let again = again.json();
        assert_eq!(at(&again), at(&first));
        assert_eq!(rt(&again), rt(&first));
        let left = again["expires_in_ms"].as_u64().unwrap();
        assert!(left <= 3_600_000 && left > 3_500_000, "{left}");
    }
    // The old access token keeps working until it expires (never rejected early).
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    // First use of the new access token ends the grace.
    assert_eq!(h.whoami(&at(&first)).await.status, 200);
    assert_unknown_token(&h.refresh(&old_rt).await, false);
}

/// Concurrent refreshes with one refresh token: each peeks a live token, one rotation wins and
/// every other finds the token rotated inside `rotate.lua` (its lost-race branch, which reads the
/// successor then), so all get the winner's pair (DESIGN.md §2 "/refresh": idempotent).
#[tokio::test]
async fn concurrent_refreshes_of_one_token_all_get_the_same_pair() {
    let h = Harness::start().await;
    for round in 0..5 {
        let v = h.login("alice").await;
        let old_rt = rt(&v);
        let answers = futures_util::future::join_all((0..12).map(|_| h.refresh(&old_rt))).await;
        let first = answers[0].json();
        for r in &answers {
            assert_eq!(r.status, 200, "round {round}");
            let j = r.json();
            assert_eq!(at(&j), at(&first), "round {round}");
            assert_eq!(rt(&j), rt(&first), "round {round}");
        }
        // The winner's pair works.
        assert_eq!(h.whoami(&at(&first)).await.status, 200);
        assert_eq!(h.refresh(&rt(&first)).await.status, 200);
    }
}

#[tokio::test]
async fn using_the_new_refresh_token_ends_the_old_ones_grace() {
    let h = Harness::with(
        ProxyOptions {
            revoke_on_reuse: false,
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    let r1 = h.refresh(&rt(&v)).await.json();
    let r2 = h.refresh(&rt(&r1)).await.json();
    assert_ne!(rt(&r2), rt(&r1));
    // Old RT is now past its grace: unknown, and (reuse detection off) the session lives.
    assert_unknown_token(&h.refresh(&rt(&v)).await, false);
    assert_eq!(h.whoami(&at(&r2)).await.status, 200);
    assert_eq!(h.refresh(&rt(&r2)).await.status, 200);
}

#[tokio::test]
async fn reuse_after_grace_revokes_the_whole_session() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let other = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    assert_eq!(h.whoami(&at(&n)).await.status, 200); // grace over
    let r = h.refresh(&rt(&v)).await;
    assert_unknown_token(&r, false);
    // Every token of that session is dead now …
    assert_unknown_token(&h.whoami(&at(&n)).await, false);
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
    assert_unknown_token(&h.refresh(&rt(&n)).await, false);
    // … the user's other session is not.
    assert_eq!(h.whoami(&at(&other)).await.status, 200);
    assert!(h.proxy.logs().contains("refresh_token_reuse"));
}

/// The set of used refresh token ids is capped (64, up to 7 more between trims): the trim keeps
/// the newest ids, so a token whose grace ended last is still recognised as a reuse after many
/// refreshes, and the oldest are forgotten. (Its scores are the negated time of use since
/// issue 11's Redis work; sets written before rank their ids after these and lose them first.)
#[tokio::test]
async fn reuse_of_the_latest_used_token_is_detected_after_many_refreshes() {
    let o = ProxyOptions {
        extra: "rate_limit:\n  refresh: {per_second: 1, burst: 200}\n".into(),
        ..Default::default()
    };
    let h = Harness::with(o, false).await;
    let v = h.login("alice").await;
    let mut spent = vec![rt(&v)];
    let mut latest = v;
    for _ in 0..100 {
        let r = h.refresh(spent.last().unwrap()).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        latest = r.json();
        spent.push(rt(&latest));
    }
    // Each rotation ended the grace of the token before the one it spent: all but the last two
    // of `spent` are used ids now; the oldest of them were trimmed away.
    let oldest = &spent[0];
    assert_unknown_token(&h.refresh(oldest).await, false);
    assert_eq!(
        h.whoami(&at(&latest)).await.status,
        200,
        "an old id is forgotten, no reuse"
    );
    let newest_used = &spent[spent.len() - 3];
    assert_unknown_token(&h.refresh(newest_used).await, false);
    assert!(h.proxy.logs().contains("refresh_token_reuse"));
    assert_unknown_token(&h.whoami(&at(&latest)).await, false);
}

#[tokio::test]
async fn fifty_parallel_refreshes_yield_one_identical_pair() {
    // Fifty refreshes of one session at once is past the default refresh burst (20), which is
    // what tests/ratelimit.rs checks; here the budget is raised to test the concurrency alone.
    let o = ProxyOptions {
        extra: "rate_limit:\n  refresh: {per_second: 1, burst: 100}\n".into(),
        ..Default::default()
    };
    let h = std::sync::Arc::new(Harness::with(o, false).await);
    let v = h.login("alice").await;
    let token = rt(&v);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let h = h.clone();
        let t = token.clone();
        tasks.push(tokio::spawn(async move { h.refresh(&t).await }));
    }
    let mut pairs = HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.json());
        let v = r.json();
        pairs.insert((at(&v), rt(&v)));
    }
    assert_eq!(pairs.len(), 1, "all callers got the same pair");
    let (a, r) = pairs.into_iter().next().unwrap();
    assert_eq!(h.whoami(&a).await.status, 200);
    assert_eq!(h.refresh(&r).await.status, 200);
}

#[tokio::test]
async fn expired_access_token_is_soft_logout_then_refresh_works() {
    let h = Harness::with_access_and_clock("1s").await;
    let v = h.login("alice").await;
    assert_eq!(v["expires_in_ms"], 1000);
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    h.advance_clock(Duration::from_millis(1000));
    h.hs.clear_requests();
    assert_unknown_token(&h.whoami(&at(&v)).await, true);
    assert!(
        h.hs.requests().is_empty(),
        "expired tokens are not forwarded"
    );
    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    assert_eq!(h.whoami(&at(&n.json())).await.status, 200);
}

#[tokio::test]
async fn refresh_idle_expiry_is_403_forbidden() {
    let h = Harness::with(
        ProxyOptions {
            access: "1s",
            refresh: "\"2s\"",
            test_clock: true,
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    h.advance_clock(Duration::from_millis(2000));
    let r = h.refresh(&rt(&v)).await;
    assert_eq!(r.status, 403, "{:?}", r.json());
    assert_eq!(r.errcode(), "M_FORBIDDEN");
}

#[tokio::test]
async fn session_lifetime_caps_tokens_and_ends_with_403() {
    let h = Harness::with(
        ProxyOptions {
            access: "1h",
            session: "\"2s\"",
            test_clock: true,
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    // The access token never outlives the session.
    assert!(v["expires_in_ms"].as_u64().unwrap() <= 2000);
    let n = h.refresh(&rt(&v)).await.json();
    assert!(n["expires_in_ms"].as_u64().unwrap() <= 2000);
    h.advance_clock(Duration::from_millis(2000));
    assert_unknown_token(&h.whoami(&at(&n)).await, true);
    let r = h.refresh(&rt(&n)).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.errcode(), "M_FORBIDDEN");
}

#[tokio::test]
async fn redis_holds_no_tokens_in_clear_and_every_key_has_a_ttl() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    h.whoami(&at(&n)).await;
    let dump = h.redis.dump();
    assert!(!dump.is_empty());
    for secret in [at(&v), rt(&v), at(&n), rt(&n)] {
        assert!(!dump.contains(&secret[6..40]), "token material in Redis");
    }
    // The upstream token is sealed.
    let ut = h.hs.requests_to("/whoami")[0].bearer().unwrap();
    assert!(!dump.contains(&ut), "upstream token in clear in Redis");
    for key in h.redis.cli(&["--scan"]).lines() {
        let ttl: i64 = h.redis.cli(&["PTTL", key]).trim().parse().unwrap();
        assert!(ttl > 0, "{key} has no TTL");
    }
}
