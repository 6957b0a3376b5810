//! Redis cost per operation, for the README's capacity page: commands (from `INFO
//! commandstats`), network bytes (`INFO stats`) and memory per session (`MEMORY USAGE`), measured
//! on a private Redis through the proxy. `cargo test --test capacity -- --nocapture` prints the
//! table; the assertions pin the command counts, so a change in the hot path shows up here.

mod common;

use std::collections::BTreeMap;

use common::*;

/// `cmdstat_<name>` → (calls, µs of Redis CPU), from `INFO commandstats`.
fn commandstats(h: &Harness) -> BTreeMap<String, (u64, u64)> {
    h.redis
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let mut f = rest.split(',');
            let calls = f.next()?.strip_prefix("calls=")?.parse().ok()?;
            let usec = f.next()?.strip_prefix("usec=")?.parse().ok()?;
            Some((name.to_owned(), (calls, usec)))
        })
        .collect()
}

fn stat(h: &Harness, field: &str) -> u64 {
    h.redis
        .cli(&["INFO", "stats"])
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// What `n` operations cost Redis: commands per operation (by name) and bytes per operation.
struct Cost {
    commands: BTreeMap<String, f64>,
    /// Redis CPU time per operation (µs, the scripts' `usec` in commandstats).
    usec: f64,
    bytes_in: f64,
    bytes_out: f64,
}

async fn measure<F, Fut>(h: &Harness, n: usize, mut op: F) -> Cost
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = commandstats(h);
    let (in0, out0) = (
        stat(h, "total_net_input_bytes"),
        stat(h, "total_net_output_bytes"),
    );
    for i in 0..n {
        op(i).await;
    }
    let after = commandstats(h);
    let (in1, out1) = (
        stat(h, "total_net_input_bytes"),
        stat(h, "total_net_output_bytes"),
    );
    let mut commands = BTreeMap::new();
    let mut usec = 0;
    for (k, (calls, us)) in &after {
        // The INFO calls of this measurement and the proxy's own background PINGs / SCANs are
        // not the operation's.
        if k == "info" || k == "ping" || k == "scan" {
            continue;
        }
        let (c0, us0) = before.get(k).copied().unwrap_or((0, 0));
        if calls - c0 > 0 {
            commands.insert(k.clone(), (calls - c0) as f64 / n as f64);
        }
        // Commands run by a script are timed inside the script's own time: count top-level
        // calls only (EVALSHA/EVAL and plain commands the proxy sends).
        if matches!(k.as_str(), "evalsha" | "eval" | "hgetall" | "hdel" | "wait") {
            usec += us - us0;
        }
    }
    Cost {
        usec: usec as f64 / n as f64,
        commands,
        bytes_in: (in1 - in0) as f64 / n as f64,
        bytes_out: (out1 - out0) as f64 / n as f64,
    }
}

fn show(name: &str, c: &Cost) -> String {
    let cmds: Vec<String> = c
        .commands
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect();
    format!(
        "| {name} | {} | {:.0} | {:.0} | {:.0} |",
        cmds.join(", "),
        c.usec,
        c.bytes_in,
        c.bytes_out
    )
}

fn calls(c: &Cost, cmd: &str) -> f64 {
    c.commands.get(cmd).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn redis_cost_per_login_refresh_and_request() {
    let h = Harness::with(
        ProxyOptions {
            // The token cache off: what each operation costs Redis (the cache's effect is
            // measured last).
            extra: "rate_limit:\n  enabled: false\ncache:\n  enabled: false\n".to_owned(),
            ..Default::default()
        },
        false,
    )
    .await;
    // Warm up: scripts loaded, connection open.
    let v = h.login("warm").await;
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);

    const N: usize = 100;
    let sessions = std::sync::Mutex::new(Vec::new());
    let login = measure(&h, N, |i| {
        let h = &h;
        let sessions = &sessions;
        async move {
            let v = h.login(&format!("u{i}")).await;
            sessions.lock().unwrap().push((at(&v), rt(&v)));
        }
    })
    .await;
    let first = sessions.lock().unwrap().clone();
    // The first request with a session's first access token (ends nothing: no predecessor).
    let first_use = measure(&h, N, |i| {
        let h = &h;
        let t = first[i].0.clone();
        async move { assert_eq!(h.whoami(&t).await.status, 200) }
    })
    .await;
    let request = measure(&h, N, |i| {
        let h = &h;
        let t = first[i].0.clone();
        async move { assert_eq!(h.whoami(&t).await.status, 200) }
    })
    .await;
    let refreshed = std::sync::Mutex::new(Vec::new());
    let refresh = measure(&h, N, |i| {
        let h = &h;
        let t = first[i].1.clone();
        let refreshed = &refreshed;
        async move {
            let r = h.refresh(&t).await;
            assert_eq!(r.status, 200);
            let v = r.json();
            refreshed.lock().unwrap().push(at(&v));
        }
    })
    .await;
    let second = refreshed.lock().unwrap().clone();
    // First use of a refreshed access token: ends the old refresh token's grace.
    let after_refresh = measure(&h, N, |i| {
        let h = &h;
        let t = second[i].clone();
        async move { assert_eq!(h.whoami(&t).await.status, 200) }
    })
    .await;

    // Memory of one session (all its keys), right after login and after refreshes.
    let mem = |pattern: &str| -> (u64, u64) {
        let keys = h.redis.cli(&["--scan", "--pattern", pattern]);
        let keys: Vec<&str> = keys.lines().collect();
        let bytes = keys
            .iter()
            .map(|k| {
                h.redis
                    .cli(&["MEMORY", "USAGE", k])
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
            .sum();
        (keys.len() as u64, bytes)
    };
    let sessions_total = mem("mrp:{*}:*");
    let index_total = mem("mrp:u*");
    let per_session = sessions_total.1 as f64 / (N + 1) as f64;
    let per_index = index_total.1 as f64 / (N + 1) as f64;
    let used_memory = h
        .redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();

    println!(
        "| operation | Redis commands per operation (round trips: evalsha, and a refresh's first HMGET pair; the rest run inside the scripts) | Redis CPU µs | bytes to Redis | bytes from Redis |"
    );
    println!("|---|---|---|---|---|");
    for (name, c) in [
        ("login", &login),
        ("first request with a new access token", &first_use),
        ("authenticated request", &request),
        ("refresh", &refresh),
        ("first request after a refresh", &after_refresh),
    ] {
        println!("{}", show(name, c));
    }
    println!(
        "memory: {} session keys for {} sessions = {per_session:.0} B/session (MEMORY USAGE, refreshed once), user index {per_index:.0} B/session; used_memory {used_memory}",
        sessions_total.0,
        N + 1
    );

    // The hot path is one script call; a login two (index, create), a refresh one (rotate)
    // after a pipeline of two plain HMGETs (a live token's record and session, issue 11):
    // the user index is extended only when the session's keys are (an eighth of their TTL at a
    // time, store/lua/common.lua `slack`), not on every refresh.
    assert_eq!(calls(&request, "evalsha"), 1.0);
    assert_eq!(calls(&first_use, "evalsha"), 1.0);
    assert_eq!(calls(&after_refresh, "evalsha"), 1.0);
    assert_eq!(calls(&login, "evalsha"), 2.0);
    assert_eq!(calls(&refresh, "evalsha"), 1.0);

    // With the token cache on, a token seen before costs no Redis call; the heartbeats do (50
    // PUBLISHes a second per replica).
    let h = Harness::with(
        ProxyOptions {
            extra: "rate_limit:\n  enabled: false\n".to_owned(),
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("cached").await;
    let t = at(&v);
    assert_eq!(h.whoami(&t).await.status, 200);
    let cached = measure(&h, N, |_| {
        let h = &h;
        let t = t.clone();
        async move { assert_eq!(h.whoami(&t).await.status, 200) }
    })
    .await;
    println!("{}", show("authenticated request, token cache on", &cached));
    assert_eq!(calls(&cached, "evalsha"), 0.0);
}
