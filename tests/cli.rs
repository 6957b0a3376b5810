//! The command line: check-config and startup errors.

use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_matrix-refresh-proxy"));
    c.env_remove("MRP_LISTEN")
        .env_remove("MRP_UPSTREAM_URL")
        .env_remove("MRP_REDIS_URL")
        .env_remove("MRP_CONFIG");
    c
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let out = bin()
        .args([
            "check-config",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_names_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "upstream: {url: 'http://hs'}\ntokens: {access_token_lifetime: soon}\n",
            "tokens.access_token_lifetime",
        ),
        (
            "upstream: {url: 'http://hs'}\ntokens: {refresh_tokn_lifetime: 1d}\n",
            "refresh_tokn_lifetime",
        ),
        (
            "upstream: {url: 'http://hs'}\nlisten: 'not an address'\n",
            "listen",
        ),
        ("listen: '127.0.0.1:1'\n", "upstream.url"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("c{i}.yaml"));
        std::fs::write(&p, text).unwrap();
        let out = bin()
            .arg("check-config")
            .arg("--config")
            .arg(&p)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text:?}: {err}");
    }
    let out = bin()
        .args(["check-config", "--config", "/nonexistent/config.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/config.yaml"));
}

#[test]
fn env_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, "upstream: {url: 'http://hs'}\n").unwrap();
    let out = bin()
        .arg("check-config")
        .arg("--config")
        .arg(&p)
        .env("MRP_LISTEN", "nonsense")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}
