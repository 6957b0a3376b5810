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

/// The proxy's logs once a line containing every one of `needles` is there (log lines are
/// written in batches, up to 20 ms late); after 2 s, whatever there is.
async fn logs_with(h: &Harness, needles: &[&str]) -> String {
    for _ in 0..100 {
        let logs = h.proxy.logs_now();
        if logs.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    h.proxy.logs()
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
    let logs = logs_with(h, &["admin call", "revoke_session", "count=1"]).await;
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
    // Without admin.upstream_key_file, upstream logout cannot be done (the upstream token is
    // sealed under the client's token): refused with how to enable it; the session is untouched.
    let sid = sessions(&admin(h, Method::GET, "/admin/v1/users/@erin:fake.test/sessions").await)[0]
        ["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for path in [
        "/admin/v1/users/@erin:fake.test/sessions?logout_upstream=true".to_owned(),
        format!("/admin/v1/sessions/{sid}?logout_upstream=true"),
    ] {
        let r = admin(h, Method::DELETE, &path).await;
        assert_eq!(r.status, 400, "{:?}", r.json());
        assert_eq!(r.errcode(), "M_INVALID_PARAM");
        let msg = r.json()["error"].as_str().unwrap().to_owned();
        assert!(
            msg.contains("admin.upstream_key_file") && msg.contains("Nothing was changed"),
            "{msg}"
        );
    }
    // A misspelt value is refused rather than read as false.
    let r = admin(
        h,
        Method::DELETE,
        &format!("/admin/v1/sessions/{sid}?logout_upstream=yes"),
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.json());
    assert_eq!(h.whoami(&at(&l)).await.status, 200);
    assert!(h.hs.requests_to("/logout").is_empty());
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
    let logs = logs_with(h, &["auth_failed"]).await;
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
    // Session ids are base64url: one in 32 begins with `-`, and is a value, not a flag.
    let (ok, _, err) = cli(
        h,
        &["sessions", "revoke", "-AAAAAAAAAAAAAAAAAAAAA", "--json"],
    );
    assert!(!ok);
    assert!(err.contains("M_NOT_FOUND"), "{err}");
    // No admin.upstream_key_file on this proxy: --logout-upstream says how to enable it.
    let l3 = h.login("ivan").await;
    let (ok, _, err) = cli(
        h,
        &[
            "sessions",
            "revoke",
            "--user",
            "@ivan:fake.test",
            "--logout-upstream",
        ],
    );
    assert!(!ok);
    assert!(err.contains("admin.upstream_key_file"), "{err}");
    assert_eq!(h.whoami(&at(&l3)).await.status, 200, "nothing changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_revoke_logout_upstream() {
    let a = start_with_key().await;
    let h = &a.h;
    let l1 = h.login("judy").await;
    let l2 = h.login("judy").await;
    let (ut1, ut2) = (
        upstream_token(h, &at(&l1)).await,
        upstream_token(h, &at(&l2)).await,
    );
    let list = sessions(&admin(h, Method::GET, "/admin/v1/users/@judy:fake.test/sessions").await);
    let sid1 = session_of(&list, &l1["device_id"]);
    // The CLI does not read the server's key (it may not be readable where the CLI runs).
    std::fs::remove_file(a._dir.path().join("key-a")).unwrap();
    // --admin-token-file overrides admin.token_file.
    let wrong = a._dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-secret\n").unwrap();
    let w = wrong.to_str().unwrap();
    let (ok, _, err) = cli(
        h,
        &[
            "sessions",
            "--admin-token-file",
            w,
            "list",
            "@judy:fake.test",
        ],
    );
    assert!(!ok);
    assert!(
        err.contains("401") && err.contains("M_UNKNOWN_TOKEN"),
        "{err}"
    );
    let (ok, _, err) = cli(
        h,
        &["sessions", "--admin-token-file", "/nonexistent/t", "stats"],
    );
    assert!(!ok);
    assert!(err.contains("/nonexistent/t"), "{err}");
    let (ok, out, err) = cli(h, &["sessions", "revoke", &sid1, "--logout-upstream"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 session(s) ended"), "{out}");
    assert!(
        out.contains("upstream logout: 1 done, 0 failed, 0 not possible"),
        "{out}"
    );
    assert!(!h.hs.is_live(&ut1));
    assert!(h.hs.is_live(&ut2));
    let (ok, out, err) = cli(
        h,
        &[
            "sessions",
            "revoke",
            "--user",
            "@judy:fake.test",
            "--logout-upstream",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).unwrap(),
        json!({"ended": 1, "upstream_logout": {"done": 1, "failed": 0, "not_possible": 0}})
    );
    assert!(!h.hs.is_live(&ut2));
    assert_unknown_token(&h.whoami(&at(&l2)).await, false);
}

// ---- ?logout_upstream=true with admin.upstream_key_file ----

fn key_file(dir: &std::path::Path, name: &str, seed: u8) -> std::path::PathBuf {
    let f = dir.join(name);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect();
    std::fs::write(&f, key).unwrap();
    f
}

fn key_options(dir: &std::path::Path, current: &str, previous: Option<&str>) -> ProxyOptions {
    let token = dir.join("admin-token");
    std::fs::write(&token, SECRET).unwrap();
    let mut extra = format!(
        "  token_file: \"{}\"\n  upstream_key_file: \"{}\"\n",
        token.display(),
        dir.join(current).display()
    );
    if let Some(p) = previous {
        extra += &format!(
            "  previous_upstream_key_file: \"{}\"\n",
            dir.join(p).display()
        );
    }
    ProxyOptions {
        extra,
        ..Default::default()
    }
}

async fn start_with_key() -> Admin {
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path(), "key-a", 1);
    let o = key_options(dir.path(), "key-a", None);
    Admin {
        h: Harness::with(o, false).await,
        _dir: dir,
    }
}

/// The upstream token behind a proxy access token, as the fake homeserver receives it.
async fn upstream_token(h: &Harness, access: &str) -> String {
    h.hs.clear_requests();
    assert_eq!(h.whoami(access).await.status, 200);
    let ut = h.hs.requests_to("/account/whoami")[0].bearer().unwrap();
    assert!(common::fake_hs::FakeHs::is_upstream_token(&ut), "{ut}");
    ut
}

fn session_of(list: &[Value], device: &Value) -> String {
    list.iter().find(|s| &s["device_id"] == device).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The bearer tokens the fake homeserver received on `/logout`.
fn logged_out(h: &Harness) -> Vec<String> {
    h.hs.requests_to("/logout")
        .iter()
        .filter_map(|r| r.bearer())
        .collect()
}

#[tokio::test]
async fn logout_upstream_ends_the_homeserver_device_too() {
    let a = start_with_key().await;
    let h = &a.h;
    let l1 = h.login("frank").await;
    let l2 = h.login("frank").await;
    let l3 = h.login("frank").await;
    let grace = h.login("grace").await;
    let (ut1, ut2, ut3, ut_grace) = (
        upstream_token(h, &at(&l1)).await,
        upstream_token(h, &at(&l2)).await,
        upstream_token(h, &at(&l3)).await,
        upstream_token(h, &at(&grace)).await,
    );
    // The escrow copy is sealed: no upstream token in clear anywhere in Redis.
    let dump = h.redis.cli(&["--scan", "--pattern", "mrp:*"]);
    for k in dump.lines().filter(|k| k.ends_with(":s")) {
        let v = h.redis.cli(&["HGETALL", k]);
        assert!(!v.contains("syt_fake"), "{k}: {v}");
        assert!(v.contains("ue"), "no escrow field in {k}: {v}");
    }
    let list = sessions(&admin(h, Method::GET, "/admin/v1/users/@frank:fake.test/sessions").await);
    assert_eq!(list.len(), 3);

    // One session: it ends here and at the homeserver, with its own upstream token.
    h.hs.clear_requests();
    let sid1 = session_of(&list, &l1["device_id"]);
    let r = admin(
        h,
        Method::DELETE,
        &format!("/admin/v1/sessions/{sid1}?logout_upstream=true"),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json(),
        json!({"ended": 1, "upstream_logout": {"done": 1, "failed": 0, "not_possible": 0}})
    );
    assert_eq!(logged_out(h), vec![ut1.clone()]);
    let rec = &h.hs.requests_to("/logout")[0];
    assert_eq!(rec.method, Method::POST);
    assert_eq!(rec.path, "/_matrix/client/v3/logout");
    assert!(!h.hs.is_live(&ut1));
    assert!(h.hs.is_live(&ut2) && h.hs.is_live(&ut3) && h.hs.is_live(&ut_grace));
    assert_unknown_token(&h.whoami(&at(&l1)).await, false);
    assert_eq!(h.refresh(&rt(&l1)).await.status, 401);

    // A session made before the key was set has no escrow copy (simulated by removing it).
    let sid3 = session_of(&list, &l3["device_id"]);
    h.redis.cli(&["HDEL", &format!("mrp:{{{sid3}}}:s"), "ue"]);
    // All of the user's sessions: both end; one is logged out upstream, one cannot be.
    h.hs.clear_requests();
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@frank:fake.test/sessions?logout_upstream=true",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json(),
        json!({"ended": 2, "upstream_logout": {"done": 1, "failed": 0, "not_possible": 1}})
    );
    assert_eq!(logged_out(h), vec![ut2.clone()]);
    assert!(!h.hs.is_live(&ut2));
    assert!(
        h.hs.is_live(&ut3),
        "no escrow copy: the homeserver device stays"
    );
    for l in [&l2, &l3] {
        assert_unknown_token(&h.whoami(&at(l)).await, false);
    }
    assert_eq!(h.whoami(&at(&grace)).await.status, 200);
    assert!(h.hs.is_live(&ut_grace));

    // Audit lines carry the counts; no token, upstream or proxy, is ever logged. (Log lines
    // are written in batches, up to 20 ms late.)
    let logs = logs_with(h, &["admin call", "revoke_user_sessions"]).await;
    let audit = |logs: &str| {
        logs.lines()
            .find(|l| l.contains("admin call") && l.contains("revoke_user_sessions"))
            .map(str::to_owned)
    };
    let line = audit(&logs).unwrap_or_else(|| panic!("no audit line:\n{logs}"));
    assert!(
        line.contains("count=2")
            && line.contains("upstream_done=1")
            && line.contains("upstream_failed=0")
            && line.contains("upstream_not_possible=1"),
        "{line}"
    );
    assert!(!logs.contains("syt_fake"), "an upstream token in the logs");
    for t in [at(&l1), rt(&l1), at(&l2)] {
        assert!(!logs.contains(&t));
    }
    let m = h.metrics().await;
    for want in [
        "mrp_admin_upstream_logouts_total{outcome=\"done\"} 2",
        "mrp_admin_upstream_logouts_total{outcome=\"failed\"} 0",
        "mrp_admin_upstream_logouts_total{outcome=\"not_possible\"} 1",
        "mrp_upstream_request_duration_seconds_count{route=\"admin_logout\"} 2",
    ] {
        assert!(m.contains(want), "{want} in\n{m}");
    }
}

#[tokio::test]
async fn logout_upstream_failure_still_ends_the_session() {
    let a = start_with_key().await;
    let h = &a.h;
    let l = h.login("henry").await;
    let ut = upstream_token(h, &at(&l)).await;
    h.hs.answer(
        "/logout",
        500,
        json!({"errcode": "M_UNKNOWN", "error": "boom"}),
    );
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@henry:fake.test/sessions?logout_upstream=true",
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(
        r.json(),
        json!({"ended": 1, "upstream_logout": {"done": 0, "failed": 1, "not_possible": 0}})
    );
    assert_eq!(logged_out(h), vec![ut]);
    assert_unknown_token(&h.whoami(&at(&l)).await, false);
    // An unknown session is 404 and calls nobody.
    h.hs.clear_requests();
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA?logout_upstream=true",
    )
    .await;
    assert!(matches!(r.status.as_u16(), 400 | 404), "{:?}", r.json());
    assert!(h.hs.requests_to("/logout").is_empty());
    // Without the flag nothing is sent upstream, with the key configured or not.
    let l = h.login("henry").await;
    let r = admin(
        h,
        Method::DELETE,
        "/admin/v1/users/@henry:fake.test/sessions",
    )
    .await;
    assert_eq!(r.json(), json!({"ended": 1}));
    assert!(h.hs.requests_to("/logout").is_empty());
    assert_unknown_token(&h.whoami(&at(&l)).await, false);
}

#[tokio::test]
async fn upstream_key_rotation_keeps_the_previous_key_readable() {
    let dir = tempfile::tempdir().unwrap();
    key_file(dir.path(), "key-a", 1);
    key_file(dir.path(), "key-b", 2);
    let mut h = Harness::with(key_options(dir.path(), "key-a", None), false).await;
    let old = h.login("ivy").await;
    let old_ut = upstream_token(&h, &at(&old)).await;
    // Rotate: key-b seals from now on, key-a (previous) still opens.
    h.proxy = ProxyProcess::start(
        &h.hs.url(),
        &h.redis.url(),
        &key_options(dir.path(), "key-b", Some("key-a")),
    );
    let new = h.login("ivy").await;
    let new_ut = upstream_token(&h, &at(&new)).await;
    let list = sessions(&admin(&h, Method::GET, "/admin/v1/users/@ivy:fake.test/sessions").await);
    let old_sid = session_of(&list, &old["device_id"]);
    let r = admin(
        &h,
        Method::DELETE,
        &format!("/admin/v1/sessions/{old_sid}?logout_upstream=true"),
    )
    .await;
    assert_eq!(r.json()["upstream_logout"]["done"], 1, "{:?}", r.json());
    assert!(!h.hs.is_live(&old_ut));
    // Previous key dropped: a session sealed under it cannot be logged out upstream any more.
    let older = h.login("ivy").await; // sealed under key-b
    let older_ut = upstream_token(&h, &at(&older)).await;
    h.proxy = ProxyProcess::start(
        &h.hs.url(),
        &h.redis.url(),
        &key_options(dir.path(), "key-a", None),
    );
    let r = admin(
        &h,
        Method::DELETE,
        "/admin/v1/users/@ivy:fake.test/sessions?logout_upstream=true",
    )
    .await;
    assert_eq!(
        r.json(),
        json!({"ended": 2, "upstream_logout": {"done": 0, "failed": 0, "not_possible": 2}})
    );
    assert!(h.hs.is_live(&new_ut) && h.hs.is_live(&older_ut));
    assert!(
        logs_with(&h, &["opens under no configured key"])
            .await
            .contains("opens under no configured key"),
        "the reason is logged"
    );
}

#[test]
fn a_malformed_upstream_key_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "not-a-key\n").unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:0\nupstream: {{url: 'http://127.0.0.1:9'}}\nredis: {{url: 'redis://127.0.0.1:9'}}\nadmin: {{listen: 127.0.0.1:0, upstream_key_file: '{}'}}\n",
            key.display()
        ),
    )
    .unwrap();
    for cmd in [&["check-config"][..], &[][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"))
            .args(cmd)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("admin.upstream_key_file") && err.contains("32"),
            "{err}"
        );
    }
}
