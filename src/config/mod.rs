//! Configuration: raw serde structs (unknown keys are errors) parsed once into a typed
//! [`Config`]. Every error names the offending key path.
//!
//! The shipped `config.yaml` at the repository root documents every key.

mod cache;
mod rate_limit;
mod raw;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::session::Lifetimes;
use crate::session::escrow::{EscrowKeys, UpstreamKey};

pub use self::cache::CacheConfig;
pub use self::rate_limit::{LimitConfig, RateLimitBackend, RateLimitConfig, TrustedProxies};

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Client-facing listen address.
    pub listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub redis: RedisConfig,
    pub tokens: Lifetimes,
    pub http: HttpConfig,
    pub log: LogConfig,
    /// How long in-flight requests (long polls included) may take to finish after SIGTERM.
    pub shutdown_timeout: Duration,
    pub rate_limit: RateLimitConfig,
    /// Peers whose `X-Forwarded-For` is believed when finding the client IP.
    pub trusted_proxies: TrustedProxies,
    pub admin: AdminConfig,
    /// TLS on the client listener; `None` = plain HTTP (TLS terminated in front, or none).
    pub tls: Option<TlsConfig>,
    /// The in-process cache of access-token lookups.
    pub cache: CacheConfig,
}

/// The client listener's certificate files (PEM), re-read on SIGHUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// The operator listener (`/metrics`, `/health/live`, `/health/ready`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminConfig {
    /// Its address, never the client one; `None` = no admin listener.
    pub listen: Option<SocketAddr>,
    /// File holding the bearer secret of the operator API (`/admin/v1/...`); `None` = the API
    /// is off (404) and only `/metrics` and `/health/*` are served.
    pub token_file: Option<PathBuf>,
    /// File holding a 32-byte server key: new sessions also keep their upstream token sealed
    /// under it, so `?logout_upstream=true` can log them out at the homeserver. `None` = no
    /// such copy is written and upstream logout is refused.
    pub upstream_key_file: Option<PathBuf>,
    /// The key `upstream_key_file` held before a rotation: still opens what it sealed.
    pub previous_upstream_key_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamConfig {
    /// Base URL of the homeserver (scheme, authority, optional path prefix without trailing `/`).
    pub url: http::Uri,
    pub connect_timeout: Duration,
    /// Time allowed for the homeserver's response headers (after the request body was sent).
    pub response_timeout: Duration,
    /// For an `https://` URL: the CA bundle (PEM) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Connections to the homeserver open at once, at most (busy and idle). With every one busy
    /// a request waits up to `connect_timeout` for one, then gets 503.
    pub max_connections: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    /// The single node (`redis.url`); the default when neither Sentinel nor Cluster is set.
    pub url: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// For a `rediss://` URL: the CA bundle (PEM) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Which Redis deployment: `url`, Sentinel or Cluster.
    pub topology: RedisTopology,
    /// Replicas that must hold a login's or refresh's write before it is answered (`WAIT`);
    /// 0 = answer as soon as the master has it.
    pub min_replicas_acked: u32,
    /// How long `WAIT` may take; past it the client gets 503 and retries.
    pub replica_ack_timeout: Duration,
}

/// The Redis deployment the proxy talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTopology {
    /// One node at `redis.url` (redis-rs reconnects to that address).
    Single,
    /// A master found through Sentinel, followed across failovers.
    Sentinel(SentinelConfig),
    /// A Redis Cluster, slots followed by redis-rs' cluster client.
    Cluster(ClusterConfig),
}

/// `redis.sentinel`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelConfig {
    /// The name the Sentinels monitor the master under (`sentinel monitor <name> …`).
    pub master_name: String,
    /// Sentinel addresses (`host:port`), asked in order.
    pub nodes: Vec<(String, u16)>,
    /// File holding the password of the Redis master and replicas (not of the Sentinels).
    pub password_file: Option<PathBuf>,
}

/// `redis.cluster`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Seed nodes (`host:port`); give them all, so start-up works with any of them down.
    pub nodes: Vec<(String, u16)>,
    /// File holding the password of the cluster nodes.
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    /// Largest JSON body the proxy reads itself (login, register, refresh, logout-ish).
    pub max_json_body: usize,
    /// Slowloris guard: time allowed to receive a request's headers.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no byte moving for this long is closed.
    pub idle_timeout: Duration,
    /// Most client connections open at once; beyond it the proxy stops accepting.
    pub max_connections: usize,
    /// Time a request body may stall (no byte arriving); a JSON body the proxy reads itself
    /// must also arrive whole within it. Past it: 408 and the connection is closed.
    pub body_read_timeout: Duration,
    /// Most connections open at once from one client IP (the TCP peer; IPv6 by its /64); `None`
    /// = no cap.
    pub max_connections_per_ip: Option<usize>,
    /// Most requests in flight at once from one client IP (counted as connections are), over
    /// all its connections: HTTP/2 carries up to 100 per connection. Past it: 429. `None` = no
    /// cap. Default: 4 × `max_connections_per_ip`, none when that is none.
    pub max_requests_per_ip: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    /// A tracing filter directive (`info`, `matrix_refresh_proxy=debug` …); `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
}

/// A configuration error, naming the key path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Environment variables that override the file (so a container needs no file edits).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("MRP_LISTEN", "listen"),
    ("MRP_UPSTREAM_URL", "upstream.url"),
    ("MRP_REDIS_URL", "redis.url"),
    ("MRP_LOG_LEVEL", "log.level"),
    ("MRP_ADMIN_LISTEN", "admin.listen"),
];

impl Config {
    /// Reads and validates `path`, then applies `MRP_*` environment overrides. The files it names
    /// (certificates, keys, CA bundles) are not read here: [`crate::tls::check_files`] does,
    /// for `check-config`, startup and reload alike.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, |k| std::env::var(k).ok())
    }

    /// Parses YAML text; `env` supplies override variables. Reads no file.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut raw = raw::Raw::from_yaml(text)?;
        raw.override_from(env);
        raw.validate()
    }

    /// Reads `admin.upstream_key_file` (and the previous key): `None` when not configured.
    /// Called by `check-config` and at startup (the `sessions` CLI does not need the key).
    pub fn escrow_keys(&self) -> Result<Option<EscrowKeys>, ConfigError> {
        fn read(key: &str, path: &Path) -> Result<UpstreamKey, ConfigError> {
            let bytes = std::fs::read(path)
                .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
            UpstreamKey::from_file_content(&bytes)
                .map_err(|e| invalid(key, format!("{}: {e}", path.display())))
        }
        let Some(current) = &self.admin.upstream_key_file else {
            return Ok(None);
        };
        let current = read("admin.upstream_key_file", current)?;
        let previous = match &self.admin.previous_upstream_key_file {
            Some(p) => Some(read("admin.previous_upstream_key_file", p)?),
            None => None,
        };
        if previous
            .as_ref()
            .is_some_and(|p| p.id_hex() == current.id_hex())
        {
            return Err(invalid(
                "admin.previous_upstream_key_file",
                "holds the same key as admin.upstream_key_file",
            ));
        }
        Ok(Some(EscrowKeys::new(current, previous)))
    }
}

/// Reads a password file: its first line, which must not be empty.
pub fn read_password(p: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let pw = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if pw.is_empty() {
        return Err(format!("{} is empty", p.display()));
    }
    Ok(pw.to_owned())
}

/// Reads the password files the `redis:` section names (for `check-config` and startup).
pub fn check_password_files(config: &Config) -> Result<(), ConfigError> {
    let password = match &config.redis.topology {
        RedisTopology::Single => None,
        RedisTopology::Sentinel(s) => s
            .password_file
            .as_ref()
            .map(|p| ("redis.sentinel.password_file", p)),
        RedisTopology::Cluster(c) => c
            .password_file
            .as_ref()
            .map(|p| ("redis.cluster.password_file", p)),
    };
    if let Some((key, p)) = password {
        read_password(p).map_err(|e| invalid(key, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, |_| None)
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../config.yaml");
        let c = parse(text).expect("config.yaml must parse");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.tokens.access, Duration::from_secs(300));
        assert_eq!(c.tokens.refresh_idle, Some(Duration::from_secs(7 * 86400)));
        assert_eq!(c.tokens.session, None);
        assert!(c.tokens.revoke_on_reuse);
        // The shipped file spells out the defaults.
        let defaults = parse("upstream: {url: 'http://hs'}").unwrap();
        assert_eq!(c.rate_limit, defaults.rate_limit);
        assert!(c.rate_limit.enabled);
        assert_eq!(c.rate_limit.all, None);
        assert!(c.trusted_proxies.is_empty());
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.tls, None);
        assert_eq!(c.upstream.ca_file, None);
        assert_eq!(c.redis.ca_file, None);
    }

    /// Connection and request caps: per-IP requests follow the per-IP connections unless set;
    /// the homeserver connections have their own cap.
    #[test]
    fn caps() {
        let c = parse("upstream: {url: 'http://hs'}").unwrap();
        assert_eq!(c.http.max_connections_per_ip, Some(256));
        assert_eq!(c.http.max_requests_per_ip, Some(1024));
        assert_eq!(c.upstream.max_connections, 16_384);
        let c = parse("upstream: {url: 'http://hs'}\nhttp: {max_connections_per_ip: 0}").unwrap();
        assert_eq!(c.http.max_connections_per_ip, None);
        assert_eq!(
            c.http.max_requests_per_ip, None,
            "off behind a reverse proxy"
        );
        let c = parse(
            "upstream: {url: 'http://hs', max_connections: 64}\n\
             http: {max_connections_per_ip: 10, max_requests_per_ip: 7}",
        )
        .unwrap();
        assert_eq!(c.http.max_requests_per_ip, Some(7));
        assert_eq!(c.upstream.max_connections, 64);
        for off in ["0", "null"] {
            let c = parse(&format!(
                "upstream: {{url: 'http://hs'}}\nhttp: {{max_requests_per_ip: {off}}}"
            ))
            .unwrap();
            assert_eq!(c.http.max_requests_per_ip, None);
        }
        assert!(parse("upstream: {url: 'http://hs', max_connections: 0}").is_err());
        assert!(parse("redis: {max_connections: 5}\nupstream: {url: 'http://hs'}").is_err());
    }

    #[test]
    fn tls_keys() {
        let c = parse(
            "upstream: {url: 'https://hs.example:8448/', ca_file: /etc/ca.pem}\n\
             redis: {url: 'rediss://redis.example:6380/0', ca_file: redis-ca.pem}\n\
             tls: {cert_file: /etc/fullchain.pem, key_file: /etc/privkey.pem}",
        )
        .unwrap();
        assert_eq!(c.upstream.url.scheme_str(), Some("https"));
        assert_eq!(c.upstream.ca_file, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(c.redis.ca_file, Some(PathBuf::from("redis-ca.pem")));
        assert_eq!(
            c.tls,
            Some(TlsConfig {
                cert_file: "/etc/fullchain.pem".into(),
                key_file: "/etc/privkey.pem".into(),
            })
        );
        // null and absent both mean plain HTTP and system roots.
        let c = parse("upstream: {url: 'https://hs', ca_file: null}\ntls: null").unwrap();
        assert_eq!((c.tls, c.upstream.ca_file), (None, None));
        // `parse` reads no file: the PEM checks are `tls::check_files`.
        parse("upstream: {url: 'http://hs'}\ntls: {cert_file: /nonexistent/c, key_file: /nonexistent/k}").unwrap();
    }

    #[test]
    fn admin_token_file() {
        let c = parse("upstream: {url: 'http://hs'}").unwrap();
        assert_eq!(c.admin.token_file, None);
        let c = parse(
            "upstream: {url: 'http://hs'}\nadmin: {token_file: /run/credentials/mrp/admin-token}",
        )
        .unwrap();
        assert_eq!(
            c.admin.token_file,
            Some(PathBuf::from("/run/credentials/mrp/admin-token"))
        );
        assert!(parse("upstream: {url: 'http://hs'}\nadmin: {token_file: ''}").is_err());
    }

    #[test]
    fn admin_upstream_key_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, bad) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("bad"),
        );
        std::fs::write(&a, (0u8..32).collect::<Vec<_>>()).unwrap();
        std::fs::write(&b, (1u8..33).collect::<Vec<_>>()).unwrap();
        std::fs::write(&bad, "short\n").unwrap();
        let cfg = |extra: &str| {
            parse(&format!(
                "upstream: {{url: 'http://hs'}}\nadmin: {{{extra}}}"
            ))
        };
        let c = cfg("").unwrap();
        assert!(c.escrow_keys().unwrap().is_none());
        let c = cfg(&format!("upstream_key_file: '{}'", a.display())).unwrap();
        let k = c.escrow_keys().unwrap().unwrap();
        assert!(k.previous().is_none());
        let c = cfg(&format!(
            "upstream_key_file: '{}', previous_upstream_key_file: '{}'",
            b.display(),
            a.display()
        ))
        .unwrap();
        assert!(c.escrow_keys().unwrap().unwrap().previous().is_some());
        let e = cfg(&format!("upstream_key_file: '{}'", bad.display()))
            .unwrap()
            .escrow_keys()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("admin.upstream_key_file: "), "{e}");
        assert!(e.contains("32 random bytes"), "{e}");
        let e = cfg("upstream_key_file: /nonexistent/k")
            .unwrap()
            .escrow_keys();
        assert!(e.unwrap_err().to_string().contains("cannot read"));
        let e = cfg(&format!("previous_upstream_key_file: '{}'", a.display())).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("admin.previous_upstream_key_file"),
            "{e}"
        );
        let e = cfg(&format!(
            "upstream_key_file: '{}', previous_upstream_key_file: '{}'",
            a.display(),
            a.display()
        ))
        .unwrap_err();
        assert!(e.to_string().contains("same file"), "{e}");
        let c2 = dir.path().join("a2");
        std::fs::copy(&a, &c2).unwrap();
        let e = cfg(&format!(
            "upstream_key_file: '{}', previous_upstream_key_file: '{}'",
            a.display(),
            c2.display()
        ))
        .unwrap()
        .escrow_keys()
        .unwrap_err();
        assert!(e.to_string().contains("same key"), "{e}");
    }

    #[test]
    fn admin_listener() {
        let c = parse("upstream: {url: 'http://hs'}").unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9090".parse().unwrap()));
        let c = parse("upstream: {url: 'http://hs'}\nadmin: {listen: null}").unwrap();
        assert_eq!(c.admin.listen, None);
        let c = parse("upstream: {url: 'http://hs'}\nadmin: {listen: '0.0.0.0:9100'}").unwrap();
        assert_eq!(c.admin.listen, Some("0.0.0.0:9100".parse().unwrap()));
        // Port 0 on both (tests): two different ephemeral ports.
        let c = parse(
            "listen: '127.0.0.1:0'\nupstream: {url: 'http://hs'}\nadmin: {listen: '127.0.0.1:0'}",
        )
        .unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:0".parse().unwrap()));
        // Same port on another specific address is fine.
        parse("listen: '10.0.0.1:8080'\nupstream: {url: 'http://hs'}\nadmin: {listen: '127.0.0.1:8080'}").unwrap();
        let env = |k: &str| (k == "MRP_ADMIN_LISTEN").then(|| "0.0.0.0:9999".to_owned());
        let c = Config::parse("upstream: {url: 'http://hs'}\nadmin: {listen: null}", env).unwrap();
        assert_eq!(c.admin.listen, Some("0.0.0.0:9999".parse().unwrap()));
    }

    #[test]
    fn minimal_and_defaults() {
        let c = parse("upstream: {url: 'http://hs:8008/'}").unwrap();
        assert_eq!(c.upstream.url.to_string(), "http://hs:8008/");
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379");
        assert_eq!(c.http.max_json_body, 65536);
        assert_eq!(c.tokens.refresh_idle, Some(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn null_means_never() {
        let c = parse("upstream: {url: 'http://hs'}\ntokens: {refresh_token_lifetime: null, session_lifetime: 30d}").unwrap();
        assert_eq!(c.tokens.refresh_idle, None);
        assert_eq!(c.tokens.session, Some(Duration::from_secs(30 * 86400)));
    }

    #[test]
    fn redis_sentinel_and_cluster() {
        let c = parse(
            "upstream: {url: 'http://hs'}\nredis:\n  sentinel: {master_name: mrp, nodes: ['10.0.0.1:26379', '[::1]:26380'], password_file: /run/pw}\n  min_replicas_acked: 1",
        )
        .unwrap();
        assert_eq!(
            c.redis.topology,
            RedisTopology::Sentinel(SentinelConfig {
                master_name: "mrp".into(),
                nodes: vec![("10.0.0.1".into(), 26379), ("::1".into(), 26380)],
                password_file: Some(PathBuf::from("/run/pw")),
            })
        );
        assert_eq!(c.redis.min_replicas_acked, 1);
        assert_eq!(c.redis.replica_ack_timeout, Duration::from_millis(500));
        let c =
            parse("upstream: {url: 'http://hs'}\nredis: {cluster: {nodes: ['a:7000', 'b:7001']}}")
                .unwrap();
        assert_eq!(
            c.redis.topology,
            RedisTopology::Cluster(ClusterConfig {
                nodes: vec![("a".into(), 7000), ("b".into(), 7001)],
                password_file: None,
            })
        );
        let c = parse("upstream: {url: 'http://hs'}").unwrap();
        assert_eq!(c.redis.topology, RedisTopology::Single);
        assert_eq!(c.redis.min_replicas_acked, 0);
        // MRP_REDIS_URL is a redis.url too.
        let e = Config::parse(
            "upstream: {url: 'http://hs'}\nredis: {cluster: {nodes: ['a:7000']}}",
            |k| (k == "MRP_REDIS_URL").then(|| "redis://x".to_owned()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("MRP_REDIS_URL"), "{e}");
        // check_files reads the password file.
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let text = format!(
            "upstream: {{url: 'http://hs'}}\nredis: {{sentinel: {{master_name: m, nodes: ['s:1'], password_file: '{}'}}}}",
            pw.display()
        );
        let c = parse(&text).unwrap();
        let e = check_password_files(&c).unwrap_err().to_string();
        assert!(e.contains("redis.sentinel.password_file"), "{e}");
        std::fs::write(&pw, "\n").unwrap();
        assert!(
            check_password_files(&c)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        std::fs::write(&pw, "s3cret\n").unwrap();
        check_password_files(&c).unwrap();
        assert_eq!(read_password(&pw).unwrap(), "s3cret");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("upstream: {url: 'http://hs'}\nlisten: nope", "listen"),
            ("tokens: {}", "upstream.url"),
            ("upstream: {url: 'ftp://hs'}", "upstream.url"),
            (
                "upstream: {url: 'http://hs'}\ntokens: {access_token_lifetime: soon}",
                "tokens.access_token_lifetime",
            ),
            (
                "upstream: {url: 'http://hs'}\ntokens: {access_token_lifetime: 0s}",
                "tokens.access_token_lifetime",
            ),
            (
                "upstream: {url: 'http://hs'}\ntokens: {access_token_lifetime: 1h, refresh_token_lifetime: 1m}",
                "tokens.refresh_token_lifetime",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {url: 'nope://x'}",
                "redis.url",
            ),
            (
                "upstream: {url: 'http://hs'}\nlog: {format: xml}",
                "log.format",
            ),
            (
                "upstream: {url: 'http://hs'}\nhttp: {max_json_body: 3}",
                "http.max_json_body",
            ),
            ("upstream: {url: 'http://hs', extra: 1}", "extra"),
            (
                "upstream: {url: 'http://hs'}\nadmin: {listen: nope}",
                "admin.listen",
            ),
            (
                "upstream: {url: 'http://hs'}\nadmin: {listen: '127.0.0.1:8080'}",
                "admin.listen",
            ),
            (
                "listen: '0.0.0.0:8080'\nupstream: {url: 'http://hs'}\nadmin: {listen: '127.0.0.1:8080'}",
                "admin.listen",
            ),
            (
                "upstream: {url: 'http://hs'}\nadmin: {listen: '[::]:8080'}",
                "admin.listen",
            ),
            ("upstream: {url: 'http://hs'}\nadmin: {port: 1}", "port"),
            ("upstream: {url: 'http://hs'}\ntokenz: {}", "tokenz"),
            (
                "upstream: {url: 'http://hs'}\ntls: {cert_file: c.pem}",
                "tls.key_file",
            ),
            (
                "upstream: {url: 'http://hs'}\ntls: {key_file: k.pem}",
                "tls.cert_file",
            ),
            (
                "upstream: {url: 'http://hs'}\ntls: {cert_file: '', key_file: k.pem}",
                "tls.cert_file",
            ),
            (
                "upstream: {url: 'http://hs'}\ntls: {cert_file: c, key_file: k, ca_file: x}",
                "ca_file",
            ),
            (
                "upstream: {url: 'http://hs', ca_file: ca.pem}",
                "upstream.ca_file",
            ),
            (
                "upstream: {url: 'https://hs', ca_file: ''}",
                "upstream.ca_file",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {url: 'redis://r', ca_file: ca.pem}",
                "redis.ca_file",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {url: 'redis://r', sentinel: {master_name: m, nodes: ['s:26379']}}",
                "redis.url",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {sentinel: {master_name: m, nodes: ['s:1']}, cluster: {nodes: ['c:1']}}",
                "redis.cluster",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {sentinel: {nodes: ['s:26379']}}",
                "redis.sentinel.master_name",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {sentinel: {master_name: m, nodes: []}}",
                "redis.sentinel.nodes",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {sentinel: {master_name: m, nodes: ['s']}}",
                "redis.sentinel.nodes",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {cluster: {nodes: ['c:99999']}}",
                "redis.cluster.nodes",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {cluster: {nodes: ['c:1'], seeds: 2}}",
                "unknown field",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {cluster: {nodes: ['c:1']}, ca_file: ca.pem}",
                "redis.ca_file",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {min_replicas_acked: 17}",
                "redis.min_replicas_acked",
            ),
            (
                "upstream: {url: 'http://hs'}\nredis: {replica_ack_timeout: 2s}",
                "redis.replica_ack_timeout",
            ),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(
                e.contains(key),
                "{text:?} gave {e:?}, expected it to name {key}"
            );
        }
    }

    #[test]
    fn env_overrides_connection_settings() {
        let env = |k: &str| match k {
            "MRP_LISTEN" => Some("0.0.0.0:9999".to_owned()),
            "MRP_UPSTREAM_URL" => Some("http://other:8448".to_owned()),
            "MRP_REDIS_URL" => Some("redis+unix:///tmp/r.sock".to_owned()),
            _ => None,
        };
        let c = Config::parse("upstream: {url: 'http://hs'}", env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9999");
        assert_eq!(c.upstream.url.authority().unwrap().as_str(), "other:8448");
        assert_eq!(c.redis.url, "redis+unix:///tmp/r.sock");
    }
}
