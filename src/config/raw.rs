//! The configuration as written in YAML (unknown keys are errors), and one `validate` per
//! section into the typed values of [`super`]. Every error names its key path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::rate_limit::{self, RawRateLimit};
use super::{
    AdminConfig, ClusterConfig, Config, ConfigError, HttpConfig, LogConfig, LogFormat, RedisConfig,
    RedisTopology, SentinelConfig, TlsConfig, UpstreamConfig, invalid,
};
use crate::session::Lifetimes;

/// `Some(None)` for an explicit `null`, `None` for a missing key.
pub(super) fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    listen: Option<String>,
    #[serde(default)]
    upstream: RawEndpoint,
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
    rate_limit: RawRateLimit,
    trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    admin: RawAdmin,
    tls: Option<RawTls>,
    #[serde(default)]
    cache: super::cache::RawCache,
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
    upstream_key_file: Option<String>,
    previous_upstream_key_file: Option<String>,
}

/// A server the proxy connects to: `upstream:` and `redis:` both have these keys.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    ca_file: Option<String>,
    /// `upstream:` only (`redis:` has its own struct and never sets it).
    max_connections: Option<u64>,
}

/// `redis:`: the endpoint keys, or Sentinel / Cluster instead of `url`, and write durability.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    ca_file: Option<String>,
    sentinel: Option<RawSentinel>,
    cluster: Option<RawCluster>,
    min_replicas_acked: Option<u32>,
    replica_ack_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSentinel {
    master_name: Option<String>,
    nodes: Option<Vec<String>>,
    password_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    nodes: Option<Vec<String>>,
    password_file: Option<String>,
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
    #[serde(default, deserialize_with = "nullable")]
    max_requests_per_ip: Option<Option<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

pub(super) fn duration(key: &str, v: Option<&str>, default: &str) -> Result<Duration, ConfigError> {
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

/// An optional file path: absent or `null` = none; empty is an error.
fn path(key: &str, v: Option<String>) -> Result<Option<PathBuf>, ConfigError> {
    match v {
        None => Ok(None),
        Some(s) if s.trim().is_empty() => Err(invalid(key, "empty path (use null for none)")),
        Some(s) => Ok(Some(PathBuf::from(s))),
    }
}

/// A whole number in `range`, else `message`.
fn bounded(
    key: &str,
    v: u64,
    range: std::ops::RangeInclusive<u64>,
    message: &str,
) -> Result<usize, ConfigError> {
    if !range.contains(&v) {
        return Err(invalid(key, message));
    }
    Ok(v as usize)
}

/// A cap that 0 or null turns off: `default` when the key is absent, else 1 to `max`.
fn optional_cap(
    key: &str,
    v: Option<Option<u64>>,
    default: Option<usize>,
    max: u64,
) -> Result<Option<usize>, ConfigError> {
    match v {
        None => Ok(default),
        Some(None) | Some(Some(0)) => Ok(None),
        Some(Some(n)) => bounded(
            key,
            n,
            1..=max,
            &format!("must be between 0 (no cap) and {max}"),
        )
        .map(Some),
    }
}

impl Raw {
    /// YAML text; an empty file is all defaults (and fails for want of `upstream.url`).
    pub(super) fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        if text.trim().is_empty() {
            return Ok(Raw::default());
        }
        // serde_yaml's messages carry the key path and the line ("tokens: unknown field …").
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))
    }

    /// Applies the [`super::ENV_OVERRIDES`].
    pub(super) fn override_from(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(v) = env("MRP_LISTEN") {
            self.listen = Some(v);
        }
        if let Some(v) = env("MRP_UPSTREAM_URL") {
            self.upstream.url = Some(v);
        }
        if let Some(v) = env("MRP_REDIS_URL") {
            self.redis.url = Some(v);
        }
        if let Some(v) = env("MRP_LOG_LEVEL") {
            self.log.level = Some(v);
        }
        if let Some(v) = env("MRP_ADMIN_LISTEN") {
            self.admin.listen = Some(Some(v));
        }
    }

    /// The typed configuration, section by section (in this order, so the first error named
    /// is the same whatever the section count).
    pub(super) fn validate(self) -> Result<Config, ConfigError> {
        let listen_s = self.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = listen_s.parse().map_err(|_| {
            invalid(
                "listen",
                format!("not an address like 127.0.0.1:8080: {listen_s:?}"),
            )
        })?;
        let upstream = self.upstream.upstream()?;
        let redis = self.redis.redis()?;
        let tokens = self.tokens.validate()?;
        let http = self.http.validate()?;
        let log = self.log.validate()?;
        let admin = self.admin.validate(listen)?;
        Ok(Config {
            listen,
            upstream,
            redis,
            tokens,
            http,
            log,
            admin,
            rate_limit: rate_limit::rate_limit(self.rate_limit)?,
            trusted_proxies: rate_limit::trusted_proxies(self.trusted_proxies.unwrap_or_default())?,
            tls: self.tls.map(RawTls::validate).transpose()?,
            cache: super::cache::cache(self.cache)?,
            shutdown_timeout: duration(
                "shutdown_timeout",
                self.shutdown_timeout.as_deref(),
                "30s",
            )?,
        })
    }
}

/// What `upstream:` and `redis:` check alike.
struct Endpoint {
    connect_timeout: Duration,
    response_timeout: Duration,
    ca_file: Option<PathBuf>,
}

impl RawEndpoint {
    /// The CA bundle (only with the TLS scheme, `tls` says whether the URL has it) and the two
    /// timeouts (`defaults`: connect, response).
    fn checks(
        &self,
        section: &str,
        tls: bool,
        tls_scheme: &str,
        defaults: (&str, &str),
    ) -> Result<Endpoint, ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        let ca_file = path(&key("ca_file"), self.ca_file.clone())?;
        if ca_file.is_some() && !tls {
            return Err(invalid(
                &key("ca_file"),
                format!(
                    "set, but {section}.url is not {tls_scheme}:// (remove it, or use {tls_scheme})"
                ),
            ));
        }
        Ok(Endpoint {
            ca_file,
            connect_timeout: duration(
                &key("connect_timeout"),
                self.connect_timeout.as_deref(),
                defaults.0,
            )?,
            response_timeout: duration(
                &key("response_timeout"),
                self.response_timeout.as_deref(),
                defaults.1,
            )?,
        })
    }

    fn upstream(self) -> Result<UpstreamConfig, ConfigError> {
        let url_s = self
            .url
            .as_deref()
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
        let https = url.scheme_str() == Some("https");
        let e = self.checks("upstream", https, "https", ("5s", "5m"))?;
        let max_connections = bounded(
            "upstream.max_connections",
            self.max_connections.unwrap_or(16_384),
            1..=1_000_000,
            "must be between 1 and 1000000",
        )?;
        Ok(UpstreamConfig {
            url,
            connect_timeout: e.connect_timeout,
            response_timeout: e.response_timeout,
            ca_file: e.ca_file,
            max_connections,
        })
    }
}

impl RawRedis {
    fn redis(self) -> Result<RedisConfig, ConfigError> {
        let topology = self.topology()?;
        if topology != RedisTopology::Single {
            let other = if matches!(topology, RedisTopology::Sentinel(_)) {
                "redis.sentinel"
            } else {
                "redis.cluster"
            };
            if self.url.is_some() {
                return Err(invalid(
                    "redis.url",
                    format!(
                        "set together with {other} (use one of them; MRP_REDIS_URL counts too)"
                    ),
                ));
            }
            if self.ca_file.is_some() {
                return Err(invalid(
                    "redis.ca_file",
                    format!("only for a rediss:// redis.url, not with {other}"),
                ));
            }
        }
        let endpoint = RawEndpoint {
            url: self.url,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            ca_file: self.ca_file,
            max_connections: None,
        };
        let url = endpoint
            .url
            .clone()
            .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
        redis::Client::open(url.as_str())
            .map_err(|e| invalid("redis.url", format!("not a Redis URL: {}", e)))?;
        let tls = url.starts_with("rediss://");
        let e = endpoint.checks("redis", tls, "rediss", ("1s", "2s"))?;
        let redis = RedisConfig {
            url,
            connect_timeout: e.connect_timeout,
            response_timeout: e.response_timeout,
            ca_file: e.ca_file,
            topology,
            min_replicas_acked: self.min_replicas_acked.unwrap_or(0),
            replica_ack_timeout: duration(
                "redis.replica_ack_timeout",
                self.replica_ack_timeout.as_deref(),
                "500ms",
            )?,
        };
        if redis.min_replicas_acked > 16 {
            return Err(invalid(
                "redis.min_replicas_acked",
                "must be between 0 and 16 (replicas of one master)",
            ));
        }
        if redis.replica_ack_timeout >= redis.response_timeout {
            return Err(invalid(
                "redis.replica_ack_timeout",
                "must be shorter than redis.response_timeout (WAIT runs inside it)",
            ));
        }
        Ok(redis)
    }

    /// `redis.sentinel` / `redis.cluster`: at most one of them.
    fn topology(&self) -> Result<RedisTopology, ConfigError> {
        match (&self.sentinel, &self.cluster) {
            (Some(_), Some(_)) => Err(invalid(
                "redis.cluster",
                "set together with redis.sentinel (use one of them)",
            )),
            (Some(s), None) => {
                let master_name = s
                    .master_name
                    .clone()
                    .filter(|n| !n.trim().is_empty())
                    .ok_or_else(|| {
                        invalid(
                            "redis.sentinel.master_name",
                            "missing (the name in `sentinel monitor <name> …`)",
                        )
                    })?;
                Ok(RedisTopology::Sentinel(SentinelConfig {
                    master_name,
                    nodes: node_list("redis.sentinel.nodes", s.nodes.clone())?,
                    password_file: path("redis.sentinel.password_file", s.password_file.clone())?,
                }))
            }
            (None, Some(c)) => Ok(RedisTopology::Cluster(ClusterConfig {
                nodes: node_list("redis.cluster.nodes", c.nodes.clone())?,
                password_file: path("redis.cluster.password_file", c.password_file.clone())?,
            })),
            (None, None) => Ok(RedisTopology::Single),
        }
    }
}

/// `host:port` of a Sentinel or cluster node.
fn host_port(key: &str, s: &str) -> Result<(String, u16), ConfigError> {
    let bad = || invalid(key, format!("not host:port: {s:?}"));
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains('/') {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn node_list(key: &str, v: Option<Vec<String>>) -> Result<Vec<(String, u16)>, ConfigError> {
    let v = v.unwrap_or_default();
    if v.is_empty() {
        return Err(invalid(key, "missing (a list of host:port)"));
    }
    v.iter().map(|s| host_port(key, s)).collect()
}

impl RawTokens {
    fn validate(self) -> Result<Lifetimes, ConfigError> {
        let tokens = Lifetimes {
            access: duration(
                "tokens.access_token_lifetime",
                self.access_token_lifetime.as_deref(),
                "5m",
            )?,
            refresh_idle: nullable_duration(
                "tokens.refresh_token_lifetime",
                self.refresh_token_lifetime,
                Some("7d"),
            )?,
            session: nullable_duration("tokens.session_lifetime", self.session_lifetime, None)?,
            revoke_on_reuse: self.revoke_session_on_reuse.unwrap_or(true),
        };
        if let Some(r) = tokens.refresh_idle
            && r < tokens.access
        {
            return Err(invalid(
                "tokens.refresh_token_lifetime",
                "shorter than tokens.access_token_lifetime: clients could never refresh",
            ));
        }
        Ok(tokens)
    }
}

impl RawHttp {
    fn validate(self) -> Result<HttpConfig, ConfigError> {
        let max_json_body = bounded(
            "http.max_json_body",
            self.max_json_body.unwrap_or(64 * 1024),
            1024..=16 * 1024 * 1024,
            "must be between 1024 and 16777216 bytes",
        )?;
        let max_connections = bounded(
            "http.max_connections",
            self.max_connections.unwrap_or(10_000),
            1..=1_000_000,
            "must be between 1 and 1000000",
        )?;
        let max_connections_per_ip = optional_cap(
            "http.max_connections_per_ip",
            self.max_connections_per_ip,
            Some(256),
            1_000_000,
        )?;
        // Default: four requests per connection the IP may open, and off when that cap is off
        // (behind a reverse proxy every request comes from its address).
        let max_requests_per_ip = optional_cap(
            "http.max_requests_per_ip",
            self.max_requests_per_ip,
            max_connections_per_ip.map(|c| c.saturating_mul(4)),
            100_000_000,
        )?;
        Ok(HttpConfig {
            max_json_body,
            max_requests_per_ip,
            header_read_timeout: duration(
                "http.header_read_timeout",
                self.header_read_timeout.as_deref(),
                "30s",
            )?,
            idle_timeout: duration("http.idle_timeout", self.idle_timeout.as_deref(), "75s")?,
            max_connections,
            body_read_timeout: duration(
                "http.body_read_timeout",
                self.body_read_timeout.as_deref(),
                "30s",
            )?,
            max_connections_per_ip,
        })
    }
}

impl RawLog {
    fn validate(self) -> Result<LogConfig, ConfigError> {
        let level = self.level.unwrap_or_else(|| "info".to_owned());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            invalid(
                "log.level",
                format!("not a tracing filter ({e}): {level:?}"),
            )
        })?;
        let format = match self.format.as_deref().unwrap_or("pretty") {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("must be \"pretty\" or \"json\", not {other:?}"),
                ));
            }
        };
        Ok(LogConfig { level, format })
    }
}

impl RawTls {
    /// `tls: {cert_file, key_file}`: both required once the section is there.
    fn validate(self) -> Result<TlsConfig, ConfigError> {
        let required = |key: &str, v: Option<String>| {
            path(key, v)?
                .ok_or_else(|| invalid(key, "missing (a PEM file; or tls: null for plain HTTP)"))
        };
        Ok(TlsConfig {
            cert_file: required("tls.cert_file", self.cert_file)?,
            key_file: required("tls.key_file", self.key_file)?,
        })
    }
}

impl RawAdmin {
    fn validate(self, client: SocketAddr) -> Result<AdminConfig, ConfigError> {
        let admin = AdminConfig {
            listen: admin_listen(self.listen, client)?,
            token_file: path("admin.token_file", self.token_file)?,
            upstream_key_file: path("admin.upstream_key_file", self.upstream_key_file)?,
            previous_upstream_key_file: path(
                "admin.previous_upstream_key_file",
                self.previous_upstream_key_file,
            )?,
        };
        if admin.previous_upstream_key_file.is_some() {
            if admin.upstream_key_file.is_none() {
                return Err(invalid(
                    "admin.previous_upstream_key_file",
                    "set without admin.upstream_key_file (the previous key only opens; the current one seals)",
                ));
            }
            if admin.previous_upstream_key_file == admin.upstream_key_file {
                return Err(invalid(
                    "admin.previous_upstream_key_file",
                    "the same file as admin.upstream_key_file",
                ));
            }
        }
        Ok(admin)
    }
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
