//! Hostile input corpus (issue 4): each malformed request gets a defined answer, the proxy keeps
//! serving, and no session in Redis changes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

/// Sends raw bytes on a fresh connection; returns the status code of the answer (0 = the
/// connection closed without one) and the raw response.
fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let mut text = String::from_utf8_lossy(&out).into_owned();
    // Skip an interim 100 Continue.
    if let Some(rest) = text.strip_prefix("HTTP/1.1 100 Continue\r\n\r\n") {
        text = rest.to_owned();
    }
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn get(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: hs\r\nConnection: close\r\n{headers}\r\n").into_bytes()
}

fn post(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "POST {path} HTTP/1.1\r\nHost: hs\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

const WHOAMI: &str = "/_matrix/client/v3/account/whoami";
const REFRESH: &str = "/_matrix/client/v3/refresh";
const LOGIN: &str = "/_matrix/client/v3/login";

#[tokio::test(flavor = "multi_thread")]
async fn corpus_gets_defined_answers_and_changes_no_session() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let a = at(&v);
    let r = rt(&v);
    assert_eq!(h.whoami(&a).await.status, 200); // first use done before the snapshot
    let before = h.redis.dump();
    let addr = h.proxy.addr;

    let long_proxy = format!("mrpat_{}", "A".repeat(10 * 1024));
    let long_foreign = "f".repeat(10 * 1024);
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    let bad_rt = format!("{}Z", &r[..r.len() - 1]);

    // (name, request bytes, acceptable statuses)
    let cases: Vec<(&str, Vec<u8>, &[u16])> = vec![
        ("basic scheme", get(WHOAMI, "Authorization: Basic dXNlcjpwYXNz\r\n"), &[200]),
        ("proxy token under another scheme", get(WHOAMI, &format!("Authorization: Token {a}\r\n")), &[401]),
        ("lowercase bearer", get(WHOAMI, &format!("Authorization: bearer {a}\r\n")), &[200]),
        ("two spaces", get(WHOAMI, &format!("Authorization: Bearer  {a}\r\n")), &[200]),
        ("trailing tab", get(WHOAMI, &format!("Authorization: Bearer {a}\t\r\n")), &[200]),
        ("lowercase header name", get(WHOAMI, &format!("authorization: Bearer {a}\r\n")), &[200]),
        ("token plus junk", get(WHOAMI, &format!("Authorization: Bearer {a} junk\r\n")), &[401]),
        ("bearer without token", get(WHOAMI, "Authorization: Bearer\r\n"), &[200]),
        (
            "two authorization headers",
            get(WHOAMI, &format!("Authorization: Bearer {a}\r\nAuthorization: Bearer {a}\r\n")),
            &[401],
        ),
        (
            "header and query together",
            get(&format!("{WHOAMI}?access_token={a}"), &format!("Authorization: Bearer {a}\r\n")),
            &[401],
        ),
        ("query token twice", get(&format!("{WHOAMI}?access_token={a}&access_token={a}"), ""), &[401]),
        ("10 KB proxy token", get(WHOAMI, &format!("Authorization: Bearer {long_proxy}\r\n")), &[401]),
        ("10 KB foreign token", get(WHOAMI, &format!("Authorization: Bearer {long_foreign}\r\n")), &[401]),
        ("NUL in header", get(WHOAMI, "Authorization: Bearer mrpat_\0abc\r\n"), &[400]),
        ("control byte in header", get(WHOAMI, "Authorization: Bearer mrpat_\x01abc\r\n"), &[400]),
        ("invalid UTF-8 in token", {
            let mut b = get(WHOAMI, "");
            b.truncate(b.len() - 2);
            b.extend_from_slice(b"Authorization: Bearer mrpat_\xff\xfe\r\n\r\n");
            b
        }, &[401, 400]),
        ("query token with %00", get(&format!("{WHOAMI}?access_token=mrpat_%00{}", &a[7..]), ""), &[401]),
        ("query token with %FF", get(&format!("{WHOAMI}?access_token=mrpat_%FF%FE"), ""), &[401]),
        ("percent-encoded prefix", get(&format!("{WHOAMI}?access_token={}", a.replacen('_', "%5F", 1)), ""), &[200]),
        ("uppercase prefix", get(WHOAMI, &format!("Authorization: Bearer {}\r\n", a.to_uppercase())), &[401]),
        ("refresh token as access token", get(WHOAMI, &format!("Authorization: Bearer {r}\r\n")), &[401]),
        ("refresh: JSON 10,000 deep", post(REFRESH, "", deep.as_bytes()), &[400]),
        ("refresh: object 10,000 deep", post(REFRESH, "", deep_obj.as_bytes()), &[400]),
        ("refresh: huge number", post(REFRESH, "", b"{\"refresh_token\": 1e999999}"), &[400]),
        ("refresh: huge integer", post(REFRESH, "", format!("{{\"refresh_token\": {}}}", "9".repeat(5000)).as_bytes()), &[400]),
        ("refresh: invalid UTF-8", post(REFRESH, "", b"{\"refresh_token\": \"\xff\xfe\"}"), &[400]),
        ("refresh: duplicate keys", post(REFRESH, "", format!("{{\"refresh_token\": \"x\", \"refresh_token\": \"{bad_rt}\"}}").as_bytes()), &[401]),
        ("refresh: text/plain", post(REFRESH, "Content-Type: text/plain\r\n", format!("{{\"refresh_token\": \"{bad_rt}\"}}").as_bytes()), &[401]),
        ("refresh: form encoded", post(REFRESH, "Content-Type: application/x-www-form-urlencoded\r\n", format!("refresh_token={r}").as_bytes()), &[400]),
        ("refresh: uppercase prefix", post(REFRESH, "", format!("{{\"refresh_token\": \"{}\"}}", r.to_uppercase()).as_bytes()), &[401]),
        ("refresh: NUL in token", post(REFRESH, "", b"{\"refresh_token\": \"mrprt_\\u0000x\"}"), &[401]),
        ("refresh: expect 100-continue", post(REFRESH, "Expect: 100-continue\r\n", format!("{{\"refresh_token\": \"{bad_rt}\"}}").as_bytes()), &[401]),
        ("login: flag is a string", post(LOGIN, "", b"{\"type\":\"m.login.password\",\"refresh_token\":\"true\"}"), &[400]),
        ("login: deep JSON is forwarded as is", post(LOGIN, "", deep.as_bytes()), &[200]),
        ("login: invalid UTF-8 body", post(LOGIN, "", b"{\"type\": \"\xff\"}"), &[200]),
        (
            "smuggling: CL and TE together",
            b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /_matrix/client/v3/account/whoami HTTP/1.1\r\nHost: hs\r\n\r\n".to_vec(),
            &[400],
        ),
        (
            "smuggling: two different Content-Lengths",
            b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nContent-Length: 5\r\nContent-Length: 50\r\n\r\nhello".to_vec(),
            &[400],
        ),
        (
            "smuggling: chunked not last",
            b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".to_vec(),
            &[400, 501],
        ),
        (
            "smuggling: obfuscated TE",
            b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            &[400, 501],
        ),
        ("negative Content-Length", b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nContent-Length: -1\r\n\r\n".to_vec(), &[400]),
        ("Content-Length not a number", b"POST /_matrix/client/v3/refresh HTTP/1.1\r\nHost: hs\r\nContent-Length: 1e3\r\n\r\n".to_vec(), &[400]),
        ("obs-fold header", format!("GET {WHOAMI} HTTP/1.1\r\nHost: hs\r\nAuthorization: Bearer\r\n {a}\r\nConnection: close\r\n\r\n").into_bytes(), &[400, 200]),
        ("space before colon", format!("GET {WHOAMI} HTTP/1.1\r\nHost: hs\r\nAuthorization : Bearer {a}\r\n\r\n").into_bytes(), &[400]),
        ("NUL in path", b"GET /_matrix/client/v3/\0sync HTTP/1.1\r\nHost: hs\r\n\r\n".to_vec(), &[400]),
        ("100 KB URI", get(&format!("/_matrix/client/v3/sync?x={}", "a".repeat(100 * 1024)), ""), &[414, 431, 400]),
        ("absolute-form URI", format!("GET http://evil.example{WHOAMI} HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {a}\r\nConnection: close\r\n\r\n").into_bytes(), &[200]),
        ("dot segments to logout", post("/_matrix/client/v3/../v3/logout", &format!("Authorization: Bearer {a}\r\n"), b"{}"), &[200]),
        ("encoded dot segments", post("/_matrix/client/v3/%2e%2e/v3/logout", &format!("Authorization: Bearer {a}\r\n"), b"{}"), &[200]),
        ("unknown method", format!("FOO {WHOAMI} HTTP/1.1\r\nHost: hs\r\nConnection: close\r\n\r\n").into_bytes(), &[200]),
        ("HTTP/1.0 without Host", format!("GET {WHOAMI} HTTP/1.0\r\nAuthorization: Bearer {a}\r\n\r\n").into_bytes(), &[200]),
        ("bare LF line endings", format!("GET {WHOAMI} HTTP/1.1\nHost: hs\nConnection: close\nAuthorization: Bearer {a}\n\n").into_bytes(), &[200, 400]),
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n".to_vec(), &[400, 0]),
        ("invalid device id encoding", format!("DELETE /_matrix/client/v3/devices/%FF%FE HTTP/1.1\r\nHost: hs\r\nConnection: close\r\nAuthorization: Bearer {a}\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(), &[401]),
        ("delete_devices: devices not a list", post("/_matrix/client/v3/delete_devices", &format!("Authorization: Bearer {a}\r\n"), b"{\"devices\": \"PHONE\"}"), &[401]),
        ("password: not JSON", post("/_matrix/client/v3/account/password", &format!("Authorization: Bearer {a}\r\n"), b"nope"), &[401]),
    ];
    assert!(cases.len() >= 40, "{} cases", cases.len());

    for (name, bytes, ok) in &cases {
        let (status, text) = tokio::task::spawn_blocking({
            let bytes = bytes.clone();
            move || raw(addr, &bytes)
        })
        .await
        .unwrap();
        assert!(
            ok.contains(&status),
            "{name}: got {status}, want one of {ok:?}\n{}\nupstream saw: {:?}",
            &text[..text.len().min(400)],
            h.hs.requests()
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect::<Vec<_>>()
        );
        // Still serving.
        assert_eq!(
            h.get("/_matrix/client/versions", None).await.status,
            200,
            "after {name}"
        );
    }

    let mut h = h;
    assert!(h.proxy.is_running());
    assert_eq!(
        h.whoami(&a).await.status,
        200,
        "the session survived the corpus"
    );
    assert_eq!(h.redis.dump(), before, "no session in Redis changed");
}
