//! The WebSocket close codes the server sends, with their reason texts.
//!
//! Owns the one list of codes (docs/ops/security.md, "Close codes and refusals"): each variant carries the numeric
//! code and the reason sent on the wire, both fixed, and the label counted in
//! `connections_closed`. Must not change a code or a text: clients and tests match
//! them.

use std::fmt;

/// Why the server closes a socket; one variant per documented close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client closed; the server answers in kind.
    ClientClosed,
    /// 1001: graceful shutdown (deploy, restart); resume with `since` elsewhere.
    ServerShutdown,
    /// 1002: a WebSocket protocol violation.
    ProtocolError,
    /// 1007: a text frame that is not UTF-8.
    InvalidUtf8,
    /// 1008: sustained rate-limit abuse (messages or frames).
    RateLimited,
    /// 1009: a frame or message over `limits.max_frame_bytes`.
    MessageTooBig,
    /// 4001: the token expired and no `auth` refresh came in time.
    TokenExpired,
    /// 4003: the user was revoked (`citapulse.revoke`); a new token is refused too.
    Revoked,
    /// 4008: the client's event queue overflowed; reconnect and resume.
    SlowConsumer,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::ClientClosed => 1000,
            Self::ServerShutdown => 1001,
            Self::ProtocolError => 1002,
            Self::InvalidUtf8 => 1007,
            Self::RateLimited => 1008,
            Self::MessageTooBig => 1009,
            Self::TokenExpired => 4001,
            Self::Revoked => 4003,
            Self::SlowConsumer => 4008,
        }
    }

    /// The reason text sent in the close frame.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::ClientClosed => "",
            Self::ServerShutdown => "server shutting down; reconnect and resume with since",
            Self::ProtocolError => "protocol error",
            Self::InvalidUtf8 => "text frames must be UTF-8",
            Self::RateLimited => "rate limit exceeded",
            Self::MessageTooBig => "message too big",
            Self::TokenExpired => "token expired",
            Self::Revoked => "revoked",
            Self::SlowConsumer => "slow consumer: reconnect and resume with since",
        }
    }

    /// The `reason` label of `connections_closed` and of the close log line.
    pub const fn label(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ServerShutdown => "server_shutdown",
            Self::ProtocolError => "protocol_error",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::RateLimited => "policy_violation",
            Self::MessageTooBig => "message_too_big",
            Self::TokenExpired => "token_expired",
            Self::Revoked => "revoked",
            Self::SlowConsumer => "slow_consumer",
        }
    }

    /// Every code, for tests and documentation checks.
    pub const ALL: [CloseCode; 9] = [
        Self::ClientClosed,
        Self::ServerShutdown,
        Self::ProtocolError,
        Self::InvalidUtf8,
        Self::RateLimited,
        Self::MessageTooBig,
        Self::TokenExpired,
        Self::Revoked,
        Self::SlowConsumer,
    ];
}

/// `4008 slow consumer: …`, as a log line would show it.
impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.reason())
    }
}

/// The close code for the WebSocket library.
impl From<CloseCode> for hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode {
    fn from(code: CloseCode) -> Self {
        Self::from(code.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_reasons_are_the_documented_ones() {
        let wire: Vec<(u16, &str, &str)> = CloseCode::ALL
            .iter()
            .map(|c| (c.code(), c.reason(), c.label()))
            .collect();
        assert_eq!(
            wire,
            vec![
                (1000, "", "client_closed"),
                (
                    1001,
                    "server shutting down; reconnect and resume with since",
                    "server_shutdown"
                ),
                (1002, "protocol error", "protocol_error"),
                (1007, "text frames must be UTF-8", "invalid_utf8"),
                (1008, "rate limit exceeded", "policy_violation"),
                (1009, "message too big", "message_too_big"),
                (4001, "token expired", "token_expired"),
                (4003, "revoked", "revoked"),
                (
                    4008,
                    "slow consumer: reconnect and resume with since",
                    "slow_consumer"
                ),
            ]
        );
    }

    #[test]
    fn every_code_is_in_the_security_docs() {
        let docs = include_str!("../../docs/ops/security.md");
        for code in CloseCode::ALL {
            assert!(
                docs.contains(&format!("| {} |", code.code())),
                "docs/ops/security.md lists {code}"
            );
        }
    }

    #[test]
    fn converts_to_the_library_code() {
        use hyper_tungstenite::tungstenite::protocol::frame::coding::CloseCode as Lib;
        assert_eq!(u16::from(Lib::from(CloseCode::TokenExpired)), 4001);
        assert_eq!(Lib::from(CloseCode::ServerShutdown), Lib::Away);
        assert_eq!(Lib::from(CloseCode::RateLimited), Lib::Policy);
    }
}
