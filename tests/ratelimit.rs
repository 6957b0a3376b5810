//! Rate limits (issue 4; DESIGN.md §2 "/refresh", §3): 429 `M_LIMIT_EXCEEDED` answers, a
//! limited /refresh that consumes nothing, client IPs behind trusted proxies, the Redis backend
//! shared by two proxies, and failing open when that Redis is down.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;
use matrix_refresh_proxy::{ProxyToken, SessionId, TokenKind};
use serde_json::{Value, json};

const LOGIN: &str = "/_matrix/client/v3/login";
const REGISTER: &str = "/_matrix/client/v3/register";
const REFRESH: &str = "/_matrix/client/v3/refresh";
const VERSIONS: &str = "/_matrix/client/versions";

/// A harness whose proxy gets `yaml` appended to its config.
async fn harness(yaml: &str) -> Harness {
    harness_with_reuse(yaml, true).await
}

async fn harness_with_reuse(yaml: &str, revoke_on_reuse: bool) -> Harness {
    let o = ProxyOptions {
        extra: format!("{yaml}\n"),
        revoke_on_reuse,
        ..Default::default()
    };
    Harness::with(o, false).await
}

fn plain_login(user: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": "secret"})
}

/// POST `v` as JSON with extra headers.
async fn post_with(h: &Harness, path: &str, headers: &[(&str, &str)], v: Value) -> Reply {
    let mut hs = vec![("content-type", "application/json")];
    hs.extend_from_slice(headers);
    h.send(Method::POST, path, &hs, body(v.to_string())).await
}

async fn refresh_from(h: &Harness, xff: &str, rt: &str) -> Reply {
    post_with(
        h,
        REFRESH,
        &[("x-forwarded-for", xff)],
        json!({"refresh_token": rt}),
    )
    .await
}

/// A Matrix 429 with both the body field and the header, consistent with each other.
#[track_caller]
fn assert_limited(r: &Reply, max_ms: u64) -> u64 {
    assert_eq!(r.status, 429, "{:?}", r.json());
    let v = r.json();
    assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED", "{v}");
    assert!(v["error"].is_string(), "{v}");
    let ms = v["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(
        ms > 0 && ms <= max_ms,
        "retry_after_ms {ms} not in 1..={max_ms}"
    );
    let secs: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(
        secs,
        ms.div_ceil(1000),
        "Retry-After is retry_after_ms in seconds, rounded up"
    );
    assert_eq!(r.headers["access-control-allow-origin"], "*");
    ms
}

#[tokio::test]
async fn login_and_register_share_a_per_ip_burst_then_429() {
    let h = harness("rate_limit:\n  login: {per_second: 0.5, burst: 3}").await;
    // Flow discovery and preflights are not login attempts.
    for _ in 0..5 {
        assert_eq!(h.get(LOGIN, None).await.status, 200);
        let r = h.send(Method::OPTIONS, LOGIN, &[], body("")).await;
        assert_ne!(r.status, 429);
    }
    assert_eq!(h.post(LOGIN, None, plain_login("a")).await.status, 200);
    h.login("alice").await; // with a refresh token
    let r = h.post(REGISTER, None, json!({"username": "newbie"})).await;
    assert_eq!(r.status, 200, "{:?}", r.json());

    // The burst is spent: /login and /register both answer 429, without asking the homeserver.
    let before = h.hs.requests().len();
    let r = h.post(LOGIN, None, plain_login("a")).await;
    let ms = assert_limited(&r, 2000);
    let r = h.post(REGISTER, None, json!({"username": "other"})).await;
    assert_limited(&r, 2000);
    assert_eq!(
        h.hs.requests().len(),
        before,
        "limited requests were forwarded"
    );
    // Other routes are not limited by it.
    assert_eq!(h.get(VERSIONS, None).await.status, 200);

    // One login comes back per 2 s.
    tokio::time::sleep(Duration::from_millis(ms + 50)).await;
    assert_eq!(h.post(LOGIN, None, plain_login("a")).await.status, 200);
    assert_limited(&h.post(LOGIN, None, plain_login("a")).await, 2000);
}

#[tokio::test]
async fn a_limited_refresh_consumes_nothing_and_the_token_works_afterwards() {
    let h = harness("rate_limit:\n  refresh: {per_second: 1, burst: 2}").await;
    let v = h.login("alice").await;
    let n1 = h.refresh(&rt(&v)).await.json();
    let n2 = h.refresh(&rt(&n1)).await.json();
    assert!(n2["refresh_token"].is_string());

    let before = h.redis.dump();
    let r = h.refresh(&rt(&n2)).await;
    let ms = assert_limited(&r, 1000);
    // A grace replay of the previous token (genuine: its record opens) is limited the same way.
    assert_limited(&h.refresh(&rt(&n1)).await, 1000);
    assert_eq!(h.redis.dump(), before, "a 429 changed the session store");
    // The access token keeps working meanwhile.
    assert_eq!(h.whoami(&at(&n2)).await.status, 200);

    tokio::time::sleep(Duration::from_millis(ms + 50)).await;
    let r = h.refresh(&rt(&n2)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let n3 = r.json();
    assert_ne!(rt(&n3), rt(&n2), "a real rotation, not a replay");
    assert_eq!(h.whoami(&at(&n3)).await.status, 200);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = h.proxy.logs();
    for t in [rt(&v), rt(&n1), rt(&n2), rt(&n3)] {
        assert!(!logs.contains(&t), "a refresh token appears in the logs");
    }
}

#[tokio::test]
async fn per_session_refresh_limit_is_independent_of_the_ip() {
    let h = harness(
        "rate_limit:\n  login: {per_second: 100, burst: 100}\n  refresh: {per_second: 0.05, burst: 3}\ntrusted_proxies: ['127.0.0.1']",
    )
    .await;

    // One session refreshed from a new address each time: the session's budget runs out.
    let mut s = h.login("alice").await;
    for i in 1..=3 {
        let r = refresh_from(&h, &format!("203.0.113.{i}"), &rt(&s)).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        s = r.json();
    }
    let before = h.redis.dump();
    let r = refresh_from(&h, "203.0.113.4", &rt(&s)).await;
    assert_limited(&r, 20_000);
    assert_eq!(h.redis.dump(), before, "a 429 changed the session store");
    // The same address is fine for another session.
    let other = h.login("bob").await;
    let r = refresh_from(&h, "203.0.113.4", &rt(&other)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());

    // Many sessions from one address: the address's budget runs out first, and a session
    // stopped by it keeps its own budget.
    let sessions: Vec<Value> =
        futures_util::future::join_all(["c1", "c2", "c3", "c4"].iter().map(|u| h.login(u))).await;
    for s in &sessions[..3] {
        let r = refresh_from(&h, "198.51.100.1", &rt(s)).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    let r = refresh_from(&h, "198.51.100.1", &rt(&sessions[3])).await;
    assert_limited(&r, 20_000);
    let r = refresh_from(&h, "198.51.100.2", &rt(&sessions[3])).await;
    assert_eq!(r.status, 200, "{:?}", r.json());

    // Garbage that is not a refresh token counts against the address only.
    for i in 0..3 {
        let r = refresh_from(&h, "192.0.2.1", &format!("mrprt_garbage{i}")).await;
        assert_unknown_token(&r, false);
    }
    assert_limited(
        &refresh_from(&h, "192.0.2.1", "mrprt_garbage").await,
        20_000,
    );
}

/// Issue 9.5: the session id is in clear in every token, so whoever saw one (or an old one) could
/// make up refresh tokens naming the session and empty its budget, and the owner's /refresh would
/// answer 429 (a logout for some SDKs). Only a token shown genuine is charged.
#[tokio::test]
async fn nobody_else_can_spend_a_session_s_refresh_budget() {
    let h = harness_with_reuse(
        "rate_limit:\n  login: {per_second: 100, burst: 100}\n  refresh: {per_second: 0.05, burst: 3}\ntrusted_proxies: ['127.0.0.1']",
        false,
    )
    .await;
    let v = h.login("victim").await;
    // An old token, used, whose grace ended when its successor's access token was used.
    let r = refresh_from(&h, "203.0.113.200", &rt(&v)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let current = r.json();
    assert_eq!(h.whoami(&at(&current)).await.status, 200);
    let sid = ProxyToken::parse_kind(&rt(&v), TokenKind::Refresh)
        .unwrap()
        .session();
    // From many addresses (so the per-IP limit is not what stops them): forged tokens naming
    // the victim's session, and the victim's spent token.
    for i in 0..20 {
        let forged = ProxyToken::generate(TokenKind::Refresh, sid, &mut rand::rngs::OsRng);
        assert_eq!(forged.session(), sid);
        let r = refresh_from(&h, &format!("198.51.100.{i}"), forged.expose()).await;
        assert_unknown_token(&r, false);
        let r = refresh_from(&h, &format!("192.0.2.{i}"), &rt(&v)).await;
        assert_eq!(r.status, 401, "{:?}", r.json());
        assert_eq!(r.errcode(), "M_UNKNOWN_TOKEN");
    }
    // The owner's genuine refreshes still have their whole budget (2 left of 3)...
    let mut s = current;
    for _ in 0..2 {
        let r = refresh_from(&h, "203.0.113.200", &rt(&s)).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        s = r.json();
    }
    // ...and the limit itself still holds for them.
    assert_limited(&refresh_from(&h, "203.0.113.200", &rt(&s)).await, 20_000);
}

#[tokio::test]
async fn spoofed_x_forwarded_for_from_an_untrusted_peer_changes_nothing() {
    // No trusted proxies (the default): the header is the client's own claim.
    let h = harness("rate_limit:\n  login: {per_second: 0.05, burst: 2}").await;
    for i in 1..=2 {
        let ip = format!("203.0.113.{i}");
        let r = post_with(&h, LOGIN, &[("x-forwarded-for", &ip)], plain_login("a")).await;
        assert_eq!(r.status, 200);
    }
    for xff in ["203.0.113.3", "198.51.100.9, 203.0.113.4", "::1"] {
        let r = post_with(&h, LOGIN, &[("x-forwarded-for", xff)], plain_login("a")).await;
        assert_limited(&r, 20_000);
    }
    // The homeserver does not get the client's claim either, only the real peer (issue 9.4).
    let seen = h.hs.requests_to("/login");
    let last = seen.last().unwrap();
    assert_eq!(last.headers["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn x_forwarded_for_from_a_trusted_proxy_names_the_client() {
    let h = harness(
        "rate_limit:\n  login: {per_second: 0.05, burst: 2}\ntrusted_proxies: ['127.0.0.0/8', '10.0.0.0/8']",
    )
    .await;
    let login_from = |xff: &'static str| {
        let h = &h;
        async move { post_with(h, LOGIN, &[("x-forwarded-for", xff)], plain_login("a")).await }
    };
    // Distinct clients behind the proxy each get their own budget.
    for xff in ["203.0.113.1", "203.0.113.2", "203.0.113.3", "2001:db8:1::1"] {
        assert_eq!(login_from(xff).await.status, 200, "{xff}");
    }
    // One client: limited, however it varies the part of the header it controls.
    assert_eq!(login_from("203.0.113.7").await.status, 200);
    assert_eq!(login_from("1.1.1.1, 203.0.113.7").await.status, 200);
    assert_limited(&login_from("2.2.2.2, 203.0.113.7").await, 20_000);
    assert_limited(&login_from("garbage, 203.0.113.7").await, 20_000);
    // Trusted hops in the chain are skipped.
    assert_limited(&login_from("203.0.113.7, 10.1.2.3").await, 20_000);
    // IPv6 clients are one identity per /64.
    assert_eq!(login_from("2001:db8:1::2").await.status, 200);
    assert_limited(&login_from("2001:db8:1::ffff").await, 20_000);
    // No header from a trusted peer: the peer itself is the client.
    assert_eq!(h.post(LOGIN, None, plain_login("a")).await.status, 200);
    assert_eq!(h.post(LOGIN, None, plain_login("a")).await.status, 200);
    assert_limited(&h.post(LOGIN, None, plain_login("a")).await, 20_000);
}

#[tokio::test]
async fn the_all_limit_covers_every_request() {
    let h = harness("rate_limit:\n  all: {per_second: 0.05, burst: 5}").await;
    let v = h.login("alice").await;
    assert_eq!(h.get(VERSIONS, None).await.status, 200);
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    assert_eq!(
        h.send(Method::OPTIONS, VERSIONS, &[], body(""))
            .await
            .status,
        200
    );
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
    let before = h.hs.requests().len();
    for r in [
        h.get(VERSIONS, None).await,
        h.whoami(&at(&v)).await,
        h.refresh(&rt(&v)).await,
        h.post(LOGIN, None, plain_login("a")).await,
    ] {
        assert_limited(&r, 20_000);
    }
    assert_eq!(
        h.hs.requests().len(),
        before,
        "limited requests were forwarded"
    );
}

#[tokio::test]
async fn enabled_false_turns_every_limit_off() {
    let h = harness(
        "rate_limit:\n  enabled: false\n  login: {per_second: 0.01, burst: 1}\n  refresh: {per_second: 0.01, burst: 1}\n  all: {per_second: 0.01, burst: 1}",
    )
    .await;
    let mut v = h.login("alice").await;
    for _ in 0..15 {
        assert_eq!(h.post(LOGIN, None, plain_login("a")).await.status, 200);
        let r = h.refresh(&rt(&v)).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
        v = r.json();
        assert_eq!(h.get(VERSIONS, None).await.status, 200);
    }
    assert!(h.proxy.logs().contains("rate limits disabled"));
}

/// Raw request to any proxy.
async fn post_to(client: &Client, base: &str, path: &str, v: &Value) -> Reply {
    let req = Request::post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body(v.to_string()))
        .unwrap();
    let res = client.request(req).await.expect("proxy answered");
    let (parts, b) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: b.collect().await.map(|c| c.to_bytes()).unwrap_or_default(),
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TestBody,
>;

fn redis_backend(login: &str) -> ProxyOptions {
    ProxyOptions {
        extra: format!("rate_limit:\n  backend: redis\n  login: {login}\n"),
        ..Default::default()
    }
}

#[tokio::test]
async fn redis_backend_shares_one_budget_between_two_proxies() {
    let redis = RedisServer::start();
    let hs = FakeHs::start().await;
    let o = redis_backend("{per_second: 0.01, burst: 4}");
    let a = ProxyProcess::start(&hs.url(), &redis.url(), &o);
    let b = ProxyProcess::start(&hs.url(), &redis.url(), &o);
    let c = client();
    let login = plain_login("a");
    for p in [&a, &b, &a, &b] {
        let r = post_to(&c, &p.url(), LOGIN, &login).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    // Each proxy has used 2 of its local 4: the shared budget is what says no.
    for p in [&a, &b] {
        let r = post_to(&c, &p.url(), LOGIN, &login).await;
        assert_limited(&r, 100_000);
    }
    assert_eq!(hs.requests_to("/login").len(), 4);
    // One key per identity, expiring when the budget is full again (4 × 100 s at most).
    let key = "mrp:rl:login:{127.0.0.1}";
    let ttl: i64 = redis.cli(&["PTTL", key]).trim().parse().unwrap();
    assert!(ttl > 300_000 && ttl <= 400_000, "PTTL {ttl}");
    let keys = redis.cli(&["--scan", "--pattern", "mrp:rl:*"]);
    assert_eq!(keys.trim(), key);
}

#[tokio::test]
async fn redis_backend_fails_open_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let hs = FakeHs::start().await;
    let o = redis_backend("{per_second: 0.01, burst: 3}");
    let p = ProxyProcess::start(&hs.url(), &redis.url(), &o);
    let c = client();
    let login = plain_login("a");
    assert_eq!(post_to(&c, &p.url(), LOGIN, &login).await.status, 200);
    redis.kill();
    // Logins without refresh tokens need no Redis: they keep working, on the local limit.
    for _ in 0..2 {
        let r = post_to(&c, &p.url(), LOGIN, &login).await;
        assert_eq!(r.status, 200, "{:?}", r.json());
    }
    assert_limited(&post_to(&c, &p.url(), LOGIN, &login).await, 100_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = p.logs();
    assert!(
        logs.contains("shared rate limit unavailable"),
        "no warning logged: {logs}"
    );
    // /refresh without its store is still the non-JSON 503 (DESIGN.md §2), never a 429.
    let sid = SessionId::generate(&mut rand::rngs::OsRng);
    let token = ProxyToken::generate(TokenKind::Refresh, sid, &mut rand::rngs::OsRng);
    let r = post_to(
        &c,
        &p.url(),
        REFRESH,
        &json!({"refresh_token": token.expose()}),
    )
    .await;
    assert_eq!(r.status, 503);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
}

/// Measurement, not a test (run by hand, release build):
/// `cargo test --release --test ratelimit -- --ignored --nocapture rss_after_a_million_client_ips`
/// One million distinct client IPs (through a trusted X-Forwarded-For) each hit /login once;
/// prints the proxy's RSS before, after the flood, and after housekeeping dropped the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rss_after_a_million_client_ips() {
    const CLIENTS: u32 = 1_000_000;
    const CONCURRENCY: u32 = 64;
    let redis = RedisServer::start();
    // An upstream that refuses connections: the proxy answers 502 at once, so the run measures
    // the limiter rather than a homeserver.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let o = ProxyOptions {
        extra: "trusted_proxies: ['127.0.0.1']\n".into(),
        ..Default::default()
    };
    let p = ProxyProcess::start(&upstream, &redis.url(), &o);
    let url = format!("{}{LOGIN}", p.url());
    let c = client();
    // Warm up connections and allocator.
    for _ in 0..1000 {
        let req = Request::post(&url).body(body("{}")).unwrap();
        let _ = c.request(req).await.unwrap().into_body().collect().await;
    }
    let before = p.rss_kib();
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|w| {
            let c = c.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut n = w;
                while n < CLIENTS {
                    let ip = std::net::Ipv4Addr::from(0x0b00_0000 + n).to_string();
                    let req = Request::post(&url)
                        .header("x-forwarded-for", ip)
                        .body(body(Bytes::from_static(b"{}")))
                        .unwrap();
                    let res = c.request(req).await.unwrap();
                    assert_ne!(res.status(), 429);
                    let _ = res.into_body().collect().await;
                    n += CONCURRENCY;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let flood = started.elapsed();
    let after_flood = p.rss_kib();
    // Keys are idle 4 s after their one login (0.5/s, burst 10); housekeeping runs every 30 s.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let after_housekeeping = p.rss_kib();
    println!(
        "{CLIENTS} client IPs in {:.1}s ({:.0}/s): RSS before {before} KiB, after the flood {after_flood} KiB (+{} KiB, {:.0} B per IP), after housekeeping {after_housekeeping} KiB",
        flood.as_secs_f64(),
        f64::from(CLIENTS) / flood.as_secs_f64(),
        after_flood.saturating_sub(before),
        (after_flood.saturating_sub(before) * 1024) as f64 / f64::from(CLIENTS),
    );
    // Each sweep's key count before and after (the proxy logs them at debug level).
    for line in p
        .logs()
        .lines()
        .filter(|l| l.contains("rate limit housekeeping"))
    {
        println!("{}", line.split("ratelimit: ").nth(1).unwrap_or(line));
    }
}
