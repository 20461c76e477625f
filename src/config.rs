//! Configuration: one serde tree loaded from defaults, an optional TOML file and
//! `SWITCHBOARD_<SECTION>__<KEY>` environment variables (in that order of precedence).
//!
//! Every section denies unknown keys so a typo fails at start naming the key. Values are typed:
//! addresses, port ranges and CIDR lists are parsed here, once, and a bad one names its key.
//! Secrets may be given inline or as `<key>_file`; [`Config::resolve_secrets`] reads the files.
//! This module does no network I/O, starts nothing, and never imports `turn` (which takes its
//! settings from here).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Prefix of the environment overrides (`SWITCHBOARD_HTTP__LISTEN`).
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SQLite file and generated secrets live here.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub turn: TurnConfig,
    pub calls: CallsConfig,
    pub ws: WsConfig,
    pub presence: PresenceConfig,
    pub chat: ChatConfig,
    pub socketio: SocketIoConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            http: HttpConfig::default(),
            database: DatabaseConfig::default(),
            auth: AuthConfig::default(),
            turn: TurnConfig::default(),
            calls: CallsConfig::default(),
            ws: WsConfig::default(),
            presence: PresenceConfig::default(),
            chat: ChatConfig::default(),
            socketio: SocketIoConfig::default(),
            cluster: ClusterConfig::default(),
            log: LogConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Largest accepted REST request body.
    pub max_body_bytes: usize,
    /// Serve `/metrics` on this address only (e.g. `127.0.0.1:9090`) instead of on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Peers whose `X-Forwarded-For` is believed (reverse proxies). The client address is the
    /// right-most forwarded address not in this list; it feeds throttling and logs.
    #[serde(with = "cidr_list")]
    pub trusted_proxies: Vec<IpNet>,
    /// Origins (`https://app.example.org`) whose pages may call `/api` and `/socket.io` from a
    /// browser, with credentials. Empty: none (same-origin only).
    pub cors_origins: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            tls_cert_file: None,
            tls_key_file: None,
            max_body_bytes: 256 * 1024,
            metrics_listen: None,
            trusted_proxies: vec![
                "127.0.0.0/8".parse().expect("literal CIDR"),
                "::1/128".parse().expect("literal CIDR"),
            ],
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Empty: SQLite in `data_dir`. `sqlite://path` is accepted too.
    pub url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret for our own tokens; empty: generated into `data_dir/jwt_secret`.
    pub jwt_secret: String,
    pub jwt_secret_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub access_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub refresh_ttl: Duration,
    pub allow_registration: bool,
    /// External identity provider: expected `iss` of its tokens. Empty: none trusted.
    pub issuer: String,
    /// Expected `aud` of external tokens (checked when set).
    pub audience: String,
    /// PEM public key (RSA → RS256, EC P-256 → ES256) of the external issuer.
    pub jwt_public_key_file: Option<PathBuf>,
    /// HS256 shared secret of the external issuer (instead of a public key).
    pub issuer_secret: String,
    pub issuer_secret_file: Option<PathBuf>,
    /// Failed logins allowed per username (and per client IP, times 4) within `login_window`.
    pub login_max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
    /// Registrations allowed per client address within `register_window`; 0 disables.
    pub register_max_per_ip: u32,
    #[serde(with = "humantime_serde")]
    pub register_window: Duration,
    /// Password hashes (argon2id, 19 MiB each) computed at once; 0: one per CPU core, at most 8.
    pub hash_concurrency: usize,
    /// Logins/registrations waiting for a hashing slot; beyond that they get 429 at once.
    pub hash_queue: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            jwt_secret_file: None,
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(30 * 24 * 3600),
            allow_registration: true,
            issuer: String::new(),
            audience: String::new(),
            jwt_public_key_file: None,
            issuer_secret: String::new(),
            issuer_secret_file: None,
            login_max_failures: 5,
            login_window: Duration::from_secs(15 * 60),
            register_max_per_ip: 10,
            register_window: Duration::from_secs(3600),
            hash_concurrency: 0,
            hash_queue: 32,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    pub enabled: bool,
    pub listen_udp: SocketAddr,
    /// TURN over TCP (RFC 8656 §3.1), e.g. `0.0.0.0:3478`; empty: off.
    #[serde(with = "optional_addr")]
    pub listen_tcp: Option<SocketAddr>,
    /// TURN over TLS, e.g. `0.0.0.0:5349`; empty: off.
    #[serde(with = "optional_addr")]
    pub listen_tls: Option<SocketAddr>,
    /// Certificate and key of TURN over TLS; unset: the `http.tls_*` pair.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// TURN over TLS is also accepted on the HTTPS listener (`http.tls_*`): a TLS client that
    /// asks for no HTTP protocol (ALPN) and speaks STUN goes to TURN.
    pub share_https: bool,
    pub public_host: String,
    /// The address (one per family, comma-separated) clients reach this host at, when it is
    /// behind NAT; empty: the bound or detected one.
    pub public_ip: PublicIps,
    pub realm: String,
    pub secret: String,
    pub secret_file: Option<PathBuf>,
    pub previous_secret: String,
    pub previous_secret_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub credential_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_allocation_lifetime: Duration,
    pub relay_ports: PortRange,
    #[serde(with = "cidr_list")]
    pub allow_peers: Vec<IpNet>,
    #[serde(with = "cidr_list")]
    pub deny_peers: Vec<IpNet>,
    pub user_quota: u32,
    pub total_quota: u32,
    /// Per allocation and direction, bits per second; 0: no cap. Excess packets are dropped.
    pub max_bps_per_allocation: u64,
    /// All allocations together, per direction, bits per second; 0: no cap.
    pub total_bps: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen_udp: "0.0.0.0:3478".parse().expect("literal address"),
            listen_tcp: None,
            listen_tls: None,
            tls_cert_file: None,
            tls_key_file: None,
            share_https: true,
            public_host: String::new(),
            public_ip: PublicIps::default(),
            realm: "switchboard".into(),
            secret: String::new(),
            secret_file: None,
            previous_secret: String::new(),
            previous_secret_file: None,
            credential_ttl: Duration::from_secs(24 * 3600),
            max_allocation_lifetime: Duration::from_secs(24 * 3600),
            relay_ports: PortRange {
                min: 49152,
                max: 65535,
            },
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            user_quota: 12,
            total_quota: 1000,
            max_bps_per_allocation: 0,
            total_bps: 0,
        }
    }
}

impl TurnConfig {
    /// The certificate and key of TURN over TLS: its own pair, else the HTTPS one.
    pub fn tls_pair<'a>(&'a self, http: &'a HttpConfig) -> Option<(&'a Path, &'a Path)> {
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            _ => match (&http.tls_cert_file, &http.tls_key_file) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    #[serde(with = "humantime_serde")]
    pub ring_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_grace: Duration,
}

impl Default for CallsConfig {
    fn default() -> Self {
        Self {
            ring_timeout: Duration::from_secs(30),
            reconnect_grace: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsConfig {
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it is closed with 4429.
    pub send_queue: usize,
    /// Inbound events per second allowed per connection (burst: twice that); 0 disables.
    pub rate_limit: u32,
    /// Live connections one user may hold (all devices and tabs); beyond, closed with 4429.
    pub max_connections_per_user: usize,
    /// Messages per second one user may send across all connections (each forwarded message
    /// counts); 0 disables.
    pub user_message_rate: u32,
    /// Messages a user may send in a burst above `user_message_rate`.
    pub user_message_burst: u32,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 65536,
            send_queue: 256,
            rate_limit: 50,
            max_connections_per_user: 20,
            user_message_rate: 20,
            user_message_burst: 100,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    #[serde(with = "humantime_serde")]
    pub offline_grace: Duration,
    /// A `typing-start` not refreshed within this ends by itself.
    #[serde(with = "humantime_serde")]
    pub typing_timeout: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            offline_grace: Duration::from_secs(5),
            typing_timeout: Duration::from_secs(6),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// Longest message content, in Unicode scalar values.
    pub max_content_chars: usize,
    /// Most participants in a group chat.
    pub max_participants: usize,
}

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            max_content_chars: 4000,
            max_participants: 256,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoConfig {
    /// Serve Socket.IO v4 (Engine.IO websocket and polling) on `/socket.io/`.
    pub enabled: bool,
    /// Also emit the seeds' older events (`connected`, `new-message`, `message-delivered`,
    /// `user-online`, `user-offline`) and accept their older names (`send-message`, ...).
    pub legacy_events: bool,
}

impl Default for SocketIoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            legacy_events: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Empty: single node. `redis://host:6379/0` (or `rediss://` for TLS): every node of one
    /// cluster names the same Redis and the same PostgreSQL `database.url`.
    pub redis_url: String,
    /// Prepended to every Redis key and channel: several clusters may share one Redis.
    pub redis_prefix: String,
    /// This node's name among the nodes; empty: a fresh one at every start.
    pub node_id: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_prefix: "switchboard:".into(),
            node_id: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(String),
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read `{key}` from {path}: {source}")]
    SecretFile {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, Env::prefixed(ENV_PREFIX).split("__"))
    }

    /// Defaults, then the TOML text `toml` (no environment), validated: what `check-config`
    /// says of a file with this content.
    pub fn from_toml_str(toml: &str) -> Result<Self, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment_error(e)))?;
        config.validate()?;
        Ok(config)
    }

    fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Parse(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        let config: Config = fig
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Parse(describe_figment_error(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        if self.ws.max_frame_bytes < 1024 {
            return Err(bad("ws.max_frame_bytes", "must be at least 1024"));
        }
        if self.ws.send_queue == 0 {
            return Err(bad("ws.send_queue", "must be at least 1"));
        }
        if self.ws.max_connections_per_user == 0 {
            return Err(bad("ws.max_connections_per_user", "must be at least 1"));
        }
        if self.ws.user_message_rate > 0
            && (self.ws.user_message_burst as usize) < crate::limits::FORWARD_MAX
        {
            return Err(bad(
                "ws.user_message_burst",
                format!(
                    "must be at least {} (one message:forward-multiple)",
                    crate::limits::FORWARD_MAX
                ),
            ));
        }
        if self.auth.hash_queue == 0 {
            return Err(bad("auth.hash_queue", "must be at least 1"));
        }
        if self.ws.heartbeat_interval.is_zero() {
            return Err(bad("ws.heartbeat_interval", "must be positive"));
        }
        if self.ws.idle_timeout <= self.ws.heartbeat_interval {
            return Err(bad(
                "ws.idle_timeout",
                "must be longer than ws.heartbeat_interval",
            ));
        }
        if self.auth.access_ttl < Duration::from_secs(10) {
            return Err(bad("auth.access_ttl", "must be at least 10s"));
        }
        if self.auth.refresh_ttl < self.auth.access_ttl {
            return Err(bad("auth.refresh_ttl", "must be at least auth.access_ttl"));
        }
        if self.auth.jwt_public_key_file.is_some() && self.auth.issuer.is_empty() {
            return Err(bad(
                "auth.issuer",
                "must be set when auth.jwt_public_key_file is set",
            ));
        }
        if !self.auth.issuer.is_empty()
            && self.auth.jwt_public_key_file.is_none()
            && self.auth.issuer_secret.is_empty()
            && self.auth.issuer_secret_file.is_none()
        {
            return Err(bad(
                "auth.issuer",
                "needs auth.jwt_public_key_file or auth.issuer_secret",
            ));
        }
        if self.chat.max_content_chars == 0 {
            return Err(bad("chat.max_content_chars", "must be at least 1"));
        }
        if self.chat.max_participants < 2 {
            return Err(bad("chat.max_participants", "must be at least 2"));
        }
        let db = self.database.url.trim();
        if !db.is_empty()
            && !db.starts_with("sqlite:")
            && !db.starts_with("postgres://")
            && !db.starts_with("postgresql://")
        {
            return Err(bad(
                "database.url",
                "must be empty (SQLite in the data directory), sqlite:PATH or postgres://…",
            ));
        }
        match (&self.http.tls_cert_file, &self.http.tls_key_file) {
            (Some(_), None) => {
                return Err(bad(
                    "http.tls_key_file",
                    "must be set with http.tls_cert_file",
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "http.tls_cert_file",
                    "must be set with http.tls_key_file",
                ))
            }
            _ => {}
        }
        for origin in &self.http.cors_origins {
            if let Err(why) = check_origin(origin) {
                return Err(bad("http.cors_origins", format!("`{origin}`: {why}")));
            }
        }
        if !self.cluster.redis_url.is_empty() {
            let url = &self.cluster.redis_url;
            if !url.starts_with("redis://")
                && !url.starts_with("rediss://")
                && !url.starts_with("redis+unix://")
                && !url.starts_with("unix://")
            {
                return Err(bad(
                    "cluster.redis_url",
                    "must be redis://…, rediss://… or unix://…",
                ));
            }
            let db = &self.database.url;
            if !db.starts_with("postgres://") && !db.starts_with("postgresql://") {
                return Err(bad(
                    "cluster.redis_url",
                    "several nodes share one PostgreSQL database: set database.url to postgres://…",
                ));
            }
        }
        if self.turn.enabled {
            let t = &self.turn;
            if t.listen_tls.is_some() && t.tls_pair(&self.http).is_none() {
                return Err(bad(
                    "turn.listen_tls",
                    "needs a certificate: turn.tls_cert_file and turn.tls_key_file, or http.tls_*",
                ));
            }
            match (&t.tls_cert_file, &t.tls_key_file) {
                (Some(_), None) => {
                    return Err(bad(
                        "turn.tls_key_file",
                        "must be set with turn.tls_cert_file",
                    ))
                }
                (None, Some(_)) => {
                    return Err(bad(
                        "turn.tls_cert_file",
                        "must be set with turn.tls_key_file",
                    ))
                }
                _ => {}
            }
            if t.realm.is_empty() {
                return Err(bad("turn.realm", "must not be empty"));
            }
            if t.user_quota == 0 || t.total_quota == 0 {
                return Err(bad("turn.user_quota", "quotas must be at least 1"));
            }
            if t.credential_ttl < Duration::from_secs(60) {
                return Err(bad("turn.credential_ttl", "must be at least 60s"));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(bad("log.level", "not a valid level or filter directive"));
        }
        if self.presence.typing_timeout.is_zero() {
            return Err(bad("presence.typing_timeout", "must be positive"));
        }
        Ok(())
    }

    /// Replaces every `*_file` secret by the file's contents (trimmed); then fills secrets that
    /// are still empty from systemd credentials (`$CREDENTIALS_DIRECTORY/switchboard_<name>` or
    /// `$CREDENTIALS_DIRECTORY/<name>`), so they never pass through the environment.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        self.resolve_secret_files()?;
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let dir = PathBuf::from(dir);
            let read = |name: &str| {
                [format!("switchboard_{name}"), name.to_owned()]
                    .iter()
                    .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
            };
            for (name, target) in [
                ("jwt_secret", &mut self.auth.jwt_secret),
                ("issuer_secret", &mut self.auth.issuer_secret),
                ("turn_secret", &mut self.turn.secret),
                ("turn_previous_secret", &mut self.turn.previous_secret),
            ] {
                if target.is_empty() {
                    if let Some(value) = read(name) {
                        *target = value;
                    }
                }
            }
        }
        Ok(())
    }

    fn resolve_secret_files(&mut self) -> Result<(), ConfigError> {
        fn read(
            key: &'static str,
            file: &Option<PathBuf>,
            target: &mut String,
        ) -> Result<(), ConfigError> {
            if let Some(path) = file {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                        key,
                        path: path.clone(),
                        source,
                    })?;
                *target = text.trim().to_owned();
            }
            Ok(())
        }
        read(
            "auth.jwt_secret_file",
            &self.auth.jwt_secret_file,
            &mut self.auth.jwt_secret,
        )?;
        read(
            "auth.issuer_secret_file",
            &self.auth.issuer_secret_file,
            &mut self.auth.issuer_secret,
        )?;
        read(
            "turn.secret_file",
            &self.turn.secret_file,
            &mut self.turn.secret,
        )?;
        read(
            "turn.previous_secret_file",
            &self.turn.previous_secret_file,
            &mut self.turn.previous_secret,
        )?;
        Ok(())
    }
}

/// A browser origin as `Origin` headers carry it: `scheme://host[:port]`, nothing after.
fn check_origin(origin: &str) -> Result<(), &'static str> {
    let (scheme, rest) = origin
        .split_once("://")
        .ok_or("expected scheme://host[:port]")?;
    if scheme != "http" && scheme != "https" {
        return Err("the scheme must be http or https");
    }
    if rest.is_empty() || rest.contains('/') || rest.contains('*') {
        return Err("expected scheme://host[:port], without a path or wildcard");
    }
    Ok(())
}

/// An inclusive range of ports, `min-max` in the file (`0 < min <= max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn range(self) -> std::ops::RangeInclusive<u16> {
        self.min..=self.max
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}`: expected `min-max` with 0 < min <= max");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(PortRange { min, max })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// At most one IPv4 and one IPv6 address, `"a.b.c.d,x::y"` in the file; empty: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublicIps {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl std::str::FromStr for PublicIps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = PublicIps::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let twice = "at most one IPv4 and one IPv6 address, comma-separated";
            match part.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) if out.v4.is_none() => out.v4 = Some(v4),
                Ok(IpAddr::V6(v6)) if out.v6.is_none() => out.v6 = Some(v6),
                Ok(_) => return Err(twice.into()),
                Err(_) => return Err(format!("`{part}` is not an IP address")),
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for PublicIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [self.v4.map(IpAddr::V4), self.v6.map(IpAddr::V6)]
            .into_iter()
            .flatten()
            .map(|ip| ip.to_string())
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Serde through `FromStr`/`Display`, so a bad value fails naming its key.
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

string_serde!(PortRange);
string_serde!(PublicIps);

/// An address that may be left empty (`""`: off).
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "" => Ok(None),
            t => t.parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!(
                    "`{t}` is not address:port, e.g. 0.0.0.0:3478 (or empty: off)"
                ))
            }),
        }
    }
}

/// A list of CIDR ranges in the config, where a bare address means just that address.
mod cidr_list {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn parse(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
            .map_err(|_| format!("`{s}` is not an IP address or CIDR range"))
    }

    pub fn serialize<S: Serializer>(list: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        list.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| parse(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// Figment's errors name the key path and the source; make that one readable line each.
fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|err| {
            let key = err.path.join(".");
            let origin = err
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            if key.is_empty() {
                format!("config error: {}{origin}", err.kind)
            } else {
                format!("config error at `{key}`: {}{origin}", err.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load_from(Some(&path), Env::prefixed("SWITCHBOARD_TEST_UNUSED_"))
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.ws.max_frame_bytes, 65536);
        assert_eq!(c.ws.send_queue, 256);
        assert_eq!(c.ws.heartbeat_interval, Duration::from_secs(25));
        assert_eq!(c.ws.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.presence.offline_grace, Duration::from_secs(5));
        assert_eq!(c.auth.access_ttl, Duration::from_secs(900));
        assert_eq!(c.turn.listen_udp.to_string(), "0.0.0.0:3478");
        assert_eq!(c.turn.relay_ports.to_string(), "49152-65535");
        assert_eq!(c.turn.listen_tcp, None);
        assert_eq!(c.calls.ring_timeout, Duration::from_secs(30));
    }

    #[test]
    fn durations_parse_humantime() {
        let c = load_toml("[ws]\nheartbeat_interval = \"5s\"\nidle_timeout = \"1m\"\n").unwrap();
        assert_eq!(c.ws.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.ws.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load_toml("[ws]\nheartbeat = \"5s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("heartbeat"), "{err}");
        let err = load_toml("[wss]\nx = 1\n").unwrap_err().to_string();
        assert!(err.contains("wss"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = load_toml("[ws]\nsend_queue = 0\n").unwrap_err().to_string();
        assert!(err.contains("ws.send_queue"), "{err}");
        let err = load_toml("[http]\nlisten = \"nope\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.listen"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn env_overrides_nest_with_double_underscore() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SWITCHBOARD_HTTP__LISTEN", "127.0.0.1:9999");
            jail.set_env("SWITCHBOARD_DATA_DIR", "/tmp/sbdata");
            jail.set_env("SWITCHBOARD_WS__IDLE_TIMEOUT", "90s");
            let c = Config::load(None).expect("loads");
            assert_eq!(c.http.listen.to_string(), "127.0.0.1:9999");
            assert_eq!(c.data_dir, PathBuf::from("/tmp/sbdata"));
            assert_eq!(c.ws.idle_timeout, Duration::from_secs(90));
            Ok(())
        });
    }

    #[test]
    fn the_reference_config_documents_every_key() {
        let reference = include_str!("../turn-config/switchboard.toml");
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut section = String::new();
        let mut documented = std::collections::HashSet::new();
        for line in reference.lines() {
            let line = line.trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, _)) = line.trim_start_matches('#').split_once(" = ") {
                documented.insert(if section.is_empty() {
                    key.trim().to_owned()
                } else {
                    format!("{section}.{}", key.trim())
                });
            }
        }
        for (name, value) in defaults.as_object().unwrap() {
            match value.as_object() {
                Some(keys) => {
                    for key in keys.keys() {
                        let path = format!("{name}.{key}");
                        assert!(
                            documented.contains(&path),
                            "turn-config/switchboard.toml lacks `{path}`"
                        );
                    }
                }
                None => assert!(
                    documented.contains(name),
                    "turn-config/switchboard.toml lacks `{name}`"
                ),
            }
        }
    }

    #[test]
    fn trusted_proxies_take_ranges_and_addresses() {
        let c = load_toml("[http]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\", \"::1\"]\n")
            .unwrap();
        let list: Vec<String> = c
            .http
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(list, ["10.0.0.0/8", "192.0.2.1/32", "::1/128"]);
        let err = load_toml("[http]\ntrusted_proxies = [\"nope\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http.trusted_proxies") && err.contains("nope"),
            "{err}"
        );
    }

    #[test]
    fn turn_values_are_parsed_once_and_a_bad_one_names_its_key() {
        let c = load_toml(
            "[turn]\nrelay_ports = \" 1000 - 2000 \"\nlisten_tcp = \"127.0.0.1:3478\"\n\
             public_ip = \"203.0.113.7, 2001:db8::1\"\nallow_peers = [\"10.0.0.1\", \"fc00::/7\"]\n",
        )
        .unwrap();
        assert_eq!(c.turn.relay_ports.range(), 1000..=2000);
        assert_eq!(c.turn.listen_tcp, Some("127.0.0.1:3478".parse().unwrap()));
        assert_eq!(c.turn.listen_tls, None);
        assert_eq!(c.turn.public_ip.to_string(), "203.0.113.7,2001:db8::1");
        assert_eq!(c.turn.allow_peers[0].to_string(), "10.0.0.1/32");
        // What is written back (a reload compares configs this way) reads the same again.
        let back = serde_json::to_value(&c.turn).unwrap();
        assert_eq!(back["relay_ports"], "1000-2000");
        assert_eq!(back["listen_tls"], "");
        for (line, key) in [
            ("relay_ports = \"10-5\"", "turn.relay_ports"),
            ("relay_ports = \"0-5\"", "turn.relay_ports"),
            ("listen_udp = \"nope\"", "turn.listen_udp"),
            ("listen_tcp = \"3478\"", "turn.listen_tcp"),
            ("public_ip = \"1.2.3.4,5.6.7.8\"", "turn.public_ip"),
            ("public_ip = \"host.example\"", "turn.public_ip"),
            ("deny_peers = [\"10.0.0.0/99\"]", "turn.deny_peers"),
        ] {
            let err = load_toml(&format!("[turn]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn cors_origins_are_origins() {
        let c = load_toml(
            "[http]\ncors_origins = [\"https://app.example.org\", \"http://localhost:3000\"]\n",
        )
        .unwrap();
        assert_eq!(c.http.cors_origins.len(), 2);
        for bad in [
            "*",
            "https://app.example.org/",
            "app.example.org",
            "ftp://x",
            "https://*.x.org",
        ] {
            let err = load_toml(&format!("[http]\ncors_origins = [\"{bad}\"]\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("http.cors_origins"), "{bad}: {err}");
        }
    }

    #[test]
    fn secret_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "topsecret\n").unwrap();
        let mut c = Config::default();
        c.auth.jwt_secret_file = Some(secret);
        c.resolve_secrets().unwrap();
        assert_eq!(c.auth.jwt_secret, "topsecret");
    }
}
