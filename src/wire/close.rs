//! Close codes (RFC 6455 §7.4.1 and PROTOCOL §2's application range) with what the client should
//! do after each: the code is how a server tells a client whether to come back.

/// What a client should do after a close with a given code (PROTOCOL §2's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconnect {
    /// Stay closed (the client asked for it, or it must be fixed first).
    No,
    /// Reconnect at once.
    Now,
    /// Reconnect with backoff (the server is restarting, or the client was too fast or slow).
    WithBackoff,
    /// Refresh the token first; never loop on the same token.
    AfterRefresh,
}

/// A close code with its reason text and reconnect class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode {
    pub code: u16,
    pub reason: &'static str,
    pub reconnect: Reconnect,
}

impl CloseCode {
    const fn new(code: u16, reason: &'static str, reconnect: Reconnect) -> Self {
        Self {
            code,
            reason,
            reconnect,
        }
    }

    /// Same code and class, another reason text.
    pub const fn because(self, reason: &'static str) -> Self {
        Self { reason, ..self }
    }
}

pub const NORMAL: CloseCode = CloseCode::new(1000, "normal close", Reconnect::No);
pub const GOING_AWAY: CloseCode = CloseCode::new(1001, "server going away", Reconnect::WithBackoff);
pub const TOO_LARGE: CloseCode = CloseCode::new(1009, "frame too large", Reconnect::No);
pub const RESTARTING: CloseCode = CloseCode::new(1012, "server restarting", Reconnect::WithBackoff);
pub const UNAUTHORIZED: CloseCode = CloseCode::new(4401, "unauthorized", Reconnect::AfterRefresh);
pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode::new(4408, "heartbeat timeout", Reconnect::Now);
pub const TOO_SLOW: CloseCode = CloseCode::new(4429, "send queue overflow", Reconnect::WithBackoff);

/// Every code this server sends.
pub const ALL: &[CloseCode] = &[
    NORMAL,
    GOING_AWAY,
    TOO_LARGE,
    RESTARTING,
    UNAUTHORIZED,
    HEARTBEAT_TIMEOUT,
    TOO_SLOW,
];

/// The class of a code a client received (unknown codes: reconnect with backoff).
pub fn reconnect_class(code: u16) -> Reconnect {
    ALL.iter()
        .find(|c| c.code == code)
        .map_or(Reconnect::WithBackoff, |c| c.reconnect)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_of_the_protocol() {
        let table: Vec<(u16, Reconnect)> = ALL.iter().map(|c| (c.code, c.reconnect)).collect();
        assert_eq!(
            table,
            [
                (1000, Reconnect::No),
                (1001, Reconnect::WithBackoff),
                (1009, Reconnect::No),
                (1012, Reconnect::WithBackoff),
                (4401, Reconnect::AfterRefresh),
                (4408, Reconnect::Now),
                (4429, Reconnect::WithBackoff),
            ]
        );
        assert_eq!(reconnect_class(4401), Reconnect::AfterRefresh);
        assert_eq!(reconnect_class(4999), Reconnect::WithBackoff);
        assert_eq!(TOO_SLOW.because("rate limited").code, 4429);
    }
}
