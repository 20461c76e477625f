//! The `switchboard` binary: parse the command line, load the config, run the app, and talk to
//! systemd (`Type=notify`: READY=1 once every listener is bound and the store is open, STATUS=,
//! WATCHDOG=1, STOPPING=1) and to signals (SIGTERM/SIGINT stop, SIGHUP reloads).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use switchboard::app::App;
use switchboard::config::Config;
use switchboard::telemetry::LogReload;

/// Exit code for configuration errors (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;
/// Threads of tokio's blocking pool at most.
const MAX_BLOCKING_THREADS: usize = 32;

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
    /// Write a consistent copy of the SQLite database to FILE while the server may be running.
    Backup {
        /// Where to write the copy (must not exist).
        file: PathBuf,
    },
    /// Copy a stopped node's SQLite database into an empty PostgreSQL database (PROTOCOL §8)
    /// and verify it: the same rows in every table, every chat's seq intact.
    MigrateStore {
        /// The SQLite database: sqlite:///var/lib/switchboard/switchboard.db
        #[arg(long)]
        from: String,
        /// The PostgreSQL database: postgres://user:password@host/db
        #[arg(long)]
        to: String,
    },
    /// Check from anywhere that calls will work: every TURN transport the server lists gets an
    /// allocation and a relay-only WebRTC connection between two local peers. Exit 0 when all
    /// work. Needs no config file.
    Doctor {
        /// The server's base URL, e.g. https://chat.example.org
        url: String,
        /// An access token (else --user with SWITCHBOARD_DOCTOR_PASSWORD, or a prompt).
        #[arg(long)]
        token: Option<String>,
        /// Log in as this user.
        #[arg(long)]
        user: Option<String>,
        /// A PEM certificate to trust besides the public roots (private CA, self-signed).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// How long each transport may take to connect.
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Loads and validates the config, with `*_file` secrets (and systemd credentials) read.
fn load(path: Option<&Path>) -> Result<Config, String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    config.resolve_secrets().map_err(|e| e.to_string())?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Doctor {
        url,
        token,
        user,
        ca_file,
        timeout,
        json,
    }) = cli.command
    {
        return doctor(url, token, user, ca_file, timeout, json);
    }
    if let Some(Command::MigrateStore { from, to }) = &cli.command {
        return runtime(migrate_store(from.clone(), to.clone()));
    }
    let config = match load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Backup { file } => runtime(async move {
            match switchboard::store::Backend::of(&config.database.url, &config.data_dir) {
                switchboard::store::Backend::Sqlite(db) => {
                    switchboard::store::sqlite::backup(&db, &file)
                        .await
                        .map_err(Into::into)
                }
                switchboard::store::Backend::Postgres(_) => Err(anyhow::anyhow!(
                    "`switchboard backup` copies a SQLite database; back PostgreSQL up with \
                     pg_dump (docs/operations.md)"
                )),
            }
        }),
        Command::Serve => {
            let log = switchboard::telemetry::init(&config.log);
            runtime(run(config, cli.config, log))
        }
        Command::Doctor { .. } | Command::MigrateStore { .. } => {
            unreachable!("handled before the config is loaded")
        }
    }
}

/// `switchboard migrate-store`: needs no config file, only the two URLs.
async fn migrate_store(from: String, to: String) -> anyhow::Result<()> {
    use switchboard::store::Backend;
    let here = Path::new(".");
    // Parsed here, not through Backend::of: that would take anything else for the default
    // ./switchboard.db and migrate the wrong database.
    let source = match from
        .trim()
        .strip_prefix("sqlite://")
        .or(from.trim().strip_prefix("sqlite:"))
    {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => anyhow::bail!("--from must name the SQLite file: sqlite:///path/to/switchboard.db"),
    };
    let Backend::Postgres(target) = Backend::of(&to, here) else {
        anyhow::bail!("--to must be a postgres:// URL");
    };
    let report = switchboard::store::migrate::sqlite_to_postgres(&source, &target).await?;
    for (table, rows) in &report.tables {
        println!("{table:>15}: {rows} rows");
    }
    println!("copied and verified: the same rows in every table, every chat's seq intact");
    Ok(())
}

/// `switchboard doctor`: exit 0 when every transport works, 1 when one does not, 2 when the
/// check could not run at all.
fn doctor(
    url: String,
    token: Option<String>,
    user: Option<String>,
    ca_file: Option<PathBuf>,
    timeout: std::time::Duration,
    json: bool,
) -> ExitCode {
    let mut password = std::env::var("SWITCHBOARD_DOCTOR_PASSWORD").ok();
    if user.is_some() && token.is_none() && password.is_none() {
        eprint!("password: ");
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_ok() {
            password = Some(line.trim_end_matches(['\r', '\n']).to_owned());
        }
    }
    let opts = switchboard::doctor::Options {
        url,
        token,
        user,
        password,
        ca_file,
        timeout,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard doctor: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(switchboard::doctor::run(&opts)) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("the report serialises")
                );
            } else {
                print!("{}", report.text());
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("switchboard doctor: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // The blocking pool runs password hashes (bounded by auth.hash_concurrency) and file
        // work; tokio's default of 512 threads would let a burst pin gigabytes of stacks.
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Tells systemd, when it is listening; a no-op otherwise.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    log: Option<LogReload>,
) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let (listener, tls) = switchboard::app::bind_http(&config).await?;
    let http = listener.local_addr()?;
    let https = tls.as_ref().map(|_| http.port());
    let prepared = switchboard::app::prepare_with_tls(config, shutdown.clone(), tls, https).await?;
    let state = prepared.app().clone();
    // Every listener is bound and the store is open: ready.
    let status = match prepared.turn_addresses() {
        Some(t) => {
            let mut s = format!("serving http on {http}, turn on {}/udp", t.udp);
            if let Some(a) = t.tcp {
                s += &format!(", {a}/tcp");
            }
            if let Some(a) = t.tls {
                s += &format!(", {a}/tls");
            }
            s
        }
        None => format!("serving http on {http}, turn disabled"),
    };
    notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                notify(&[NotifyState::Watchdog]);
            }
        })
    });
    let signals = tokio::spawn(handle_signals(state, config_path, log));
    let result = prepared.run(listener).await;
    signals.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    result
}

/// SIGTERM (what systemd sends on stop and on restart) is a restart: sockets get 1012 and
/// clients reconnect. SIGINT (Ctrl-C) is going away for good: calls end with `server_shutdown`
/// and sockets get 1001. SIGHUP reloads what can change without a restart.
async fn handle_signals(state: Arc<App>, config_path: Option<PathBuf>, log: Option<LogReload>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM received: restarting clients reconnect (1012)");
                notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
                state.shutdown().cancel();
                return;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT received: going away (1001), ending calls");
                notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
                state.go_away().await;
                return;
            }
            _ = hup.recv() => reload(&state, config_path.as_deref(), log.as_ref()),
        }
    }
}

/// Reloads the config file; an invalid one keeps the running config and says why.
fn reload(state: &App, path: Option<&Path>, log: Option<&LogReload>) {
    tracing::info!("SIGHUP received: reloading the configuration");
    let new = match load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("reload failed, keeping the running configuration: {e}");
            notify(&[NotifyState::Status(
                "reload failed; running with the previous configuration",
            )]);
            return;
        }
    };
    match state.reload(&new) {
        Ok(restart_needed) => {
            if let Some(handle) = log {
                if let Err(e) = handle.reload(switchboard::telemetry::filter(&new.log.level)) {
                    tracing::warn!(error = %e, "could not change the log level");
                }
            }
            if !restart_needed.is_empty() {
                tracing::warn!(keys = ?restart_needed, "these changes take effect after a restart");
            }
            tracing::info!("configuration reloaded");
            notify(&[NotifyState::Status("configuration reloaded")]);
        }
        Err(e) => {
            tracing::error!("reload failed, keeping the running configuration: {e:#}");
            notify(&[NotifyState::Status(
                "reload failed; running with the previous configuration",
            )]);
        }
    }
}
