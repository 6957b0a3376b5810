//! Bodies, at the bottom of the crate: the one body type every response and forwarded request
//! has ([`Body`], in memory or streamed), bounded reads ([`read_limited`]), and the client's
//! request body as the proxy sees it ([`ClientBody`]): a progress deadline on every body (a
//! stalled upload is cut after `http.body_read_timeout`), and what is left of it when the proxy
//! answers before reading it all, so the connection can be kept (drained) or closed honestly.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::time::Sleep;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response and forwarded request: streamed or in memory.
pub type Body = BoxBody<Bytes, BoxError>;

/// An in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Wraps a client request body for forwarding (streamed, never buffered).
pub fn stream(b: ClientBody) -> Body {
    b.boxed()
}

/// Reads a body up to `limit` bytes: `Ok(None)` when it is longer.
pub async fn read_limited<B>(body: B, limit: usize) -> Result<Option<Bytes>, BoxError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(Some(c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A request body that stalled longer than `http.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("timed out reading the request body")]
pub struct BodyTimeout;

/// Shared between a [`ClientBody`] and the request handler that made it.
#[derive(Default)]
pub struct BodyState {
    done: AtomicBool,
    timed_out: AtomicBool,
    /// The unread rest of a body dropped before its end.
    leftover: Mutex<Option<Incoming>>,
}

impl BodyState {
    /// The body was read to its end.
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// The body stalled past the deadline.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// The unread rest of the body, once whoever held it dropped it.
    pub fn take_leftover(&self) -> Option<Incoming> {
        self.leftover.lock().ok()?.take()
    }
}

pub struct ClientBody {
    inner: Option<Incoming>,
    state: Arc<BodyState>,
    timeout: Duration,
    /// Armed while a read waits for the client.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration) -> (Self, Arc<BodyState>) {
        let state = Arc::new(BodyState::default());
        if hyper::body::Body::is_end_stream(&inner) {
            state.done.store(true, Ordering::Relaxed);
        }
        (
            ClientBody {
                inner: Some(inner),
                state: state.clone(),
                timeout,
                deadline: None,
            },
            state,
        )
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.deadline = None;
                if r.is_none() || hyper::body::Body::is_end_stream(inner) {
                    this.state.done.store(true, Ordering::Relaxed);
                }
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let d = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if d.as_mut().poll(cx).is_ready() {
                    this.state.timed_out.store(true, Ordering::Relaxed);
                    this.inner = None;
                    this.deadline = None;
                    return Poll::Ready(Some(Err(BodyTimeout.into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self
            .inner
            .as_ref()
            .is_none_or(hyper::body::Body::is_end_stream);
        if end && !self.state.timed_out() {
            self.state.done.store(true, Ordering::Relaxed);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            if hyper::body::Body::is_end_stream(&inner) {
                self.state.done.store(true, Ordering::Relaxed);
            } else if let Ok(mut slot) = self.state.leftover.lock() {
                *slot = Some(inner);
            }
        }
    }
}
