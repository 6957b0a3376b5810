//! Every other request: credential rewriting, hygiene, streaming, upstream faults
//! (DESIGN.md §2 "Every other request").

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;

#[tokio::test]
async fn header_token_is_swapped_for_the_upstream_token_and_nothing_else_changes() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let access = at(&v);
    h.hs.clear_requests();
    let auth = format!("Bearer {access}");
    let r = h
        .send(
            Method::PUT,
            "/_matrix/client/v3/rooms/!r:fake.test/send/m.room.message/txn1?a=1&b=%2F",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-custom", "kept"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
                ("keep-alive", "timeout=5"),
                ("x-forwarded-for", "198.51.100.7"),
                ("host", "matrix.example.org"),
            ],
            body(json!({"msgtype": "m.text", "body": "hi"}).to_string()),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = &h.hs.requests()[0];
    assert_eq!(seen.method, Method::PUT);
    assert_eq!(
        seen.path,
        "/_matrix/client/v3/rooms/!r:fake.test/send/m.room.message/txn1"
    );
    assert_eq!(seen.query.as_deref(), Some("a=1&b=%2F"));
    let ut = seen.bearer().unwrap();
    assert!(FakeHs::is_upstream_token(&ut));
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert!(seen.headers.get("x-hop").is_none());
    assert!(seen.headers.get("keep-alive").is_none());
    // 127.0.0.1 is not a trusted proxy here: the client's own claim is dropped.
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "matrix.example.org");
    assert_eq!(seen.json(), json!({"msgtype": "m.text", "body": "hi"}));
}

/// Issue 9.6: a proxy token in `?access_token=` goes upstream as `Authorization: Bearer`, and the
/// parameter is removed (long-lived upstream tokens must not land in URL logs).
#[tokio::test]
async fn query_token_goes_upstream_in_the_authorization_header() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    h.hs.clear_requests();
    let token = at(&v);
    for query in [
        format!("since=s%2F1&access_token={token}&timeout=0"),
        format!("access_token={token}"),
        format!("access_token={token}&a=b%26c"),
    ] {
        let r = h
            .get(&format!("/_matrix/client/v3/sync?{query}"), None)
            .await;
        assert_eq!(r.status, 200);
    }
    let seen = h.hs.requests();
    assert_eq!(seen.len(), 3);
    let wants = [Some("since=s%2F1&timeout=0"), None, Some("a=b%26c")];
    for (s, want) in seen.iter().zip(wants) {
        assert_eq!(s.query.as_deref(), want);
        assert!(!s.query.as_deref().unwrap_or("").contains("access_token"));
        assert_eq!(s.headers.get_all("authorization").iter().count(), 1);
        let ut = s.bearer().expect("Authorization: Bearer upstream");
        assert!(FakeHs::is_upstream_token(&ut), "{}", s.path);
        assert!(h.hs.is_live(&ut));
    }
}

#[tokio::test]
async fn foreign_tokens_and_anonymous_requests_are_untouched() {
    let h = Harness::start().await;
    let r = h
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({"type": "m.login.password", "user": "bot"}),
        )
        .await;
    let ut = at(&r.json());
    h.hs.clear_requests();
    assert_eq!(
        h.get("/_matrix/client/v3/account/whoami", Some(&ut))
            .await
            .status,
        200
    );
    let r = h
        .get(
            "/_matrix/client/v3/rooms/x/messages?user_id=%40as%3Afake.test&access_token=as_tok",
            None,
        )
        .await;
    assert_eq!(r.status, 401); // the fake homeserver does not know as_tok: its answer, not ours
    assert_eq!(h.get("/_matrix/client/versions", None).await.status, 200);
    let seen = h.hs.requests();
    assert_eq!(seen[0].bearer().as_deref(), Some(ut.as_str()));
    assert_eq!(
        seen[1].query.as_deref(),
        Some("user_id=%40as%3Afake.test&access_token=as_tok")
    );
    assert!(seen[2].headers.get("authorization").is_none());
    // Other Authorization schemes are not ours either.
    h.hs.clear_requests();
    let r = h
        .send(
            Method::GET,
            "/_matrix/client/versions",
            &[("authorization", "Basic dXNlcjpwYXNz")],
            body(""),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        h.hs.requests()[0].headers["authorization"],
        "Basic dXNlcjpwYXNz"
    );
}

#[tokio::test]
async fn unknown_or_malformed_proxy_tokens_are_rejected_without_forwarding() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    h.hs.clear_requests();
    let never_issued = {
        // Right shape, right checksum, never stored: flip the secret and recompute the CRC.
        let a = at(&v);
        let signed = format!("{}{}", &a[..40], if &a[40..41] == "A" { "B" } else { "A" });
        let signed = format!("{signed}{}", &a[41..70]);
        format!("{signed}{:08x}", crc32fast::hash(signed.as_bytes()))
    };
    for t in [
        never_issued.as_str(),
        "mrpat_short",
        &format!("{}x", at(&v)),
        &rt(&v), // a refresh token is not an access token
    ] {
        assert_unknown_token(&h.whoami(t).await, false);
        let r = h
            .get(
                &format!("/_matrix/client/v3/account/whoami?access_token={t}"),
                None,
            )
            .await;
        assert_unknown_token(&r, false);
    }
    assert!(h.hs.requests().is_empty());
}

#[tokio::test]
async fn header_and_query_token_together_are_refused() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    h.hs.clear_requests();
    let auth = format!("Bearer {}", at(&v));
    let r = h
        .send(
            Method::GET,
            &format!("/_matrix/client/v3/account/whoami?access_token={}", at(&v)),
            &[("authorization", &auth)],
            body(""),
        )
        .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.errcode(), "M_MISSING_TOKEN");
    let r = h
        .send(
            Method::GET,
            "/_matrix/client/v3/account/whoami",
            &[("authorization", &auth), ("authorization", "Bearer other")],
            body(""),
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(h.hs.requests().is_empty());
}

#[tokio::test]
async fn upstream_revocation_behind_our_back_purges_the_session() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let other = h.login("alice").await;
    h.whoami(&at(&v)).await;
    let ut =
        h.hs.requests_to("/whoami")
            .last()
            .unwrap()
            .bearer()
            .unwrap();
    h.hs.revoke(&ut);
    // The homeserver's 401 passes through as it is (no soft_logout: spec default false) …
    let r = h.whoami(&at(&v)).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed."})
    );
    // … and the proxy session is gone: no forward, refresh unknown.
    h.hs.clear_requests();
    assert_unknown_token(&h.whoami(&at(&v)).await, false);
    assert!(h.hs.requests().is_empty());
    assert_unknown_token(&h.refresh(&rt(&v)).await, false);
    assert_eq!(h.whoami(&at(&other)).await.status, 200);
}

#[tokio::test]
async fn upstream_soft_logout_401_does_not_purge() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/whoami".into(),
        status: 401,
        body: json!({"errcode": "M_UNKNOWN_TOKEN", "error": "soft", "soft_logout": true}),
        delay: None,
        times: Some(1),
    });
    assert_unknown_token(&h.whoami(&at(&v)).await, true);
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/whoami".into(),
        status: 401,
        body: json!({"errcode": "M_MISSING_TOKEN", "error": "x"}),
        delay: None,
        times: Some(1),
    });
    assert_eq!(h.whoami(&at(&v)).await.status, 401);
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
}

#[tokio::test]
async fn a_request_valid_at_start_is_not_cut_off_when_its_token_expires() {
    let h = Harness::with_access("1s").await;
    let v = h.login("alice").await;
    let r = h
        .get("/_matrix/client/v3/sync?timeout=2000", Some(&at(&v)))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["next_batch"], "s1");
}

#[tokio::test]
async fn hundred_megabyte_upload_streams_without_buffering() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let size: usize = 100 * 1024 * 1024;
    let rss_before = h.proxy.rss_kib();
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let chunks = size / chunk.len();
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))),
    );
    let b = http_body_util::StreamBody::new(stream).boxed();
    let auth = format!("Bearer {}", at(&v));
    let len = size.to_string();
    let r = h
        .send(
            Method::POST,
            "/_matrix/media/v3/upload?filename=big.bin",
            &[
                ("authorization", &auth),
                ("content-type", "application/octet-stream"),
                ("content-length", &len),
            ],
            b,
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["len"], size);
    let rss_after = h.proxy.rss_kib();
    let grown_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 30,
        "proxy RSS grew by {grown_mib} MiB for a 100 MiB upload"
    );
}

#[tokio::test]
async fn large_download_streams_through() {
    // The fake homeserver echoes small JSON; check a big response body by uploading through the
    // proxy and reading a large JSON answer.
    let h = Harness::start().await;
    let big = json!({"data": "y".repeat(5 * 1024 * 1024)});
    h.hs.answer("/big", 200, big.clone());
    let r = h.get("/_matrix/client/v3/big", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.to_string().len());
}

#[tokio::test]
async fn upstream_unreachable_is_502_and_timeout_is_504() {
    // Nothing listens on the port of a dropped listener.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let redis = RedisServer::start();
    let proxy = ProxyProcess::start(
        &format!("http://127.0.0.1:{port}"),
        &redis.url(),
        &ProxyOptions::default(),
    );
    let c = client();
    let res = c
        .request(
            http::Request::get(format!("{}/_matrix/client/versions", proxy.url()))
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let b = res.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["errcode"], "M_UNKNOWN");

    let h = Harness::with(
        ProxyOptions {
            response_timeout: "1s",
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    h.hs.add_override(fake_hs::Override {
        method: None,
        path_suffix: "/slow".into(),
        status: 200,
        body: json!({}),
        delay: Some(Duration::from_secs(3)),
        times: None,
    });
    let r = h.get("/_matrix/client/v3/slow", Some(&at(&v))).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.errcode(), "M_UNKNOWN");
    // The session is untouched by upstream trouble.
    assert_eq!(h.whoami(&at(&v)).await.status, 200);
}

/// A proxy whose clients (loopback) are, or are not, a trusted proxy.
async fn behind_loopback_proxy(trusted: bool) -> Harness {
    let extra = if trusted {
        "trusted_proxies: [\"127.0.0.1\"]\n"
    } else {
        ""
    };
    Harness::with(
        ProxyOptions {
            extra: extra.into(),
            ..Default::default()
        },
        false,
    )
    .await
}

#[tokio::test]
async fn forwarded_proto_of_a_trusted_ingress_is_kept() {
    for (trusted, want) in [(true, "https"), (false, "http")] {
        let h = behind_loopback_proxy(trusted).await;
        let r = h
            .send(
                Method::GET,
                "/_matrix/client/versions",
                &[("x-forwarded-proto", "https")],
                body(""),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            h.hs.requests()[0].headers["x-forwarded-proto"],
            want,
            "trusted={trusted}"
        );
    }
}

/// Issue 9.4: a client not behind a trusted proxy cannot pick the address the homeserver logs and
/// rate-limits; a trusted proxy's chain is extended with the peer.
#[tokio::test]
async fn forwarding_headers_of_untrusted_peers_are_replaced_and_trusted_chains_extended() {
    for trusted in [false, true] {
        let h = behind_loopback_proxy(trusted).await;
        let v = h.login("alice").await;
        h.hs.clear_requests();
        let auth = format!("Bearer {}", at(&v));
        for (path, auth) in [
            ("/_matrix/client/versions", None),
            ("/_matrix/client/v3/account/whoami", Some(auth.as_str())),
        ] {
            let mut hdrs = vec![
                ("x-forwarded-for", "198.51.100.7"),
                ("x-forwarded-for", "203.0.113.1, 192.0.2.2"),
                ("forwarded", "for=198.51.100.7;proto=https"),
                ("x-real-ip", "198.51.100.7"),
            ];
            if let Some(a) = auth {
                hdrs.push(("authorization", a));
            }
            let r = h.send(Method::GET, path, &hdrs, body("")).await;
            assert_eq!(r.status, 200, "{path}");
        }
        let seen = h.hs.requests();
        assert_eq!(seen.len(), 2);
        for s in &seen {
            let xff: Vec<_> = s.headers.get_all("x-forwarded-for").iter().collect();
            assert_eq!(xff.len(), 1, "trusted={trusted} {}", s.path);
            if trusted {
                assert_eq!(xff[0], "198.51.100.7, 203.0.113.1, 192.0.2.2, 127.0.0.1");
                assert_eq!(s.headers["forwarded"], "for=198.51.100.7;proto=https");
                assert_eq!(s.headers["x-real-ip"], "198.51.100.7");
            } else {
                assert_eq!(xff[0], "127.0.0.1", "{}", s.path);
                assert!(s.headers.get("forwarded").is_none(), "{}", s.path);
                assert!(s.headers.get("x-real-ip").is_none(), "{}", s.path);
            }
        }
        // /login goes upstream too: the same rules.
        h.hs.clear_requests();
        let r = h
            .send(
                Method::POST,
                "/_matrix/client/v3/login",
                &[
                    ("x-forwarded-for", "198.51.100.7"),
                    ("x-real-ip", "198.51.100.7"),
                    ("content-type", "application/json"),
                ],
                body(json!({"type": "m.login.password", "user": "bob"}).to_string()),
            )
            .await;
        assert_eq!(r.status, 200);
        let s = &h.hs.requests_to("/login")[0];
        if trusted {
            assert_eq!(s.headers["x-forwarded-for"], "198.51.100.7, 127.0.0.1");
        } else {
            assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
            assert!(s.headers.get("x-real-ip").is_none());
        }
    }
}
