//! The binary: CLI, config, telemetry, then `matrix_refresh_proxy::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use matrix_refresh_proxy::config::Config;

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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and exit (non-zero, naming the key, when it is wrong).
    CheckConfig,
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
    let config = Config::load(&cli.config)
        .with_context(|| format!("configuration {}", cli.config.display()))?;
    if let Some(Command::CheckConfig) = cli.command {
        println!("{}: OK", cli.config.display());
        return Ok(());
    }
    matrix_refresh_proxy::telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let path = cli.config.clone();
    runtime.block_on(async {
        // The first SIGTERM/SIGINT starts a graceful drain; a second one exits at once.
        let (begin_shutdown, shutdown) = tokio::sync::oneshot::channel::<()>();
        let mut signals = Signals::new().context("installing signal handlers")?;
        tokio::spawn(async move {
            signals.next().await;
            tracing::info!("signal received: stopping (a second signal exits at once)");
            let _ = begin_shutdown.send(());
            signals.next().await;
            tracing::warn!("second signal: exiting without waiting for in-flight requests");
            std::process::exit(1);
        });
        matrix_refresh_proxy::run(config, Some(path), async {
            let _ = shutdown.await;
        })
        .await?;
        tracing::info!("stopped");
        Ok(())
    })
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
