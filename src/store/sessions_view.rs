//! Read-only views of sessions for the operator API (`/admin/v1/...`): plain Redis reads of the
//! session hashes, never a token record; the one sealed value read is the server-key escrow
//! copy, for `?logout_upstream=true` ([`RedisStore::session_escrows`]).

use redis::Value;

use crate::session::{Millis, SessionId, StoreError};
use crate::store::RedisStore;

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
        let mut pipe = redis::pipe();
        for sid in sids {
            pipe.cmd("HMGET")
                .arg(session_key(*sid))
                .arg(&["u", "d", "c", "lr", "aexp", "rexp"]);
        }
        let mut c = self.connection();
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut c).await.map_err(err)?;
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

    /// Counts session records with `SCAN … MATCH mrp:{*}:s` (for the sampled
    /// `mrp_sessions_alive` gauge: run on an interval, never per scrape).
    pub async fn count_sessions(&self) -> Result<u64, StoreError> {
        let mut c = self.connection();
        let mut cursor: u64 = 0;
        let mut n: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Value>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg("mrp:{*}:s")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            n += keys.len() as u64;
            if next == 0 {
                return Ok(n);
            }
            cursor = next;
        }
    }
}
