//! Long-term credentials of the TURN REST scheme, pure: stateless nonces bound to the client's
//! transport address, and the check of a request's USERNAME/REALM/NONCE/MESSAGE-INTEGRITY against
//! the current and the previous secret (RFC 8489 §9.2).
//!
//! A nonce is `base64url(issued || mac)`, `issued` the unix second it was minted (4 bytes) and
//! `mac` the first 8 bytes of HMAC-SHA1(key, issued || transport || client address). The server
//! keeps nothing per nonce or per client: any number of challenges costs no memory, and a nonce
//! taken to another address (or replayed after [`NONCE_TTL_SECS`]) is stale.

use std::net::SocketAddr;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::integrity::MessageIntegrity;
use stun::message::Message;
use stun::textattrs::TextAttribute;

use crate::auth::turn_rest;

/// How long a nonce is accepted (then 438 with a fresh one).
pub const NONCE_TTL_SECS: i64 = 3600;
/// A nonce from the future by more than this is refused (clock steps).
const NONCE_SKEW_SECS: i64 = 60;
/// Longest USERNAME, REALM and NONCE values read (RFC 8489 §14: fewer than 509/763 bytes).
const MAX_TEXT: usize = 763;

/// The current and the previous TURN secret (rotation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secrets {
    pub current: String,
    pub previous: Option<String>,
}

/// Mints and checks nonces with a per-process key.
#[derive(Clone)]
pub struct Nonces {
    key: [u8; 32],
}

fn mac(key: &[u8], issued: [u8; 4], transport: u8, client: SocketAddr) -> [u8; 8] {
    let mut m = Hmac::<Sha1>::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(&issued);
    m.update(&[transport]);
    match client {
        SocketAddr::V4(a) => {
            m.update(&a.ip().octets());
            m.update(&a.port().to_be_bytes());
        }
        SocketAddr::V6(a) => {
            m.update(&a.ip().octets());
            m.update(&a.port().to_be_bytes());
        }
    }
    let full = m.finalize().into_bytes();
    let mut out = [0u8; 8];
    out.copy_from_slice(&full[..8]);
    out
}

impl Nonces {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// A nonce for `client` (over `transport`, a small tag) at unix second `now`.
    pub fn mint(&self, transport: u8, client: SocketAddr, now: i64) -> String {
        let issued = (now as u32).to_be_bytes();
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&issued);
        raw[4..].copy_from_slice(&mac(&self.key, issued, transport, client));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Whether `nonce` was minted by us for this client and is still fresh at `now`.
    pub fn accepts(&self, nonce: &str, transport: u8, client: SocketAddr, now: i64) -> bool {
        let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(nonce) else {
            return false;
        };
        if raw.len() != 12 {
            return false;
        }
        let issued: [u8; 4] = raw[..4].try_into().expect("4 bytes");
        let expected = mac(&self.key, issued, transport, client);
        // Constant time: the comparison must not tell how much of a forged MAC was right.
        let same = raw[4..]
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
        let age = now - u32::from_be_bytes(issued) as i64;
        same && age < NONCE_TTL_SECS && age > -NONCE_SKEW_SECS
    }
}

/// Why a request's credentials were not accepted, in RFC 8489 §9.2.4 order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No MESSAGE-INTEGRITY: 401 with a challenge.
    Challenge,
    /// MESSAGE-INTEGRITY without USERNAME, REALM or NONCE: 400.
    Incomplete,
    /// A nonce we did not mint for this client, or an old one: 438 with a fresh one.
    StaleNonce,
    /// Wrong realm, a username not of the REST form, or a bad signature: 401.
    BadCredentials(&'static str),
}

/// A request whose MESSAGE-INTEGRITY checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub username: String,
    /// The user id part of the username.
    pub user: String,
    /// Unix second the credential expires.
    pub expiry: i64,
    /// The long-term key (MD5 of `username:realm:password`), for signing the response.
    pub key: Vec<u8>,
}

fn text(m: &Message, attr: stun::attributes::AttrType) -> Option<String> {
    let raw = m.get(attr).ok()?;
    if raw.len() > MAX_TEXT {
        return None;
    }
    let mut t = TextAttribute::new(attr, String::new());
    use stun::message::Getter;
    t.get_from(m).ok().map(|_| t.text)
}

/// Checks the long-term credential of `m` from `client` at unix second `now`.
pub fn verify(
    m: &Message,
    realm: &str,
    secrets: &Secrets,
    nonces: &Nonces,
    transport: u8,
    client: SocketAddr,
    now: i64,
) -> Result<Verified, Refused> {
    if !m.contains(stun::attributes::ATTR_MESSAGE_INTEGRITY) {
        return Err(Refused::Challenge);
    }
    let (Some(username), Some(req_realm), Some(nonce)) = (
        text(m, ATTR_USERNAME),
        text(m, ATTR_REALM),
        text(m, ATTR_NONCE),
    ) else {
        return Err(Refused::Incomplete);
    };
    if !nonces.accepts(&nonce, transport, client, now) {
        return Err(Refused::StaleNonce);
    }
    if req_realm != realm {
        return Err(Refused::BadCredentials("wrong realm"));
    }
    let Some((expiry, user)) = turn_rest::parse_username(&username) else {
        return Err(Refused::BadCredentials("username is not <expiry>:<user>"));
    };
    let user = user.to_owned();
    let key = std::iter::once(secrets.current.as_str())
        .chain(secrets.previous.as_deref())
        .find_map(|secret| {
            let mi = MessageIntegrity::new_long_term_integrity(
                username.clone(),
                realm.to_owned(),
                turn_rest::password(secret, &username),
            );
            // `check` adjusts the length field while it hashes; it works on a copy.
            mi.check(&mut m.clone()).is_ok().then_some(mi.0)
        })
        .ok_or(Refused::BadCredentials("bad credential"))?;
    Ok(Verified {
        username,
        user,
        expiry,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_bound_to_the_client_and_expire() {
        let n = Nonces::new([9; 32]);
        let a: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        let b: SocketAddr = "198.51.100.1:5001".parse().unwrap();
        let nonce = n.mint(0, a, 1_000_000);
        assert_eq!(nonce.len(), 16, "short: unauthenticated answers stay small");
        assert!(n.accepts(&nonce, 0, a, 1_000_000));
        assert!(n.accepts(&nonce, 0, a, 1_000_000 + NONCE_TTL_SECS - 1));
        assert!(!n.accepts(&nonce, 0, a, 1_000_000 + NONCE_TTL_SECS));
        assert!(!n.accepts(&nonce, 0, b, 1_000_000), "another port");
        assert!(!n.accepts(&nonce, 1, a, 1_000_000), "another transport");
        assert!(
            !Nonces::new([8; 32]).accepts(&nonce, 0, a, 1_000_000),
            "another key"
        );
        assert!(!n.accepts("garbage!", 0, a, 1_000_000));
        let mut forged = nonce.into_bytes();
        forged[15] = if forged[15] == b'A' { b'B' } else { b'A' };
        assert!(!n.accepts(std::str::from_utf8(&forged).unwrap(), 0, a, 1_000_000));
    }
}
