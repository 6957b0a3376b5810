//! The per-user session index (`mrp:us:{user}` + `mrp:ud:{user}`): its upkeep per login does
//! not grow with the user's number of sessions, it is pruned of sessions gone by TTL, and the
//! index of earlier versions (`mrp:u:{user}`) is still honoured.
mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::json;

const USER: &str = "@alice:fake.test";
const N: usize = 300;
const BATCH: usize = 20;

fn opts() -> ProxyOptions {
    ProxyOptions {
        extra: "rate_limit:\n  enabled: false\n".into(),
        ..Default::default()
    }
}

/// Commands that the harness or the proxy's background tasks send, not a login.
fn background(cmd: &str) -> bool {
    matches!(
        cmd,
        "config" | "info" | "command" | "command|docs" | "hello" | "scan" | "ping" | "client"
    ) || cmd.starts_with("config|")
        || cmd.starts_with("client|")
        || cmd.starts_with("command|")
}

/// `INFO commandstats`: command → (calls, usec).
fn commandstats(h: &Harness) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in h.redis.cli(&["INFO", "commandstats"]).lines() {
        let Some(rest) = line.trim().strip_prefix("cmdstat_") else {
            continue;
        };
        let (cmd, fields) = rest.split_once(':').unwrap();
        if background(cmd) {
            continue;
        }
        let field = |name: &str| -> u64 {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(cmd.to_owned(), (field("calls"), field("usec")));
    }
    out
}

/// Redis commands (and their µs, for information only) of `BATCH` logins of `USER`.
async fn batch(h: &Harness) -> BTreeMap<String, (u64, u64)> {
    h.redis.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..BATCH {
        h.login("alice").await;
    }
    commandstats(h)
}

fn show(name: &str, stats: &BTreeMap<String, (u64, u64)>) {
    let calls: u64 = stats.values().map(|(c, _)| c).sum();
    let usec: u64 = stats.values().map(|(_, u)| u).sum();
    let per: Vec<String> = stats
        .iter()
        .map(|(c, (n, _))| format!("{c} {:.2}", *n as f64 / BATCH as f64))
        .collect();
    println!(
        "{name}: {:.2} commands per login ({}), {:.1} µs of Redis per login (not asserted)",
        calls as f64 / BATCH as f64,
        per.join(", "),
        usec as f64 / BATCH as f64
    );
}

/// Per-command call counts, without the token cache's heartbeats and its invalidation
/// connection (`publish`, `ping`, `subscribe`, `hello`, `client`): they tick with time, not logins.
fn calls(stats: &BTreeMap<String, (u64, u64)>) -> BTreeMap<String, u64> {
    stats
        .iter()
        .filter(|(k, _)| !["publish", "ping", "subscribe", "hello", "client"].contains(&k.as_str()))
        .map(|(k, (c, _))| (k.clone(), *c))
        .collect()
}

fn index_len(h: &Harness) -> (usize, usize) {
    let z = h.redis.cli(&["ZCARD", &format!("mrp:us:{{{USER}}}")]);
    let d = h.redis.cli(&["HLEN", &format!("mrp:ud:{{{USER}}}")]);
    (z.trim().parse().unwrap(), d.trim().parse().unwrap())
}

fn sessions_alive(h: &Harness) -> usize {
    h.redis
        .cli(&["--scan", "--pattern", "mrp:{*}:s"])
        .lines()
        .count()
}

#[tokio::test]
async fn index_upkeep_per_login_does_not_grow_with_the_users_sessions() {
    let h = Harness::with(opts(), false).await;
    for _ in 0..BATCH {
        h.login("alice").await;
    }
    let early = batch(&h).await;
    for _ in 0..N - 3 * BATCH {
        h.login("alice").await;
    }
    let late = batch(&h).await;
    show(&format!("logins {}..{}", BATCH + 1, 2 * BATCH), &early);
    show(&format!("logins {}..{N}", N - BATCH + 1), &late);
    assert_eq!(index_len(&h), (N, N));
    // The same commands, the same number of times, with 20 or 280 sessions already indexed.
    assert_eq!(calls(&early), calls(&late));
    // And none that reads a whole collection.
    for cmd in [
        "hgetall", "hkeys", "hvals", "hscan", "zrange", "zscan", "smembers", "keys",
    ] {
        assert!(!late.contains_key(cmd), "{cmd} on the login path: {late:?}");
    }
    // Per login: one entry in the user index (sessions keep no index of their own keys).
    assert_eq!(late.get("zadd").map(|c| c.0), Some(BATCH as u64));

    // The listing and /logout/all see all of them.
    let last = h.login("alice").await;
    let r = h
        .post("/_matrix/client/v3/logout/all", Some(&at(&last)), json!({}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(sessions_alive(&h), 0, "every session purged");
    assert_eq!(index_len(&h), (0, 0), "index emptied");
}

#[tokio::test]
async fn entries_of_sessions_gone_by_ttl_are_pruned_by_the_next_login() {
    let h = Harness::with(opts(), false).await;
    h.login("alice").await;
    let z = format!("mrp:us:{{{USER}}}");
    let d = format!("mrp:ud:{{{USER}}}");
    // Ten sessions whose keys expired long ago (score: when their keys expired, Redis TIME).
    for i in 0..10 {
        let tag = format!("gone{i:018}");
        h.redis.cli(&["ZADD", &z, &(1000 + i).to_string(), &tag]);
        h.redis.cli(&["HSET", &d, &tag, "OLDDEVICE"]);
    }
    assert_eq!(index_len(&h), (11, 11));
    // At most 8 per call: two logins clear them.
    h.login("alice").await;
    h.login("alice").await;
    assert_eq!(index_len(&h), (3, 3));
    assert!(!h.redis.cli(&["HVALS", &d]).contains("OLDDEVICE"));
}

#[tokio::test]
async fn sessions_in_the_index_of_earlier_versions_are_still_found_and_moved() {
    let h = Harness::with(opts(), false).await;
    let old = h.login("alice").await;
    let moved = h.login("alice").await;
    let current = h.login("alice").await;
    // Make the first two look like sessions indexed by an earlier version: only in the hash
    // `mrp:u:{user}` (tag → device \n expiry).
    let z = format!("mrp:us:{{{USER}}}");
    let d = format!("mrp:ud:{{{USER}}}");
    let legacy = format!("mrp:u:{{{USER}}}");
    let tags: Vec<String> = h
        .redis
        .cli(&["ZRANGE", &z, "0", "-1"])
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(tags.len(), 3);
    let tag_of = |token: &str| -> String {
        tags.iter()
            .find(|t| token[6..].starts_with(&t[..21]))
            .unwrap()
            .clone()
    };
    for v in [&old, &moved] {
        let tag = tag_of(&at(v));
        let device = h.redis.cli(&["HGET", &d, &tag]).trim().to_owned();
        h.redis.cli(&["ZREM", &z, &tag]);
        h.redis.cli(&["HDEL", &d, &tag]);
        h.redis
            .cli(&["HSET", &legacy, &tag, &format!("{device}\n9999999999999")]);
        // Earlier versions kept no record of their keys' expiry (`sx`), so their sessions'
        // first refresh extends the keys and indexes the session anew.
        h.redis.cli(&["HDEL", &format!("mrp:{{{tag}}}:s"), "sx"]);
    }
    assert_eq!(index_len(&h), (1, 1));
    // A refresh moves its session to the new index.
    let n = h.refresh(&rt(&moved)).await;
    assert_eq!(n.status, 200);
    assert_eq!(index_len(&h), (2, 2));
    assert_eq!(h.redis.cli(&["HLEN", &legacy]).trim(), "1");
    // /logout/all ends the session only the old index knows, too.
    let r = h
        .post(
            "/_matrix/client/v3/logout/all",
            Some(&at(&current)),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_unknown_token(&h.whoami(&at(&old)).await, false);
    assert_eq!(sessions_alive(&h), 0);
    assert_eq!(h.redis.cli(&["EXISTS", &legacy]).trim(), "0");
    assert_eq!(index_len(&h), (0, 0));
}

/// Redis `TIME` in ms.
fn redis_now_ms(h: &Harness) -> i64 {
    let t = h.redis.cli(&["TIME"]);
    let mut it = t.lines().map(|l| l.trim().parse::<i64>().unwrap());
    let (s, us) = (it.next().unwrap(), it.next().unwrap());
    s * 1000 + us / 1000
}

/// The one session's key names (`mrp:{T}:s`) and its entry's score in the user index, with the
/// PTTL of every fixed key of the session (ms).
fn index_and_keys(h: &Harness) -> (i64, Vec<(String, i64)>) {
    let keys: Vec<String> = h
        .redis
        .cli(&["--scan", "--pattern", "mrp:{*}:*"])
        .lines()
        .map(str::to_owned)
        .collect();
    let s = keys
        .iter()
        .find(|k| k.ends_with(":s"))
        .expect("session key");
    let tag = &s[s.find('{').unwrap() + 1..s.find('}').unwrap()];
    let z = format!("mrp:us:{{{USER}}}");
    let score: i64 = h.redis.cli(&["ZSCORE", &z, tag]).trim().parse().unwrap();
    let ttls = keys
        .iter()
        .map(|k| {
            let t = h.redis.cli(&["PTTL", k]).trim().parse::<i64>().unwrap();
            (k.clone(), t)
        })
        .collect();
    (score, ttls)
}

fn assert_index_outlives_keys(h: &Harness) -> i64 {
    let now = redis_now_ms(h);
    let (score, ttls) = index_and_keys(h);
    let session_ttl = ttls.iter().find(|(k, _)| k.ends_with(":s")).unwrap().1;
    for (k, ttl) in &ttls {
        assert!(*ttl > 0, "{k} has no TTL");
        assert!(
            score >= now + ttl,
            "index entry (until {score}) ends before {k} (until {})",
            now + ttl
        );
    }
    session_ttl
}

fn evalsha_calls(h: &Harness) -> u64 {
    commandstats(h).get("evalsha").map_or(0, |c| c.0)
}

/// `/logout/all` finds sessions through the user index, so the index entry must outlive every
/// key of the session. A refresh extends the session's keys, and then the index entry, only once
/// their recorded expiry falls short of the new records (an eighth of their lifetime at a time,
/// store/lua/common.lua `slack`): most refreshes touch neither.
#[tokio::test(flavor = "multi_thread")]
async fn the_index_outlives_the_session_keys_whenever_a_refresh_extends_them() {
    let h = Harness::with(opts(), false).await;
    let v = h.login("alice").await;
    let first = assert_index_outlives_keys(&h);
    h.redis.cli(&["CONFIG", "RESETSTAT"]);
    let v = h.refresh(&rt(&v)).await.json();
    assert_eq!(
        evalsha_calls(&h),
        1,
        "rotate only (the live token is read with HMGETs), no index upkeep"
    );
    assert_index_outlives_keys(&h);

    // Refresh tokens that live much longer from now on: the next rotation's records outlive
    // the session's keys, which are extended, and the index with them.
    let path = h.proxy.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = original.replace(
        "refresh_token_lifetime: \"7d\"",
        "refresh_token_lifetime: \"60d\"",
    );
    assert_ne!(edited, original);
    std::fs::write(&path, &edited).unwrap();
    h.proxy.signal("HUP");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !h.proxy.logs().contains("token lifetimes reloaded") {
        assert!(std::time::Instant::now() < deadline, "no reload");
    }
    h.redis.cli(&["CONFIG", "RESETSTAT"]);
    let v = h.refresh(&rt(&v)).await.json();
    assert_eq!(evalsha_calls(&h), 2, "rotate and the index extension");
    let extended = assert_index_outlives_keys(&h);
    assert!(
        extended > first + 50 * 24 * 3600 * 1000,
        "session keys not extended: {first} -> {extended} ms"
    );
    // And the next one is inside the new slack again.
    h.redis.cli(&["CONFIG", "RESETSTAT"]);
    h.refresh(&rt(&v)).await;
    assert_eq!(evalsha_calls(&h), 1);
    assert_index_outlives_keys(&h);
}
