//! `cache:`: the in-process cache of access-token lookups (issue 11; README "Token cache").

use std::time::Duration;

use serde::Deserialize;

use super::raw::duration;
use super::{ConfigError, invalid};

/// The validated `cache:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheConfig {
    /// `false`: every access token is looked up in Redis (the behaviour without a cache).
    pub enabled: bool,
    /// Most sessions held at once.
    pub max_entries: u64,
    /// Most bytes the entries may take (their heap data and the map's per-entry bookkeeping).
    pub max_bytes: u64,
    /// Longest an entry is trusted without asking Redis again, whatever its token's expiry: a
    /// backstop, not the revocation path.
    pub max_ttl: Duration,
    /// How often each replica publishes a heartbeat to its own invalidation subscriber.
    pub heartbeat_interval: Duration,
    /// Heartbeat silence after which the cache is flushed and bypassed; also the bound on how
    /// long a revocation made on another replica can go unseen here.
    pub liveness_timeout: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            max_ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_millis(20),
            liveness_timeout: Duration::from_millis(80),
        }
    }
}

const DEFAULT_MAX_ENTRIES: u64 = 100_000;
/// 48 MiB: 100k entries of ~410 bytes (a typical session: `store::cached` tests), with room for
/// longer user ids and upstream tokens.
const DEFAULT_MAX_BYTES: u64 = 48 * 1024 * 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    enabled: Option<bool>,
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
    max_ttl: Option<String>,
    heartbeat_interval: Option<String>,
    liveness_timeout: Option<String>,
}

pub(super) fn cache(raw: RawCache) -> Result<CacheConfig, ConfigError> {
    let max_entries = raw.max_entries.unwrap_or(DEFAULT_MAX_ENTRIES);
    if !(1..=100_000_000).contains(&max_entries) {
        return Err(invalid(
            "cache.max_entries",
            "must be between 1 and 100000000",
        ));
    }
    let max_bytes = raw.max_bytes.unwrap_or(DEFAULT_MAX_BYTES);
    if !(64 * 1024..=64 * 1024 * 1024 * 1024).contains(&max_bytes) {
        return Err(invalid(
            "cache.max_bytes",
            "must be between 65536 (64 KiB) and 68719476736 (64 GiB)",
        ));
    }
    let heartbeat_interval = duration(
        "cache.heartbeat_interval",
        raw.heartbeat_interval.as_deref(),
        "20ms",
    )?;
    if heartbeat_interval < Duration::from_millis(1) || heartbeat_interval > Duration::from_secs(1)
    {
        return Err(invalid(
            "cache.heartbeat_interval",
            "must be between 1ms and 1s",
        ));
    }
    let liveness_timeout = duration(
        "cache.liveness_timeout",
        raw.liveness_timeout.as_deref(),
        "80ms",
    )?;
    if liveness_timeout < heartbeat_interval * 2 || liveness_timeout > Duration::from_secs(10) {
        return Err(invalid(
            "cache.liveness_timeout",
            "must be at least twice cache.heartbeat_interval and at most 10s",
        ));
    }
    Ok(CacheConfig {
        enabled: raw.enabled.unwrap_or(true),
        max_entries,
        max_bytes,
        max_ttl: duration("cache.max_ttl", raw.max_ttl.as_deref(), "60s")?,
        heartbeat_interval,
        liveness_timeout,
    })
}
