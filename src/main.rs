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
    runtime.block_on(async {
        matrix_refresh_proxy::run(config, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
