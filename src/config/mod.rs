//! Configuration: raw serde structs (unknown keys are errors) parsed once into a typed
//! [`Config`]. Every error names the offending key path.
//!
//! The shipped `config.yaml` at the repository root documents every key.

mod cache;
mod rate_limit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::session::Lifetimes;

pub use self::cache::CacheConfig;
pub use self::rate_limit::{LimitConfig, RateLimitBackend, RateLimitConfig};
pub use crate::proxy::client_ip::TrustedProxies;

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
}

#[derive(Clone, Debug, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// For a `rediss://` URL: the CA bundle (PEM) to trust instead of the system roots.
    pub ca_file: Option<PathBuf>,
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
    /// Most connections open at once from one client IP (the TCP peer); `None` = no cap.
    pub max_connections_per_ip: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
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

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

// ---- raw, as written in YAML ----

/// `Some(None)` for an explicit `null`, `None` for a missing key.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: Option<String>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    tokens: RawTokens,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    log: RawLog,
    shutdown_timeout: Option<String>,
    #[serde(default)]
    rate_limit: rate_limit::RawRateLimit,
    trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    admin: RawAdmin,
    tls: Option<RawTls>,
    #[serde(default)]
    cache: cache::RawCache,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<String>,
    key_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default, deserialize_with = "nullable")]
    listen: Option<Option<String>>,
    token_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    ca_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTokens {
    access_token_lifetime: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    refresh_token_lifetime: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    session_lifetime: Option<Option<String>>,
    revoke_session_on_reuse: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_json_body: Option<u64>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<u64>,
    body_read_timeout: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    max_connections_per_ip: Option<Option<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

fn duration(key: &str, v: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
    let s = v.unwrap_or(default);
    let d = humantime::parse_duration(s)
        .map_err(|e| invalid(key, format!("not a duration ({e}): {s:?}")))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than zero"));
    }
    Ok(d)
}

fn nullable_duration(
    key: &str,
    v: Option<Option<String>>,
    default: Option<&str>,
) -> Result<Option<Duration>, ConfigError> {
    match v {
        None => default.map(|d| duration(key, Some(d), d)).transpose(),
        Some(None) => Ok(None),
        Some(Some(s)) => duration(key, Some(&s), "").map(Some),
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
    /// Reads and validates `path`, then applies `MRP_*` environment overrides.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config = Self::parse(&text, |k| std::env::var(k).ok())?;
        config.check_files()?;
        Ok(config)
    }

    /// Reads the files the config names (TLS certificate and key, CA bundles) and checks that
    /// they parse, so the proxy refuses to start (and `check-config` fails) on a bad one.
    /// [`Config::parse`] does not touch the filesystem.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        fn named(key: &'static str) -> impl Fn(crate::tls::TlsError) -> ConfigError {
            move |e| invalid(key, e.to_string())
        }
        if let Some(tls) = &self.tls {
            let chain =
                crate::tls::read_cert_chain(&tls.cert_file).map_err(named("tls.cert_file"))?;
            let key = crate::tls::read_private_key(&tls.key_file).map_err(named("tls.key_file"))?;
            // A leaf that does not parse, or a key of another certificate.
            crate::tls::server_config(chain, key).map_err(|e| match e {
                crate::tls::TlsError::KeyMismatch => invalid(
                    "tls.key_file",
                    format!("{e} in tls.cert_file ({})", tls.cert_file.display()),
                ),
                e => invalid("tls.cert_file", e.to_string()),
            })?;
        }
        if let Some(ca) = &self.upstream.ca_file {
            crate::tls::read_ca_bundle(ca).map_err(named("upstream.ca_file"))?;
        }
        if let Some(ca) = &self.redis.ca_file {
            crate::tls::read_ca_bundle(ca).map_err(named("redis.ca_file"))?;
        }
        Ok(())
    }

    /// Parses YAML text; `env` supplies override variables.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut raw: Raw = if text.trim().is_empty() {
            Raw::default()
        } else {
            // serde_yaml's messages carry the key path and the line ("tokens: unknown field …").
            serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?
        };
        if let Some(v) = env("MRP_LISTEN") {
            raw.listen = Some(v);
        }
        if let Some(v) = env("MRP_UPSTREAM_URL") {
            raw.upstream.url = Some(v);
        }
        if let Some(v) = env("MRP_REDIS_URL") {
            raw.redis.url = Some(v);
        }
        if let Some(v) = env("MRP_LOG_LEVEL") {
            raw.log.level = Some(v);
        }
        if let Some(v) = env("MRP_ADMIN_LISTEN") {
            raw.admin.listen = Some(Some(v));
        }
        Self::from_raw(raw)
    }

    fn from_raw(raw: Raw) -> Result<Self, ConfigError> {
        let listen_s = raw.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = listen_s.parse().map_err(|_| {
            invalid(
                "listen",
                format!("not an address like 127.0.0.1:8080: {listen_s:?}"),
            )
        })?;

        let url_s = raw
            .upstream
            .url
            .ok_or_else(|| invalid("upstream.url", "missing (the homeserver's base URL)"))?;
        let url: http::Uri = url_s
            .trim_end_matches('/')
            .parse()
            .map_err(|e| invalid("upstream.url", format!("not a URL ({e}): {url_s:?}")))?;
        match url.scheme_str() {
            Some("http" | "https") => {}
            Some(other) => {
                return Err(invalid(
                    "upstream.url",
                    format!("scheme {other:?} is not supported (use http or https)"),
                ));
            }
            None => {
                return Err(invalid(
                    "upstream.url",
                    "needs a scheme, e.g. http://127.0.0.1:8008",
                ));
            }
        }
        if url.authority().is_none() {
            return Err(invalid("upstream.url", "needs a host"));
        }
        if url.query().is_some() {
            return Err(invalid("upstream.url", "must not have a query"));
        }
        let upstream_ca = path("upstream.ca_file", raw.upstream.ca_file)?;
        if upstream_ca.is_some() && url.scheme_str() != Some("https") {
            return Err(invalid(
                "upstream.ca_file",
                "set, but upstream.url is not https:// (remove it, or use https)",
            ));
        }
        let upstream = UpstreamConfig {
            ca_file: upstream_ca,
            url,
            connect_timeout: duration(
                "upstream.connect_timeout",
                raw.upstream.connect_timeout.as_deref(),
                "5s",
            )?,
            response_timeout: duration(
                "upstream.response_timeout",
                raw.upstream.response_timeout.as_deref(),
                "5m",
            )?,
        };

        let redis_url = raw
            .redis
            .url
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        redis::Client::open(redis_url.as_str())
            .map_err(|e| invalid("redis.url", format!("not a Redis URL: {}", e)))?;
        let redis_ca = path("redis.ca_file", raw.redis.ca_file)?;
        if redis_ca.is_some() && !redis_url.starts_with("rediss://") {
            return Err(invalid(
                "redis.ca_file",
                "set, but redis.url is not rediss:// (remove it, or use rediss)",
            ));
        }
        let redis = RedisConfig {
            ca_file: redis_ca,
            url: redis_url,
            connect_timeout: duration(
                "redis.connect_timeout",
                raw.redis.connect_timeout.as_deref(),
                "1s",
            )?,
            response_timeout: duration(
                "redis.response_timeout",
                raw.redis.response_timeout.as_deref(),
                "2s",
            )?,
        };

        let t = raw.tokens;
        let tokens = Lifetimes {
            access: duration(
                "tokens.access_token_lifetime",
                t.access_token_lifetime.as_deref(),
                "5m",
            )?,
            refresh_idle: nullable_duration(
                "tokens.refresh_token_lifetime",
                t.refresh_token_lifetime,
                Some("7d"),
            )?,
            session: nullable_duration("tokens.session_lifetime", t.session_lifetime, None)?,
            revoke_on_reuse: t.revoke_session_on_reuse.unwrap_or(true),
        };
        if let Some(r) = tokens.refresh_idle
            && r < tokens.access
        {
            return Err(invalid(
                "tokens.refresh_token_lifetime",
                "shorter than tokens.access_token_lifetime: clients could never refresh",
            ));
        }

        let max_json_body = raw.http.max_json_body.unwrap_or(64 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&max_json_body) {
            return Err(invalid(
                "http.max_json_body",
                "must be between 1024 and 16777216 bytes",
            ));
        }
        let max_connections = raw.http.max_connections.unwrap_or(10_000);
        if !(1..=1_000_000).contains(&max_connections) {
            return Err(invalid(
                "http.max_connections",
                "must be between 1 and 1000000",
            ));
        }
        let http = HttpConfig {
            max_json_body: max_json_body as usize,
            header_read_timeout: duration(
                "http.header_read_timeout",
                raw.http.header_read_timeout.as_deref(),
                "30s",
            )?,
            idle_timeout: duration("http.idle_timeout", raw.http.idle_timeout.as_deref(), "75s")?,
            max_connections: max_connections as usize,
            body_read_timeout: duration(
                "http.body_read_timeout",
                raw.http.body_read_timeout.as_deref(),
                "30s",
            )?,
            max_connections_per_ip: match raw.http.max_connections_per_ip {
                None => Some(256),
                Some(None) | Some(Some(0)) => None,
                Some(Some(n)) if n <= 1_000_000 => Some(n as usize),
                Some(Some(_)) => {
                    return Err(invalid(
                        "http.max_connections_per_ip",
                        "must be between 0 (no cap) and 1000000",
                    ));
                }
            },
        };

        let level = raw.log.level.unwrap_or_else(|| "info".to_owned());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            invalid(
                "log.level",
                format!("not a tracing filter ({e}): {level:?}"),
            )
        })?;
        let format = match raw.log.format.as_deref().unwrap_or("pretty") {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("must be \"pretty\" or \"json\", not {other:?}"),
                ));
            }
        };

        let admin = AdminConfig {
            listen: admin_listen(raw.admin.listen, listen)?,
            token_file: path("admin.token_file", raw.admin.token_file)?,
        };
        let rate_limit = rate_limit::rate_limit(raw.rate_limit)?;
        let trusted_proxies = rate_limit::trusted_proxies(raw.trusted_proxies.unwrap_or_default())?;
        let tls = raw.tls.map(tls_files).transpose()?;
        let cache = cache::cache(raw.cache)?;

        Ok(Config {
            listen,
            upstream,
            redis,
            tokens,
            http,
            log: LogConfig { level, format },
            admin,
            shutdown_timeout: duration("shutdown_timeout", raw.shutdown_timeout.as_deref(), "30s")?,
            rate_limit,
            trusted_proxies,
            tls,
            cache,
        })
    }
}

/// An optional file path: absent or `null` = none; empty is an error.
fn path(key: &str, v: Option<String>) -> Result<Option<PathBuf>, ConfigError> {
    match v {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Err(invalid(key, "empty path (use null for none)")),
        Some(s) => Ok(Some(PathBuf::from(s))),
    }
}

/// `tls: {cert_file, key_file}`: both required once the section is there.
fn tls_files(raw: RawTls) -> Result<TlsConfig, ConfigError> {
    let required = |key: &str, v: Option<String>| {
        path(key, v)?
            .ok_or_else(|| invalid(key, "missing (a PEM file; or tls: null for plain HTTP)"))
    };
    Ok(TlsConfig {
        cert_file: required("tls.cert_file", raw.cert_file)?,
        key_file: required("tls.key_file", raw.key_file)?,
    })
}

/// `admin.listen`: default `127.0.0.1:9090`, `null` disables. The admin endpoints are never
/// served on the client port, so an address that would collide with `listen` is an error.
fn admin_listen(
    v: Option<Option<String>>,
    client: SocketAddr,
) -> Result<Option<SocketAddr>, ConfigError> {
    let s = match v {
        None => "127.0.0.1:9090".to_owned(),
        Some(None) => return Ok(None),
        Some(Some(s)) => s,
    };
    let addr: SocketAddr = s.parse().map_err(|_| {
        invalid(
            "admin.listen",
            format!("not an address like 127.0.0.1:9090 (or null to disable): {s:?}"),
        )
    })?;
    let overlapping_ip =
        addr.ip() == client.ip() || addr.ip().is_unspecified() || client.ip().is_unspecified();
    if addr.port() != 0 && addr.port() == client.port() && overlapping_ip {
        return Err(invalid(
            "admin.listen",
            format!(
                "{addr} collides with listen ({client}): the admin endpoints are never served on the client port"
            ),
        ));
    }
    Ok(Some(addr))
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
        // `parse` reads no file: the PEM checks are `check_files`, which `load` runs.
        let c = parse("upstream: {url: 'http://hs'}\ntls: {cert_file: /nonexistent/c, key_file: /nonexistent/k}").unwrap();
        let e = c.check_files().unwrap_err().to_string();
        assert!(
            e.starts_with("tls.cert_file: cannot read /nonexistent/c"),
            "{e}"
        );
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
