//! The `switchboard` binary: parse the command line, load the config, run the app.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use switchboard::config::Config;

/// Exit code for configuration errors (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Chat WebSocket, call signaling and TURN in one binary"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML). Without it: defaults plus SWITCHBOARD_* environment variables.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Validate the configuration and exit (0 when valid).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = config.resolve_secrets() {
        eprintln!("switchboard: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config),
    }
}

fn serve(config: Config) -> ExitCode {
    switchboard::telemetry::init(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| anyhow::anyhow!("http.listen {}: {e}", config.http.listen))?;
    let prepared = switchboard::app::prepare(config, shutdown.clone()).await?;
    let signals = tokio::spawn(wait_for_signal(prepared.state().clone()));
    let result = prepared.run(listener).await;
    signals.abort();
    result
}

/// SIGTERM (what systemd sends on stop and on restart) is a restart: sockets get 1012 and
/// clients reconnect. SIGINT (Ctrl-C) is going away for good: calls end with `server_shutdown`
/// and sockets get 1001.
async fn wait_for_signal(state: std::sync::Arc<switchboard::app::AppState>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {
            tracing::info!("SIGTERM received: restarting clients reconnect (1012)");
            state.shutdown.cancel();
        }
        _ = int.recv() => {
            tracing::info!("SIGINT received: going away (1001), ending calls");
            state.go_away().await;
        }
    }
}
