//! `rate_limit:` and `trusted_proxies:` (issue 4; DESIGN.md §3 "Client IP for rate limits").

use std::num::NonZeroU32;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::raw::nullable;
use super::{ConfigError, invalid};

/// One keyed limiter: a sustained rate and a burst (GCRA, as `governor` and the Redis script
/// implement it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitConfig {
    /// Sustained requests per second; fractional rates are fine (0.5 = one every 2 s).
    pub per_second: f64,
    /// Requests allowed at once before the sustained rate applies.
    pub burst: NonZeroU32,
    /// Time to earn one request back (`1 / per_second`).
    pub period: Duration,
}

/// Where the limiter state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitBackend {
    /// In this process only: each replica has its own budget.
    Local,
    /// In this process first, then shared by every replica through `redis.url`.
    Redis,
}

/// The validated `rate_limit:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitConfig {
    /// `false` turns every limiter off.
    pub enabled: bool,
    /// Per client IP on `POST /login` and `POST /register`; `None` = no limit.
    pub login: Option<LimitConfig>,
    /// Per client IP and, separately, per session on `POST /refresh`; `None` = no limit.
    pub refresh: Option<LimitConfig>,
    /// Per client IP on every request; `None` (the default) = no limit.
    pub all: Option<LimitConfig>,
    pub backend: RateLimitBackend,
}

/// The `trusted_proxies` setting: networks whose `X-Forwarded-For` is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` (IPv4-mapped IPv6 counts as IPv4) is in a trusted network.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The defaults: generous enough that no real client is ever limited (some SDKs log out on any
/// JSON error from /refresh, DESIGN.md §2).
const DEFAULT_LOGIN: (f64, u32) = (0.5, 10);
const DEFAULT_REFRESH: (f64, u32) = (10.0, 100);
/// The emission interval must be at least 1 µs (the Redis script counts in µs).
const MAX_PER_SECOND: f64 = 1_000_000.0;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    login: Option<Option<RawLimit>>,
    #[serde(default, deserialize_with = "nullable")]
    refresh: Option<Option<RawLimit>>,
    #[serde(default, deserialize_with = "nullable")]
    all: Option<Option<RawLimit>>,
    backend: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    per_second: Option<f64>,
    burst: Option<u32>,
}

fn limit(
    key: &str,
    raw: Option<Option<RawLimit>>,
    default: Option<(f64, u32)>,
) -> Result<Option<LimitConfig>, ConfigError> {
    let (raw, default) = match (raw, default) {
        (Some(None), _) | (None, None) => return Ok(None),
        (Some(Some(r)), d) => (r, d),
        (None, Some(d)) => (RawLimit::default(), Some(d)),
    };
    let per_second = match (raw.per_second, default) {
        (Some(v), _) => v,
        (None, Some((d, _))) => d,
        (None, None) => return Err(invalid(&format!("{key}.per_second"), "missing")),
    };
    if per_second.is_nan() || per_second <= 0.0 || per_second > MAX_PER_SECOND {
        return Err(invalid(
            &format!("{key}.per_second"),
            format!("must be greater than 0 and at most {MAX_PER_SECOND}, not {per_second}"),
        ));
    }
    let period = Duration::try_from_secs_f64(1.0 / per_second)
        .ok()
        .filter(|p| *p <= Duration::from_secs(365 * 86400))
        .ok_or_else(|| {
            invalid(
                &format!("{key}.per_second"),
                "too small: one request a year at least",
            )
        })?;
    let burst = match (raw.burst, default) {
        (Some(v), _) => v,
        (None, Some((_, d))) => d,
        (None, None) => return Err(invalid(&format!("{key}.burst"), "missing")),
    };
    let burst = NonZeroU32::new(burst)
        .ok_or_else(|| invalid(&format!("{key}.burst"), "must be at least 1"))?;
    Ok(Some(LimitConfig {
        per_second,
        burst,
        period,
    }))
}

pub(super) fn rate_limit(raw: RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
    let backend = match raw.backend.as_deref().unwrap_or("local") {
        "local" => RateLimitBackend::Local,
        "redis" => RateLimitBackend::Redis,
        other => {
            return Err(invalid(
                "rate_limit.backend",
                format!("must be \"local\" or \"redis\", not {other:?}"),
            ));
        }
    };
    Ok(RateLimitConfig {
        enabled: raw.enabled.unwrap_or(true),
        login: limit("rate_limit.login", raw.login, Some(DEFAULT_LOGIN))?,
        refresh: limit("rate_limit.refresh", raw.refresh, Some(DEFAULT_REFRESH))?,
        all: limit("rate_limit.all", raw.all, None)?,
        backend,
    })
}

/// Parses `trusted_proxies`: CIDRs, or bare addresses meaning one host.
pub(super) fn trusted_proxies(raw: Vec<String>) -> Result<TrustedProxies, ConfigError> {
    let mut nets = Vec::with_capacity(raw.len());
    for (i, s) in raw.iter().enumerate() {
        let key = format!("trusted_proxies[{i}]");
        let net: IpNet = match s.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match s.parse::<std::net::IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(invalid(
                        &key,
                        format!("not a CIDR like 10.0.0.0/8 or an address: {s:?}"),
                    ));
                }
            },
        };
        // "10.1.2.3/8" is almost always a typo for a narrower net; trusting a whole /8 by
        // accident would let anyone in it pick their own rate-limit identity.
        if net.trunc() != net {
            return Err(invalid(
                &key,
                format!(
                    "host bits set in {s:?}: write {} for the network, or {}/{} for one host",
                    net.trunc(),
                    net.addr(),
                    net.max_prefix_len()
                ),
            ));
        }
        nets.push(net);
    }
    Ok(TrustedProxies::new(nets))
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("upstream: {{url: 'http://hs'}}\n{extra}"), |_| {
            None
        })
    }

    #[test]
    fn contains_handles_mapped_addresses() {
        let t = TrustedProxies::new(
            ["127.0.0.0/8", "fd00::/8"]
                .iter()
                .map(|n| n.parse().unwrap())
                .collect(),
        );
        let ip = |s: &str| s.parse().unwrap();
        assert!(t.contains(ip("127.0.0.1")));
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("::1")));
        assert!(!t.contains(ip("128.0.0.1")));
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        let r = &c.rate_limit;
        assert!(r.enabled);
        assert_eq!(r.backend, RateLimitBackend::Local);
        let login = r.login.unwrap();
        assert_eq!(login.per_second, 0.5);
        assert_eq!(login.burst.get(), 10);
        assert_eq!(login.period, Duration::from_secs(2));
        let refresh = r.refresh.unwrap();
        assert_eq!(refresh.burst.get(), 100);
        assert_eq!(refresh.period, Duration::from_millis(100));
        assert_eq!(r.all, None);
        assert!(c.trusted_proxies.is_empty());
    }

    #[test]
    fn explicit_values_partial_and_null() {
        let c = parse(
            "rate_limit:\n  enabled: false\n  login: {burst: 3}\n  refresh: null\n  all: {per_second: 100, burst: 200}\n  backend: redis\ntrusted_proxies: ['10.0.0.0/8', '::1', '192.0.2.7']",
        )
        .unwrap();
        let r = &c.rate_limit;
        assert!(!r.enabled);
        assert_eq!(r.backend, RateLimitBackend::Redis);
        let login = r.login.unwrap();
        assert_eq!((login.per_second, login.burst.get()), (0.5, 3));
        assert_eq!(r.refresh, None);
        let all = r.all.unwrap();
        assert_eq!(all.period, Duration::from_millis(10));
        assert_eq!(all.burst.get(), 200);
        let t = &c.trusted_proxies;
        assert!(t.contains("10.200.0.1".parse().unwrap()));
        assert!(t.contains("::1".parse().unwrap()));
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.2.8".parse().unwrap()));
        assert!(!t.contains("11.0.0.1".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                "rate_limit: {login: {per_second: 0}}",
                "rate_limit.login.per_second",
            ),
            (
                "rate_limit: {login: {per_second: -1}}",
                "rate_limit.login.per_second",
            ),
            (
                "rate_limit: {refresh: {per_second: .nan}}",
                "rate_limit.refresh.per_second",
            ),
            (
                "rate_limit: {refresh: {per_second: 1.0e-12}}",
                "rate_limit.refresh.per_second",
            ),
            (
                "rate_limit: {refresh: {per_second: 1.0e9}}",
                "rate_limit.refresh.per_second",
            ),
            (
                "rate_limit: {refresh: {burst: 0}}",
                "rate_limit.refresh.burst",
            ),
            ("rate_limit: {login: {burst: -2}}", "rate_limit.login.burst"),
            (
                "rate_limit: {login: {burst: 1.5}}",
                "rate_limit.login.burst",
            ),
            ("rate_limit: {all: {burst: 5}}", "rate_limit.all.per_second"),
            ("rate_limit: {all: {per_second: 5}}", "rate_limit.all.burst"),
            ("rate_limit: {all: {per_second: 5, bust: 1}}", "bust"),
            ("rate_limit: {backend: memcached}", "rate_limit.backend"),
            ("rate_limit: {enabled: maybe}", "rate_limit.enabled"),
            ("rate_limit: {logins: {}}", "logins"),
            (
                "trusted_proxies: ['10.0.0.0/8', 'nope']",
                "trusted_proxies[1]",
            ),
            ("trusted_proxies: ['10.0.0.0/33']", "trusted_proxies[0]"),
            ("trusted_proxies: ['10.1.2.3/8']", "trusted_proxies[0]"),
            ("trusted_proxies: ['fd00::1/64']", "trusted_proxies[0]"),
            ("trusted_proxies: '10.0.0.0/8'", "trusted_proxies"),
        ];
        for (text, key) in cases {
            let e = parse(text).expect_err(text).to_string();
            assert!(
                e.contains(key),
                "{text:?} gave {e:?}, expected it to name {key}"
            );
        }
    }
}
