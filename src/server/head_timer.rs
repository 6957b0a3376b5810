//! hyper's HTTP/1 header-read timer, one per connection, driven by a watcher of that connection
//! instead of tokio's timer wheel.
//!
//! hyper arms its header-read timer for every request head it waits for (on a keep-alive
//! connection: from the end of one answer to the head of the next request) and drops it when
//! the head is in. With `TokioTimer` each arming is a boxed `tokio::time::Sleep` registered in
//! and removed from the runtime's timer wheel: about 1,330 instructions per request (issue 11,
//! `scripts/instructions.sh` with the timeout off). Here arming one is writing a deadline and a
//! waker into the connection's slot; a watcher of the connection, waking every quarter of
//! `http.header_read_timeout` (at least every 100 ms), fires the timer once its deadline has
//! passed. So a head that is late is cut at most one check after its deadline, never before.
//! The HTTP/2 side keeps `TokioTimer` (its timers are per connection, not per request).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The timer slot of one connection: hyper holds at most one header-read timer at a time.
#[derive(Default)]
pub struct HeadClock {
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// The id of the newest timer; an older one (already dropped by hyper) never fires.
    id: u64,
    deadline: Option<Instant>,
    waker: Option<Waker>,
    fired: bool,
}

impl HeadClock {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fires the armed timer once its deadline has passed; checks every quarter of `timeout`
    /// (at least every 100 ms). Runs as long as the connection.
    pub async fn watch(&self, timeout: Duration) {
        let step = (timeout / 4).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(step).await;
            let waker = {
                let mut s = self.slot();
                match s.deadline {
                    Some(d) if !s.fired && now() >= d => {
                        s.fired = true;
                        s.waker.take()
                    }
                    _ => None,
                }
            };
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// The time by tokio's clock (the same as `Instant::now()` unless a test pauses the clock), for
/// hyper's deadlines and the watcher alike.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The `hyper::rt::Timer` of one connection's HTTP/1 side.
pub struct HeadTimer(pub Arc<HeadClock>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(now() + duration)
    }

    fn now(&self) -> Instant {
        now()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let mut s = self.0.slot();
        s.id += 1;
        s.deadline = Some(deadline);
        s.waker = None;
        s.fired = false;
        let id = s.id;
        drop(s);
        Box::pin(HeadSleep {
            clock: self.0.clone(),
            id,
        })
    }
}

/// One armed header-read timer.
struct HeadSleep {
    clock: Arc<HeadClock>,
    id: u64,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.clock.slot();
        if s.id != self.id {
            // Replaced by a newer timer (hyper drops the old one first; never fires).
            return Poll::Pending;
        }
        if s.fired {
            return Poll::Ready(());
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        let mut s = self.clock.slot();
        if s.id == self.id {
            s.deadline = None;
            s.waker = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(start_paused = true)]
    async fn fires_after_its_deadline_within_one_check_never_before() {
        let clock = HeadClock::new();
        let timeout = Duration::from_secs(4);
        let watcher = tokio::spawn({
            let clock = clock.clone();
            async move { clock.watch(timeout).await }
        });
        let started = tokio::time::Instant::now();
        let sleep = HeadTimer(clock.clone()).sleep(timeout);
        sleep.await;
        let took = started.elapsed();
        assert!(took >= timeout, "{took:?}");
        assert!(took <= timeout + timeout / 4, "{took:?}");
        watcher.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_timer_never_fires_and_a_newer_one_does() {
        let clock = HeadClock::new();
        let timeout = Duration::from_millis(400);
        let watcher = tokio::spawn({
            let clock = clock.clone();
            async move { clock.watch(timeout).await }
        });
        let timer = HeadTimer(clock.clone());
        // Armed and dropped before its deadline, as hyper does when the head arrives in time.
        for _ in 0..3 {
            let mut early = timer.sleep(timeout);
            let polled = futures_util::poll!(early.as_mut());
            assert!(polled.is_pending());
            tokio::time::sleep(timeout / 2).await;
            drop(early);
        }
        assert!(clock.slot().deadline.is_none());
        // A superseded timer stays pending while the newest fires.
        let mut old = timer.sleep(Duration::from_millis(100));
        let newest = timer.sleep(timeout);
        tokio::time::timeout(timeout * 2, newest)
            .await
            .expect("the newest timer fired");
        assert!(futures_util::poll!(old.as_mut()).is_pending());
        watcher.abort();
    }
}
