//! JWT issue and verify, pure: the current time is an argument. Our own tokens are HS256 with
//! claims `sub`, `exp`, `iat`, `name`. An external issuer may be trusted too (HS256 secret or an
//! RS256/ES256 public key), with `iss` and (when configured) `aud` checked. The algorithm is
//! pinned per key: `none` and algorithm confusion (an HS256 token "signed" with a public key)
//! fail because each key accepts exactly one algorithm.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Seconds of clock skew tolerated on `exp`/`nbf` of external tokens (RFC 7519 §4.1.4-5 allow
/// "some small leeway"; ours are checked exactly: we minted them with this clock).
const EXTERNAL_LEEWAY_SECS: i64 = 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default)]
    pub iat: i64,
    /// Not before (RFC 7519 §4.1.5): we never set it, external issuers may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_username: Option<String>,
}

/// Who a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// One of our users, by id.
    Local { user_id: String, exp: i64 },
    /// A user of the trusted external issuer; mapped to a local user by `iss|sub`.
    External {
        subject: String,
        name: Option<String>,
        preferred_username: Option<String>,
        exp: i64,
    },
}

impl Identity {
    pub fn expires_at(&self) -> i64 {
        match self {
            Identity::Local { exp, .. } | Identity::External { exp, .. } => *exp,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token invalid: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot load the external issuer key: {0}")]
pub struct KeyError(String);

struct External {
    issuer: String,
    key: DecodingKey,
    validation: Validation,
}

/// Issues our tokens and verifies ours and the external issuer's.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    external: Option<External>,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` is checked by us against the `now` we are given.
        validation.validate_exp = false;
        validation.required_spec_claims = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            external: None,
        }
    }

    /// Trusts tokens of `issuer` signed with an HS256 shared secret.
    pub fn with_external_secret(mut self, issuer: &str, audience: &str, secret: &[u8]) -> Self {
        self.external = Some(External {
            issuer: issuer.to_owned(),
            key: DecodingKey::from_secret(secret),
            validation: external_validation(Algorithm::HS256, issuer, audience),
        });
        self
    }

    /// Trusts tokens of `issuer` signed with the key in `pem` (RSA → RS256, EC → ES256).
    pub fn with_external_pem(
        mut self,
        issuer: &str,
        audience: &str,
        pem: &[u8],
    ) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|e| KeyError(e.to_string()))?;
        let (key, alg) = if text.contains("BEGIN RSA PUBLIC KEY")
            || text.contains("BEGIN PUBLIC KEY") && DecodingKey::from_rsa_pem(pem).is_ok()
        {
            (
                DecodingKey::from_rsa_pem(pem).map_err(|e| KeyError(e.to_string()))?,
                Algorithm::RS256,
            )
        } else {
            (
                DecodingKey::from_ec_pem(pem).map_err(|e| KeyError(e.to_string()))?,
                Algorithm::ES256,
            )
        };
        self.external = Some(External {
            issuer: issuer.to_owned(),
            key,
            validation: external_validation(alg, issuer, audience),
        });
        Ok(self)
    }

    /// A signed access token for `user_id`.
    pub fn issue(&self, user_id: &str, name: &str, now: i64, ttl_secs: i64) -> String {
        let claims = Claims {
            sub: user_id.to_owned(),
            exp: now + ttl_secs,
            iat: now,
            nbf: None,
            name: Some(name.to_owned()),
            iss: None,
            preferred_username: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail")
    }

    /// Verifies a token at unix time `now` (seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, JwtError> {
        let own = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation);
        match own {
            Ok(data) if data.claims.iss.is_none() => {
                if data.claims.exp <= now {
                    return Err(JwtError::Expired);
                }
                if data.claims.nbf.is_some_and(|nbf| nbf > now) {
                    return Err(JwtError::NotYetValid);
                }
                return Ok(Identity::Local {
                    user_id: data.claims.sub,
                    exp: data.claims.exp,
                });
            }
            Ok(_) => {}
            Err(e) if self.external.is_none() => return Err(JwtError::Invalid(e.to_string())),
            Err(_) => {}
        }
        let ext = self
            .external
            .as_ref()
            .ok_or_else(|| JwtError::Invalid("unexpected issuer".into()))?;
        let data = jsonwebtoken::decode::<Claims>(token, &ext.key, &ext.validation)
            .map_err(|e| JwtError::Invalid(e.to_string()))?;
        let c = data.claims;
        if c.exp + EXTERNAL_LEEWAY_SECS <= now {
            return Err(JwtError::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf > now + EXTERNAL_LEEWAY_SECS) {
            return Err(JwtError::NotYetValid);
        }
        Ok(Identity::External {
            subject: format!("{}|{}", ext.issuer, c.sub),
            name: c.name,
            preferred_username: c.preferred_username,
            exp: c.exp,
        })
    }
}

fn external_validation(alg: Algorithm, issuer: &str, audience: &str) -> Validation {
    let mut v = Validation::new(alg);
    v.validate_exp = false;
    v.set_issuer(&[issuer]);
    let mut required = vec!["exp", "sub", "iss"];
    if audience.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&[audience]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const NOW: i64 = 1_764_000_000;

    #[test]
    fn round_trip_and_expiry() {
        let keys = JwtKeys::new(b"secret-secret-secret");
        let t = keys.issue("u1", "Alice", NOW, 900);
        assert_eq!(
            keys.verify(&t, NOW + 10),
            Ok(Identity::Local {
                user_id: "u1".into(),
                exp: NOW + 900
            })
        );
        assert_eq!(keys.verify(&t, NOW + 900), Err(JwtError::Expired));
    }

    #[test]
    fn wrong_secret_is_invalid() {
        let t = JwtKeys::new(b"one").issue("u1", "A", NOW, 900);
        assert!(matches!(
            JwtKeys::new(b"two").verify(&t, NOW),
            Err(JwtError::Invalid(_))
        ));
    }

    #[test]
    fn alg_none_is_rejected() {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(format!(r#"{{"sub":"u1","exp":{}}}"#, NOW + 100));
        let token = format!("{header}.{body}.");
        assert!(matches!(
            JwtKeys::new(b"k").verify(&token, NOW),
            Err(JwtError::Invalid(_))
        ));
    }

    #[test]
    fn external_hs256_needs_issuer_and_audience() {
        let keys = JwtKeys::new(b"ours").with_external_secret("https://idp", "chat", b"theirs");
        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"theirs"),
            )
            .unwrap()
        };
        let good = sign(
            serde_json::json!({"sub": "42", "exp": NOW + 60, "iss": "https://idp", "aud": "chat", "name": "Bob"}),
        );
        match keys.verify(&good, NOW).unwrap() {
            Identity::External { subject, name, .. } => {
                assert_eq!(subject, "https://idp|42");
                assert_eq!(name.as_deref(), Some("Bob"));
            }
            other => panic!("{other:?}"),
        }
        let wrong_aud = sign(
            serde_json::json!({"sub": "42", "exp": NOW + 60, "iss": "https://idp", "aud": "other"}),
        );
        assert!(keys.verify(&wrong_aud, NOW).is_err());
        let wrong_iss = sign(
            serde_json::json!({"sub": "42", "exp": NOW + 60, "iss": "https://evil", "aud": "chat"}),
        );
        assert!(keys.verify(&wrong_iss, NOW).is_err());
        // A token with an `iss` signed with our own secret is not a local token.
        let ours_with_iss = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1", "exp": NOW + 60, "iss": "https://idp"}),
            &EncodingKey::from_secret(b"ours"),
        )
        .unwrap();
        assert!(keys.verify(&ours_with_iss, NOW).is_err());
    }

    #[test]
    fn nbf_is_checked_with_the_leeway_of_exp() {
        let keys = JwtKeys::new(b"ours").with_external_secret("https://idp", "", b"theirs");
        let sign = |nbf: i64| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({"sub": "42", "exp": NOW + 600, "iss": "https://idp", "nbf": nbf}),
                &EncodingKey::from_secret(b"theirs"),
            )
            .unwrap()
        };
        assert_eq!(
            keys.verify(&sign(NOW + EXTERNAL_LEEWAY_SECS + 1), NOW),
            Err(JwtError::NotYetValid)
        );
        assert!(keys.verify(&sign(NOW + EXTERNAL_LEEWAY_SECS), NOW).is_ok());
        assert!(keys.verify(&sign(NOW - 100), NOW).is_ok());
        let ours = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "u1", "exp": NOW + 600, "nbf": NOW + 5}),
            &EncodingKey::from_secret(b"ours"),
        )
        .unwrap();
        assert_eq!(keys.verify(&ours, NOW), Err(JwtError::NotYetValid));
        assert!(keys.verify(&ours, NOW + 5).is_ok());
    }
}
