//! The keep-alive pool of HTTP/1.1 connections to the homeserver, on hyper's own connection
//! API (`hyper::client::conn::http1`).
//!
//! It replaced hyper-util's `legacy::Client` (issue 11): that client spawns a task and a
//! oneshot channel per request to put the connection back once it is idle again, builds a
//! lazily started connect future for every request (raced against the checkout) and keys its
//! pool by scheme and host, for the one host this proxy ever talks to. Here a connection goes
//! back to the pool when its response body ends (or at once for an empty body), and waits
//! there for hyper's dispatcher to be ready again; checkout takes the most recently used.
//!
//! What it keeps of the old client's behaviour: connections are reused until the homeserver
//! closes them or they sit idle for [`IDLE_TIMEOUT`]; at most [`MAX_IDLE`] idle ones are kept;
//! at most `upstream.max_connections` are open at once, busy or idle (each holds a permit until
//! it closes; HTTP/2 clients can have many requests in flight per connection, so without it the
//! homeserver connections, and file descriptors, grew with the requests in flight): with every
//! one busy a request waits up to `upstream.connect_timeout` for one to come back or close,
//! then fails ([`SendError::Saturated`], answered 503);
//! a request that could not be written on a reused connection (the homeserver closed it in the
//! meantime) is retried once on a new one; connects (TCP and TLS) are bounded by
//! `upstream.connect_timeout` ([`super::connector`]). A request future dropped before its answer
//! (client gone, response timeout) closes its connection: HTTP/1 cannot abandon one request.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::connector::UpstreamConnector;
use crate::body::{Body, BoxError};

/// Idle connections are closed after this long without a request.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept (the oldest goes first).
const MAX_IDLE: usize = 256;

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (TCP or TLS); the connector's error.
    Connect(BoxError),
    /// The connection failed while the request was sent or its answer read.
    Request(hyper::Error),
    /// Every connection allowed (`upstream.max_connections`) stayed busy for the wait.
    Saturated,
}

/// The cap on open connections, how long a request waits at it, and the gauge of open ones.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub wait: Duration,
    pub open: prometheus_client::metrics::gauge::Gauge,
}

/// The pool: the connector and the idle connections, newest at the back.
pub struct Pool {
    connector: UpstreamConnector,
    origin: Uri,
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    max_idle: usize,
    /// One permit per connection open (busy or idle), held by its connection task.
    open: Arc<Semaphore>,
    #[cfg(test)]
    max_connections: usize,
    /// Connections open, for `mrp_upstream_connections_open`.
    open_gauge: prometheus_client::metrics::gauge::Gauge,
    /// How long a request waits for a connection when `max_connections` are busy.
    wait: Duration,
    /// Requests waiting at the cap; only then does a checkin wake them (`returned`).
    waiting: AtomicUsize,
    returned: Notify,
}

#[derive(Default)]
struct Idle {
    conns: VecDeque<(SendRequest<Body>, Instant)>,
    /// Whether the task that closes expired idle connections runs.
    janitor: bool,
}

impl Pool {
    /// `origin`: the homeserver's `scheme://authority`, the address every connection goes to.
    pub fn new(connector: UpstreamConnector, origin: Uri, limits: Limits) -> Arc<Self> {
        Self::with_limits(connector, origin, IDLE_TIMEOUT, MAX_IDLE, limits)
    }

    fn with_limits(
        connector: UpstreamConnector,
        origin: Uri,
        idle_timeout: Duration,
        max_idle: usize,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new(Pool {
            connector,
            origin,
            idle: Mutex::default(),
            idle_timeout,
            max_idle,
            open: Arc::new(Semaphore::new(limits.max_connections)),
            #[cfg(test)]
            max_connections: limits.max_connections,
            open_gauge: limits.open,
            wait: limits.wait,
            waiting: AtomicUsize::new(0),
            returned: Notify::new(),
        })
    }

    /// Whether a request now would have to wait: every connection allowed is open and none is
    /// idle.
    pub fn saturated(&self) -> bool {
        self.open.available_permits() == 0 && self.lock().conns.is_empty()
    }

    /// Connections open now (busy and idle).
    #[cfg(test)]
    fn open_count(&self) -> usize {
        self.max_connections - self.open.available_permits()
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.lock().conns.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` (origin-form URI, `Host` set) on a pooled connection, or a new one, and
    /// returns the answer's head; the connection goes back to the pool when its body ends.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, SendError> {
        // A reused connection may turn out closed; the request is retried once on a new one
        // when hyper hands it back unsent.
        loop {
            let (mut tx, reused) = match self.checkout().await {
                Some(tx) => (tx, true),
                // Boxed: a connect (TCP, TLS, handshake) is rare and its future large (~2.5 KB);
                // inline, every request's future would carry its room and be moved with it.
                None => Box::pin(self.connect_or_wait()).await?,
            };
            match tx.try_send_request(req).await {
                Ok(res) => return Ok(self.track(res, tx)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection that is still open, once hyper's dispatcher is
    /// ready for its next request.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let mut tx = {
                let mut idle = self.lock();
                let (tx, since) = idle.conns.pop_back()?;
                if since.elapsed() >= self.idle_timeout {
                    // The newest is expired, so are all: closed by dropping them.
                    idle.conns.clear();
                    return None;
                }
                tx
            };
            // Put back when its response body ended: the dispatcher is done with that answer
            // or about to be (it resolves at once, or within one turn of its connection task).
            if tx.ready().await.is_ok() {
                return Some(tx);
            }
        }
    }

    /// A new connection when the cap allows one; at the cap, the first connection that comes
    /// back idle (reused: `true`) or a permit freed by one that closed, within `wait`.
    async fn connect_or_wait(self: &Arc<Self>) -> Result<(SendRequest<Body>, bool), SendError> {
        if let Ok(permit) = self.open.clone().try_acquire_owned() {
            return Ok((self.connect(permit).await?, false));
        }
        // Counted while waiting, also when this future is dropped mid-wait (client gone,
        // response timeout): a count left behind would make every checkin notify.
        let waiting = Waiting::enter(&self.waiting);
        let waited = tokio::time::timeout(self.wait, async {
            loop {
                // Registered before looking, so a checkin in between still wakes this.
                let returned = self.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                if let Some(tx) = self.checkout().await {
                    return Ok::<_, ()>((Some(tx), None));
                }
                tokio::select! {
                    permit = self.open.clone().acquire_owned() => {
                        return Ok((None, Some(permit.map_err(|_| ())?)));
                    }
                    () = &mut returned => {}
                }
            }
        })
        .await;
        drop(waiting);
        match waited {
            Ok(Ok((Some(tx), _))) => Ok((tx, true)),
            Ok(Ok((None, Some(permit)))) => Ok((self.connect(permit).await?, false)),
            _ => Err(SendError::Saturated),
        }
    }

    async fn connect(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
    ) -> Result<SendRequest<Body>, SendError> {
        let mut connector = self.connector.clone();
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(SendError::Connect)?;
        // Requests are flattened into one buffer, as answers are (server/listener.rs `builder`).
        let (tx, conn) = http1::Builder::new()
            .writev(false)
            .handshake(io)
            .await
            .map_err(SendError::Request)?;
        let gauge = self.open_gauge.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "homeserver connection ended with an error");
            }
            // The connection is closed: another may open.
            gauge.dec();
            drop(permit);
        });
        self.ensure_janitor();
        Ok(tx)
    }

    /// The answer's body, holding its connection until it ends.
    fn track(
        self: &Arc<Self>,
        res: Response<Incoming>,
        tx: SendRequest<Body>,
    ) -> Response<PooledBody> {
        let (parts, inner) = res.into_parts();
        let mut body = PooledBody {
            inner,
            conn: Some((Arc::downgrade(self), tx)),
        };
        // An empty answer (204, Content-Length: 0) is never polled: its connection is free now.
        if hyper::body::Body::is_end_stream(&body.inner) {
            body.give_back();
        }
        Response::from_parts(parts, body)
    }

    fn checkin(&self, tx: SendRequest<Body>) {
        if tx.is_closed() {
            return;
        }
        {
            let mut idle = self.lock();
            if idle.conns.len() >= self.max_idle {
                idle.conns.pop_front();
            }
            idle.conns.push_back((tx, Instant::now()));
        }
        // Only at the cap is anyone waiting; otherwise a checkin costs one atomic load. One
        // connection came back, so one waiter is woken (the oldest; a woken one that is
        // dropped passes it on): waking all of them made each checkin cost O(waiters) exactly
        // when the proxy is saturated.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
    }

    /// Closes idle connections past the timeout even when no request comes to find them, every
    /// half timeout, for as long as the pool exists.
    fn ensure_janitor(self: &Arc<Self>) {
        {
            let mut idle = self.lock();
            if idle.janitor {
                return;
            }
            idle.janitor = true;
        }
        let weak: Weak<Pool> = Arc::downgrade(self);
        let every = self.idle_timeout / 2;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = weak.upgrade() else { return };
                let mut idle = pool.lock();
                while idle.conns.front().is_some_and(|(tx, since)| {
                    tx.is_closed() || since.elapsed() >= pool.idle_timeout
                }) {
                    idle.conns.pop_front();
                }
            }
        });
    }
}

/// One request waiting at the connection cap, counted in `Pool::waiting` until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A homeserver answer's body; its connection returns to the pool when the body has ended.
/// Dropped before its end, the connection is closed (the rest of that answer is still on it).
pub struct PooledBody {
    inner: Incoming,
    conn: Option<(Weak<Pool>, SendRequest<Body>)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((pool, tx)) = self.conn.take()
            && let Some(pool) = pool.upgrade()
        {
            pool.checkin(tx);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::UpstreamConfig;

    /// A loopback listener for a homeserver stand-in, and its origin.
    async fn listen() -> (TcpListener, Uri) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}/", l.local_addr().unwrap())
            .parse()
            .unwrap();
        (l, origin)
    }

    /// A homeserver stand-in on loopback: counts the connections it accepted and answers each
    /// request head with `answer`; with `close_after`, it closes a connection after its first
    /// answer.
    async fn server(answer: &'static [u8], close_after: bool) -> (Uri, Arc<AtomicUsize>) {
        let (l, origin) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if s.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (origin, accepted)
    }

    fn pool(origin: &Uri, idle_timeout: Duration, max_idle: usize) -> Arc<Pool> {
        let limits = Limits {
            max_connections: 16_384,
            wait: Duration::from_secs(2),
            open: Default::default(),
        };
        capped_pool(origin, idle_timeout, max_idle, limits)
    }

    fn capped_pool(
        origin: &Uri,
        idle_timeout: Duration,
        max_idle: usize,
        limits: Limits,
    ) -> Arc<Pool> {
        let cfg = UpstreamConfig {
            url: origin.clone(),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            ca_file: None,
            max_connections: limits.max_connections,
        };
        let connector = super::super::connector::connector(&cfg).unwrap();
        Pool::with_limits(connector, origin.clone(), idle_timeout, max_idle, limits)
    }

    fn get(origin: &Uri) -> Request<Body> {
        Request::builder()
            .uri("/_matrix/client/versions")
            .header(http::header::HOST, origin.authority().unwrap().as_str())
            .body(crate::body::full(Bytes::new()))
            .unwrap()
    }

    async fn call(p: &Arc<Pool>, origin: &Uri) -> Bytes {
        let res = p.send(get(origin)).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap().to_bytes()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (origin, accepted) = server(OK, false).await;
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        for _ in 0..5 {
            assert_eq!(&call(&p, &origin).await[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(p.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_empty_answer_frees_its_connection_unread() {
        let (origin, accepted) = server(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        for _ in 0..3 {
            let res = p.send(get(&origin)).await.unwrap();
            assert_eq!(res.status(), 204);
            drop(res);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_homeserver_closed_is_replaced_and_the_request_retried() {
        let (origin, accepted) = server(OK, true).await;
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        for _ in 0..4 {
            assert_eq!(&call(&p, &origin).await[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        // The answer announces more than it sends: the body can never end.
        let (origin, accepted) = server(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort",
            false,
        )
        .await;
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        let res = p.send(get(&origin)).await.unwrap();
        drop(res);
        assert_eq!(p.idle_count(), 0);
        let res = p.send(get(&origin)).await.unwrap();
        drop(res);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_capped() {
        let (origin, accepted) = server(OK, false).await;
        let p = pool(&origin, Duration::from_millis(100), 2);
        call(&p, &origin).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        call(&p, &origin).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the expired one was not reused"
        );
        // Four at once need four connections; two of them are kept.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(p.send(get(&origin)).await.unwrap());
        }
        for res in held {
            res.into_body().collect().await.unwrap();
        }
        assert_eq!(p.idle_count(), 2);
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    /// An answer whose body comes later than its head, in parts, is read to its end and its
    /// connection reused.
    #[tokio::test]
    async fn an_answer_body_sent_late_and_in_parts_is_read_whole() {
        let (l, origin) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            for part in ["5\r\nhello\r\n", "6\r\n world\r\n", "0\r\n\r\n"] {
                tokio::time::sleep(Duration::from_millis(30)).await;
                s.write_all(part.as_bytes()).await.unwrap();
            }
            // Kept open: the connection is reusable.
            let _ = s.read(&mut head).await;
        });
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        let body = tokio::time::timeout(Duration::from_secs(5), call(&p, &origin))
            .await
            .expect("the body was never read");
        assert_eq!(&body[..], b"hello world");
        assert_eq!(p.idle_count(), 1);
    }

    /// A request body larger than the socket buffers is written whole while the caller waits for
    /// the answer.
    #[tokio::test]
    async fn a_large_request_body_is_written_while_the_answer_is_awaited() {
        const SIZE: usize = 8 << 20;
        let (l, origin) = listen().await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 65536];
            let body_at = loop {
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
            };
            let mut got = buf.len() - body_at;
            while got < SIZE {
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "body cut short at {got}");
                got += n;
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{got}",
                got.to_string().len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
            let _ = s.read(&mut chunk).await;
        });
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        let req = Request::builder()
            .method("POST")
            .uri("/_matrix/media/v3/upload")
            .header(http::header::HOST, origin.authority().unwrap().as_str())
            .body(crate::body::full(vec![7u8; SIZE]))
            .unwrap();
        let res = p.send(req).await.unwrap();
        let got = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, SIZE.to_string().as_bytes());
    }

    /// At most `max_connections` are open: with all busy a request waits for one to come back
    /// (and reuses it), or for one to close (and connects anew), and past the wait fails.
    #[tokio::test]
    async fn connections_are_capped_and_a_request_waits_for_one() {
        let (l, origin) = listen().await;
        let accepted = Arc::new(AtomicUsize::new(0));
        // Each answer waits for a permit of `gate`; a permit of `hang_up` closes a connection
        // instead of answering.
        let gate = Arc::new(Semaphore::new(0));
        let hang_up = Arc::new(Semaphore::new(0));
        let (count, g, h) = (accepted.clone(), gate.clone(), hang_up.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let (g, h) = (g.clone(), h.clone());
                tokio::spawn(async move {
                    let mut head = [0u8; 4096];
                    loop {
                        if s.read(&mut head).await.unwrap_or(0) == 0 {
                            return;
                        }
                        tokio::select! {
                            biased;
                            p = h.acquire() => { p.unwrap().forget(); return; }
                            p = g.acquire() => p.unwrap().forget(),
                        }
                        if s.write_all(OK).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let limits = Limits {
            max_connections: 2,
            wait: Duration::from_millis(300),
            open: gauge.clone(),
        };
        let p = capped_pool(&origin, IDLE_TIMEOUT, MAX_IDLE, limits);
        let spawn = |p: &Arc<Pool>| {
            let (p, origin) = (p.clone(), origin.clone());
            tokio::spawn(async move {
                let res = p.send(get(&origin)).await?;
                let _ = res.into_body().collect().await;
                Ok::<_, SendError>(())
            })
        };
        let first = spawn(&p);
        let second = spawn(&p);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.open_count(), 2);
        assert_eq!(gauge.get(), 2);
        assert!(p.saturated());
        // Both busy past the wait.
        let started = Instant::now();
        assert!(matches!(
            p.send(get(&origin)).await,
            Err(SendError::Saturated)
        ));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(p.waiting.load(Ordering::SeqCst), 0);
        // A request dropped while it waits (client gone) is no longer counted as waiting.
        let dropped = tokio::time::timeout(Duration::from_millis(50), p.send(get(&origin))).await;
        assert!(dropped.is_err());
        assert_eq!(p.waiting.load(Ordering::SeqCst), 0);
        // A waiting request takes the first connection that comes back (three answers: the
        // two in flight and the third's, on a connection one of them gave back).
        let third = spawn(&p);
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.add_permits(3);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        third.await.unwrap().unwrap();
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the third reused a connection"
        );
        // Both busy again; a waiting request connects anew once one of them closes.
        let (fourth, fifth) = (spawn(&p), spawn(&p));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sixth = spawn(&p);
        tokio::time::sleep(Duration::from_millis(50)).await;
        hang_up.add_permits(1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.add_permits(2);
        let (a, b) = (fourth.await.unwrap(), fifth.await.unwrap());
        assert!(a.is_err() != b.is_err(), "one of the two was hung up on");
        sixth.await.unwrap().unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(p.open_count(), 2);
        assert_eq!(gauge.get(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_homeserver_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let origin: Uri = format!("http://{}/", l.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(l);
        let p = pool(&origin, IDLE_TIMEOUT, MAX_IDLE);
        assert!(matches!(
            p.send(get(&origin)).await,
            Err(SendError::Connect(_))
        ));
    }
}
