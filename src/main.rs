//! The binary: CLI, config, telemetry, then `matrix_refresh_proxy::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use matrix_refresh_proxy::config::Config;

/// jemalloc: glibc's malloc/free (with `malloc_consolidate`) were 6-18 % of the proxy's CPU
/// (perf, issue 11). Measured side by side (scripts/bench.sh): access-token path +16 %,
/// passthrough +8 %; a 20 MB streamed body grows RSS by 2.2 MB (glibc 1.3 MB; mimalloc, tried
/// before, 10-12 MB: tests/e2e/test_media.py).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Matrix refresh tokens (spec v1.3) in front of homeservers without them.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(
        long,
        short,
        global = true,
        default_value = "config.yaml",
        env = "MRP_CONFIG"
    )]
    config: PathBuf,
    /// `sessions`: the admin listener's base URL (default: from `admin.listen`).
    #[arg(long, global = true, env = "MRP_ADMIN_URL")]
    admin_url: Option<String>,
    /// `sessions`: the file holding the admin secret (default: `admin.token_file`), e.g. the
    /// root-only original of a systemd credential.
    #[arg(long, global = true, env = "MRP_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and exit (non-zero, naming the key, when it is wrong).
    CheckConfig,
    /// Operator session commands, through the admin API of a running proxy (`admin.listen`,
    /// `admin.token_file` from the config).
    #[command(subcommand)]
    Sessions(SessionsCommand),
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// List a user's proxy sessions.
    List {
        /// The Matrix user id, e.g. @alice:example.org.
        user_id: String,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// End one session (by its id) or all of a user's sessions (`--user`).
    Revoke {
        /// The session id shown by `sessions list` (base64url: it may begin with `-`).
        #[arg(
            required_unless_present = "user",
            conflicts_with = "user",
            allow_hyphen_values = true
        )]
        session_id: Option<String>,
        /// End every session of this user.
        #[arg(long)]
        user: Option<String>,
        /// Also log the sessions out at the homeserver (needs `admin.upstream_key_file` on the
        /// proxy; sessions made before it was set cannot be).
        #[arg(long)]
        logout_upstream: bool,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Sessions alive, logins and refreshes in the last minute.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let context = || format!("configuration {}", cli.config.display());
    let config = Config::load(&cli.config).with_context(context)?;
    if let Some(Command::Sessions(cmd)) = cli.command {
        // The server's own files (TLS key, upstream key) are not the CLI's business.
        return sessions_cli::run(
            &config,
            cli.admin_url.as_deref(),
            cli.admin_token_file.as_deref(),
            cmd,
        );
    }
    matrix_refresh_proxy::check_files(&config)
        .and_then(|()| config.escrow_keys().map(drop))
        .with_context(context)?;
    if let Some(Command::CheckConfig) = cli.command {
        println!("{}: OK", cli.config.display());
        return Ok(());
    }
    matrix_refresh_proxy::init_logging(&config.log);
    let runtime = runtime().context("starting the async runtime")?;
    let path = cli.config.clone();
    let result = runtime.block_on(async {
        // The first SIGTERM/SIGINT starts a graceful drain; a second one exits at once.
        let (begin_shutdown, shutdown) = tokio::sync::oneshot::channel::<()>();
        let mut signals = Signals::new().context("installing signal handlers")?;
        tokio::spawn(async move {
            signals.next().await;
            tracing::info!("signal received: stopping (a second signal exits at once)");
            let _ = begin_shutdown.send(());
            signals.next().await;
            tracing::warn!("second signal: exiting without waiting for in-flight requests");
            matrix_refresh_proxy::flush_logs();
            std::process::exit(1);
        });
        matrix_refresh_proxy::run(config, Some(path), async {
            let _ = shutdown.await;
        })
        .await?;
        tracing::info!("stopped");
        Ok(())
    });
    // Pending log lines go out before main's own error line.
    matrix_refresh_proxy::flush_logs();
    result
}

/// The async runtime. With one CPU to run on (`TOKIO_WORKER_THREADS=1`, or a CPU affinity or
/// cgroup quota of one CPU) a single-threaded runtime: the multi-threaded one would still run
/// its one worker beside the main thread, with cross-thread wake-ups and atomics on every task
/// switch, for no parallelism.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
}

mod sessions_cli {
    //! `sessions list|revoke|stats`: a small client of the admin API.

    use anyhow::{Context, bail};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use matrix_refresh_proxy::config::Config;
    use serde_json::Value;

    use super::SessionsCommand;

    fn upstream_query(yes: bool) -> &'static str {
        if yes { "?logout_upstream=true" } else { "" }
    }

    fn enc(s: &str) -> String {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    pub fn run(
        config: &Config,
        admin_url: Option<&str>,
        token_file: Option<&std::path::Path>,
        cmd: SessionsCommand,
    ) -> anyhow::Result<()> {
        let addr = match admin_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let Some(mut addr) = config.admin.listen else {
                    bail!("admin.listen is null: there is no admin API to talk to");
                };
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            }
        };
        let Some(file) = token_file.or(config.admin.token_file.as_deref()) else {
            bail!("admin.token_file is not set: the admin API is off");
        };
        let secret = std::fs::read_to_string(file)
            .with_context(|| format!("admin token file {}", file.display()))?;
        let base = format!("{addr}/admin/v1");
        let (method, url, json) = match &cmd {
            SessionsCommand::List { user_id, json } => (
                http::Method::GET,
                format!("{base}/users/{}/sessions", enc(user_id)),
                *json,
            ),
            SessionsCommand::Revoke {
                session_id: Some(sid),
                logout_upstream,
                json,
                ..
            } => (
                http::Method::DELETE,
                format!(
                    "{base}/sessions/{}{}",
                    enc(sid),
                    upstream_query(*logout_upstream)
                ),
                *json,
            ),
            SessionsCommand::Revoke {
                user: Some(user),
                logout_upstream,
                json,
                ..
            } => (
                http::Method::DELETE,
                format!(
                    "{base}/users/{}/sessions{}",
                    enc(user),
                    upstream_query(*logout_upstream)
                ),
                *json,
            ),
            SessionsCommand::Revoke { .. } => bail!("give a session id or --user"),
            SessionsCommand::Stats { json } => (http::Method::GET, format!("{base}/stats"), *json),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (status, body) = runtime.block_on(async {
            let client: Client<_, Empty<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let req = http::Request::builder()
                .method(method)
                .uri(&url)
                .header(
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", secret.trim()),
                )
                .body(Empty::new())?;
            let res = tokio::time::timeout(std::time::Duration::from_secs(30), client.request(req))
                .await
                .context("the admin API did not answer within 30 s")?
                .with_context(|| format!("cannot reach the admin API at {addr}"))?;
            let status = res.status();
            let body = res.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "admin API answered {status}: {} {}",
                v["errcode"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or("")
            );
        }
        if json {
            println!("{v}");
            return Ok(());
        }
        match cmd {
            SessionsCommand::List { user_id, .. } => {
                let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
                println!("{} session(s) of {user_id}", sessions.len());
                if !sessions.is_empty() {
                    println!(
                        "{:<24} {:<16} {:<20} {:<20} {:<20} {:<20}",
                        "SESSION",
                        "DEVICE",
                        "CREATED",
                        "LAST REFRESH",
                        "ACCESS EXPIRES",
                        "REFRESH EXPIRES"
                    );
                }
                for s in sessions {
                    println!(
                        "{:<24} {:<16} {:<20} {:<20} {:<20} {:<20}",
                        s["session_id"].as_str().unwrap_or("?"),
                        s["device_id"].as_str().unwrap_or("?"),
                        time(&s["created_at"]),
                        time(&s["last_refresh_at"]),
                        time(&s["access_expires_at"]),
                        time(&s["refresh_expires_at"]),
                    );
                }
            }
            SessionsCommand::Revoke { .. } => {
                println!("{} session(s) ended", v["ended"].as_u64().unwrap_or(0));
                let up = &v["upstream_logout"];
                if up.is_object() {
                    println!(
                        "upstream logout: {} done, {} failed, {} not possible (made before admin.upstream_key_file)",
                        up["done"], up["failed"], up["not_possible"]
                    );
                }
            }
            SessionsCommand::Stats { .. } => {
                println!("sessions alive:        {}", v["sessions_alive"]);
                println!("logins (last minute):  {}", v["logins_last_minute"]);
                println!("refreshes (last min.): {}", v["refreshes_last_minute"]);
            }
        }
        Ok(())
    }

    /// A ms timestamp as UTC `YYYY-MM-DDTHH:MM:SSZ`, `-` for none.
    fn time(v: &Value) -> String {
        match v.as_u64() {
            Some(ms) => humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string(),
            None => "-".to_owned(),
        }
    }
}

/// SIGTERM and SIGINT, registered once so that no second signal is missed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}
