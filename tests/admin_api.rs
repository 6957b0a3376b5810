//! The operator session API on the admin listener and the `sessions` CLI (issue 13), black-box:
//! real proxy binary, real redis-server, fake homeserver.

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use http::{Method, Request};
use http_body_util::BodyExt;
use serde_json::{Value, json};

const SECRET: &str = "correct-horse-battery-staple-0123456789";

struct Admin {
    h: Harness,
    _dir: tempfile::TempDir,
}

async fn start() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    // A final newline, as `echo` and Kubernetes Secrets often leave one.
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let o = ProxyOptions {
        // Lands inside the `admin:` section of the harness config.
        extra: format!("  token_file: \"{}\"\n", file.display()),
        ..Default::default()
    };
    Admin {
        h: Harness::with(o, false).await,
        _dir: dir,
    }
}

async fn call(h: &Harness, method: Method, path: &str, token: Option<&str>) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("{}{path}", h.proxy.admin_url()));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let res = h
        .client
        .request(b.body(body(Bytes::new())).unwrap())
        .await
        .unwrap();
    let (p, b) = res.into_parts();
    Reply {
        status: p.status,
        headers: p.headers,
        body: b.collect().await.unwrap().to_bytes(),
    }
}

async fn admin(h: &Harness, method: Method, path: &str) -> Reply {
    call(h, method, path, Some(SECRET)).await
}

fn sessions(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, 200, "{:?}", r.json());
    r.json()["sessions"].as_array().unwrap().clone()
}

#[tokio::test]
async fn list_then_revoke_one_session() {
    let a = start().await;
    let h = &a.h;
    let l1 = h.login("alice").await;
    let l2 = h.login("alice").await;
    let bob = h.login("bob").await;

    let r = admin(h, Method::GET, "/admin/v1/users/@alice:fake.test/sessions").await;
    let list = sessions(&r);
    assert_eq!(list.len(), 2, "{list:?}");
    let devices: Vec<&str> = list
        .iter()
        .map(|s| s["device_id"].as_str().unwrap())
        .collect();
    assert!(devices.contains(&l1["device_id"].as_str().unwrap()));
    assert!(devices.contains(&l2["device_id"].as_str().unwrap()));
    for s in &list {
        assert!(s["session_id"].is_string());
        assert!(s["created_at"].as_u64().unwrap() > 1_600_000_000_000, "{s}");
        for k in ["last_refresh_at", "access_expires_at", "refresh_expires_at"] {
            assert!(s.get(k).is_some(), "{k} missing in {s}");
        }
    }
    // Never a token, never the upstream token.
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    for secret in [at(&l1), rt(&l1), at(&l2), rt(&l2)] {
        assert!(!text.contains(&secret));
    }
    assert!(!text.contains("syt_fake"), "{text}");
    assert_eq!(r.headers["cache-control"], "no-store");

    // Percent-encoded user ids work too.
    let r = admin(
        h,
        Method::GET,
        "/admin/v1/users/%40alice%3Afake.test/sessions",
    )
    .await;
    assert_eq!(sessions(&r).len(), 2);

    // Revoke the session of l1.
    let sid = list
        .iter()
        .find(|s| s["device_id"] == l1["device_id"])
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = admin(h, Method::DELETE, &format!("/admin/v1/sessions/{sid}")).await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json(), json!({"ended": 1}));
    assert_unknown_token(&h.whoami(&at(&l1)).await, false);
    let r = h.refresh(&rt(&l1)).await;
    assert_eq!(r.status, 401, "{:?}", r.json());
    assert_eq!(r.errcode(), "M_UNKNOWN_TOKEN");
    // The others live on.
    assert_eq!(h.whoami(&at(&l2)).await.status, 200);
    assert_eq!(h.whoami(&at(&bob)).await.status, 200);
    let r = admin(h, Method::GET, "/admin/v1/users/@alice:fake.test/sessions").await;
    assert_eq!(sessions(&r).len(), 1);

    // Again: it is gone.
    let r = admin(h, Method::DELETE, &format!("/admin/v1/sessions/{sid}")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.errcode(), "M_NOT_FOUND");

    // The audit line: caller, action, user, count; never the secret.
    let logs = h.proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("admin call") && l.contains("revoke_session") && l.contains("count=1"))
        .unwrap_or_else(|| panic!("no audit line:\n{logs}"));
    assert!(
        line.contains("127.0.0.1") && line.contains("@alice:fake.test"),
        "{line}"
    );
    assert!(!logs.contains(SECRET));

    let m = h.metrics().await;
    assert!(
        m.contains("mrp_admin_calls_total{action=\"revoke_session\",status=\"200\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("mrp_sessions_purged_total{cause=\"admin\"} 1"),
        "{m}"
    );
    assert!(m.contains("mrp_sessions_alive "), "{m}");
}

#[tokio::test]
async fn revoke_all_of_a_user() {
    let a = start().await;
    let h = &a.h;
    let l1 = h.login("carol").await;
    let l2 = h.login("carol").await;
    let dave = h.login("dave").await;
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@carol:fake.test/sessions",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json(), json!({"ended": 2}));
    for l in [&l1, &l2] {
        assert_unknown_token(&h.whoami(&at(l)).await, false);
        assert_eq!(h.refresh(&rt(l)).await.status, 401);
    }
    assert_eq!(h.whoami(&at(&dave)).await.status, 200);
    let r = admin(h, Method::GET, "/admin/v1/users/@carol:fake.test/sessions").await;
    assert!(sessions(&r).is_empty());
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@carol:fake.test/sessions",
    )
    .await;
    assert_eq!(r.json(), json!({"ended": 0}));
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let a = start().await;
    let h = &a.h;
    let l = h.login("erin").await;
    for bad in ["erin", "@erin", "@:fake.test", "@er%20in:fake.test"] {
        let r = admin(h, Method::GET, &format!("/admin/v1/users/{bad}/sessions")).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.json());
        assert_eq!(r.errcode(), "M_INVALID_PARAM");
    }
    let r = admin(h, Method::DELETE, "/admin/v1/sessions/not*a*session").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.errcode(), "M_INVALID_PARAM");
    // A well-formed id that names no session.
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA",
    )
    .await;
    assert!(matches!(r.status.as_u16(), 400 | 404), "{:?}", r.json());
    let r = admin(h, Method::GET, "/admin/v1/nothing").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.errcode(), "M_NOT_FOUND");
    let r = admin(h, Method::POST, "/admin/v1/stats").await;
    assert_eq!(r.status, 405);
    // Upstream logout cannot be done (the upstream token is sealed under the client's token):
    // refused, and the session is untouched.
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@erin:fake.test/sessions?logout_upstream=true",
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert_eq!(r.errcode(), "M_INVALID_PARAM");
    assert_eq!(h.whoami(&at(&l)).await.status, 200);
    // Never served on the client port.
    let r = h
        .get("/admin/v1/users/@erin:fake.test/sessions", Some(SECRET))
        .await;
    assert_ne!(r.status, 200);
    assert!(r.json().get("sessions").is_none());
}

#[tokio::test]
async fn authentication_and_rate_limit() {
    let a = start().await;
    let h = &a.h;
    let path = "/admin/v1/stats";
    let r = call(h, Method::GET, path, None).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.errcode(), "M_MISSING_TOKEN");
    let r = call(h, Method::GET, path, Some("wrong")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.errcode(), "M_UNKNOWN_TOKEN");
    let r = call(h, Method::GET, path, Some(&SECRET[..SECRET.len() - 1])).await;
    assert_eq!(r.status, 401);
    // Guessing is throttled: within a few attempts the caller gets 429.
    let mut limited = false;
    for _ in 0..10 {
        let r = call(h, Method::GET, path, Some("guess")).await;
        if r.status == 429 {
            assert_eq!(r.errcode(), "M_LIMIT_EXCEEDED");
            limited = true;
            break;
        }
        assert_eq!(r.status, 401);
    }
    assert!(limited, "guesses were never rate limited");
    let logs = h.proxy.logs();
    assert!(logs.contains("auth_failed"), "{logs}");
    assert!(
        !logs.contains("guess"),
        "a presented secret reached the logs"
    );
}

#[tokio::test]
async fn stats() {
    let a = start().await;
    let h = &a.h;
    let l = h.login("frank").await;
    h.login("grace").await;
    assert_eq!(h.refresh(&rt(&l)).await.status, 200);
    let r = admin(h, Method::GET, "/admin/v1/stats").await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    let v = r.json();
    assert_eq!(v["sessions_alive"], 2, "{v}");
    assert_eq!(v["logins_last_minute"], 2, "{v}");
    assert_eq!(v["refreshes_last_minute"], 1, "{v}");
    let m = h.metrics().await;
    assert!(m.contains("mrp_sessions_alive 2"), "{m}");

    // The times the store records: refreshed once, both expiries in the future.
    let r = admin(h, Method::GET, "/admin/v1/users/@frank:fake.test/sessions").await;
    let list = sessions(&r);
    let s = &list[0];
    let created = s["created_at"].as_u64().unwrap();
    let refreshed = s["last_refresh_at"]
        .as_u64()
        .expect("last_refresh_at after a refresh");
    assert!(refreshed >= created, "{s}");
    assert!(s["access_expires_at"].as_u64().unwrap() > refreshed, "{s}");
    assert!(s["refresh_expires_at"].as_u64().unwrap() > refreshed, "{s}");
    let r = admin(h, Method::GET, "/admin/v1/users/@grace:fake.test/sessions").await;
    let list = sessions(&r);
    assert!(
        list[0]["last_refresh_at"].is_null(),
        "never refreshed: {list:?}"
    );
    assert!(list[0]["access_expires_at"].as_u64().is_some(), "{list:?}");
}

#[tokio::test]
async fn no_token_file_means_no_api() {
    let h = Harness::start().await;
    h.login("heidi").await;
    for path in [
        "/admin/v1/stats",
        "/admin/v1/users/@heidi:fake.test/sessions",
    ] {
        let r = call(&h, Method::GET, path, Some(SECRET)).await;
        assert_eq!(r.status, 404, "{path}");
    }
    assert_eq!(h.admin_get("/health/live").await.status, 200);
    assert!(h.metrics().await.contains("mrp_sessions_alive"));
}

#[test]
fn an_empty_token_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    std::fs::write(&token, "\n").unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nupstream: {{url: 'http://127.0.0.1:9'}}\nredis: {{url: 'redis://127.0.0.1:9'}}\nadmin: {{listen: 127.0.0.1:0, token_file: '{}'}}\n",
            token.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("admin.token_file"), "{err}");
}

fn cli(h: &Harness, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"))
        .arg("--config")
        .arg(h.proxy.config_path())
        .arg("--admin-url")
        .arg(h.proxy.admin_url())
        .args(args)
        .env_remove("MRP_ADMIN_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_list_and_revoke() {
    let a = start().await;
    let h = &a.h;
    let l1 = h.login("ivan").await;
    let l2 = h.login("ivan").await;
    let (ok, out, err) = cli(h, &["sessions", "list", "@ivan:fake.test"]);
    assert!(ok, "{err}");
    assert!(out.contains("2 session(s) of @ivan:fake.test"), "{out}");
    assert!(out.contains(l1["device_id"].as_str().unwrap()), "{out}");

    let (ok, out, err) = cli(h, &["sessions", "list", "@ivan:fake.test", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let sid = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["device_id"] == l1["device_id"])
        .unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (ok, out, err) = cli(h, &["sessions", "revoke", &sid]);
    assert!(ok, "{err}");
    assert!(out.contains("1 session(s) ended"), "{out}");
    assert_unknown_token(&h.whoami(&at(&l1)).await, false);
    assert_eq!(h.whoami(&at(&l2)).await.status, 200);

    let (ok, out, err) = cli(
        h,
        &["sessions", "revoke", "--user", "@ivan:fake.test", "--json"],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({"ended": 1})
    );
    assert_unknown_token(&h.whoami(&at(&l2)).await, false);

    // Errors exit non-zero with the API's errcode.
    let (ok, _, err) = cli(h, &["sessions", "revoke", &sid]);
    assert!(!ok);
    assert!(err.contains("M_NOT_FOUND"), "{err}");
    let (ok, _, err) = cli(h, &["sessions", "list", "ivan"]);
    assert!(!ok);
    assert!(err.contains("M_INVALID_PARAM"), "{err}");
}
