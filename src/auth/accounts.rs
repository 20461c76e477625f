//! Register, login, refresh-token rotation with theft detection, and token authentication
//! (creating users of a trusted external issuer on first sight).
//!
//! A shell around the pure JWT code and throttles: reads the clock and passes it in.
#![allow(clippy::disallowed_methods)]

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::jwt::{Identity, JwtError, JwtKeys};
use super::passwords::{self, HashError, Hasher};
use super::throttle::{address_key, Throttle};
use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::store::{NewUser, NextRefreshToken, RefreshOutcome, Store, StoreError, UserRecord};
use crate::time::now_ms;
use crate::wire::models::User;

/// Failed logins per client address allowed for every one allowed per username.
const IP_FAILURE_FACTOR: u32 = 4;
/// Keys per generation of each throttle (at most twice that are held; see [`Throttle`]).
const THROTTLE_GENERATION: usize = 50_000;
const MAX_PASSWORD_BYTES: usize = 1024;
const MAX_DISPLAY_NAME_CHARS: usize = 64;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthResponse {
    pub user: User,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authed {
    pub user_id: String,
    /// Unix seconds when the presented token expires.
    pub expires_at: i64,
}

pub struct Accounts {
    store: Arc<dyn Store>,
    keys: JwtKeys,
    config: AuthConfig,
    /// Both login throttles under one lock: an attempt is checked against both and counted in
    /// both, or in neither.
    throttles: Mutex<Throttles>,
    hasher: Hasher,
}

struct Throttles {
    /// Login attempts per username.
    by_user: Throttle,
    /// Login attempts per client address (IPv6: per /64).
    by_ip: Throttle,
    /// Registrations per client address.
    register_by_ip: Throttle,
}

/// What a refused hash becomes for the client.
fn hash_refused(e: HashError) -> ApiError {
    match e {
        HashError::Busy => {
            let mut err = ApiError::rate_limited(1);
            err.message = "the server is busy checking passwords; retry in a second".into();
            err
        }
        HashError::Failed => ApiError::internal(),
    }
}

fn now_secs() -> i64 {
    now_ms() / 1000
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// SHA-256 hex of a refresh token: what the store keeps.
fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn validate_username(username: &str) -> Result<(), ApiError> {
    let ok_len = (3..=32).contains(&username.len());
    let ok_chars = username
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "username: 3-32 characters of a-z, 0-9, '_', '.', '-'",
        ))
    }
}

impl Accounts {
    pub fn new(store: Arc<dyn Store>, keys: JwtKeys, config: AuthConfig) -> Self {
        let window = config.login_window.as_millis() as i64;
        Self {
            throttles: Mutex::new(Throttles {
                by_user: Throttle::new(config.login_max_failures, window, THROTTLE_GENERATION),
                by_ip: Throttle::new(
                    config.login_max_failures.saturating_mul(IP_FAILURE_FACTOR),
                    window,
                    THROTTLE_GENERATION,
                ),
                register_by_ip: Throttle::new(
                    config.register_max_per_ip,
                    config.register_window.as_millis() as i64,
                    THROTTLE_GENERATION,
                ),
            }),
            hasher: Hasher::new(config.hash_concurrency, config.hash_queue),
            store,
            keys,
            config,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates an account for a request from `client`.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        display_name: Option<&str>,
        client: IpAddr,
    ) -> Result<AuthResponse, ApiError> {
        if !self.config.allow_registration {
            return Err(ApiError::forbidden("registration is disabled"));
        }
        validate_username(username)?;
        validate_password(password)?;
        let display_name = match display_name.map(str::trim) {
            Some(d) if !d.is_empty() => {
                if d.chars().count() > MAX_DISPLAY_NAME_CHARS {
                    return Err(ApiError::bad_request("displayName: at most 64 characters"));
                }
                d.to_owned()
            }
            _ => username.to_owned(),
        };
        // Counted once the request is valid, before the expensive part.
        let slot = self.take_register_slot(client)?;
        let hash = match self.hasher.hash(password.to_owned()).await {
            Ok(h) => h,
            Err(e) => {
                // Refused before any work: the slot is given back.
                if let Some((key, at)) = slot {
                    let mut t = self.throttles.lock().expect("throttle lock");
                    t.register_by_ip.undo(&key, at);
                }
                return Err(hash_refused(e));
            }
        };
        let user = self
            .store
            .create_user(NewUser {
                id: new_id(),
                username: username.to_owned(),
                display_name,
                password_hash: Some(hash),
                external_sub: None,
                created_at: now_ms(),
            })
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => ApiError::conflict("username is taken"),
                other => other.into(),
            })?;
        self.issue_pair(&user, new_id()).await
    }

    /// Counts a registration from `client` (`Some((key, at))` to take it back), or refuses it.
    fn take_register_slot(&self, client: IpAddr) -> Result<Option<(String, i64)>, ApiError> {
        if self.config.register_max_per_ip == 0 {
            return Ok(None);
        }
        let key = address_key(client);
        let now = now_ms();
        let mut t = self.throttles.lock().expect("throttle lock");
        if let Some(retry_ms) = t.register_by_ip.check(&key, now) {
            metrics::counter!("switchboard_auth_refused_total", "kind" => "register_rate")
                .increment(1);
            return Err(ApiError::rate_limited((retry_ms as u64).div_ceil(1000)));
        }
        t.register_by_ip.record(&key, now);
        Ok(Some((key, now)))
    }

    /// Logs in a request from `client`. The attempt is counted against the username and the
    /// address *before* the password is checked, so parallel guesses cannot all get through
    /// before the first failure is recorded; a success takes its attempt back.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        client: IpAddr,
    ) -> Result<AuthResponse, ApiError> {
        let user_key = username.to_ascii_lowercase();
        // A name that could never exist is not worth a hash, nor a throttle entry.
        validate_username(&user_key)?;
        let ip_key = address_key(client);
        let started = now_ms();
        {
            let mut t = self.throttles.lock().expect("throttle lock");
            let locked = t
                .by_user
                .check(&user_key, started)
                .or_else(|| t.by_ip.check(&ip_key, started));
            if let Some(retry_ms) = locked {
                metrics::counter!("switchboard_auth_refused_total", "kind" => "login_rate")
                    .increment(1);
                return Err(ApiError::rate_limited((retry_ms as u64).div_ceil(1000)));
            }
            t.by_user.record(&user_key, started);
            t.by_ip.record(&ip_key, started);
        }
        let take_back = |clear_user: bool| {
            let mut t = self.throttles.lock().expect("throttle lock");
            if clear_user {
                t.by_user.clear(&user_key);
            } else {
                t.by_user.undo(&user_key, started);
            }
            t.by_ip.undo(&ip_key, started);
        };
        let user = match self.store.user_by_username(&user_key).await {
            Ok(u) => Some(u),
            Err(StoreError::NotFound) => None,
            Err(e) => {
                take_back(false);
                return Err(e.into());
            }
        };
        let phc = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| passwords::dummy_hash().to_owned());
        let ok = match self.hasher.verify(password.to_owned(), phc).await {
            Ok(ok) => ok,
            Err(e) => {
                // Not checked at all: it does not count as a guess.
                take_back(false);
                return Err(hash_refused(e));
            }
        };
        match user {
            Some(user) if ok && user.password_hash.is_some() => {
                take_back(true);
                self.issue_pair(&user, new_id()).await
            }
            _ => {
                metrics::counter!("switchboard_auth_failures_total", "kind" => "login")
                    .increment(1);
                tracing::debug!(client = %client, "failed login");
                Err(ApiError::unauthorized("invalid username or password"))
            }
        }
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<AuthResponse, ApiError> {
        let (next, next_hash) = new_refresh_token()?;
        let expires_at = now_ms() + self.config.refresh_ttl.as_millis() as i64;
        let outcome = self
            .store
            .rotate_refresh_token(
                &token_hash(refresh_token),
                NextRefreshToken {
                    token_hash: next_hash,
                    expires_at,
                },
                now_ms(),
            )
            .await?;
        match outcome {
            RefreshOutcome::Rotated { user_id, .. } => {
                let user = self.store.user_by_id(&user_id).await?;
                Ok(self.response(&user, next))
            }
            RefreshOutcome::Reused => {
                metrics::counter!("switchboard_auth_failures_total", "kind" => "refresh_reuse")
                    .increment(1);
                tracing::warn!("a used refresh token was presented again; its login was revoked");
                Err(ApiError::unauthorized(
                    "refresh token was already used; this login has been revoked",
                ))
            }
            RefreshOutcome::Invalid => Err(ApiError::unauthorized(
                "refresh token is invalid or expired",
            )),
        }
    }

    /// Verifies an access token and maps it to a local user.
    pub async fn authenticate(&self, token: &str) -> Result<Authed, ApiError> {
        let identity = self.keys.verify(token, now_secs()).inspect_err(|_| {
            metrics::counter!("switchboard_auth_failures_total", "kind" => "token").increment(1);
        });
        let identity = identity.map_err(|e| match e {
            JwtError::Expired => ApiError::unauthorized("token expired"),
            JwtError::NotYetValid => ApiError::unauthorized("token not yet valid"),
            JwtError::Invalid(_) => ApiError::unauthorized("token invalid"),
        })?;
        let expires_at = identity.expires_at();
        let user_id = match identity {
            Identity::Local { user_id, .. } => user_id,
            Identity::External {
                subject,
                name,
                preferred_username,
                ..
            } => {
                self.external_user(&subject, name, preferred_username)
                    .await?
                    .id
            }
        };
        Ok(Authed {
            user_id,
            expires_at,
        })
    }

    /// The local user of an external subject, created on first sight.
    async fn external_user(
        &self,
        subject: &str,
        name: Option<String>,
        preferred_username: Option<String>,
    ) -> Result<UserRecord, ApiError> {
        match self.store.user_by_external_sub(subject).await {
            Ok(u) => return Ok(u),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
        let base = derive_username(preferred_username.as_deref().or(name.as_deref()), subject);
        let display = name.clone().unwrap_or_else(|| base.clone());
        for attempt in 0..20u32 {
            let username = if attempt == 0 {
                base.clone()
            } else {
                format!("{}-{}", &base[..base.len().min(27)], attempt + 1)
            };
            let res = self
                .store
                .create_user(NewUser {
                    id: new_id(),
                    username,
                    display_name: display.chars().take(MAX_DISPLAY_NAME_CHARS).collect(),
                    password_hash: None,
                    external_sub: Some(subject.to_owned()),
                    created_at: now_ms(),
                })
                .await;
            match res {
                Ok(u) => return Ok(u),
                // Either the username is taken (try the next) or a concurrent request created
                // this very subject (then it is found below).
                Err(StoreError::Conflict(_)) => {
                    if let Ok(u) = self.store.user_by_external_sub(subject).await {
                        return Ok(u);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::conflict(
            "could not find a free username for this account",
        ))
    }

    /// A new login (a new refresh-token family) for `user`.
    async fn issue_pair(
        &self,
        user: &UserRecord,
        family_id: String,
    ) -> Result<AuthResponse, ApiError> {
        let (refresh_token, hash) = new_refresh_token()?;
        let expires_at = now_ms() + self.config.refresh_ttl.as_millis() as i64;
        self.store
            .insert_refresh_token(&hash, &user.id, &family_id, expires_at, now_ms())
            .await?;
        Ok(self.response(user, refresh_token))
    }

    /// The response carrying a fresh access token and `refresh_token` (already stored).
    fn response(&self, user: &UserRecord, refresh_token: String) -> AuthResponse {
        let ttl = self.config.access_ttl.as_secs() as i64;
        let access_token = self
            .keys
            .issue(&user.id, &user.display_name, now_secs(), ttl);
        AuthResponse {
            user: User::new(user, false, true),
            access_token,
            refresh_token,
            expires_in: ttl as u64,
        }
    }
}

/// A random refresh token and the hash the store keeps of it.
fn new_refresh_token() -> Result<(String, String), ApiError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|_| ApiError::internal())?;
    let token = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw);
    let hash = token_hash(&token);
    Ok((token, hash))
}

fn validate_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() < 8 {
        return Err(ApiError::bad_request("password: at least 8 characters"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::bad_request("password: at most 1024 bytes"));
    }
    Ok(())
}

/// A valid username from an external name, falling back to a hash of the subject.
fn derive_username(hint: Option<&str>, subject: &str) -> String {
    let cleaned: String = hint
        .unwrap_or("")
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(28)
        .collect();
    if cleaned.len() >= 3 && validate_username(&cleaned).is_ok() {
        cleaned
    } else {
        format!("user-{}", &token_hash(subject)[..10])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        assert!(validate_username("alice").is_ok());
        assert!(validate_username("a.b-c_9").is_ok());
        assert!(validate_username("ab").is_err());
        assert!(validate_username("Alice").is_err());
        assert!(validate_username(&"a".repeat(33)).is_err());
    }

    #[test]
    fn derived_usernames_are_valid() {
        assert_eq!(derive_username(Some("Bob Smith"), "x"), "bob_smith");
        let fallback = derive_username(None, "iss|sub");
        assert!(validate_username(&fallback).is_ok(), "{fallback}");
        assert!(validate_username(&derive_username(Some("Ωμέγα"), "s")).is_ok());
    }
}
