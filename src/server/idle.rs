//! Per-connection bookkeeping for the idle keep-alive timeout: an I/O wrapper that marks every
//! read or write (a flag, no clock read), and a count of requests being handled on the
//! connection.
//!
//! A connection is idle when no request is in flight and no byte moved for `idle_timeout`; a
//! long-poll `/sync` (a request in flight) or a slow download (bytes moving) is never idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

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
}

/// How many times per `idle_timeout` the watcher looks.
const CHECKS: u32 = 4;

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            moved: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
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

/// Open connections per client IP, for `http.max_connections_per_ip`. An IP's entry goes when
/// its last connection closes, so the map never holds more entries than open connections.
pub struct PerIp {
    cap: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    metrics: Arc<crate::telemetry::metrics::Metrics>,
}

impl PerIp {
    pub fn new(cap: usize, metrics: Arc<crate::telemetry::metrics::Metrics>) -> Arc<Self> {
        Arc::new(PerIp {
            cap,
            open: Default::default(),
            metrics,
        })
    }

    /// A slot for one more connection from `ip`, or `None` when it holds `cap` already.
    pub fn acquire(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.cap {
            drop(open);
            self.metrics.connection_rejected_per_ip();
            return None;
        }
        *n += 1;
        self.metrics.set_connection_ips(open.len());
        Some(IpSlot(self.clone(), ip))
    }
}

/// One open connection of an IP, released on drop.
pub struct IpSlot(Arc<PerIp>, std::net::IpAddr);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
        self.0.metrics.set_connection_ips(open.len());
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
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
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

    #[test]
    fn per_ip_slots_are_capped_and_entries_removed() {
        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let p = PerIp::new(2, metrics.clone());
        let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let a = p.acquire(ip).unwrap();
        let b = p.acquire(ip).unwrap();
        assert!(p.acquire(ip).is_none());
        let other = p.acquire("::1".parse().unwrap()).unwrap();
        drop(a);
        let c = p.acquire(ip).unwrap();
        drop((b, c, other));
        assert!(p.open.lock().unwrap().is_empty());
        let m = metrics.encode();
        assert!(
            m.contains("mrp_connections_rejected_total{reason=\"per_ip\"} 1"),
            "{m}"
        );
        assert!(m.contains("mrp_connection_tracked_ips 0"), "{m}");
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
