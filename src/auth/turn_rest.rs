//! TURN REST API credentials (coturn `use-auth-secret`), pure: minted for browsers by the REST
//! API and checked by the embedded TURN server, so the two cannot drift.
//!
//! `username = "<unix expiry>:<userId>"`, `password = base64(HMAC-SHA1(secret, username))`.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredential {
    pub username: String,
    pub password: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// The password for `username` under `secret`.
pub fn password(secret: &str, username: &str) -> String {
    let mut mac =
        Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// A credential for `user_id` valid until `now + ttl` (seconds).
pub fn mint(secret: &str, user_id: &str, now: i64, ttl: i64) -> TurnCredential {
    let expires_at = now + ttl;
    let username = format!("{expires_at}:{user_id}");
    TurnCredential {
        password: password(secret, &username),
        username,
        expires_at,
    }
}

/// `(expiry, user id)` of a REST username; `None` if it is not of that form.
pub fn parse_username(username: &str) -> Option<(i64, &str)> {
    let (expiry, user) = username.split_once(':')?;
    let expiry: i64 = expiry.parse().ok()?;
    (!user.is_empty()).then_some((expiry, user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_coturn_scheme() {
        // Fixed vector: base64(HMAC-SHA1("north", "1764000000:alice")), computed independently
        // with `printf %s 1764000000:alice | openssl dgst -sha1 -hmac north -binary | base64`.
        assert_eq!(
            password("north", "1764000000:alice"),
            "9LAwaPnprPABVShse3H8XaVS8kE="
        );
        let c = mint("north", "alice", 1_763_913_600, 86_400);
        assert_eq!(c.username, "1764000000:alice");
        assert_eq!(c.password, "9LAwaPnprPABVShse3H8XaVS8kE=");
        assert_eq!(c.expires_at, 1_764_000_000);
    }

    #[test]
    fn parses_usernames() {
        assert_eq!(
            parse_username("1764000000:0192f3c4-aa"),
            Some((1_764_000_000, "0192f3c4-aa"))
        );
        assert_eq!(
            parse_username("1764000000:a:b"),
            Some((1_764_000_000, "a:b"))
        );
        assert_eq!(parse_username("1764000000"), None);
        assert_eq!(parse_username("soon:alice"), None);
        assert_eq!(parse_username("1764000000:"), None);
    }
}
