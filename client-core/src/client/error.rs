//! What can go wrong, as types that callers branch on.

use alloc::string::String;
use core::fmt;

use crate::path::PathError;
use crate::timestamp::Timestamp;
use crate::wire::ErrorCode;

/// The code of a server refusal (`!code message`): one the protocol defines, or one this
/// version does not know (a newer server's). Treat an unknown code as a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerCode {
    /// A code of `docs/PROTOCOL.md`, section 6.4.
    Known(ErrorCode),
    /// Any other code, as written on the wire.
    Other(String),
}

impl ServerCode {
    /// The code for its wire form.
    pub fn from_wire(code: &str) -> ServerCode {
        match ErrorCode::from_wire(code) {
            Some(c) => ServerCode::Known(c),
            None => ServerCode::Other(code.into()),
        }
    }

    /// The code as written on the wire (`too-many-subscriptions`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            ServerCode::Known(c) => c.as_str(),
            ServerCode::Other(s) => s,
        }
    }
}

impl fmt::Display for ServerCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ServerCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ServerCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<ErrorCode> for ServerCode {
    fn eq(&self, other: &ErrorCode) -> bool {
        *self == ServerCode::Known(*other)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The path is invalid; nothing was sent. Fix the path.
    InvalidPath(PathError),
    /// The server refused the command (`!code message`); for a send, nothing was stored.
    Server {
        /// The error code: act on it, not on the message.
        code: ServerCode,
        /// The server's explanation (may change between versions).
        message: String,
    },
    /// The connection dropped after the request was sent and before its reply. A send gets
    /// this only when it could not be resent with its id (`docs/PROTOCOL.md` 5.9): it went
    /// plain (a server without send ids, or [`Config::idempotency_window`](super::Config::idempotency_window)
    /// 0), or the client ended ([`ClientError::Unauthorized`]'s state) while it awaited its
    /// resend; it may or may not have been stored (if it was, it is in the log and in the
    /// backfill). See [`ClientError::is_uncertain`]. A send with an id whose connection drops
    /// is resent on the next connection instead, and resolves once.
    ConnectionLost,
    /// Not connected, and the request cannot wait (timestamp), the offline queue is full or
    /// disabled (send), or a queued send found no connection within
    /// [`Config::request_timeout`](super::Config::request_timeout). Nothing was sent;
    /// retrying later is safe.
    NotConnected,
    /// No reply within [`Config::request_timeout`](super::Config::request_timeout): a
    /// timestamp request, or a plain send (see [`ClientError::ConnectionLost`]), which may or
    /// may not have been stored. See [`ClientError::is_uncertain`]. (A send with an id whose
    /// reply does not come in time is resent on a new connection instead.)
    Timeout,
    /// The send's ack was lost and the client could not resend it (with its id) within
    /// [`Config::idempotency_window`](super::Config::idempotency_window) of its first write:
    /// the server may have forgotten its id, so a resend could store it twice. It may or may
    /// not have been stored (if it was, it is in the log and in the backfill); see
    /// [`ClientError::is_uncertain`]. With ids, the only uncertain outcome of a send.
    WindowPassed,
    /// The client was closed.
    Closed,
    /// The send's command (`size` bytes, ack key included) would exceed the server's message
    /// size limit (`limit`, [`Config::max_message_size`](super::Config::max_message_size)), and
    /// the server would close the connection over it: nothing was sent, the connection is
    /// kept. Make the data smaller.
    TooLarge {
        /// The command's size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The client ended in [`ConnState::Unauthorized`](super::ConnState::Unauthorized): the
    /// server refused its token and no fresh one came ([`Client::unauthorized_reason`](super::Client::unauthorized_reason)
    /// says why). Nothing was sent; nothing more will be.
    Unauthorized,
}

impl ClientError {
    /// Whether a failed send may nevertheless have been stored. With send ids (every send,
    /// against a server that knows them, `docs/PROTOCOL.md` 5.9) only
    /// [`ClientError::WindowPassed`]: a lost ack is otherwise resent with the same id and
    /// resolves once. Without them (an older server, or
    /// [`Config::idempotency_window`](super::Config::idempotency_window) 0),
    /// [`ClientError::ConnectionLost`] and [`ClientError::Timeout`] too. If it was stored, it
    /// is in the log, and the subscriptions that match it deliver it; to avoid publishing it
    /// twice, look for it in the log before sending it again. For every other error, nothing
    /// was stored.
    pub fn is_uncertain(&self) -> bool {
        matches!(self, ClientError::ConnectionLost | ClientError::Timeout | ClientError::WindowPassed)
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::InvalidPath(e) => write!(f, "invalid path: {e}"),
            ClientError::Server { code, message } => write!(f, "server refused ({code}): {message}"),
            ClientError::ConnectionLost => f.write_str("connection lost before the reply; the event may or may not have been stored"),
            ClientError::NotConnected => f.write_str("not connected; nothing was sent"),
            ClientError::Timeout => f.write_str("no reply in time; the event may or may not have been stored"),
            ClientError::WindowPassed => f.write_str(
                "the ack was lost and the send could not be resent within the idempotency window; the event may or may not have been stored",
            ),
            ClientError::Closed => f.write_str("client closed"),
            ClientError::TooLarge { size, limit } => {
                write!(f, "message too large: the send is {size} bytes, the server's limit is {limit}; nothing was sent")
            }
            ClientError::Unauthorized => f.write_str("unauthorized: the server refused the token and no fresh one came; nothing was sent"),
        }
    }
}

impl core::error::Error for ClientError {}

/// A subscription's notice to the application besides its events, with the message every
/// driver shows for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionError {
    /// The server no longer has events this subscription delivered (it lost them); delivery
    /// continues after `last`. The subscription goes on.
    ContinuityLost {
        /// The last event delivered.
        last: Timestamp,
        /// The server's position.
        position: Timestamp,
    },
    /// The server refused the subscription (for example too many subscriptions); the
    /// subscription ended.
    Refused(ClientError),
    /// The server ended the subscription (`!subscription-ended`): the connection's refreshed
    /// token no longer covers its path. The subscription ended; the reason is the server's.
    Ended(String),
}

impl fmt::Display for SubscriptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubscriptionError::ContinuityLost { last, position } if position > last => write!(
                f,
                "continuity lost: events after the last one delivered ({last}) were deleted from the server's log, up to {position}"
            ),
            SubscriptionError::ContinuityLost { last, position } => {
                write!(f, "continuity lost: the server's history ends at {position}, before the last event delivered ({last})")
            }
            SubscriptionError::Refused(e) => write!(f, "subscription refused: {e}"),
            SubscriptionError::Ended(reason) => write!(f, "subscription ended by the server: {reason}"),
        }
    }
}

impl core::error::Error for SubscriptionError {}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;

    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn server_codes_known_and_unknown() {
        for c in ErrorCode::ALL {
            assert_eq!(ServerCode::from_wire(c.as_str()), ServerCode::Known(c));
            assert_eq!(ServerCode::from_wire(c.as_str()), c);
        }
        assert_eq!(ServerCode::from_wire("forbidden"), ServerCode::Known(ErrorCode::Forbidden));
        let other = ServerCode::from_wire("payment-required");
        assert_eq!(other, ServerCode::Other("payment-required".into()));
        assert_eq!(other, "payment-required");
        assert_eq!(other.to_string(), "payment-required");
        assert!(ServerCode::Known(ErrorCode::TooManySubscriptions) == *"too-many-subscriptions");
    }

    #[test]
    fn messages_and_uncertainty() {
        let refused = ClientError::Server { code: ServerCode::from_wire("rate-limited"), message: "slow down".into() };
        assert_eq!(refused.to_string(), "server refused (rate-limited): slow down");
        assert_eq!(ClientError::ConnectionLost.to_string(), "connection lost before the reply; the event may or may not have been stored");
        assert_eq!(ClientError::Timeout.to_string(), "no reply in time; the event may or may not have been stored");
        assert_eq!(ClientError::NotConnected.to_string(), "not connected; nothing was sent");
        let too_large = ClientError::TooLarge { size: 70_010, limit: 65_536 };
        assert_eq!(too_large.to_string(), "message too large: the send is 70010 bytes, the server's limit is 65536; nothing was sent");
        let uncertain: alloc::vec::Vec<bool> = [
            ClientError::InvalidPath(PathError::TrailingSlash),
            refused.clone(),
            ClientError::ConnectionLost,
            ClientError::NotConnected,
            ClientError::Timeout,
            ClientError::Closed,
            too_large,
            ClientError::WindowPassed,
        ]
        .iter()
        .map(ClientError::is_uncertain)
        .collect();
        assert_eq!(uncertain, [false, false, true, false, true, false, false, true]);
        assert!(ClientError::WindowPassed.to_string().contains("may or may not have been stored"));
        let t = |n| Timestamp::new(1_700_000_000, n).unwrap();
        assert_eq!(
            SubscriptionError::ContinuityLost { last: t(2), position: t(1) }.to_string(),
            "continuity lost: the server's history ends at 1700000000.000000001, before the last event delivered (1700000000.000000002)"
        );
        assert_eq!(SubscriptionError::Refused(refused).to_string(), "subscription refused: server refused (rate-limited): slow down");
    }
}
