//! Cross-replica invalidation of the token cache (issue 11; README "Token cache").
//!
//! Every purge of a session runs `purge_session` in `lua/common.lua`, which publishes the
//! session's tag on [`CHANNEL`] in the same script (atomic with the deletion). Each replica keeps
//! one dedicated pub/sub connection subscribed to it and to its own heartbeat channel, and
//! publishes a heartbeat (its monotonic send time) every `cache.heartbeat_interval` through its
//! *data* connection. Redis delivers one subscriber's messages in order, so a heartbeat heard
//! proves that every revocation committed before it was sent has been applied; the cache serves
//! hits only while such a heartbeat is younger than `cache.liveness_timeout`
//! ([`super::cached::TokenCache`]).
//!
//! Pub/sub is at most once: a closed subscriber connection flushes the cache, and so does
//! heartbeat silence; it comes back in service with the first heartbeat sent after the flush.
//!
//! Topologies: the channel names carry the hash tag `{inv}`. In Redis Cluster a classic
//! `PUBLISH` reaches every node's subscribers over the cluster bus, so one subscriber on any node
//! hears the revocations of all slots; but the heartbeat then only proves the path from the node
//! it was published on, so it must be published on every primary (or the one that owns the
//! session) for the ordering argument to hold. With Sentinel the subscriber must follow the
//! master with the data connection, and a master switch must flush (see README).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::RedisStore;
use super::cached::TokenCache;
use crate::session::SessionId;
use crate::telemetry::metrics::CacheFlush;

/// Where the purge script publishes revoked sessions (payload: the session tag). Must match
/// `INVALIDATION_CHANNEL` in `lua/common.lua`.
pub const CHANNEL: &str = "mrp:{inv}";

/// A replica's own heartbeat channel.
pub fn heartbeat_channel(replica: &str) -> String {
    format!("{CHANNEL}:hb:{replica}")
}

/// Timing of the invalidation tasks.
#[derive(Clone, Debug)]
pub struct InvalidationSettings {
    pub heartbeat_interval: Duration,
    /// Bound on connecting and subscribing.
    pub connect_timeout: Duration,
}

/// Whether `store`'s deployment has an invalidation channel (a single node today; Sentinel and
/// Cluster need the work described in the module doc). Without it the cache must stay off.
pub fn supported(store: &RedisStore) -> bool {
    store.subscriber_client().is_some()
}

/// Starts the subscriber and the heartbeat task; both run until their handles are aborted.
/// `None` where the deployment has no invalidation channel ([`supported`]).
pub fn spawn(
    cache: Arc<TokenCache>,
    store: &RedisStore,
    settings: InvalidationSettings,
) -> Option<[tokio::task::JoinHandle<()>; 2]> {
    let client = store.subscriber_client()?.clone();
    let replica = replica_id();
    let hb = heartbeat_channel(&replica);
    let subscriber = tokio::spawn(subscribe(
        cache.clone(),
        client,
        hb.clone(),
        settings.connect_timeout,
    ));
    let heartbeats = tokio::spawn(heartbeat(cache, store.clone(), hb, settings));
    Some([subscriber, heartbeats])
}

/// A random name for this process's heartbeat channel.
fn replica_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What one message on the subscriber connection means.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Revoked(SessionId),
    Heartbeat(u64),
    /// Unreadable: the cache cannot know what it should forget.
    Garbage,
}

fn event(channel: &str, payload: &[u8], heartbeat: &str) -> Event {
    let text = std::str::from_utf8(payload).ok();
    if channel == heartbeat {
        return match text.and_then(|t| t.parse().ok()) {
            Some(ns) => Event::Heartbeat(ns),
            None => Event::Garbage,
        };
    }
    match text.and_then(SessionId::from_tag) {
        Some(sid) if channel == CHANNEL => Event::Revoked(sid),
        _ => Event::Garbage,
    }
}

async fn subscribe(
    cache: Arc<TokenCache>,
    client: redis::Client,
    heartbeat: String,
    connect_timeout: Duration,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        match connect(&client, &heartbeat, connect_timeout).await {
            Ok(pubsub) => {
                backoff = Duration::from_millis(20);
                tracing::debug!("token cache invalidation subscriber connected");
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = messages.next().await {
                    match event(msg.get_channel_name(), msg.get_payload_bytes(), &heartbeat) {
                        Event::Revoked(sid) => cache.invalidate(sid),
                        Event::Heartbeat(ns) => cache.heard(ns),
                        Event::Garbage => cache.flush(CacheFlush::BadMessage),
                    }
                }
                tracing::warn!("token cache invalidation subscriber disconnected");
            }
            Err(e) => {
                tracing::warn!(error = %e, "token cache invalidation subscriber cannot connect");
            }
        }
        // Whatever was published meanwhile is lost: nothing cached may outlive that.
        cache.flush(CacheFlush::Disconnect);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn connect(
    client: &redis::Client,
    heartbeat: &str,
    timeout: Duration,
) -> Result<redis::aio::PubSub, String> {
    let setup = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&[CHANNEL, heartbeat]).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    match tokio::time::timeout(timeout, setup).await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

async fn heartbeat(
    cache: Arc<TokenCache>,
    store: RedisStore,
    channel: String,
    settings: InvalidationSettings,
) {
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        cache.check_liveness();
        let sent = cache.now_ns();
        let mut conn = store.connection();
        let channel = channel.clone();
        // Not awaited in line: a slow Redis must not delay the liveness check above.
        tokio::spawn(async move {
            let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(sent)
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "token cache heartbeat not published");
            }
        });
        n = n.wrapping_add(1);
        if n.is_multiple_of(16) {
            cache.sample_gauges();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events() {
        let hb = heartbeat_channel("ab12");
        assert_eq!(hb, "mrp:{inv}:hb:ab12");
        let sid = SessionId::from_tag("AAAAAAAAAAAAAAAAAAAAAA").unwrap();
        assert_eq!(
            event(CHANNEL, b"AAAAAAAAAAAAAAAAAAAAAA", &hb),
            Event::Revoked(sid)
        );
        assert_eq!(event(&hb, b"12345", &hb), Event::Heartbeat(12345));
        assert_eq!(event(&hb, b"x", &hb), Event::Garbage);
        assert_eq!(event(CHANNEL, b"short", &hb), Event::Garbage);
        assert_eq!(event(CHANNEL, &[0xff, 0xfe], &hb), Event::Garbage);
    }

    #[test]
    fn the_purge_script_publishes_on_this_channel() {
        let lua = include_str!("lua/common.lua");
        assert!(
            lua.contains(&format!("INVALIDATION_CHANNEL = '{CHANNEL}'")),
            "common.lua and CHANNEL disagree"
        );
    }
}
