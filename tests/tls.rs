//! TLS, black-box: the client listener (HTTP/1.1 and HTTP/2, X-Forwarded-Proto, certificate
//! reload on SIGHUP, handshake deadline), an HTTPS homeserver, rediss:// and the PEM checks of
//! check-config. Every certificate is made here by rcgen.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::tls::{Leaf, TestCa, connect, https_client, peer_leaf, send};
use common::{FakeHs, Harness, ProxyOptions, ProxyProcess, RedisServer, at, body, rt};
use http::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const VERSIONS: &str = "/_matrix/client/versions";

fn tls_yaml(cert: &Path, key: &Path) -> String {
    format!(
        "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// A harness whose proxy serves `leaf` (written into `dir`) on its client listener.
async fn tls_harness(dir: &Path, leaf: &Leaf, extra: &str) -> Harness {
    let (cert, key) = leaf.write(dir);
    Harness::with(
        ProxyOptions {
            extra: format!("{}{extra}", tls_yaml(&cert, &key)),
            ..Default::default()
        },
        false,
    )
    .await
}

fn hangup(proxy: &ProxyProcess) {
    let ok = Command::new("kill")
        .arg("-HUP")
        .arg(proxy.pid().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -HUP failed");
}

/// Waits until `needle` appears `count` times in the proxy's logs.
async fn wait_for_log(proxy: &ProxyProcess, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.logs().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the logs:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn https_listener_serves_http1_and_http2_and_forwards_proto_https() {
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    let h = tls_harness(dir.path(), &ca.leaf("proxy", 1), "").await;
    let url = format!("{}{VERSIONS}", h.proxy.https_url());

    let (r, version) = send(
        &https_client(&ca, false),
        Method::GET,
        &url,
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(version, http::Version::HTTP_11);

    // ALPN offers h2: a client that prefers it gets HTTP/2.
    let (r, version) = send(
        &https_client(&ca, true),
        Method::GET,
        &url,
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(version, http::Version::HTTP_2);

    let seen = h.hs.requests_to(VERSIONS);
    assert_eq!(seen.len(), 2);
    for r in seen {
        assert_eq!(r.headers["x-forwarded-proto"], "https");
    }

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = common::client()
        .request(
            Request::get(format!("{}{VERSIONS}", h.proxy.url()))
                .body(body(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(plain.is_err(), "plain HTTP was answered on the TLS port");
    assert_eq!(h.hs.requests_to(VERSIONS).len(), 2);
}

#[tokio::test]
async fn login_refresh_and_request_over_tls() {
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    let h = tls_harness(dir.path(), &ca.leaf("proxy", 1), "").await;
    let client = https_client(&ca, true);
    let base = h.proxy.https_url();
    let post = |path: &str, v: serde_json::Value| {
        let url = format!("{base}{path}");
        let client = client.clone();
        async move {
            send(
                &client,
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                Bytes::from(v.to_string()),
            )
            .await
            .0
        }
    };

    let login = post(
        "/_matrix/client/v3/login",
        json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"},
            "password": "secret",
            "refresh_token": true,
        }),
    )
    .await;
    assert_eq!(login.status, 200, "{:?}", login.json());
    let refreshed = post(
        "/_matrix/client/v3/refresh",
        json!({"refresh_token": rt(&login.json())}),
    )
    .await;
    assert_eq!(refreshed.status, 200, "{:?}", refreshed.json());
    let bearer = format!("Bearer {}", at(&refreshed.json()));
    let (whoami, version) = send(
        &client,
        Method::GET,
        &format!("{base}/_matrix/client/v3/account/whoami"),
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await;
    assert_eq!(whoami.status, 200, "{:?}", whoami.json());
    assert_eq!(whoami.json()["user_id"], "@alice:fake.test");
    assert_eq!(version, http::Version::HTTP_2);
    let upstream = h.hs.requests_to("/account/whoami");
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0].headers["x-forwarded-proto"], "https");
    // HTTP/2 has no Host header: the :authority the client used becomes X-Forwarded-Host.
    let authority = base.trim_start_matches("https://");
    assert_eq!(upstream[0].headers["x-forwarded-host"], authority);
    assert!(FakeHs::is_upstream_token(&upstream[0].bearer().unwrap()));
}

/// An HTTP/1.1 connection over TLS: its certificate and a request sender.
async fn open_connection(
    proxy: &ProxyProcess,
    ca: &TestCa,
) -> (
    rustls::pki_types::CertificateDer<'static>,
    hyper::client::conn::http1::SendRequest<common::TestBody>,
) {
    let stream = connect(proxy.addr, ca, &[b"http/1.1"]).await;
    let leaf = peer_leaf(&stream);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    (leaf, sender)
}

async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<common::TestBody>,
) -> StatusCode {
    let req = Request::get(VERSIONS)
        .header("host", "127.0.0.1")
        .body(body(Bytes::new()))
        .unwrap();
    sender
        .send_request(req)
        .await
        .expect("answered on the open connection")
        .status()
}

#[tokio::test]
async fn sighup_serves_a_new_certificate_to_new_connections_and_keeps_open_ones() {
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf("first", 1);
    let h = tls_harness(dir.path(), &first, "").await;
    assert!(h.proxy.logs().contains(&sha256_hex(&first.der)));

    let (leaf, mut old) = open_connection(&h.proxy, &ca).await;
    assert_eq!(leaf, first.der);
    assert_eq!(get_on(&mut old).await, 200);

    let second = ca.leaf("second", 2);
    second.write(dir.path());
    hangup(&h.proxy);
    wait_for_log(&h.proxy, "TLS certificate reloaded", 1).await;
    // The log names the certificate now in force.
    assert!(h.proxy.logs().contains(&sha256_hex(&second.der)));

    let (leaf, mut new) = open_connection(&h.proxy, &ca).await;
    assert_eq!(
        leaf, second.der,
        "a new connection still got the old certificate"
    );
    assert_eq!(get_on(&mut new).await, 200);
    // The keep-alive connection opened before the reload was not dropped.
    assert_eq!(get_on(&mut old).await, 200);
    assert_eq!(get_on(&mut old).await, 200);
}

#[tokio::test]
async fn broken_files_at_sighup_keep_the_old_certificate() {
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.leaf("first", 1);
    let h = tls_harness(dir.path(), &first, "").await;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));

    // Garbage in the certificate file.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    hangup(&h.proxy);
    wait_for_log(&h.proxy, "TLS certificate not reloaded", 1).await;
    let (leaf, mut c) = open_connection(&h.proxy, &ca).await;
    assert_eq!(leaf, first.der);
    assert_eq!(get_on(&mut c).await, 200);

    // A new certificate with the old key (a half-finished renewal).
    let other = ca.leaf("other", 3);
    std::fs::write(&cert, &other.cert_pem).unwrap();
    std::fs::write(&key, &first.key_pem).unwrap();
    hangup(&h.proxy);
    wait_for_log(&h.proxy, "TLS certificate not reloaded", 2).await;
    let (leaf, mut c) = open_connection(&h.proxy, &ca).await;
    assert_eq!(leaf, first.der);
    assert_eq!(get_on(&mut c).await, 200);

    // Missing key file.
    std::fs::remove_file(&key).unwrap();
    hangup(&h.proxy);
    wait_for_log(&h.proxy, "TLS certificate not reloaded", 3).await;
    let (leaf, _) = open_connection(&h.proxy, &ca).await;
    assert_eq!(leaf, first.der);
    assert!(!h.proxy.logs().contains("TLS certificate reloaded"));
    // Once the files are right again, a SIGHUP takes them.
    other.write(dir.path());
    hangup(&h.proxy);
    wait_for_log(&h.proxy, "TLS certificate reloaded", 1).await;
    let (leaf, _) = open_connection(&h.proxy, &ca).await;
    assert_eq!(leaf, other.der);
    // No key material in the logs, whatever failed.
    let logs = h.proxy.logs();
    for line in first.key_pem.lines().chain(other.key_pem.lines()) {
        if !line.starts_with("-----") {
            assert!(!logs.contains(line), "key material in the logs");
        }
    }
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_cut_and_frees_its_slot() {
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    // One connection slot: the stalled handshake holds it until the deadline.
    let h = tls_harness(
        dir.path(),
        &ca.leaf("proxy", 1),
        "http:\n  header_read_timeout: \"1s\"\n  max_connections: 1\n",
    )
    .await;
    let started = Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(h.proxy.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let client = https_client(&ca, false);
    let url = format!("{}{VERSIONS}", h.proxy.https_url());
    let (r, _) = tokio::time::timeout(
        Duration::from_secs(10),
        send(&client, Method::GET, &url, &[], Bytes::new()),
    )
    .await
    .expect("the slot was freed");
    assert_eq!(r.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "served before the stalled handshake's deadline: {:?}",
        started.elapsed()
    );

    // The stalled connection was closed by the proxy.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf))
        .await
        .expect("the stalled connection was closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    wait_for_log(&h.proxy, "TLS handshake timed out", 1).await;
}

/// An idle keep-alive connection is closed as TLS asks (RFC 8446 "Closure Alerts": each party
/// sends `close_notify` before closing its write side): the client reads a clean end of stream,
/// not a truncation (OpenSSL 3 clients report one as "unexpected eof while reading").
#[tokio::test]
async fn an_idle_tls_connection_is_closed_with_close_notify() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new("client-side CA");
    let dir = tempfile::tempdir().unwrap();
    let h = tls_harness(
        dir.path(),
        &ca.leaf("proxy", 1),
        "http:\n  idle_timeout: \"1s\"\n",
    )
    .await;
    let mut stream = connect(h.proxy.addr, &ca, &[b"http/1.1"]).await;
    stream
        .write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    // The answer, then the connection left idle until the proxy closes it.
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("the idle connection was closed");
        match read {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
    // rustls reports a stream that ends without close_notify as UnexpectedEof.
    end.expect("a clean TLS end of stream (close_notify), not a truncation");
}

/// A harness in front of an HTTPS fake homeserver (certificate from `hs_ca`).
async fn https_upstream(hs_ca: &TestCa, upstream_extra: String) -> Harness {
    let redis = RedisServer::start();
    let hs = FakeHs::start_tls(hs_ca.leaf("homeserver", 7).server_config()).await;
    let proxy = ProxyProcess::start(
        &hs.url(),
        &redis.url(),
        &ProxyOptions {
            upstream_extra,
            ..Default::default()
        },
    );
    Harness {
        redis,
        hs,
        proxy,
        client: common::client(),
    }
}

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let hs_ca = TestCa::new("homeserver CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("hs-ca.pem");
    std::fs::write(&ca_file, &hs_ca.cert_pem).unwrap();
    let h = https_upstream(&hs_ca, format!("  ca_file: \"{}\"\n", ca_file.display())).await;
    assert!(h.hs.url().starts_with("https://"));

    let login = h.login("bob").await;
    let r = h.refresh(&rt(&login)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let w = h.whoami(&at(&r.json())).await;
    assert_eq!(w.status, 200, "{:?}", w.json());
    assert_eq!(w.json()["user_id"], "@bob:fake.test");
    // The client spoke plain HTTP to the proxy.
    assert_eq!(
        h.hs.requests_to("/account/whoami")[0].headers["x-forwarded-proto"],
        "http"
    );
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_502() {
    let hs_ca = TestCa::new("homeserver CA");
    let dir = tempfile::tempdir().unwrap();
    // Another CA in ca_file: only it is trusted.
    let other = TestCa::new("some other CA");
    let ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, &other.cert_pem).unwrap();
    let h = https_upstream(&hs_ca, format!("  ca_file: \"{}\"\n", ca_file.display())).await;
    let r = h.get(VERSIONS, None).await;
    assert_eq!(r.status, 502, "{:?}", r.json());
    assert!(h.hs.requests().is_empty());
    assert!(
        h.proxy
            .logs()
            .contains("invalid peer certificate: UnknownIssuer"),
        "the log says why: {}",
        h.proxy.logs()
    );

    // No ca_file: the system roots, which do not hold the test CA.
    let h = https_upstream(&hs_ca, String::new()).await;
    let r = h.get(VERSIONS, None).await;
    assert_eq!(r.status, 502, "{:?}", r.json());
    assert!(h.hs.requests().is_empty());
}

#[tokio::test]
async fn an_upstream_that_never_finishes_the_handshake_is_504_at_the_connect_timeout() {
    // Accepts TCP, then says nothing: the TLS handshake never completes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let ca = TestCa::new("homeserver CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let redis = RedisServer::start();
    // The harness sets upstream.connect_timeout 2s; response_timeout is 30s.
    let proxy = ProxyProcess::start(
        &format!("https://{addr}"),
        &redis.url(),
        &ProxyOptions {
            upstream_extra: format!("  ca_file: \"{}\"\n", ca_file.display()),
            ..Default::default()
        },
    );
    let started = Instant::now();
    let r = common::get_url(&common::client(), &format!("{}{VERSIONS}", proxy.url())).await;
    assert_eq!(r.status, 504, "{:?}", r.json());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "{took:?}"
    );
    silent.abort();
}

#[tokio::test]
async fn rediss_with_ca_file() {
    let ca = TestCa::new("redis CA");
    let leaf = ca.leaf("redis", 9);
    let redis = RedisServer::start_tls(&leaf.cert_pem, &leaf.key_pem);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let hs = FakeHs::start().await;
    let proxy = ProxyProcess::start(
        &hs.url(),
        &redis.rediss_url(),
        &ProxyOptions {
            redis_extra: format!("  ca_file: \"{}\"\n", ca_file.display()),
            ..Default::default()
        },
    );
    let h = Harness {
        redis,
        hs,
        proxy,
        client: common::client(),
    };
    let login = h.login("carol").await;
    let r = h.refresh(&rt(&login)).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let w = h.whoami(&at(&r.json())).await;
    assert_eq!(w.status, 200, "{:?}", w.json());
    // The session is in this Redis (read back over its plain Unix socket).
    assert!(h.redis.cli(&["--scan"]).contains("mrp:"));

    // Without the CA (system roots only) the store is unreachable: 503, never 401.
    let proxy = ProxyProcess::start(&h.hs.url(), &h.redis.rediss_url(), &Default::default());
    let bearer = format!("Bearer {}", at(&r.json()));
    let res = common::client()
        .request(
            Request::get(format!("{}/_matrix/client/v3/account/whoami", proxy.url()))
                .header("authorization", bearer)
                .body(body(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"));
    c.env_remove("MRP_LISTEN")
        .env_remove("MRP_UPSTREAM_URL")
        .env_remove("MRP_REDIS_URL")
        .env_remove("MRP_CONFIG")
        .env_remove("MRP_ADMIN_LISTEN");
    c
}

#[test]
fn check_config_reads_and_parses_every_pem_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new("CA");
    let leaf = ca.leaf("proxy", 1);
    let other = ca.leaf("other", 2);
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cert = write("cert.pem", &leaf.cert_pem);
    let key = write("key.pem", &leaf.key_pem);
    let ca_file = write("ca.pem", &ca.cert_pem);
    let other_key = write("other-key.pem", &other.key_pem);
    let garbage = write("garbage.pem", "hello, not PEM\n");
    // Looks like PEM, is not: the secret-looking text must never be echoed.
    let bad_key = write(
        "bad-key.pem",
        "-----BEGIN PRIVATE KEY-----\nSECRETMATERIAL!!not*base64\n-----END PRIVATE KEY-----\n",
    );
    let bad_der = write(
        "bad-der.pem",
        "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n",
    );
    let missing = d.join("missing.pem").display().to_string();

    let config = |cert: &str, key: &str, up_ca: &str, redis_ca: &str| {
        format!(
            "upstream: {{url: 'https://hs.example', ca_file: '{up_ca}'}}\n\
             redis: {{url: 'rediss://127.0.0.1:6380', ca_file: '{redis_ca}'}}\n\
             tls: {{cert_file: '{cert}', key_file: '{key}'}}\n"
        )
    };
    let run = |text: &str, command: &str| {
        let p = d.join("config.yaml");
        std::fs::write(&p, text).unwrap();
        bin().arg(command).arg("--config").arg(&p).output().unwrap()
    };

    let ok = run(&config(&cert, &key, &ca_file, &ca_file), "check-config");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let cases = [
        (config(&missing, &key, &ca_file, &ca_file), "tls.cert_file"),
        (config(&garbage, &key, &ca_file, &ca_file), "tls.cert_file"),
        // A key where the certificate should be.
        (config(&key, &key, &ca_file, &ca_file), "tls.cert_file"),
        (config(&bad_der, &key, &ca_file, &ca_file), "tls.cert_file"),
        (config(&cert, &missing, &ca_file, &ca_file), "tls.key_file"),
        (config(&cert, &garbage, &ca_file, &ca_file), "tls.key_file"),
        (config(&cert, &cert, &ca_file, &ca_file), "tls.key_file"),
        (config(&cert, &bad_key, &ca_file, &ca_file), "tls.key_file"),
        // The key of another certificate.
        (
            config(&cert, &other_key, &ca_file, &ca_file),
            "tls.key_file",
        ),
        (config(&cert, &key, &missing, &ca_file), "upstream.ca_file"),
        (config(&cert, &key, &garbage, &ca_file), "upstream.ca_file"),
        (config(&cert, &key, &bad_der, &ca_file), "upstream.ca_file"),
        (config(&cert, &key, &ca_file, &missing), "redis.ca_file"),
        (config(&cert, &key, &ca_file, &key), "redis.ca_file"),
        (
            format!("upstream: {{url: 'http://hs'}}\ntls: {{cert_file: '{cert}'}}\n"),
            "tls.key_file",
        ),
        (
            format!("upstream: {{url: 'http://hs', ca_file: '{ca_file}'}}\n"),
            "upstream.ca_file",
        ),
        (
            format!("upstream: {{url: 'http://hs'}}\nredis: {{ca_file: '{ca_file}'}}\n"),
            "redis.ca_file",
        ),
    ];
    for (text, key_name) in &cases {
        for command in ["check-config", "run"] {
            let out = run(text, command);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{command} accepted {text}");
            assert!(err.contains(key_name), "{text}: {err}");
            assert!(!err.contains("SECRETMATERIAL"), "{err}");
        }
    }
}
