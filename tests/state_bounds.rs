//! Per-session Redis state: its fields (read by the admin API) and its bounds (issue 9).
mod common;

use common::*;

fn session_key(h: &Harness) -> String {
    let keys = h.redis.cli(&["--scan", "--pattern", "mrp:{*}:s"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert_eq!(keys.len(), 1, "one session: {keys:?}");
    keys[0].to_owned()
}

fn field(h: &Harness, key: &str, f: &str) -> u64 {
    let v = h.redis.cli(&["HGET", key, f]);
    v.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{f} = {v:?} in {key}"))
}

#[tokio::test]
async fn session_hash_tracks_last_refresh_and_current_expiries() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let s = session_key(&h);
    let c = field(&h, &s, "c");
    assert!(c > 0);
    assert_eq!(field(&h, &s, "lr"), 0, "no refresh yet");
    let aexp = field(&h, &s, "aexp");
    let rexp = field(&h, &s, "rexp");
    // access 1h, refresh 7d (the harness defaults)
    assert!(aexp.abs_diff(c + 3_600_000) < 5_000, "aexp {aexp} c {c}");
    assert!(
        rexp.abs_diff(c + 7 * 86_400_000) < 5_000,
        "rexp {rexp} c {c}"
    );

    let n = h.refresh(&rt(&v)).await;
    assert_eq!(n.status, 200);
    let lr = field(&h, &s, "lr");
    assert!(lr >= c, "lr {lr} c {c}");
    assert_eq!(field(&h, &s, "c"), c, "created unchanged");
    let aexp2 = field(&h, &s, "aexp");
    assert!(
        aexp2.abs_diff(lr + 3_600_000) < 5_000,
        "aexp {aexp2} lr {lr}"
    );
    assert!(field(&h, &s, "rexp").abs_diff(lr + 7 * 86_400_000) < 5_000);
}

#[tokio::test]
async fn session_hash_rexp_is_zero_without_refresh_expiry() {
    let h = Harness::with(
        ProxyOptions {
            refresh: "null",
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    let s = session_key(&h);
    assert_eq!(field(&h, &s, "rexp"), 0);
    assert_eq!(h.refresh(&rt(&v)).await.status, 200);
    assert_eq!(field(&h, &s, "rexp"), 0);
    assert!(field(&h, &s, "lr") > 0);
}

/// The session's keys that a purge finds from its hash, as `purge_session` in
/// src/store/lua/common.lua walks them: the live refresh record (`cr`), each refresh record's
/// `prev` and paired access record (`at`), the newest superseded access record (`sa`), and the
/// fixed keys.
fn reachable(h: &Harness, s: &str) -> Vec<String> {
    let prefix = &s[..s.len() - 1];
    let mut out = vec![s.to_owned(), format!("{prefix}used"), format!("{prefix}x")];
    let hget = |k: &str, f: &str| h.redis.cli(&["HGET", k, f]).trim().to_owned();
    let sa = hget(s, "sa");
    if !sa.is_empty() {
        out.push(format!("{prefix}a:{sa}"));
    }
    let mut rid = hget(s, "cr");
    for _ in 0..4 {
        if rid.is_empty() {
            break;
        }
        let rkey = format!("{prefix}r:{rid}");
        let at = hget(&rkey, "at");
        if !at.is_empty() {
            out.push(format!("{prefix}a:{at}"));
        }
        rid = hget(&rkey, "prev");
        out.push(rkey);
    }
    out
}

/// Keys, keys a purge finds, keys it would miss, and summed `MEMORY USAGE` of the one session.
fn footprint(h: &Harness) -> (usize, usize, usize, u64) {
    let s = session_key(h);
    let prefix = &s[..s.len() - 1];
    let keys = h.redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
    let keys: Vec<&str> = keys.lines().collect();
    let mut bytes = 0;
    for k in &keys {
        let n: u64 = h.redis.cli(&["MEMORY", "USAGE", k]).trim().parse().unwrap();
        if std::env::var("MRP_FOOTPRINT_DETAIL").is_ok() {
            let enc = h.redis.cli(&["OBJECT", "ENCODING", k]);
            println!("  {n:>5} bytes {} {k}", enc.trim());
        }
        bytes += n;
    }
    let found = reachable(h, &s);
    let missed = keys
        .iter()
        .filter(|k| !found.iter().any(|f| f == *k))
        .count();
    let found = keys.len() - missed;
    (keys.len(), found, missed, bytes)
}

/// With `admin.upstream_key_file` a session also keeps the escrow copy of its upstream token
/// (field `ue`, the token + 16 bytes): the same keys, the session hash one allocator size class
/// larger (measured +48..64 B with the fake homeserver's 16-byte tokens). The bound is the
/// login bound plus that one copy: 2 KiB + 128 B.
#[tokio::test]
async fn session_state_with_upstream_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("upstream-key");
    std::fs::write(&key, (1u8..=32).collect::<Vec<u8>>()).unwrap();
    let h = Harness::with(
        ProxyOptions {
            extra: format!("  upstream_key_file: \"{}\"\n", key.display()),
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    let s = session_key(&h);
    let ue = h.redis.cli(&["HSTRLEN", &s, "ue"]);
    let ue: usize = ue.trim().parse().unwrap();
    let (keys, names, dangling, bytes) = footprint(&h);
    println!(
        "after login, with upstream_key_file: {keys} keys, {names} found by a purge ({dangling} missed), {bytes} bytes (escrow field {ue} bytes)"
    );
    assert!(ue > 16, "escrow field: {ue} bytes");
    assert!(bytes <= 2048 + 128, "{bytes} bytes right after login");
    // Refreshes never rewrite or copy it.
    let mut rt_now = rt(&v);
    for _ in 0..20 {
        let n = h.refresh(&rt_now).await;
        assert_eq!(n.status, 200);
        let n = n.json();
        assert_eq!(h.whoami(&at(&n)).await.status, 200);
        rt_now = rt(&n);
    }
    let (keys, _, dangling, bytes) = footprint(&h);
    println!("after 20 refreshes, with upstream_key_file: {keys} keys, {bytes} bytes");
    assert!(keys <= 8 && dangling == 0 && bytes <= 8192);
    let after: usize = h.redis.cli(&["HSTRLEN", &s, "ue"]).trim().parse().unwrap();
    assert_eq!(after, ue);
}

#[tokio::test]
async fn session_state_does_not_grow_with_refreshes() {
    let h = Harness::with(
        ProxyOptions {
            extra: "rate_limit:\n  refresh: null\n".into(),
            ..Default::default()
        },
        false,
    )
    .await;
    let v = h.login("alice").await;
    let (keys, names, dangling, bytes) = footprint(&h);
    println!(
        "after login: {keys} keys, {names} found by a purge ({dangling} missed), {bytes} bytes"
    );
    assert_eq!(dangling, 0, "keys a purge would miss after login");
    assert!(bytes <= 2048, "{bytes} bytes right after login");
    let mut rt_now = rt(&v);
    let mut old_at = Vec::new();
    let mut old_rt = Vec::new();
    let s = session_key(&h);
    let prefix = s[..s.len() - 1].to_owned();
    let zcard = |name: &str| -> usize {
        let key = format!("{prefix}{name}");
        h.redis.cli(&["ZCARD", &key]).trim().parse().unwrap()
    };
    let (mut most_used, mut most_markers) = (0, 0);
    for i in 1..=1000 {
        let n = h.refresh(&rt_now).await;
        assert_eq!(n.status, 200, "refresh {i}");
        let n = n.json();
        assert_eq!(h.whoami(&at(&n)).await.status, 200, "new access token {i}");
        old_at.push(at(&n));
        rt_now = rt(&n);
        old_rt.push(rt_now.clone());
        // The capped sets are trimmed on every 8th consumed refresh token (common.lua TRIM):
        // at least the 64 latest used ids / 16 markers once there were that many, at most 7
        // more. Checked over two whole trim cycles.
        if i > 1000 - 40 {
            let (used, markers) = (zcard("used"), zcard("x"));
            assert!(
                (64..64 + 8).contains(&used),
                "{used} used ids after {i} refreshes"
            );
            assert!(
                (16..16 + 8).contains(&markers),
                "{markers} markers after {i}"
            );
            most_used = most_used.max(used);
            most_markers = most_markers.max(markers);
        }
        // 999: the capped sets at their fullest (just before a trim).
        if [1, 10, 100, 999, 1000].contains(&i) {
            let (keys, names, dangling, bytes) = footprint(&h);
            println!(
                "after {i} refreshes: {keys} keys, {names} found by a purge ({dangling} missed), {bytes} bytes"
            );
            assert!(keys <= 8, "{keys} keys after {i} refreshes");
            assert_eq!(dangling, 0, "keys a purge would miss after {i} refreshes");
            assert!(bytes <= 8192, "{bytes} bytes after {i} refreshes");
        }
    }
    println!(
        "capped sets over the last 40 refreshes: at most {most_used} used ids, {most_markers} markers"
    );
    assert_eq!(
        (most_used, most_markers),
        (64 + 7, 16 + 7),
        "trimmed too often"
    );
    // The current token works; the one before it still holds its full record; older ones are
    // markers: soft logout, never a hard one, while the session lives.
    assert_eq!(h.whoami(&old_at[999]).await.status, 200);
    assert_eq!(h.whoami(&old_at[998]).await.status, 200);
    assert_unknown_token(&h.whoami(&old_at[990]).await, true);
    // A used refresh token is still recognised as reuse (not merely unknown): revokes all.
    let r = h.refresh(&old_rt[990]).await;
    assert_eq!(r.status, 401);
    assert_unknown_token(&h.whoami(&old_at[999]).await, false);
    assert_unknown_token(&h.whoami(&old_at[990]).await, false);
    assert!(
        h.redis
            .cli(&["--scan", "--pattern", "mrp:{*"])
            .trim()
            .is_empty()
    );
}

/// Sessions written by earlier versions list their records in the key index `mrp:{T}:k` and
/// have no `cr`: a logout still deletes every key of them.
#[tokio::test]
async fn a_session_of_an_earlier_version_is_purged_whole() {
    let h = Harness::start().await;
    let v = h.login("alice").await;
    let n = h.refresh(&rt(&v)).await.json();
    assert_eq!(h.whoami(&at(&n)).await.status, 200);
    let s = session_key(&h);
    let prefix = &s[..s.len() - 1];
    // As an earlier version left it: no `cr`, the records named in `k`.
    let keys = h.redis.cli(&["--scan", "--pattern", &format!("{prefix}*")]);
    let index = format!("{prefix}k");
    for k in keys
        .lines()
        .filter(|k| k.contains(":a:") || k.contains(":r:"))
    {
        h.redis.cli(&["ZADD", &index, "9999999999999", k]);
    }
    h.redis.cli(&["HDEL", &s, "cr", "sa"]);
    let r = h
        .post(
            "/_matrix/client/v3/logout",
            Some(&at(&n)),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(r.status, 200);
    let left = h.redis.cli(&["--scan", "--pattern", "mrp:{*"]);
    assert!(left.trim().is_empty(), "left after logout: {left}");
}
