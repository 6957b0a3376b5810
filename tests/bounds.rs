//! Hard bounds: slowloris, idle keep-alive, connection cap, upstream connect timeout, body limits
//! (issue 4 "Hard bounds").

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn opts(extra: &str) -> ProxyOptions {
    ProxyOptions {
        extra: extra.to_owned(),
        ..Default::default()
    }
}

/// Reads until EOF or `limit`; returns what was read and whether the peer closed.
fn read_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return (out, true),
        }
    }
    (out, false)
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_client_is_cut_off_while_others_are_served() {
    let h = Harness::with(opts("http:\n  header_read_timeout: \"1s\"\n"), false).await;
    let addr = h.proxy.addr;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let started = Instant::now();
        let head = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for b in head.iter() {
            if s.write_all(&[*b]).is_err() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(200));
            s.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => return started.elapsed(),
                Ok(_) => return started.elapsed(),
                Err(_) => {}
            }
            s.set_nonblocking(false).unwrap();
        }
        panic!("slow client was never cut off");
    });
    // Meanwhile others are served.
    for _ in 0..5 {
        assert_eq!(h.get("/_matrix/client/versions", None).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_after = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(
        cut_after < Duration::from_secs(4),
        "cut off after {cut_after:?}"
    );
    assert!(
        cut_after >= Duration::from_millis(800),
        "cut off too early: {cut_after:?}"
    );
}

/// `http.header_read_timeout` also bounds the wait for the next request on an HTTP/1 keep-alive
/// connection (hyper's header-read timer, fired by the connection's own watcher): the
/// connection closes after it, never before, however long `idle_timeout` is, while a
/// connection that keeps sending requests stays open.
#[tokio::test(flavor = "multi_thread")]
async fn header_read_timeout_bounds_the_keepalive_wait_for_the_next_head() {
    let h = Harness::with(
        opts("http:\n  header_read_timeout: \"1s\"\n  idle_timeout: \"60s\"\n"),
        false,
    )
    .await;
    let addr = h.proxy.addr;
    let (busy_open, idle_closed, idle_after) = tokio::task::spawn_blocking(move || {
        let get = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n";
        let answer = |s: &mut TcpStream| {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8192];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        };
        // A request every 600 ms for 3 s: each head arrives within the timeout.
        let mut busy = TcpStream::connect(addr).unwrap();
        for _ in 0..5 {
            busy.write_all(get).unwrap();
            answer(&mut busy);
            std::thread::sleep(Duration::from_millis(600));
        }
        busy.write_all(get).unwrap();
        answer(&mut busy);
        // One request, then nothing.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(get).unwrap();
        answer(&mut idle);
        let idle_start = Instant::now();
        let (_, closed) = read_until_close(&mut idle, Duration::from_secs(5));
        (true, closed, idle_start.elapsed())
    })
    .await
    .unwrap();
    assert!(busy_open);
    assert!(idle_closed, "the keep-alive wait was not bounded");
    assert!(
        idle_after >= Duration::from_millis(950) && idle_after < Duration::from_secs(3),
        "closed after {idle_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keepalive_connections_close_but_long_polls_do_not() {
    let h = Harness::with(opts("http:\n  idle_timeout: \"1s\"\n"), false).await;
    let v = h.login("alice").await;
    let addr = h.proxy.addr;
    let token = at(&v);
    let res = tokio::task::spawn_blocking(move || {
        // A long poll longer than the idle timeout completes …
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /_matrix/client/v3/sync?timeout=2500 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while !String::from_utf8_lossy(&got).contains("next_batch") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "connection closed during a long poll");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() >= Duration::from_millis(2400));
        // … then the idle keep-alive connection is closed about a second later.
        let idle_start = Instant::now();
        let (_, closed) = read_until_close(&mut s, Duration::from_secs(5));
        (closed, idle_start.elapsed())
    })
    .await
    .unwrap();
    assert!(res.0, "idle connection was not closed");
    assert!(
        res.1 >= Duration::from_millis(800) && res.1 < Duration::from_secs(4),
        "{:?}",
        res.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_cap_queues_extra_clients() {
    let h = Harness::with(opts("http:\n  max_connections: 2\n"), false).await;
    let addr = h.proxy.addr;
    let held1 = TcpStream::connect(addr).unwrap();
    let held2 = TcpStream::connect(addr).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(
            b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let started = Instant::now();
        let (out, _) = read_until_close(&mut s, Duration::from_secs(10));
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    drop(held1);
    let (out, waited) = tokio::task::spawn_blocking(move || waiter.join().unwrap())
        .await
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        waited >= Duration::from_millis(500),
        "served before a slot was free: {waited:?}"
    );
    drop(held2);
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_connect_timeout_is_504() {
    // A listener whose accept queue is full and never drained: connects hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start(
        &format!("http://{addr}"),
        &redis.url(),
        &ProxyOptions::default(),
    );
    let c = client();
    let started = Instant::now();
    let res = c
        .request(
            http::Request::get(format!("{}/_matrix/client/versions", proxy.url()))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 504, "{}", proxy.logs());
    // The harness sets upstream.connect_timeout to 2s.
    assert!(
        started.elapsed() >= Duration::from_millis(1800),
        "{:?}",
        started.elapsed()
    );
    drop(listener);
}

#[tokio::test]
async fn bodies_the_proxy_reads_are_limited() {
    let h = Harness::with(opts("http:\n  max_json_body: 2048\n"), false).await;
    let v = h.login("alice").await;
    let pad = "x".repeat(4096);
    for path in [
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/register",
        "/_matrix/client/v3/refresh",
        "/_matrix/client/v3/delete_devices",
        "/_matrix/client/v3/account/password",
    ] {
        let r = h.post(path, Some(&at(&v)), json!({"pad": pad})).await;
        assert_eq!(r.status, 413, "{path}");
        assert_eq!(r.errcode(), "M_TOO_LARGE");
    }
    // Forwarded bodies are not limited by the proxy.
    let r = h
        .post(
            "/_matrix/client/v3/rooms/x/send/m.room.message/t",
            Some(&at(&v)),
            json!({"pad": "y".repeat(100_000)}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(h.hs.requests_to("/login").len() == 1);
}

#[tokio::test]
async fn oversized_request_head_is_refused() {
    let h = Harness::start().await;
    let big = "a".repeat(100 * 1024);
    let r = h
        .send(
            http::Method::GET,
            "/_matrix/client/versions",
            &[("x-big", big.as_str())],
            body(""),
        )
        .await;
    assert_eq!(r.status, 431);
    assert_eq!(h.get("/_matrix/client/versions", None).await.status, 200);
}

/// Homeserver connections are capped (`upstream.max_connections`): with the only one held by a
/// long poll, another request waits `upstream.connect_timeout` (2 s in the harness), then gets
/// 503 with `Retry-After`, counted as `saturated`; readiness says so; once the poll ends, the
/// connection serves the next request.
#[tokio::test]
async fn homeserver_connections_are_capped_and_a_request_past_the_cap_gets_503() {
    let h = Harness::with(
        ProxyOptions {
            upstream_extra: "  max_connections: 1\n".to_owned(),
            ..Default::default()
        },
        false,
    )
    .await;
    let s = h.login("alice").await;
    let token = at(&s);
    let poll = {
        let (h, token) = (&h, token.clone());
        async move {
            h.get("/_matrix/client/v3/sync?timeout=4000", Some(&token))
                .await
        }
    };
    let waited = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let ready = h.admin_get("/health/ready").await;
        let r = h.whoami(&token).await;
        (r, started.elapsed(), ready)
    };
    let (poll, (r, took, ready)) = tokio::join!(poll, waited);
    assert_eq!(poll.status, 200);
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    assert!(r.headers.contains_key("retry-after"));
    assert!(
        took >= Duration::from_millis(1900),
        "answered after {took:?}"
    );
    assert_eq!(ready.status, 503);
    assert!(
        String::from_utf8_lossy(&ready.body).contains("all homeserver connections busy"),
        "{:?}",
        ready.body
    );
    let m = h.metrics().await;
    assert!(
        m.lines().any(
            |l| l.starts_with("mrp_upstream_errors_total{") && l.contains("kind=\"saturated\"")
        ),
        "{m}"
    );
    assert!(m.contains("mrp_upstream_connections_open 1"), "{m}");
    // The poll is over: its connection serves the next request.
    assert_eq!(h.whoami(&token).await.status, 200);
    assert!(
        h.metrics()
            .await
            .contains("mrp_upstream_connections_open 1")
    );
}

/// Requests in flight per client IP are capped over all its connections
/// (`http.max_requests_per_ip`): with two long polls in flight, a third request is answered 429
/// at once; when they end, requests pass again.
#[tokio::test]
async fn requests_in_flight_per_ip_are_capped() {
    let h = Harness::with(opts("http:\n  max_requests_per_ip: 2\n"), false).await;
    let s = h.login("alice").await;
    let token = at(&s);
    let poll = || h.get("/_matrix/client/v3/sync?timeout=2000", Some(&token));
    let third = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let r = h.whoami(&token).await;
        let took = started.elapsed();
        // /refresh is never refused by this cap (it holds no homeserver connection, and some
        // SDKs log out on any JSON error from it).
        let refreshed = h.refresh(&rt(&s)).await;
        // A refused request with a body: the body is drained, the connection kept (no
        // `Connection: close`, which could reset the connection before the client read the
        // 429).
        let posted = h
            .post(
                "/_matrix/client/v3/rooms/!r:fake.test/send/m.room.message/t1",
                Some(&token),
                json!({"msgtype": "m.text", "body": "hello"}),
            )
            .await;
        (r, took, refreshed, posted)
    };
    let (a, b, (r, took, refreshed, posted)) = tokio::join!(poll(), poll(), third);
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.body);
    assert_eq!(posted.status, 429, "{:?}", posted.body);
    assert!(
        posted.headers.get("connection").is_none(),
        "{:?}",
        posted.headers
    );
    assert_eq!(a.status, 200);
    assert_eq!(b.status, 200);
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(r.errcode(), "M_LIMIT_EXCEEDED");
    assert_eq!(r.json()["retry_after_ms"], 1000);
    assert!(
        took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    // Both polls are over: the next request passes.
    assert_eq!(h.whoami(&token).await.status, 200);
}
