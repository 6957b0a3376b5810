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
//! Topologies ([`super::redis::Subscriber`]):
//! - one node: subscriber and heartbeats on it;
//! - Sentinel: the subscriber connects to the master the data connection uses, and on a master
//!   switch the cache flushes and the subscriber moves to the new master (the heartbeats, sent
//!   through the data connection, follow it by themselves; until both are on the same node no
//!   heartbeat comes back, so the cache stays flushed);
//! - Cluster: a classic `PUBLISH` (the purge script's, on the session's node) reaches every
//!   node's subscribers over the cluster bus, so one subscriber on any node hears the revocations
//!   of every slot. A heartbeat only proves the path from the node it was published on, so each
//!   tick publishes one on every primary (payload `<sent ns> <primary>`), and the cache is told
//!   a heartbeat was heard only once every primary's has come back ([`Quorum`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::RedisStore;
use super::cached::TokenCache;
use super::connection::RedisConn;
use super::redis::Subscriber;
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

/// Starts the subscriber and the heartbeat task; both run until their handles are aborted.
pub fn spawn(
    cache: Arc<TokenCache>,
    store: &RedisStore,
    settings: InvalidationSettings,
) -> Option<[tokio::task::JoinHandle<()>; 2]> {
    let replica = replica_id();
    let hb = heartbeat_channel(&replica);
    // Cluster: the primaries the heartbeats went to, which the subscriber expects back.
    let primaries = Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tokio::spawn(subscribe(
        cache.clone(),
        store.subscriber().clone(),
        store.master_switch_events(),
        hb.clone(),
        primaries.clone(),
        settings.connect_timeout,
    ));
    let heartbeats = tokio::spawn(heartbeat(cache, store.clone(), hb, primaries, settings));
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
    /// An own heartbeat: its send time, and the cluster primary it went through.
    Heartbeat(u64, Option<String>),
    /// Unreadable: the cache cannot know what it should forget.
    Garbage,
}

fn event(channel: &str, payload: &[u8], heartbeat: &str) -> Event {
    let text = std::str::from_utf8(payload).ok();
    if channel == heartbeat {
        let (ns, origin) = match text.map(|t| t.split_once(' ')) {
            Some(Some((ns, origin))) => (ns, Some(origin.to_owned())),
            Some(None) => (text.unwrap_or_default(), None),
            None => return Event::Garbage,
        };
        return match ns.parse() {
            Ok(ns) => Event::Heartbeat(ns, origin),
            Err(_) => Event::Garbage,
        };
    }
    match text.and_then(SessionId::from_tag) {
        Some(sid) if channel == CHANNEL => Event::Revoked(sid),
        _ => Event::Garbage,
    }
}

/// The latest heartbeat heard from each cluster primary; what may be passed on to the cache is
/// the oldest of them, and only once every expected primary has answered.
#[derive(Default)]
struct Quorum {
    latest: std::collections::HashMap<String, u64>,
}

impl Quorum {
    /// Records `ns` from `origin`; the send time every expected primary has reached, if any.
    fn heard(&mut self, origin: String, ns: u64, expected: &[String]) -> Option<u64> {
        let e = self.latest.entry(origin).or_insert(0);
        *e = (*e).max(ns);
        if expected.is_empty() {
            return None;
        }
        expected
            .iter()
            .map(|p| self.latest.get(p).copied())
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().min())
    }
}

/// Where the subscriber connects now (`attempt` rotates through cluster nodes).
async fn subscriber_client(source: &Subscriber, attempt: usize) -> Result<redis::Client, String> {
    match source {
        Subscriber::Node(c) => Ok((**c).clone()),
        Subscriber::Sentinel(s) => s.master_client().await.map_err(|e| e.to_string()),
        Subscriber::AnyOf(nodes) => nodes
            .get(attempt % nodes.len().max(1))
            .cloned()
            .ok_or_else(|| "no cluster node".to_owned()),
    }
}

/// Resolves when the Sentinel master changes (never for other deployments).
async fn switched(rx: &mut Option<tokio::sync::watch::Receiver<Option<String>>>) {
    match rx {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

async fn subscribe(
    cache: Arc<TokenCache>,
    source: Subscriber,
    mut switches: Option<tokio::sync::watch::Receiver<Option<String>>>,
    heartbeat: String,
    primaries: Arc<std::sync::Mutex<Vec<String>>>,
    connect_timeout: Duration,
) {
    let mut backoff = Duration::from_millis(20);
    let mut attempt = 0usize;
    loop {
        // A switch seen before this connection is made is already followed by it.
        if let Some(rx) = switches.as_mut() {
            rx.borrow_and_update();
        }
        let connected = match subscriber_client(&source, attempt).await {
            Ok(client) => connect(&client, &heartbeat, connect_timeout).await,
            Err(e) => Err(e),
        };
        match connected {
            Ok(pubsub) => {
                backoff = Duration::from_millis(20);
                tracing::debug!("token cache invalidation subscriber connected");
                let mut quorum = Quorum::default();
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        m = messages.next() => m,
                        _ = switched(&mut switches) => {
                            // Revocations written on the new master before this subscriber
                            // got there were published where nobody listened.
                            cache.flush(CacheFlush::MasterSwitch);
                            break;
                        }
                    };
                    let Some(msg) = msg else {
                        tracing::warn!("token cache invalidation subscriber disconnected");
                        break;
                    };
                    match event(msg.get_channel_name(), msg.get_payload_bytes(), &heartbeat) {
                        Event::Revoked(sid) => cache.invalidate(sid),
                        Event::Heartbeat(ns, None) => cache.heard(ns),
                        Event::Heartbeat(ns, Some(origin)) => {
                            let expected =
                                primaries.lock().unwrap_or_else(|p| p.into_inner()).clone();
                            if let Some(ns) = quorum.heard(origin, ns, &expected) {
                                cache.heard(ns);
                            }
                        }
                        Event::Garbage => cache.flush(CacheFlush::BadMessage),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "token cache invalidation subscriber cannot connect");
            }
        }
        // Whatever was published meanwhile is lost: nothing cached may outlive that.
        cache.flush(CacheFlush::Disconnect);
        attempt += 1;
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

/// How often the cluster's primaries are listed for the heartbeats (in heartbeat ticks).
const PRIMARIES_REFRESH_TICKS: u32 = 25;

async fn heartbeat(
    cache: Arc<TokenCache>,
    store: RedisStore,
    channel: String,
    primaries: Arc<std::sync::Mutex<Vec<String>>>,
    settings: InvalidationSettings,
) {
    let mut tick = tokio::time::interval(settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    let cluster = matches!(store.connection(), RedisConn::Cluster(_));
    loop {
        tick.tick().await;
        cache.check_liveness();
        let sent = cache.now_ns();
        if cluster && n.is_multiple_of(PRIMARIES_REFRESH_TICKS) {
            let store = store.clone();
            let primaries = primaries.clone();
            tokio::spawn(async move {
                match store.cluster_primaries().await {
                    Ok(p) => {
                        let p: Vec<String> =
                            p.into_iter().map(|(h, p)| format!("{h}:{p}")).collect();
                        *primaries.lock().unwrap_or_else(|e| e.into_inner()) = p;
                    }
                    Err(e) => tracing::debug!(error = %e, "cluster primaries not listed"),
                }
            });
        }
        let targets: Vec<Option<String>> = if cluster {
            primaries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        for target in targets {
            let mut conn = store.connection();
            let channel = channel.clone();
            // Not awaited in line: a slow Redis must not delay the liveness check above.
            tokio::spawn(async move {
                let r = publish(&mut conn, &channel, sent, target).await;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "token cache heartbeat not published");
                }
            });
        }
        n = n.wrapping_add(1);
        if n.is_multiple_of(16) {
            cache.sample_gauges();
        }
    }
}

/// One heartbeat: through the data connection, or on one cluster primary (`target`, which the
/// payload names).
async fn publish(
    conn: &mut RedisConn,
    channel: &str,
    sent: u64,
    target: Option<String>,
) -> redis::RedisResult<()> {
    match (conn, target) {
        (RedisConn::Cluster(cc), Some(addr)) => {
            let (host, port) = addr
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
                .ok_or_else(|| {
                    redis::RedisError::from((redis::ErrorKind::Client, "bad address"))
                })?;
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(format!("{sent} {addr}"));
            let routing = redis::cluster_routing::RoutingInfo::SingleNode(
                redis::cluster_routing::SingleNodeRoutingInfo::ByAddress { host, port },
            );
            cc.route_command(cmd, routing).await.map(|_| ())
        }
        (conn, _) => redis::cmd("PUBLISH")
            .arg(channel)
            .arg(sent)
            .query_async::<i64>(conn)
            .await
            .map(|_| ()),
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
        assert_eq!(event(&hb, b"12345", &hb), Event::Heartbeat(12345, None));
        assert_eq!(
            event(&hb, b"12345 10.0.0.1:7000", &hb),
            Event::Heartbeat(12345, Some("10.0.0.1:7000".into()))
        );
        assert_eq!(event(&hb, b"x 10.0.0.1:7000", &hb), Event::Garbage);
        assert_eq!(event(&hb, b"x", &hb), Event::Garbage);
        assert_eq!(event(CHANNEL, b"short", &hb), Event::Garbage);
        assert_eq!(event(CHANNEL, &[0xff, 0xfe], &hb), Event::Garbage);
    }

    #[test]
    fn a_cluster_heartbeat_counts_once_every_primary_answered() {
        let p = vec!["a:1".to_owned(), "b:2".to_owned()];
        let mut q = Quorum::default();
        assert_eq!(q.heard("a:1".into(), 10, &p), None, "b has not answered");
        assert_eq!(q.heard("b:2".into(), 12, &p), Some(10));
        assert_eq!(q.heard("a:1".into(), 20, &p), Some(12));
        // A primary that stops answering holds the quorum back (so liveness flushes).
        assert_eq!(q.heard("a:1".into(), 30, &p), Some(12));
        // Nothing expected yet (primaries not listed): nothing passed on.
        assert_eq!(Quorum::default().heard("a:1".into(), 5, &[]), None);
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
