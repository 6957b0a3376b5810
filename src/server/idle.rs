//! Per-connection bookkeeping for the idle keep-alive timeout: an I/O wrapper that marks every
//! read or write (a flag, no clock read) and ends the connection's I/O when the watcher closes
//! it, and a count of requests being handled on the connection.
//!
//! A connection is idle when no request is in flight and no byte moved for `idle_timeout`; a
//! long-poll `/sync` (a request in flight) or a slow download (bytes moving) is never idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between the I/O wrapper, the service and the idle watcher of one connection.
///
/// Every read, write and request start or end sets `moved`; the watcher looks at it (and
/// clears it) a few times per timeout. So the hot path stores one flag instead of reading the
/// clock on every read and write (issue 11), and an idle connection is closed at most one
/// check interval (a quarter of `idle_timeout`, at least 100 ms) after it was idle for
/// `idle_timeout`, never before.
pub struct Activity {
    moved: AtomicBool,
    in_flight: AtomicUsize,
    /// Set by [`Activity::close`]: reads end (end-of-file) from then on.
    closed: AtomicBool,
    /// The task waiting for the connection's next bytes, woken by [`Activity::close`].
    reader: AtomicWaker,
    /// The task waiting to write (a client that stopped reading), woken by [`Activity::close`].
    writer: AtomicWaker,
}

/// How many times per `idle_timeout` the watcher looks.
const CHECKS: u32 = 4;

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            moved: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            writer: AtomicWaker::new(),
        })
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Closes the connection: its next read is end-of-file (an idle HTTP/1 connection ends as if
    /// the client had closed it; under TLS the server side sees a truncated stream, and hyper's
    /// shutdown still sends the client `close_notify`: `tests/tls.rs`
    /// `an_idle_tls_connection_is_closed_with_close_notify`), a write that would wait for the
    /// socket fails (so a client that stopped reading cannot hold the shutdown), and a read or
    /// write waiting for the socket is woken to see it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.reader.wake();
        self.writer.wake();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// Marks a request in flight until the guard drops.
    pub fn request(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActiveRequest(self.clone())
    }

    /// Resolves once the connection has been idle (no request in flight, no byte moved) for
    /// `timeout`, at most one check interval later.
    pub async fn idle(&self, timeout: Duration) {
        let step = check_interval(timeout);
        // Quiet checks in a row needed: whole steps covering `timeout` (a step is never 0).
        let needed = timeout.as_nanos().div_ceil(step.as_nanos());
        let mut quiet = 0;
        loop {
            tokio::time::sleep(step).await;
            let moved = self.moved.swap(false, Ordering::Relaxed);
            if moved || self.in_flight.load(Ordering::Relaxed) > 0 {
                quiet = 0;
            } else {
                quiet += 1;
                if quiet >= needed {
                    return;
                }
            }
        }
    }
}

/// How often the idle watcher looks: a quarter of the timeout, at least 100 ms.
fn check_interval(timeout: Duration) -> Duration {
    (timeout / CHECKS).max(Duration::from_millis(100))
}

/// Open connections per client IP, for `http.max_connections_per_ip`, keyed as the rate limits
/// key a client ([`crate::ratelimit::ip_key`]: IPv6 by its /64, the smallest block a host is
/// given, so one host cannot take every slot from many addresses of its prefix). An IP's entry
/// goes when its last connection closes, so the map never holds more entries than open
/// connections.
///
/// Each IP's entry also counts its requests in flight over all its connections, for
/// `http.max_requests_per_ip` (HTTP/2 carries up to 100 per connection): an atomic shared by
/// the IP's connections, so a request costs two atomic operations and no lock.
pub struct PerIp {
    /// Connections per IP (`usize::MAX`: not capped, only tracked for the request cap).
    cap: usize,
    /// Requests in flight per IP, `None`: not capped.
    requests_cap: Option<usize>,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (usize, Arc<AtomicUsize>)>>,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl PerIp {
    pub fn new(
        cap: Option<usize>,
        requests_cap: Option<usize>,
        metrics: Arc<crate::telemetry::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(PerIp {
            cap: cap.unwrap_or(usize::MAX),
            requests_cap,
            open: Default::default(),
            metrics,
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds `cap` already.
    pub fn acquire(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let ip = crate::ratelimit::ip_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (n, count) = open.entry(ip).or_default();
        if *n >= self.cap {
            drop(open);
            self.metrics.connection_rejected_per_ip();
            return None;
        }
        *n += 1;
        let requests = self.requests_cap.map(|cap| IpRequests {
            count: count.clone(),
            cap,
        });
        self.metrics.set_connection_ips(open.len());
        Some(IpSlot(self.clone(), ip, requests))
    }
}

/// One open connection of an IP, released on drop.
pub struct IpSlot(Arc<PerIp>, std::net::IpAddr, Option<IpRequests>);

impl IpSlot {
    /// The IP's requests in flight, for this connection's requests to count themselves in;
    /// `None` when they are not capped (nothing to count).
    pub fn requests(&self) -> Option<IpRequests> {
        self.2.clone()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((n, _)) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
        self.0.metrics.set_connection_ips(open.len());
    }
}

/// The requests in flight of one client IP, over all its connections.
#[derive(Clone)]
pub struct IpRequests {
    count: Arc<AtomicUsize>,
    cap: usize,
}

impl IpRequests {
    /// Counts a request in until the guard drops; `None` (not counted) when the IP has its
    /// cap of requests in flight already.
    pub fn enter(&self) -> Option<IpRequest> {
        let before = self.count.fetch_add(1, Ordering::Relaxed);
        if before >= self.cap {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(IpRequest(self.count.clone()))
    }
}

/// A request counted in its IP's requests in flight.
pub struct IpRequest(Arc<AtomicUsize>);

impl Drop for IpRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request being handled on the connection (the connection is not idle while one is).
pub struct ActiveRequest(Arc<Activity>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Stamps [`Activity`] on every successful read or write.
pub struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> TrackedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        TrackedIo { inner, activity }
    }

    /// After a write: marks bytes written; a write waiting for the socket (a client that
    /// stopped reading) registers for `close`, and after `close` it fails.
    fn wrote(&self, cx: &Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) if n > 0 => self.activity.touch(),
            Poll::Pending => {
                self.activity.writer.register(cx.waker());
                if self.activity.is_closed() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "closed as idle",
                    )));
                }
            }
            _ => {}
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.activity.is_closed() {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.activity.touch(),
            // Waiting for bytes (between requests, typically): `close` wakes this task. Looked
            // at again after registering, so a `close` in between is not missed.
            Poll::Pending => {
                self.activity.reader.register(cx.waker());
                if self.activity.is_closed() {
                    return Poll::Ready(Ok(()));
                }
            }
            _ => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.wrote(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test]
    async fn close_ends_a_waiting_read_and_a_stuck_write() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A read waiting for bytes ends with end-of-file.
        let (near, _far) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TrackedIo::new(near, activity.clone());
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            io.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished());
        activity.close();
        let n = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the read was woken")
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);

        // A write stuck on a peer that stopped reading fails.
        let (near, _far) = tokio::io::duplex(64);
        let activity = Activity::new();
        let mut io = TrackedIo::new(near, activity.clone());
        let writer = tokio::spawn(async move { io.write_all(&[0u8; 4096]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished());
        activity.close();
        let r = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the write was woken")
            .unwrap();
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    }

    #[test]
    fn per_ip_slots_are_capped_and_entries_removed() {
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let p = PerIp::new(Some(2), None, metrics.clone());
        let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let a = p.acquire(ip).unwrap();
        let b = p.acquire(ip).unwrap();
        assert!(p.acquire(ip).is_none());
        let other = p.acquire("::1".parse().unwrap()).unwrap();
        drop(a);
        let c = p.acquire(ip).unwrap();
        // IPv6 by its /64: two addresses of one prefix share its slots, another prefix has its own.
        let v6 = p.acquire("2001:db8:0:1::1".parse().unwrap()).unwrap();
        let v6b = p.acquire("2001:db8:0:1:ffff::2".parse().unwrap()).unwrap();
        assert!(p.acquire("2001:db8:0:1::3".parse().unwrap()).is_none());
        let v6c = p.acquire("2001:db8:0:2::1".parse().unwrap()).unwrap();
        // IPv4-mapped IPv6 counts as its IPv4 address.
        assert!(p.acquire("::ffff:127.0.0.1".parse().unwrap()).is_none());
        drop((b, c, other, v6, v6b, v6c));
        assert!(p.open.lock().unwrap().is_empty());
        let m = metrics.encode();
        assert!(
            m.contains("mrp_connections_rejected_total{reason=\"per_ip\"} 3"),
            "{m}"
        );
        assert!(m.contains("mrp_connection_tracked_ips 0"), "{m}");
    }

    /// An IP's requests in flight are counted over all its connections and capped; the count
    /// goes with the requests, and another IP has its own.
    #[test]
    fn requests_per_ip_are_counted_over_its_connections_and_capped() {
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let p = PerIp::new(None, Some(3), metrics);
        let ip: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        let (a, b) = (p.acquire(ip).unwrap(), p.acquire(ip).unwrap());
        let r1 = a.requests().unwrap().enter().unwrap();
        let r2 = a.requests().unwrap().enter().unwrap();
        let r3 = b.requests().unwrap().enter().unwrap();
        assert!(a.requests().unwrap().enter().is_none());
        assert!(b.requests().unwrap().enter().is_none());
        // Another address of the same /64 is the same client.
        let c = p.acquire("2001:db8::2".parse().unwrap()).unwrap();
        assert!(c.requests().unwrap().enter().is_none());
        let other = p.acquire("192.0.2.1".parse().unwrap()).unwrap();
        let _o = other.requests().unwrap().enter().unwrap();
        drop(r1);
        let r4 = c.requests().unwrap().enter().unwrap();
        drop((r2, r3, r4));
        assert_eq!(a.requests().unwrap().count.load(Ordering::Relaxed), 0);
        // Not capped: nothing to count.
        let p = PerIp::new(
            Some(2),
            None,
            Arc::new(crate::telemetry::metrics::Metrics::new()),
        );
        assert!(p.acquire(ip).unwrap().requests().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_and_bytes() {
        let a = Activity::new();
        let guard = a.request();
        // A request in flight is never idle, however long it takes.
        let r =
            tokio::time::timeout(Duration::from_secs(600), a.idle(Duration::from_secs(5))).await;
        assert!(r.is_err());
        drop(guard);
        let t = Instant::now();
        a.idle(Duration::from_secs(5)).await;
        let took = t.elapsed();
        assert!(took >= Duration::from_secs(5), "{took:?}");
        assert!(
            took <= Duration::from_secs(5) + Duration::from_secs(5) / CHECKS,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn odd_and_short_timeouts_close_within_one_check() {
        for timeout in [
            Duration::from_millis(150),
            Duration::from_secs(1) + Duration::from_nanos(1),
            Duration::from_millis(7_777),
        ] {
            let a = Activity::new();
            let t = Instant::now();
            a.idle(timeout).await;
            let took = t.elapsed();
            assert!(took >= timeout, "{timeout:?}: {took:?}");
            assert!(
                took <= timeout + check_interval(timeout),
                "{timeout:?}: {took:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_moving_keep_a_connection_open() {
        let a = Activity::new();
        let mover = a.clone();
        // A slow download: a byte every 2 s, for 20 s, then silence.
        tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                mover.touch();
            }
        });
        let t = Instant::now();
        a.idle(Duration::from_secs(5)).await;
        let took = t.elapsed();
        assert!(took >= Duration::from_secs(25), "{took:?}");
        assert!(took <= Duration::from_secs(27), "{took:?}");
    }
}
