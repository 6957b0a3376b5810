//! Connections and the proxy's own answers (issue 9, points 2 and 3): keep-alive connections
//! survive every answer the proxy makes itself, request bodies have a deadline, and one host
//! cannot hold more than `http.max_connections_per_ip` connections.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;
use serde_json::json;

const LOGIN: &str = "/_matrix/client/v3/login";
const REFRESH: &str = "/_matrix/client/v3/refresh";

async fn harness(yaml: &str) -> Harness {
    let o = ProxyOptions {
        extra: format!("{yaml}\n"),
        ..Default::default()
    };
    Harness::with(o, false).await
}

/// A body sent as two writes a moment apart (head and start first, as many clients do).
fn split_body(s: String) -> TestBody {
    let b = bytes::Bytes::from(s);
    let (a, rest) = (b.slice(..100), b.slice(100..));
    let frames = futures_util::stream::unfold(0u8, move |i| {
        let (a, rest) = (a.clone(), rest.clone());
        async move {
            match i {
                0 => Some((
                    Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(a)),
                    1,
                )),
                1 => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Some((Ok(hyper::body::Frame::data(rest)), 2))
                }
                _ => None,
            }
        }
    });
    http_body_util::StreamBody::new(frames)
        .map_err(|never| match never {})
        .boxed()
}

/// 16 keep-alive clients, 3 rounds of 300 `POST /login` with a JSON body, all past the login
/// limit: every one gets its 429, none loses its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn over_limit_logins_on_keepalive_connections_all_get_their_429() {
    let h = harness("rate_limit:\n  login: {per_second: 0.001, burst: 1}").await;
    let url = format!("{}{LOGIN}", h.proxy.url());
    let login = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "mallory"},
        "password": "x".repeat(30_000),
        "refresh_token": true,
    })
    .to_string();
    // No silent retry on a connection that closed under a request: every loss counts.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .retry_canceled_requests(false)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let transport_errors = Arc::new(AtomicUsize::new(0));
    let limited = Arc::new(AtomicUsize::new(0));
    let mut first_error = None;
    for _round in 0..3 {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..16 {
            let (client, url, login) = (client.clone(), url.clone(), login.clone());
            let (next, errors, limited) = (next.clone(), transport_errors.clone(), limited.clone());
            workers.push(tokio::spawn(async move {
                let mut first = None;
                while next.fetch_add(1, Ordering::Relaxed) < 300 {
                    let req = Request::builder()
                        .method(Method::POST)
                        .uri(&url)
                        .header("content-type", "application/json")
                        .header("content-length", login.len())
                        .body(split_body(login.clone()))
                        .unwrap();
                    match client.request(req).await {
                        Ok(res) => {
                            let status = res.status().as_u16();
                            match res.into_body().collect().await {
                                Ok(_) if status == 429 => {
                                    limited.fetch_add(1, Ordering::Relaxed);
                                }
                                Ok(_) => {}
                                Err(e) => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    first.get_or_insert(e.to_string());
                                }
                            }
                        }
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            first.get_or_insert(format!("{e:?}"));
                        }
                    }
                }
                first
            }));
        }
        for w in workers {
            if let Some(e) = w.await.unwrap() {
                first_error.get_or_insert(e);
            }
        }
    }
    let errors = transport_errors.load(Ordering::Relaxed);
    assert_eq!(
        errors, 0,
        "{errors} transport errors, first: {first_error:?}"
    );
    // The first login of the burst may pass; everything else is limited.
    assert!(limited.load(Ordering::Relaxed) >= 899);
}

/// Sends `head` then, after `delay`, `rest`, and then `next` on the same connection; returns
/// everything read until the peer closes or 5 s pass.
fn exchange(
    addr: std::net::SocketAddr,
    head: &[u8],
    delay: Duration,
    rest: &[u8],
    next: &[u8],
) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(head).unwrap();
    std::thread::sleep(delay);
    let _ = s.write_all(rest);
    std::thread::sleep(Duration::from_millis(100));
    let _ = s.write_all(next);
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if String::from_utf8_lossy(&out).matches("HTTP/1.1 ").count() >= 2 {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The body arrives after the proxy decided to answer 429: either it is read and discarded (the
/// next request on the connection is answered) or the 429 says `Connection: close`.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_body_after_a_429_never_breaks_the_connection_silently() {
    let h = harness("rate_limit:\n  login: {per_second: 0.001, burst: 1}").await;
    // Spends the burst of one.
    h.post(LOGIN, None, json!({"type": "m.login.password"}))
        .await;
    let addr = h.proxy.addr;
    let body = format!(
        "{{\"type\":\"m.login.password\",\"password\":\"{}\"}}",
        "x".repeat(30_000)
    );
    let head = format!(
        "POST {LOGIN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let next = b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n";
    let out = tokio::task::spawn_blocking(move || {
        exchange(
            addr,
            head.as_bytes(),
            Duration::from_millis(200),
            body.as_bytes(),
            next,
        )
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
    let first = &out[..out.find("\r\n\r\n").unwrap()].to_ascii_lowercase();
    let answered_next = out.matches("HTTP/1.1 ").count() >= 2;
    assert!(
        answered_next || first.contains("connection: close"),
        "the connection closed after the 429 without saying so:\n{out}"
    );
}

/// The head of `POST /refresh` with `Content-Length: 100` and no body: answered 408 within the
/// body timeout, with `Connection: close`, and the connection is freed.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_refresh_body_gets_408_within_the_timeout() {
    let h = harness("http:\n  body_read_timeout: \"1s\"").await;
    let addr = h.proxy.addr;
    let (out, took, closed) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST {REFRESH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"refresh"
        )
        .unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        (String::from_utf8_lossy(&out).into_owned(), started.elapsed(), closed)
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    assert!(out.contains("M_UNKNOWN"), "{out}");
    assert!(closed, "the connection stayed open");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Others are served meanwhile and after.
    assert_eq!(h.get("/_matrix/client/versions", None).await.status, 200);
}

/// A streamed upload that stalls longer than the body timeout is cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_streamed_upload_is_cut() {
    let h = harness("http:\n  body_read_timeout: \"1s\"").await;
    let addr = h.proxy.addr;
    let (out, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /_matrix/media/v3/upload HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n{}",
            "a".repeat(1000)
        )
        .unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
}

/// Whether the proxy answers a request on `s` (false: it closed the connection).
fn answers(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
}

/// `http.max_connections_per_ip: 3`: a 4th connection from 127.0.0.1 is refused while 3 are
/// held, and accepted again once one closes; the refusal is counted.
#[tokio::test(flavor = "multi_thread")]
async fn connections_per_ip_are_capped() {
    let h = harness("http:\n  max_connections_per_ip: 3").await;
    let addr = h.proxy.addr;
    let metrics = tokio::task::spawn_blocking(move || {
        let mut held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for s in &mut held {
            assert!(answers(s), "a connection within the cap was refused");
        }
        let mut extra = TcpStream::connect(addr).unwrap();
        assert!(!answers(&mut extra), "the 4th connection was served");
        drop(held.pop());
        std::thread::sleep(Duration::from_millis(200));
        let mut again = TcpStream::connect(addr).unwrap();
        assert!(answers(&mut again), "refused after one connection closed");
        drop(held);
    })
    .await;
    metrics.unwrap();
    let m = h.metrics().await;
    assert!(
        m.contains("mrp_connections_rejected_total{reason=\"per_ip\"} 1"),
        "{m}"
    );
    assert!(m.contains("mrp_connection_tracked_ips "), "{m}");
}
