//! Logging: `tracing` to stdout (journald picks it up), human or JSON. Noisy dependencies are held
//! at `warn` unless the filter names them. Nothing here ever formats a token or a secret.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Directives appended to the configured level so dependency chatter stays out of the log.
const QUIET: &str = "sqlx=warn,hyper=warn,tungstenite=warn,tokio_tungstenite=warn";

pub fn filter(level: &str) -> EnvFilter {
    let mut directives = level.to_owned();
    for quiet in QUIET.split(',') {
        let target = quiet.split('=').next().unwrap_or_default();
        if !level.contains(target) {
            directives.push(',');
            directives.push_str(quiet);
        }
    }
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &LogConfig) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(&config.level))
        .with_writer(std::io::stdout);
    let result = match config.format {
        LogFormat::Human => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(e) = result {
        eprintln!("logging was already initialised: {e}");
    }
}
