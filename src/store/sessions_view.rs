//! Read-only views of sessions for the operator API (`/admin/v1/...`): plain Redis reads of the
//! session hashes, never a token record; the one sealed value read is the server-key escrow
//! copy, for `?logout_upstream=true` ([`RedisStore::session_escrows`]).

use std::time::Duration;

use redis::Value;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};

use super::connection::RedisConn;
use crate::session::{Millis, SessionId, StoreError};
use crate::store::RedisStore;

const FIELDS: [&str; 6] = ["u", "d", "c", "lr", "aexp", "rexp"];

/// What the operator API shows of one session (ms timestamps; `None` = not recorded / none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    pub sid: SessionId,
    pub user_id: String,
    pub device_id: String,
    pub created_at: Option<Millis>,
    pub last_refresh_at: Option<Millis>,
    pub access_expires_at: Option<Millis>,
    /// `None` also when refresh tokens have no idle limit (`rexp` 0).
    pub refresh_expires_at: Option<Millis>,
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError(e.to_string())
}

fn session_key(sid: SessionId) -> String {
    format!("mrp:{{{}}}:s", sid.tag())
}

fn millis(v: Option<String>) -> Option<Millis> {
    v.and_then(|s| s.parse().ok())
}

impl RedisStore {
    /// The sessions among `sids` whose session record still exists, in the same order. One
    /// pipelined round trip (`HMGET` per session; fields absent in older records are `None`).
    pub async fn session_views(&self, sids: &[SessionId]) -> Result<Vec<SessionView>, StoreError> {
        if sids.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.connection();
        let rows: Vec<Vec<Option<String>>> = if self.cluster() {
            // Sessions live in different slots (nodes): one HMGET each, all at once.
            let calls = sids.iter().map(|sid| {
                let mut c = c.clone();
                async move {
                    redis::cmd("HMGET")
                        .arg(session_key(*sid))
                        .arg(&FIELDS)
                        .query_async::<Vec<Option<String>>>(&mut c)
                        .await
                }
            });
            futures_util::future::try_join_all(calls)
                .await
                .map_err(err)?
        } else {
            let mut pipe = redis::pipe();
            for sid in sids {
                pipe.cmd("HMGET").arg(session_key(*sid)).arg(&FIELDS);
            }
            let mut c = c;
            pipe.query_async(&mut c).await.map_err(err)?
        };
        Ok(sids
            .iter()
            .zip(rows)
            .filter_map(|(sid, row)| {
                let mut it = row.into_iter();
                let user_id = it.next().flatten()?;
                let device_id = it.next().flatten().unwrap_or_default();
                let created_at = millis(it.next().flatten());
                // `lr` 0 = not refreshed yet.
                let last_refresh_at = millis(it.next().flatten()).filter(|&t| t > 0);
                let access_expires_at = millis(it.next().flatten());
                let refresh_expires_at = millis(it.next().flatten()).filter(|&t| t > 0);
                Some(SessionView {
                    sid: *sid,
                    user_id,
                    device_id,
                    created_at,
                    last_refresh_at,
                    access_expires_at,
                    refresh_expires_at,
                })
            })
            .collect())
    }

    /// The owner and the `ue` field (upstream token sealed under the server key, if any) of each
    /// of `sids`, in order; `None` for a session record that no longer exists. One pipelined
    /// round trip. For the operator's upstream logout only: the value is opened by
    /// [`crate::session::escrow::EscrowKeys::open`], never shown.
    pub async fn session_escrows(
        &self,
        sids: &[SessionId],
    ) -> Result<Vec<Option<(String, Option<Vec<u8>>)>>, StoreError> {
        if sids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for sid in sids {
            pipe.cmd("HMGET").arg(session_key(*sid)).arg(&["u", "ue"]);
        }
        let mut c = self.connection();
        let rows: Vec<(Option<String>, Option<Vec<u8>>)> =
            pipe.query_async(&mut c).await.map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|(user, ue)| user.map(|u| (u, ue)))
            .collect())
    }

    /// Counts session records with `SCAN … MATCH mrp:{*}:s`, at once (the admin API's stats
    /// call). In a cluster, every primary is scanned.
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        self.count_sessions_paced(None).await
    }

    /// [`Self::count_sessions`] with a pause of `pace` after every `SCAN` step (1,000 keys):
    /// the sampled `mrp_sessions_alive` gauge. Unpaced, each replica's pass was the whole
    /// keyspace every 30 s, Redis work that grew with the number of sessions and replicas: in
    /// the benchmark it doubled Redis' CPU per refresh within 15 minutes of logins. Paced, a
    /// pass costs a replica at most one step per `pace` whatever the dataset; a larger one only
    /// takes longer to count.
    pub async fn count_sessions_paced(&self, pace: Option<Duration>) -> Result<u64, StoreError> {
        let c = self.connection();
        let RedisConn::Cluster(cc) = c else {
            return scan_count(c, None, pace).await;
        };
        let mut n = 0;
        for primary in self.cluster_primaries().await? {
            n += scan_count(RedisConn::Cluster(cc.clone()), Some(primary), pace).await?;
        }
        Ok(n)
    }

    /// `host:port` of the cluster's primaries that serve slots (from `CLUSTER NODES` of a random
    /// node); empty for other deployments.
    pub async fn cluster_primaries(&self) -> Result<Vec<(String, u16)>, StoreError> {
        let RedisConn::Cluster(mut cc) = self.connection() else {
            return Ok(Vec::new());
        };
        let nodes: String = cc
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .and_then(|v| redis::from_redis_value(v).map_err(Into::into))
            .map_err(err)?;
        Ok(primaries(&nodes))
    }
}

/// `host:port` of the primaries in `CLUSTER NODES` output that serve slots.
fn primaries(nodes: &str) -> Vec<(String, u16)> {
    nodes
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let flags = f.get(2)?;
            if !flags.contains("master") || flags.contains("fail") || f.len() < 9 {
                return None;
            }
            // ip:port@bus[,hostname]
            let addr = f.get(1)?.split('@').next()?;
            let (h, p) = addr.rsplit_once(':')?;
            Some((h.to_owned(), p.parse().ok()?))
        })
        .collect()
}

/// `SCAN … MATCH mrp:{*}:s` to the end on one node (`node` in a cluster).
async fn scan_count(
    mut c: RedisConn,
    node: Option<(String, u16)>,
    pace: Option<Duration>,
) -> Result<u64, StoreError> {
    let mut cursor: u64 = 0;
    let mut n: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg("mrp:{*}:s")
            .arg("COUNT")
            .arg(1000);
        let reply: Value = match (&mut c, &node) {
            (RedisConn::Cluster(cc), Some((host, port))) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                cc.route_command(cmd, routing).await.map_err(err)?
            }
            _ => cmd.query_async(&mut c).await.map_err(err)?,
        };
        let (next, keys): (u64, Vec<Value>) = redis::from_redis_value(reply)
            .map_err(|e| StoreError(format!("unexpected SCAN reply: {e}")))?;
        n += keys.len() as u64;
        if next == 0 {
            return Ok(n);
        }
        cursor = next;
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
}
