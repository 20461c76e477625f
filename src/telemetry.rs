//! Logging: `tracing` to stdout (journald picks it up), human or JSON. Noisy dependencies are held
//! at `warn` unless the filter names them. Nothing here ever formats a token or a secret.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Directives appended to the configured level so dependency chatter stays out of the log.
// socketioxide and engineioxide log handshake auth (the JWT), every event and every packet
// at debug: never below warn, so a debug log holds no token or message.
const QUIET: &str = "sqlx=warn,hyper=warn,tungstenite=warn,tokio_tungstenite=warn,\
socketioxide=warn,engineioxide=warn";

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

/// Changes the log filter of the running process (SIGHUP).
pub type LogReload = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &LogConfig) -> Option<LogReload> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter(&config.level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stdout);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.format {
        LogFormat::Human => registry.with(fmt.with_ansi(false)).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    };
    match result {
        Ok(()) => Some(handle),
        Err(e) => {
            eprintln!("logging was already initialised: {e}");
            None
        }
    }
}

/// The process-wide Prometheus recorder. Installed once; every app in the process (tests run
/// several) renders from the same registry.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                eprintln!("a metrics recorder was already installed; /metrics will be empty");
            }
            metrics::gauge!("switchboard_build_info", "version" => env!("CARGO_PKG_VERSION"))
                .set(1.0);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("switchboard_ws_connections", "Open WebSocket connections");
    describe_gauge!(
        "switchboard_users_online",
        "Users with at least one connection (or in their offline grace)"
    );
    describe_counter!(
        "switchboard_ws_events_total",
        "Client events received, by event name"
    );
    describe_counter!("switchboard_ws_errors_total", "Error replies sent, by code");
    describe_counter!(
        "switchboard_ws_closes_total",
        "Connections closed by the server, by close code"
    );
    describe_counter!(
        "switchboard_ws_send_queue_overflows_total",
        "Connections cut because their send queue was full"
    );
    describe_counter!(
        "switchboard_messages_stored_total",
        "Chat messages committed to the store"
    );
    describe_counter!(
        "switchboard_messages_delivered_total",
        "Message frames written to a recipient connection"
    );
    describe_counter!(
        "switchboard_auth_failures_total",
        "Failed authentications, by kind"
    );
}
