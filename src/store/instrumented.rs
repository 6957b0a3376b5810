//! A [`TokenStore`] decorator that times every call and counts failures (metrics
//! `mrp_redis_command_duration_seconds` and `mrp_redis_errors_total`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::session::{
    AccessRecord, Issued, NewSession, RefreshRecord, RotateResult, Rotation, SessionId,
    SessionInfo, StoreError, TokenStore,
};
use crate::telemetry::metrics::{Metrics, StoreOp};

/// Wraps a store; each call is recorded under its [`StoreOp`].
#[derive(Clone)]
pub struct Instrumented<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Instrumented<S> {
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Instrumented { inner, metrics }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: TokenStore> Instrumented<S> {
    async fn timed<T>(
        &self,
        op: StoreOp,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .store_call(op, started.elapsed(), result.is_ok());
        result
    }
}

impl<S: TokenStore> TokenStore for Instrumented<S> {
    async fn create(&self, s: &NewSession, offset: i64) -> Result<Issued, StoreError> {
        self.timed(StoreOp::Create, self.inner.create(s, offset))
            .await
    }

    async fn lookup_access(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
    ) -> Result<AccessRecord, StoreError> {
        self.timed(
            StoreOp::LookupAccess,
            self.inner.lookup_access(sid, id, offset),
        )
        .await
    }

    async fn peek_refresh(
        &self,
        sid: SessionId,
        id: &str,
        offset: i64,
        revoke_on_reuse: bool,
    ) -> Result<RefreshRecord, StoreError> {
        self.timed(
            StoreOp::PeekRefresh,
            self.inner.peek_refresh(sid, id, offset, revoke_on_reuse),
        )
        .await
    }

    async fn rotate(
        &self,
        sid: SessionId,
        old_id: &str,
        r: &Rotation,
        offset: i64,
    ) -> Result<RotateResult, StoreError> {
        self.timed(StoreOp::Rotate, self.inner.rotate(sid, old_id, r, offset))
            .await
    }

    async fn purge(&self, sid: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        self.timed(StoreOp::Purge, self.inner.purge(sid)).await
    }

    async fn user_sessions(&self, user_id: &str) -> Result<Vec<(SessionId, String)>, StoreError> {
        self.timed(StoreOp::UserSessions, self.inner.user_sessions(user_id))
            .await
    }

    async fn index_session(
        &self,
        info: &SessionInfo,
        sid: SessionId,
        ttl: Duration,
        offset: i64,
    ) -> Result<(), StoreError> {
        self.timed(
            StoreOp::IndexSession,
            self.inner.index_session(info, sid, ttl, offset),
        )
        .await
    }

    async fn unindex_session(&self, user_id: &str, sid: SessionId) -> Result<(), StoreError> {
        self.timed(
            StoreOp::UnindexSession,
            self.inner.unindex_session(user_id, sid),
        )
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(StoreOp::Ping, self.inner.ping()).await
    }
}
