//! Process lifecycle: systemd notification (`Type=notify`), the watchdog, and configuration
//! reload on SIGHUP.
//!
//! Notifications go to `$NOTIFY_SOCKET` and do nothing without it, so the same binary runs
//! under systemd, Kubernetes or a shell.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::config::Config;
use crate::http::App;
use crate::ratelimit::RateLimits;
use crate::session::TokenStore;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify the service manager");
    }
}

/// Sends `READY=1` once Redis answers (the listeners are bound before this runs), retrying
/// every 500 ms: systemd then starts the units ordered after us only when we can serve
/// sessions. Requests are served meanwhile.
pub async fn ready_when_store_answers(app: Arc<App>) {
    let mut logged = false;
    loop {
        match app.sessions.store().ping().await {
            Ok(()) => {
                notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
                return;
            }
            Err(e) => {
                if !logged {
                    tracing::warn!(error = %e, "waiting for Redis before reporting ready");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Marks the start of shutdown: readiness turns false and systemd hears `STOPPING=1`.
pub fn stopping(app: &App) {
    app.draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining connections"),
    ]);
}

/// Pings the systemd watchdog at half its interval when `WATCHDOG_USEC` is set; returns at
/// once otherwise. A stuck runtime stops pinging, and systemd restarts the unit.
pub async fn watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tick.tick().await;
        notify(&[NotifyState::Watchdog]);
    }
}

/// On every SIGHUP: re-reads the TLS certificate (the files it was started with; a failed read
/// keeps the one in force), and re-reads the configuration file when there is one, applying what
/// can change live: token lifetimes (for tokens issued from then on) and rate limits (budgets
/// start afresh). Changes to other keys are reported as needing a restart. A file that does not
/// parse changes nothing.
///
/// The SIGHUP stream is created by the caller before `READY=1` can be sent, so an early
/// `systemctl reload` cannot kill the process (SIGHUP's default action).
pub async fn reload_on_sighup(
    app: Arc<App>,
    path: Option<PathBuf>,
    mut running: Config,
    mut hup: tokio::signal::unix::Signal,
) {
    while hup.recv().await.is_some() {
        notify(&[NotifyState::Reloading]);
        if let Some(tls) = app.tls.clone() {
            // File reads are small and rare; off the runtime threads all the same.
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS certificate not reloaded; still serving the previous one"
                ),
                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload task failed"),
            }
        }
        if let Some(path) = &path {
            match Config::load(path).and_then(|c| crate::tls::check_files(&c).map(|()| c)) {
                Ok(new) => {
                    apply(&app, &running, &new);
                    running = new;
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "configuration reload failed; keeping the running configuration"
                ),
            }
        }
        notify(&[NotifyState::Ready]);
    }
}

/// Applies the live-reloadable parts of `new`.
pub fn apply(app: &App, old: &Config, new: &Config) {
    if old.tokens != new.tokens {
        app.sessions.set_lifetimes(new.tokens);
        tracing::info!(
            access = ?new.tokens.access,
            refresh_idle = ?new.tokens.refresh_idle,
            session = ?new.tokens.session,
            revoke_on_reuse = new.tokens.revoke_on_reuse,
            "token lifetimes reloaded"
        );
    }
    if old.rate_limit != new.rate_limit {
        app.limits.store(Arc::new(RateLimits::new(
            &new.rate_limit,
            app.redis.clone(),
        )));
        tracing::info!("rate limits reloaded");
    }
    let restart_needed: Vec<&str> = [
        ("listen", old.listen != new.listen),
        ("upstream", old.upstream.url != new.upstream.url),
        ("redis", old.redis != new.redis),
        (
            "trusted_proxies",
            old.trusted_proxies != new.trusted_proxies,
        ),
        ("admin", old.admin != new.admin),
        ("http", old.http != new.http),
    ]
    .into_iter()
    .filter_map(|(k, changed)| changed.then_some(k))
    .collect();
    if !restart_needed.is_empty() {
        tracing::warn!(keys = ?restart_needed, "changed settings take effect after a restart");
    }
}
