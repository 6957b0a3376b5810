//! Redis Sentinel and Cluster: two proxy replicas under a steady load of logins, refreshes and
//! authenticated requests while the master fails over or slots move. Nothing issued may be
//! lost, no valid token may be answered 401, and the only errors allowed are 503s with
//! `Retry-After`. Figures are printed (`cargo test --test ha -- --nocapture`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use common::ha::{ClusterSetup, MASTER_NAME, SentinelSetup, cli};
use common::{FakeHs, ProxyOptions, ProxyProcess, Reply, TestBody, body, client};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    TestBody,
>;

async fn send(
    c: &Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    v: Option<Value>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let b = match v {
        Some(v) => {
            req = req.header("content-type", "application/json");
            body(v.to_string())
        }
        None => body(Bytes::new()),
    };
    let res = tokio::time::timeout(Duration::from_secs(10), c.request(req.body(b).unwrap()))
        .await
        .expect("proxy answered within 10 s")
        .expect("proxy answered");
    let (parts, b) = res.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: b.collect().await.map(|c| c.to_bytes()).unwrap_or_default(),
    }
}

fn login_body(user: &str) -> Value {
    json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": "secret",
        "refresh_token": true,
    })
}

const LOGIN: &str = "/_matrix/client/v3/login";
const REFRESH: &str = "/_matrix/client/v3/refresh";
const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
const LOGOUT: &str = "/_matrix/client/v3/logout";

/// The latest tokens of a session the load issued.
#[derive(Clone)]
struct Tokens {
    at: String,
    rt: String,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    logins: AtomicU64,
    refreshes: AtomicU64,
    authed: AtomicU64,
    unavailable: AtomicU64,
    /// 401s (or 403s) to tokens the proxy had issued and nobody revoked.
    unauthorized: AtomicU64,
    /// Anything else unexpected (a 503 without Retry-After included), described.
    errors: Mutex<Vec<String>>,
    /// First and last 503 seen (ms since the load started).
    first_503: Mutex<Option<u128>>,
    last_503: Mutex<Option<u128>>,
    sessions: Mutex<Vec<Tokens>>,
}

impl Stats {
    fn record_503(&self, r: &Reply, started: Instant, what: &str) {
        self.unavailable.fetch_add(1, Ordering::Relaxed);
        let t = started.elapsed().as_millis();
        self.first_503.lock().unwrap().get_or_insert(t);
        *self.last_503.lock().unwrap() = Some(t);
        if !r.headers.contains_key("retry-after") {
            self.errors
                .lock()
                .unwrap()
                .push(format!("{what}: 503 without Retry-After"));
        }
    }

    fn unexpected(&self, what: &str, r: &Reply) {
        if matches!(r.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            self.unauthorized.fetch_add(1, Ordering::Relaxed);
        }
        self.errors.lock().unwrap().push(format!(
            "{what}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
}

/// Logins, then per session 3 authenticated requests for each refresh, a new session every
/// 24 steps; each step goes to the other proxy than the one before.
async fn worker(
    id: usize,
    urls: Arc<Vec<String>>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    started: Instant,
) {
    let c = client();
    let mut current: Option<usize> = None;
    let mut step = 0usize;
    let mut n_sessions = 0;
    while !stop.load(Ordering::Relaxed) {
        step += 1;
        let base = &urls[(step + id) % urls.len()];
        stats.requests.fetch_add(1, Ordering::Relaxed);
        match current {
            None => {
                let user = format!("w{id}s{n_sessions}");
                let r = send(
                    &c,
                    Method::POST,
                    &format!("{base}{LOGIN}"),
                    None,
                    Some(login_body(&user)),
                )
                .await;
                match r.status {
                    StatusCode::OK => {
                        stats.logins.fetch_add(1, Ordering::Relaxed);
                        let v = r.json();
                        let t = Tokens {
                            at: v["access_token"].as_str().unwrap().to_owned(),
                            rt: v["refresh_token"].as_str().unwrap().to_owned(),
                        };
                        let mut s = stats.sessions.lock().unwrap();
                        s.push(t);
                        current = Some(s.len() - 1);
                        n_sessions += 1;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => stats.record_503(&r, started, "login"),
                    _ => stats.unexpected("login", &r),
                }
            }
            Some(i) => {
                let t = stats.sessions.lock().unwrap()[i].clone();
                if step.is_multiple_of(4) {
                    let r = send(
                        &c,
                        Method::POST,
                        &format!("{base}{REFRESH}"),
                        None,
                        Some(json!({"refresh_token": t.rt})),
                    )
                    .await;
                    match r.status {
                        StatusCode::OK => {
                            stats.refreshes.fetch_add(1, Ordering::Relaxed);
                            let v = r.json();
                            stats.sessions.lock().unwrap()[i] = Tokens {
                                at: v["access_token"].as_str().unwrap().to_owned(),
                                rt: v["refresh_token"].as_str().unwrap().to_owned(),
                            };
                        }
                        StatusCode::SERVICE_UNAVAILABLE => stats.record_503(&r, started, "refresh"),
                        _ => stats.unexpected("refresh", &r),
                    }
                } else {
                    let r = send(
                        &c,
                        Method::GET,
                        &format!("{base}{WHOAMI}"),
                        Some(&t.at),
                        None,
                    )
                    .await;
                    match r.status {
                        StatusCode::OK => {
                            stats.authed.fetch_add(1, Ordering::Relaxed);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => stats.record_503(&r, started, "whoami"),
                        _ => stats.unexpected("whoami", &r),
                    }
                }
                if step.is_multiple_of(24) {
                    current = None;
                }
            }
        }
        // A steady, modest rate (2 cores are shared with Redis and the homeserver).
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

struct Load {
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    fn start(urls: Vec<String>, workers: usize) -> Self {
        let urls = Arc::new(urls);
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = (0..workers)
            .map(|i| {
                tokio::spawn(worker(
                    i,
                    urls.clone(),
                    stats.clone(),
                    stop.clone(),
                    started,
                ))
            })
            .collect();
        Load {
            stats,
            stop,
            tasks,
            started,
        }
    }

    async fn stop(self) -> Arc<Stats> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.stats
    }
}

/// Waits until both proxies answer a fresh login (service back by itself); returns how long.
async fn wait_service(urls: &[String], limit: Duration) -> Duration {
    let c = client();
    let t = Instant::now();
    for u in urls {
        loop {
            let r = send(
                &c,
                Method::POST,
                &format!("{u}{LOGIN}"),
                None,
                Some(login_body("probe")),
            )
            .await;
            if r.status == 200 {
                break;
            }
            assert!(
                t.elapsed() < limit,
                "service not back after {limit:?}: {}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    t.elapsed()
}

/// Every session the load was issued still works with its latest tokens, through both proxies:
/// the access token authenticates and the refresh token refreshes. Returns how many were lost.
/// `sentinel`: the Sentinel topology under test, asked whether writes can be acknowledged now
/// (its master has a replica online; 503s while it has none do not count against the retry
/// deadline), and whose state is printed once a session's refresh has answered 503 for more
/// than 3 s (to tell a stuck store from a stuck session).
async fn check_sessions(stats: &Stats, urls: &[String], sentinel: Option<&SentinelSetup>) -> usize {
    let c = client();
    let sessions = stats.sessions.lock().unwrap().clone();
    let mut lost = 0;
    let mut retried = 0;
    let mut unwritable = 0;
    for (i, t) in sessions.iter().enumerate() {
        let a = &urls[i % urls.len()];
        let b = &urls[(i + 1) % urls.len()];
        // A 503 is unavailability, not loss: on whoami, a store call while the connection
        // still follows the new master (the token cache is bypassed until its invalidation
        // connection is back); on /refresh also `min_replicas_acked` (no replica acknowledged in
        // time, e.g. while the restarted node still resyncs). The client retries, the same
        // refresh token too, and a rotation that went through answers it from its grace.
        // 10 s of retries, not counting time in which the master had no replica online to
        // acknowledge a write (a refresh then answers 503 by configuration, not by loss), up
        // to 60 s in all.
        let mut deadline = Instant::now() + Duration::from_secs(10);
        let limit = Instant::now() + Duration::from_secs(60);
        let w = loop {
            let w = send(&c, Method::GET, &format!("{a}{WHOAMI}"), Some(&t.at), None).await;
            if w.status != 503 || Instant::now() > deadline {
                break w;
            }
            retried += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut reported = false;
        let r = loop {
            let r = send(
                &c,
                Method::POST,
                &format!("{b}{REFRESH}"),
                None,
                Some(json!({"refresh_token": t.rt})),
            )
            .await;
            if r.status != 503 || Instant::now() > deadline.min(limit) {
                break r;
            }
            if !sentinel.is_none_or(|s| tokio::task::block_in_place(|| s.master_has_replica())) {
                deadline += Duration::from_millis(200);
                unwritable += 1;
            }
            if !reported
                && deadline.saturating_duration_since(Instant::now()) < Duration::from_secs(7)
            {
                reported = true;
                eprintln!(
                    "session {i}: refresh still 503 ({}) after 3 s; topology now:\n{}",
                    String::from_utf8_lossy(&r.body),
                    sentinel.map_or_else(String::new, |s| tokio::task::block_in_place(
                        || s.replication_report()
                    ))
                );
            }
            retried += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if w.status != 200 || r.status != 200 {
            lost += 1;
            eprintln!(
                "session {i} lost: whoami {} refresh {} {}",
                w.status,
                r.status,
                String::from_utf8_lossy(&r.body)
            );
        }
    }
    if retried > 0 {
        eprintln!(
            "check: {retried} requests answered 503 and were retried ({unwritable} while the master had no replica online)"
        );
    }
    lost
}

/// After a loss in a Sentinel phase: each proxy's store errors and the topology's state.
fn explain_loss(proxies: &[&ProxyProcess], s: &SentinelSetup) {
    eprintln!("{}", store_errors(proxies));
    eprintln!("{}", tokio::task::block_in_place(|| s.replication_report()));
}

/// Logout through one proxy is refused through the other at once.
async fn logout_is_seen_by_the_other_replica(urls: &[String]) {
    let c = client();
    let r = send(
        &c,
        Method::POST,
        &format!("{}{LOGIN}", urls[0]),
        None,
        Some(login_body("bye")),
    )
    .await;
    assert_eq!(r.status, 200);
    let at = r.json()["access_token"].as_str().unwrap().to_owned();
    // Both replicas hold the token in their token cache.
    for _ in 0..3 {
        for u in urls {
            let w = send(&c, Method::GET, &format!("{u}{WHOAMI}"), Some(&at), None).await;
            assert_eq!(w.status, 200);
        }
    }
    let out = send(
        &c,
        Method::POST,
        &format!("{}{LOGOUT}", urls[1]),
        Some(&at),
        Some(json!({})),
    )
    .await;
    assert_eq!(out.status, 200, "{:?}", out.json());
    // The other replica's cache is told through Redis pub/sub: refused within 100 ms at most.
    let t = Instant::now();
    loop {
        let w = send(
            &c,
            Method::GET,
            &format!("{}{WHOAMI}", urls[0]),
            Some(&at),
            None,
        )
        .await;
        if w.status == 401 {
            break;
        }
        assert_eq!(w.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "revocation unseen for 100 ms"
        );
    }
    for u in urls {
        let w = send(&c, Method::GET, &format!("{u}{WHOAMI}"), Some(&at), None).await;
        assert_eq!(w.status, 401, "after logout via the other replica");
    }
}

fn report(name: &str, stats: &Stats, extra: &str, elapsed: Duration) {
    let window = match (
        *stats.first_503.lock().unwrap(),
        *stats.last_503.lock().unwrap(),
    ) {
        (Some(a), Some(b)) => format!("{} ms", b - a),
        _ => "none".to_owned(),
    };
    println!(
        "[{name}] {:.1} s: requests {} (logins {}, refreshes {}, authenticated {}), 503s {} (window {window}), 401s {}, other errors {}; {extra}",
        elapsed.as_secs_f64(),
        stats.requests.load(Ordering::Relaxed),
        stats.logins.load(Ordering::Relaxed),
        stats.refreshes.load(Ordering::Relaxed),
        stats.authed.load(Ordering::Relaxed),
        stats.unavailable.load(Ordering::Relaxed),
        stats.unauthorized.load(Ordering::Relaxed),
        stats.errors.lock().unwrap().len(),
    );
}

/// The proxies' store-error lines (the error each 503 came from), printed when a check fails.
fn store_errors(proxies: &[&ProxyProcess]) -> String {
    let mut out = String::new();
    for (i, p) in proxies.iter().enumerate() {
        let logs = p.logs_now();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("store unavailable") || l.contains("ERROR"))
            .collect();
        out.push_str(&format!(
            "proxy {i}: {} store-error lines, the last:\n",
            lines.len()
        ));
        for l in &lines[lines.len().saturating_sub(8)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn assert_clean(stats: &Stats, lost: usize) {
    let errors = stats.errors.lock().unwrap();
    assert!(
        errors.is_empty(),
        "unexpected answers: {:#?}",
        &errors[..errors.len().min(20)]
    );
    assert_eq!(
        stats.unauthorized.load(Ordering::Relaxed),
        0,
        "valid tokens answered 401"
    );
    assert_eq!(lost, 0, "sessions lost");
}

fn sentinel_location(s: &SentinelSetup) -> String {
    let nodes: Vec<String> = s
        .sentinel_addrs()
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect();
    format!(
        "  sentinel:\n    master_name: \"{MASTER_NAME}\"\n    nodes: [{}]\n",
        nodes.join(", ")
    )
}

fn cluster_location(c: &ClusterSetup) -> String {
    let nodes: Vec<String> = c.addrs().iter().map(|a| format!("\"{a}\"")).collect();
    format!("  cluster:\n    nodes: [{}]\n", nodes.join(", "))
}

/// The HA tests run one at a time: each starts several redis-server processes and a steady load
/// on 2 shared cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ha_options(min_replicas_acked: u32) -> ProxyOptions {
    ProxyOptions {
        redis_extra: format!(
            "  min_replicas_acked: {min_replicas_acked}\n  replica_ack_timeout: \"300ms\"\n"
        ),
        // The load logs in far more often than the default login limit allows.
        extra: "rate_limit:\n  enabled: false\n".to_owned(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_and_killed_master_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let mut s = SentinelSetup::start(1);
    let hs = FakeHs::start().await;
    let loc = sentinel_location(&s);
    let o = ha_options(1);
    let a = ProxyProcess::start_on(&hs.url(), &loc, &o);
    let b = ProxyProcess::start_on(&hs.url(), &loc, &o);
    let urls = vec![a.url(), b.url()];
    wait_service(&urls, Duration::from_secs(10)).await;

    // 1. SENTINEL FAILOVER under load.
    let load = Load::start(urls.clone(), 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = s.master_port();
    let t = Instant::now();
    s.failover();
    let new = tokio::task::block_in_place(|| s.wait_new_master(old, Duration::from_secs(10)));
    let switch = t.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let back = wait_service(&urls, Duration::from_secs(10)).await;
    let elapsed = load.started.elapsed();
    let stats = load.stop().await;
    let lost = check_sessions(&stats, &urls, Some(&s)).await;
    if lost > 0 {
        explain_loss(&[&a, &b], &s);
    }
    report(
        "sentinel SENTINEL FAILOVER",
        &stats,
        &format!(
            "master {old} -> {new} named after {switch:?}, sessions checked {}, lost {lost}, probe login ok {back:?} after",
            stats.sessions.lock().unwrap().len()
        ),
        elapsed,
    );
    assert_clean(&stats, lost);
    // The old master is a replica of the new one now (Sentinel reconfigured it).
    tokio::task::block_in_place(|| s.wait_replica_synced(old, Duration::from_secs(20)));
    // Nothing runs scripts on the old master any more (a replica applies their effects only).
    let evalsha = |port| {
        cli(port, &["INFO", "commandstats"])
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha"))
            .map(str::to_owned)
    };
    let before = evalsha(old);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        evalsha(old),
        before,
        "scripts still sent to the demoted master"
    );

    // 2. The master killed under load (-9), restarted once Sentinel has promoted the replica
    // (as a supervisor would): it comes back empty and Sentinel makes it a replica.
    let load = Load::start(urls.clone(), 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old = s.master_port();
    let t = Instant::now();
    s.master().kill();
    let new = tokio::task::block_in_place(|| s.wait_new_master(old, Duration::from_secs(15)));
    let no_master = t.elapsed();
    let n = s.nodes.iter_mut().find(|n| n.port == old).unwrap();
    tokio::task::block_in_place(|| n.restart());
    tokio::task::block_in_place(|| s.wait_replica_synced(old, Duration::from_secs(20)));
    let replica_back = t.elapsed();
    let back = wait_service(&urls, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let elapsed = load.started.elapsed();
    let stats = load.stop().await;
    let lost = check_sessions(&stats, &urls, Some(&s)).await;
    if lost > 0 {
        explain_loss(&[&a, &b], &s);
    }
    report(
        "sentinel kill -9 master",
        &stats,
        &format!(
            "master {old} -> {new}: no master for {no_master:?}, replica back after {replica_back:?}, sessions checked {}, lost {lost}, probe login ok {back:?} after",
            stats.sessions.lock().unwrap().len()
        ),
        elapsed,
    );
    assert_clean(&stats, lost);
    logout_is_seen_by_the_other_replica(&urls).await;
    assert!(a.logs().contains("Sentinel master changed"), "{}", a.logs());
    let m = common::get_url(&client(), &format!("{}/metrics", a.admin_url())).await;
    let m = String::from_utf8_lossy(&m.body).into_owned();
    assert!(
        m.contains("mrp_token_cache_flushes_total{reason=\"master_switch\"}"),
        "{m}"
    );
    let switches: u64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("mrp_redis_master_switches_total ")?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(switches >= 2, "two failovers followed: {switches}");
    drop((a, b));
    shared_login_budget(&hs, &loc).await;
}

/// Two more proxies with `rate_limit.backend: redis` on the same Redis share one login budget
/// (burst 4, practically no refill) whatever proxy a client reaches.
async fn shared_login_budget(hs: &FakeHs, location: &str) {
    let o = ProxyOptions {
        extra: "rate_limit:\n  backend: redis\n  login: {per_second: 0.01, burst: 4}\n".to_owned(),
        ..Default::default()
    };
    let p = [
        ProxyProcess::start_on(&hs.url(), location, &o),
        ProxyProcess::start_on(&hs.url(), location, &o),
    ];
    let c = client();
    let mut allowed = 0;
    for i in 0..10 {
        let r = send(
            &c,
            Method::POST,
            &format!("{}{LOGIN}", p[i % 2].url()),
            None,
            Some(json!({"type": "m.login.password", "user": "rl"})),
        )
        .await;
        match r.status.as_u16() {
            200 => allowed += 1,
            429 => {}
            s => panic!("login: {s} {:?}", r.json()),
        }
    }
    // Each proxy alone would allow 4 (its local limit): the shared budget allows 4 in all.
    assert_eq!(allowed, 4, "logins allowed by two replicas sharing burst 4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_migration_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let cluster = ClusterSetup::start(3);
    let hs = FakeHs::start().await;
    let loc = cluster_location(&cluster);
    let o = ha_options(0);
    let a = ProxyProcess::start_on(&hs.url(), &loc, &o);
    let b = ProxyProcess::start_on(&hs.url(), &loc, &o);
    let urls = vec![a.url(), b.url()];
    wait_service(&urls, Duration::from_secs(10)).await;

    let load = Load::start(urls.clone(), 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (from, to) = (cluster.nodes[0].port, cluster.nodes[1].port);
    let range = cluster.first_range(from);
    let t = Instant::now();
    // A fifth of the first node's slots (reshard takes them from the start of its range),
    // keys and all, while the load goes on.
    tokio::task::block_in_place(|| cluster.reshard(from, to, 1100));
    let moved = t.elapsed();
    let moved_slots = range.start..range.start + 1100;
    let keys_moved = cluster.keys_in_slots(to, moved_slots.clone());
    assert!(keys_moved > 0, "no session keys were in the moved slots");
    assert_eq!(cluster.keys_in_slots(from, moved_slots), 0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let elapsed = load.started.elapsed();
    let stats = load.stop().await;
    let lost = check_sessions(&stats, &urls, None).await;
    report(
        "cluster reshard 1100 slots",
        &stats,
        &format!(
            "migration took {moved:?} ({keys_moved} keys now on the new owner), sessions checked {}, lost {lost}",
            stats.sessions.lock().unwrap().len()
        ),
        elapsed,
    );
    assert_clean(&stats, lost);
    logout_is_seen_by_the_other_replica(&urls).await;
    logout_all_reaches_every_slot(&urls).await;
    // The token cache served hits on the cluster (its heartbeats came back from every primary).
    let m = common::get_url(&client(), &format!("{}/metrics", a.admin_url())).await;
    let m = String::from_utf8_lossy(&m.body).into_owned();
    let hits: f64 = m
        .lines()
        .find_map(|l| {
            l.strip_prefix("mrp_token_cache_lookups_total{result=\"hit\"} ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    assert!(hits > 0.0, "no token cache hit on the cluster:\n{m}");
    shared_login_budget(&hs, &loc).await;
    // WAIT goes to the node that took the write: these masters have no replica, so a login
    // that must be acknowledged by one is refused with 503 and Retry-After, and no token is
    // handed out.
    let strict = ProxyProcess::start_on(&hs.url(), &loc, &ha_options(1));
    let r = send(
        &client(),
        Method::POST,
        &format!("{}{LOGIN}", strict.url()),
        None,
        Some(login_body("strict")),
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));
    assert!(!String::from_utf8_lossy(&r.body).contains("access_token"));
}

/// `/logout/all` through one proxy ends a user's sessions in every slot (the per-user index
/// is its own key; each session is purged on its own node).
async fn logout_all_reaches_every_slot(urls: &[String]) {
    let c = client();
    let mut ats = Vec::new();
    for i in 0..6 {
        let r = send(
            &c,
            Method::POST,
            &format!("{}{LOGIN}", urls[i % 2]),
            None,
            Some(login_body("many")),
        )
        .await;
        assert_eq!(r.status, 200);
        ats.push(r.json()["access_token"].as_str().unwrap().to_owned());
    }
    let out = send(
        &c,
        Method::POST,
        &format!("{}{LOGOUT}/all", urls[0]),
        Some(&ats[0]),
        Some(json!({})),
    )
    .await;
    assert_eq!(out.status, 200, "{:?}", out.json());
    for at in &ats {
        let w = send(
            &c,
            Method::GET,
            &format!("{}{WHOAMI}", urls[1]),
            Some(at),
            None,
        )
        .await;
        assert_eq!(w.status, 401, "a session survived /logout/all");
    }
}
