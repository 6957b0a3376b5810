//! The Redis connection of the store, whatever the deployment: one node (redis-rs'
//! [`ConnectionManager`]), a master found and followed through Sentinel ([`SentinelConn`]), or a
//! Redis Cluster (redis-rs' [`ClusterConnection`], which follows MOVED/ASK and failovers itself).
//!
//! Sentinel decides which node is master; this module only follows its decision. redis-rs has no
//! failover-following connection for Sentinel (its `SentinelClient` resolves the master once, at
//! call time), so [`SentinelConn`] re-resolves: on Sentinel's `+switch-master` event, on a poll of
//! `SENTINEL get-master-addr-by-name`, and whenever the data connection fails in a way a
//! failover explains (connection lost or refused, `READONLY`, `MASTERDOWN`, timeout). The new
//! address is used only once redis-rs has checked with `ROLE` that it answers as master.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value,
};

/// How often the Sentinels are asked who the master is, besides their `+switch-master` events.
pub const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// Where the store's connection goes.
#[derive(Clone, Debug)]
pub enum Target {
    /// A `redis://`, `rediss://` or `redis+unix://` URL, with the CA bundle for `rediss://`.
    Url {
        url: String,
        ca_pem: Option<Vec<u8>>,
    },
    Sentinel {
        master_name: String,
        nodes: Vec<(String, u16)>,
        password: Option<String>,
    },
    Cluster {
        nodes: Vec<(String, u16)>,
        password: Option<String>,
    },
}

/// Timeouts shared by every kind of connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
}

/// The store's connection: cheap to clone, every clone shares the same sockets.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Sentinel(Arc<SentinelConn>),
    Cluster(ClusterConnection),
}

/// The client for a `redis://`, `rediss://` (trusting only `ca_pem` when given) or
/// `redis+unix://` URL; also used for the token cache's pub/sub connection.
pub fn url_client(url: &str, ca_pem: Option<&[u8]>) -> Result<redis::Client, RedisError> {
    match ca_pem {
        None => redis::Client::open(url),
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
    }
}

fn manager_config(t: Timeouts) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(t.connect))
        .set_response_timeout(Some(t.response))
        // Fail fast while Redis is down (the caller answers 503); reconnect on next use.
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500))
}

impl RedisConn {
    /// Builds the connection without connecting: the proxy starts (and serves anonymous
    /// traffic) while Redis is down, and connects on first use.
    pub fn new(target: &Target, t: Timeouts) -> Result<Self, RedisError> {
        match target {
            Target::Url { url, ca_pem } => {
                Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
                    url_client(url, ca_pem.as_deref())?,
                    manager_config(t),
                )?))
            }
            Target::Sentinel {
                master_name,
                nodes,
                password,
            } => Ok(RedisConn::Sentinel(Arc::new(SentinelConn::new(
                master_name,
                nodes,
                password.as_deref(),
                t,
            )?))),
            Target::Cluster { nodes, password } => {
                let seeds: Vec<redis::ConnectionInfo> = nodes
                    .iter()
                    .map(|(h, p)| redis::IntoConnectionInfo::into_connection_info((h.as_str(), *p)))
                    .collect::<Result<_, _>>()?;
                let mut b = redis::cluster::ClusterClientBuilder::new(seeds)
                    .connection_timeout(t.connect)
                    .response_timeout(t.response)
                    // MOVED/ASK/TRYAGAIN and topology refreshes are retried inside this
                    // budget; a slot without a master fails fast (503) instead of queueing.
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200);
                if let Some(pw) = password {
                    b = b.password(pw);
                }
                let client = b.build()?;
                Ok(RedisConn::Cluster(
                    client.get_pending_async_connection_with_config(
                        redis::cluster::ClusterConfig::new()
                            .set_connection_timeout(t.connect)
                            .set_response_timeout(t.response),
                    ),
                ))
            }
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
            RedisConn::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let mut c = s.current().await?;
                    let r = c.req_packed_command(cmd).await;
                    s.after(&r);
                    r
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Sentinel(s) => {
                let s = s.clone();
                Box::pin(async move {
                    let mut c = s.current().await?;
                    let r = c.req_packed_commands(cmd, offset, count).await;
                    s.after(&r);
                    r
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
            RedisConn::Sentinel(_) => 0,
        }
    }
}

/// Whether an error may mean the master moved (so Sentinel should be asked again).
fn may_be_failover(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

fn no_master(detail: impl std::fmt::Display) -> RedisError {
    RedisError::from((
        ErrorKind::Io,
        "no Redis master known to Sentinel",
        detail.to_string(),
    ))
}

/// The master in use: its address, a client for it and a reconnecting connection to it.
struct Master {
    addr: ConnectionAddr,
    client: redis::Client,
    conn: ConnectionManager,
}

/// A connection to the master Sentinel names, switched to the new master after a failover.
pub struct SentinelConn {
    master_name: String,
    nodes: Vec<(String, u16)>,
    timeouts: Timeouts,
    /// `None` until the first resolution succeeds.
    master: ArcSwapOption<Master>,
    /// redis-rs' Sentinel client (asks the Sentinels, checks ROLE); one resolution at a time.
    client: tokio::sync::Mutex<SentinelClient>,
    /// Wakes the watcher for an immediate re-resolution (shared with it: the watcher holds no
    /// strong reference while it waits, so it ends with the connection).
    kick: Arc<tokio::sync::Notify>,
    watcher_started: AtomicBool,
    /// Bumped on each master change (the first master found included).
    switches: AtomicU64,
    /// Sent the new master's address on each switch (not for the first master found).
    switch_tx: tokio::sync::watch::Sender<Option<String>>,
}

impl SentinelConn {
    fn new(
        master_name: &str,
        nodes: &[(String, u16)],
        password: Option<&str>,
        timeouts: Timeouts,
    ) -> Result<Self, RedisError> {
        let addrs = nodes
            .iter()
            .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
        let mut b = SentinelClientBuilder::new(addrs, master_name, SentinelServerType::Master)?;
        if let Some(pw) = password {
            b = b.set_client_to_redis_password(pw);
        }
        Ok(SentinelConn {
            master_name: master_name.to_owned(),
            nodes: nodes.to_vec(),
            timeouts,
            master: ArcSwapOption::empty(),
            client: tokio::sync::Mutex::new(b.build()?),
            kick: Arc::new(tokio::sync::Notify::new()),
            watcher_started: AtomicBool::new(false),
            switches: AtomicU64::new(0),
            switch_tx: tokio::sync::watch::channel(None).0,
        })
    }

    /// Notified with the new master's address after every switch (observers such as a cache
    /// flush on it).
    pub fn subscribe_switches(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.switch_tx.subscribe()
    }

    /// The connection to the current master, resolving it first if none is known yet.
    async fn current(self: &Arc<Self>) -> Result<ConnectionManager, RedisError> {
        self.start_watcher();
        if let Some(m) = self.master.load_full() {
            return Ok(m.conn.clone());
        }
        self.resolve().await?;
        match self.master.load_full() {
            Some(m) => Ok(m.conn.clone()),
            None => Err(no_master("not resolved yet")),
        }
    }

    /// A client for the current master (resolved first if none is known yet), for a
    /// connection of its own such as the token cache's invalidation subscriber.
    pub async fn master_client(self: &Arc<Self>) -> Result<redis::Client, RedisError> {
        self.current().await?;
        self.master
            .load_full()
            .map(|m| m.client.clone())
            .ok_or_else(|| no_master("not resolved yet"))
    }

    /// After a call: an error a failover explains makes the watcher ask Sentinel now.
    fn after<T>(&self, r: &Result<T, RedisError>) {
        if let Err(e) = r
            && may_be_failover(e)
        {
            self.kick.notify_one();
        }
    }

    /// Asks the Sentinels for the master (redis-rs checks ROLE on it) and switches to it if
    /// it changed. One resolution at a time; callers queued behind it reuse its outcome.
    async fn resolve(&self) -> Result<(), RedisError> {
        let before = self.switches.load(Ordering::Acquire);
        let mut client = self.client.lock().await;
        if self.switches.load(Ordering::Acquire) != before {
            return Ok(());
        }
        // Sentinels and master are asked in turn: bound the whole lookup.
        let limit = self.timeouts.connect * 2 + self.timeouts.response;
        let found = tokio::time::timeout(limit, client.async_get_client())
            .await
            .map_err(|_| no_master("Sentinel lookup timed out"))??;
        let addr = found.get_connection_info().addr().clone();
        let current = self.master.load_full();
        if current.as_ref().is_some_and(|m| m.addr == addr) {
            return Ok(());
        }
        let conn =
            ConnectionManager::new_lazy_with_config(found.clone(), manager_config(self.timeouts))?;
        let first = current.is_none();
        self.master.store(Some(Arc::new(Master {
            addr: addr.clone(),
            client: found,
            conn,
        })));
        self.switches.fetch_add(1, Ordering::AcqRel);
        if first {
            tracing::info!(master = %addr, "redis: Sentinel master found");
        } else {
            tracing::warn!(master = %addr, "redis: Sentinel master changed, switched to it");
            self.switch_tx.send_replace(Some(addr.to_string()));
        }
        Ok(())
    }

    fn start_watcher(self: &Arc<Self>) {
        if self.watcher_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(watch(weak.clone()));
        tokio::spawn(listen_switch_master(weak));
    }

    /// `SENTINEL get-master-addr-by-name` on the first Sentinel that answers; `poll` keeps the
    /// connection to the one that answered last.
    async fn ask_master_addr(&self, poll: &mut Poll) -> Option<(String, u16)> {
        for _ in 0..self.nodes.len() {
            if poll.conn.is_none() {
                let (h, p) = &self.nodes[poll.node % self.nodes.len()];
                let cfg = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeouts.connect))
                    .set_response_timeout(Some(self.timeouts.response));
                let client = redis::Client::open((h.as_str(), *p)).ok()?;
                poll.conn = client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .ok();
            }
            if let Some(c) = poll.conn.as_mut() {
                let r: Result<Option<(String, u16)>, _> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master_name)
                    .query_async(c)
                    .await;
                if let Ok(Some(a)) = r {
                    return Some(a);
                }
            }
            // Unreachable or not answering for our master: the next Sentinel.
            poll.conn = None;
            poll.node += 1;
        }
        None
    }
}

/// The watcher's Sentinel connection for its polls.
#[derive(Default)]
struct Poll {
    node: usize,
    conn: Option<redis::aio::MultiplexedConnection>,
}

fn same_addr(a: &ConnectionAddr, host: &str, port: u16) -> bool {
    matches!(a, ConnectionAddr::Tcp(h, p) if h == host && *p == port)
}

/// Re-resolves when kicked, and polls Sentinel so that a switch nobody noticed yet (the old
/// master stays writable for seconds after `SENTINEL FAILOVER`) is followed within
/// [`SENTINEL_POLL`]. Ends with the connection.
async fn watch(conn: std::sync::Weak<SentinelConn>) {
    let Some(kick) = conn.upgrade().map(|s| s.kick.clone()) else {
        return;
    };
    let mut poll = Poll::default();
    loop {
        let kicked = tokio::select! {
            _ = kick.notified() => true,
            _ = tokio::time::sleep(SENTINEL_POLL) => false,
        };
        let Some(s) = conn.upgrade() else { return };
        let stale = if kicked {
            true
        } else {
            match (s.ask_master_addr(&mut poll).await, s.master.load_full()) {
                (Some((h, p)), Some(m)) => !same_addr(&m.addr, &h, p),
                (Some(_), None) => true,
                (None, _) => false,
            }
        };
        if stale && let Err(e) = s.resolve().await {
            tracing::debug!(error = %e, "redis: Sentinel lookup failed");
            // Don't spin on a dead master while Sentinel has not failed over yet.
            drop(s);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Subscribes to `+switch-master` on one Sentinel (the next one if it goes away) and kicks the
/// watcher on each event for our master. Ends with the connection.
async fn listen_switch_master(conn: std::sync::Weak<SentinelConn>) {
    let mut i = 0usize;
    loop {
        let Some(s) = conn.upgrade() else { return };
        let (h, p) = s.nodes[i % s.nodes.len()].clone();
        let name = s.master_name.clone();
        let connect = s.timeouts.connect;
        drop(s);
        i += 1;
        let pubsub = async {
            let client = redis::Client::open((h.as_str(), p)).ok()?;
            let mut ps = tokio::time::timeout(connect, client.get_async_pubsub())
                .await
                .ok()?
                .ok()?;
            ps.subscribe("+switch-master").await.ok()?;
            Some(ps)
        }
        .await;
        let Some(ps) = pubsub else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut messages = ps.into_on_message();
        loop {
            // Wake up now and then to notice that the connection is gone.
            let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
            let Some(s) = conn.upgrade() else { return };
            match next {
                Ok(Some(msg)) => {
                    let payload: String = msg.get_payload().unwrap_or_default();
                    if payload.split(' ').next() == Some(name.as_str()) {
                        s.kick.notify_one();
                    }
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
    }
}
