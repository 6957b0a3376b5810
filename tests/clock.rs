//! One clock for token expiry (issue 9 point 6c): Redis `TIME`, read inside the scripts. The
//! proxy's own wall clock decides nothing, so replicas whose clocks disagree agree on every
//! token; tests move the expiry clock with the test clock offset instead of sleeping.
mod common;

use std::time::{Duration, SystemTime};

use common::skew::wall_clock_skew;
use common::*;
use serde_json::Value;

const HOUR: Duration = Duration::from_secs(3600);
const HOUR_MS: u64 = 3_600_000;

fn opts() -> ProxyOptions {
    ProxyOptions {
        access: "1h",
        log_format: "json",
        test_clock: true,
        ..Default::default()
    }
}

/// A replica whose wall clock runs `secs` off (checked in its log timestamps).
fn skewed(h: &Harness, secs: i64) -> ProxyProcess {
    let p = h.replica(&ProxyOptions {
        env: wall_clock_skew(secs),
        ..opts()
    });
    let logs = p.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("listening on"))
        .expect("startup log line");
    let v: Value = serde_json::from_str(line).unwrap();
    let logged = humantime::parse_rfc3339_weak(v["timestamp"].as_str().unwrap()).unwrap();
    let now = SystemTime::now();
    let off = match logged.duration_since(now) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    assert!(
        (off - secs).abs() < 120,
        "the skew shim is not in effect: logged {off} s off, wanted {secs}"
    );
    p
}

/// Redis `TIME` in ms.
fn redis_now_ms(h: &Harness) -> u64 {
    let t = h.redis.cli(&["TIME"]);
    let mut it = t.lines();
    let s: u64 = it.next().unwrap().trim().parse().unwrap();
    let us: u64 = it.next().unwrap().trim().parse().unwrap();
    s * 1000 + us / 1000
}

/// The stored `aexp` of an access token's session.
fn stored_access_expiry(h: &Harness, access_token: &str) -> u64 {
    // A token's body starts with its session id (base64url, after the 6-character prefix):
    // 21 characters of it are those of the session's tag.
    let keys = h.redis.cli(&["--scan", "--pattern", "mrp:{*}:s"]);
    let key = keys
        .lines()
        .find(|k| {
            let tag = &k[5..k.len() - 3];
            access_token[6..].starts_with(&tag[..21])
        })
        .expect("the token's session");
    h.redis.cli(&["HGET", key, "aexp"]).trim().parse().unwrap()
}

fn expires_in(v: &Value) -> u64 {
    v["expires_in_ms"].as_u64().expect("expires_in_ms")
}

#[tokio::test]
async fn replicas_with_skewed_wall_clocks_agree_on_token_expiry() {
    let h = Harness::with(opts(), false).await;
    let ahead = skewed(&h, 3600);
    let behind = skewed(&h, -3600);
    let (a, b, c) = (h.via(&h.proxy), h.via(&ahead), h.via(&behind));

    // Minted on each replica, valid on every other one, each with a full hour.
    for (name, minter) in [("unskewed", &a), ("+1 h", &b), ("-1 h", &c)] {
        let v = minter.login("alice").await;
        assert_eq!(expires_in(&v), HOUR_MS, "minted on {name}");
        // Stored on Redis' clock, whatever the minting replica's wall clock says.
        let left = stored_access_expiry(&h, &at(&v)).abs_diff(redis_now_ms(&h) + HOUR_MS);
        assert!(
            left < 60_000,
            "minted on {name}: aexp {left} ms off Redis TIME + 1 h"
        );
        for (other, r) in [("unskewed", &a), ("+1 h", &b), ("-1 h", &c)] {
            let w = r.whoami(&at(&v)).await;
            assert_eq!(
                w.status,
                200,
                "minted on {name}, used on {other}: {:?}",
                w.json()
            );
        }
    }

    // A grace replay tells what is left of the successor's lifetime: the same on every replica.
    let v = a.login("bob").await;
    let n = a.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    let n = n.json();
    assert_eq!(expires_in(&n), HOUR_MS);
    for (name, r) in [("unskewed", &a), ("+1 h", &b), ("-1 h", &c)] {
        let g = r.refresh(&rt(&v)).await;
        assert_eq!(g.status, 200, "grace replay on {name}");
        let g = g.json();
        assert_eq!(at(&g), at(&n), "same pair on {name}");
        let left = expires_in(&g);
        assert!(
            left <= HOUR_MS && left > HOUR_MS - 60_000,
            "grace replay on {name}: expires_in_ms {left}"
        );
    }

    // Expiry comes from the expiry clock (Redis TIME + the test offset), not the wall clock:
    // an hour later on the unskewed replica the token is expired there, and still valid on the
    // replica whose wall clock is an hour ahead but whose expiry clock did not move.
    h.advance_clock(HOUR + Duration::from_secs(1));
    assert_unknown_token(&a.whoami(&at(&n)).await, true);
    assert_eq!(b.whoami(&at(&n)).await.status, 200);
    assert_eq!(c.whoami(&at(&n)).await.status, 200);
    // Moved there too: both agree it expired.
    ahead.advance_clock(HOUR + Duration::from_secs(1));
    assert_unknown_token(&b.whoami(&at(&n)).await, true);
    // The refresh token still works from anywhere.
    assert_eq!(c.refresh(&rt(&n)).await.status, 200);
}

#[tokio::test]
async fn access_expiry_follows_the_test_clock_to_the_millisecond_of_its_lifetime() {
    let h = Harness::with(opts(), false).await;
    let v = h.login("alice").await;
    h.advance_clock(HOUR - Duration::from_secs(30));
    assert_eq!(h.whoami(&at(&v)).await.status, 200, "30 s left");
    h.advance_clock(Duration::from_secs(31));
    assert_unknown_token(&h.whoami(&at(&v)).await, true);
    // A refresh after expiry issues a pair with a full lifetime from the (moved) clock.
    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    assert_eq!(expires_in(&n.json()), HOUR_MS);
    assert_eq!(h.whoami(&at(&n.json())).await.status, 200);
}

#[tokio::test]
async fn superseded_marker_answers_soft_logout_until_its_retention_ends() {
    let h = Harness::with(opts(), false).await;
    let v = h.login("alice").await;
    // Three generations, each used: the first access token is a marker only.
    let mut cur = v.clone();
    for _ in 0..3 {
        let n = h.refresh(&rt(&cur)).await.json();
        assert_eq!(h.whoami(&at(&n)).await.status, 200);
        cur = n;
    }
    assert_unknown_token(&h.whoami(&at(&v)).await, true);
    // Its expiry (1 h) plus the retention of superseded tokens (1 h), on the expiry clock.
    h.advance_clock(2 * HOUR - Duration::from_secs(60));
    assert_unknown_token(&h.whoami(&at(&v)).await, true);
    h.advance_clock(Duration::from_secs(120));
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
    // The session itself lives on: its refresh token still works.
    assert_eq!(h.refresh(&rt(&cur)).await.status, 200);
}

#[tokio::test]
async fn session_end_caps_tokens_and_ends_grace_on_the_redis_clock() {
    let h = Harness::with(
        ProxyOptions {
            session: "\"2h\"",
            ..opts()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    assert_eq!(expires_in(&v), HOUR_MS);
    // 90 minutes in, a new pair lives only until the session's end: 30 minutes.
    h.advance_clock(Duration::from_secs(90 * 60));
    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    let n = n.json();
    let left = expires_in(&n);
    assert!(
        left <= 30 * 60_000 && left > 29 * 60_000,
        "expires_in_ms {left}"
    );
    // Past the session's end: the access token is expired (soft logout), the refresh token
    // answers 403, and so does the rotated one still in grace (no dead pair replayed).
    h.advance_clock(Duration::from_secs(31 * 60));
    assert_unknown_token(&h.whoami(&at(&n)).await, true);
    let r = h.refresh(&rt(&n)).await;
    assert_eq!(r.status, 403, "{:?}", r.json());
    assert_eq!(r.errcode(), "M_FORBIDDEN");
    let g = h.refresh(&rt(&v)).await;
    assert_eq!(g.status, 403, "{:?}", g.json());
}
