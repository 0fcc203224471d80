//! The wire codec: commands (client to server) and lines (server to client).
//!
//! One command per WebSocket text message, one line per text message back. The grammar,
//! extensions over the original marked, is specified in `docs/PROTOCOL.md`:
//!
//! ```text
//! command = [ "#" ack-key "#" ] ( "+" path | "-" path | ":" path ":" data | "@" ignored
//!                                 | "&" token                ; "&": token refresh (extension)
//!                                 | "~+" path | "~?" path )  ; presence watch / query (extension)
//!                                 | "*" id ":" path ":" data ) ; "*": send with an id (extension)
//! line    = "@" timestamp ":" path ":" escaped-data     ; an event (also a log line)
//!         | "@" timestamp "~" sender ":" path ":" escaped-data   ; with `ext=sender` (extension)
//!         | "#" ack-key "#@" timestamp                  ; success reply to an acked command
//!         | [ "#" ack-key "#" ] "!" code " " message    ; error reply (extension)
//!         | "^" ( "=" | "." | "~" ) path ":" json       ; presence line (extension, after `~`;
//!                                                       ; payloads: `crate::presence`)
//! ```

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

use alloc::string::String;

use crate::escape::{UnescapeError, escape_into, escape_sub_into, escaped_len, unescape, unescape_sub};
use crate::path::{self, PathError};
use crate::presence::{PresenceError, PresenceLine, parse_presence};
use crate::timestamp::{Timestamp, TimestampError};

/// The WebSocket subprotocol: a client offers it in `Sec-WebSocket-Protocol`, and the server
/// echoes it when offered (`docs/PROTOCOL.md`, section 2.1).
pub const SUBPROTOCOL: &str = "ivy1";

/// The close codes the server ends a connection with (`docs/PROTOCOL.md`, section 7).
///
/// For every code but [`GOING_AWAY`](close_code::GOING_AWAY) the connection stops at once and
/// the lines still queued for it are discarded; a client reconnects and resumes from its
/// cursor in every case.
pub mod close_code {
    /// 1001: the server is shutting down; it wrote the lines already queued first (within 5
    /// seconds).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the client broke the WebSocket protocol (for example an unmasked frame or a bad
    /// opcode).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a text frame was not valid UTF-8.
    pub const INVALID_UTF8: u16 = 1007;
    /// 1009: a message or frame exceeded the server's `--max-message-size`.
    pub const TOO_BIG: u16 = 1009;
    /// 4000 (extension): slow consumer. The client did not read fast enough: it stayed behind
    /// (its events read from the log since its queue overflowed) for a whole ping interval, or
    /// left its replies unread that long.
    pub const SLOW_CONSUMER: u16 = 4000;
    /// 4001 (extension): ping timeout. Nothing, not even a pong, arrived for a whole ping
    /// interval after a ping: the peer is gone or the connection is half-open.
    pub const PING_TIMEOUT: u16 = 4001;
    /// 4003 (extension): token expired. The connection's token passed its `exp` and the
    /// server's `--auth-refresh-grace` without being refreshed in-band (`&JWT`,
    /// [`Op::Refresh`](super::Op::Refresh)); reconnect with a fresh token.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// 4004 (extension): disconnected by an administrator (`POST /admin/disconnect`). A
    /// client may reconnect (with backoff); an operator who wants it gone for good revokes
    /// its token too.
    pub const DISCONNECTED: u16 = 4004;
    /// 1013 (try again later; a standard code, used by an extension): a node of several (on
    /// Redis) could not take a subscribe or presence watch, because it cannot reach the event
    /// store or is behind it; reconnect (with backoff), perhaps to another node.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// What a command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op<'a> {
    /// `+path`: receive the events of this channel and its descendants.
    Subscribe(Cow<'a, str>),
    /// `-path`: stop receiving them.
    Unsubscribe(Cow<'a, str>),
    /// `:path:data`: publish `data` (raw bytes, never unescaped) on `path`; with an id,
    /// `*ID:path:data` (extension, `docs/PROTOCOL.md` 5.9): an idempotent send, stored at most
    /// once per sender and id within the server's idempotency window.
    Send {
        /// Normalized channel path.
        path: Cow<'a, str>,
        /// Raw event data.
        data: &'a [u8],
        /// The send's id (`*ID:...`, checked by [`is_valid_send_id`]); `None` for `:path:data`.
        id: Option<&'a [u8]>,
    },
    /// `@`: the server's current timestamp.
    Timestamp,
    /// `&token` (extension): replace the connection's token with this one (raw bytes, the
    /// rest of the command; a JWT is ASCII). See `docs/PROTOCOL.md`, section 5.
    Refresh(&'a [u8]),
    /// `~+path` (extension): subscribe to `path` exactly as `+path` does, and watch its
    /// presence: a snapshot (`^=` lines, then `^.`), then its changes (`^~` lines). See
    /// `docs/PROTOCOL.md`, section 5.10.
    PresenceWatch(Cow<'a, str>),
    /// `~?path` (extension): the presence of `path` once (`^=` lines, then `^.`), no
    /// subscription. See `docs/PROTOCOL.md`, section 5.10.
    PresenceQuery(Cow<'a, str>),
}

/// Most bytes of a send id (`*ID:path:data`, `docs/PROTOCOL.md` 5.9).
pub const MAX_SEND_ID_BYTES: usize = 64;

/// Whether `id` is a valid send id: 1 to [`MAX_SEND_ID_BYTES`] bytes, each of `A-Z a-z 0-9 . _
/// ~ -` (the URL-safe characters, so an id goes in an HTTP header or a URL unchanged).
pub fn is_valid_send_id(id: &[u8]) -> bool {
    (1..=MAX_SEND_ID_BYTES).contains(&id.len()) && id.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

/// A parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command<'a> {
    /// The ack key (`#key#` prefix), raw; `Some(b"")` for `##`.
    pub ack: Option<&'a [u8]>,
    /// The operation.
    pub op: Op<'a>,
}

/// Machine-readable error codes of error lines (`!code message`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The command could not be parsed.
    Malformed,
    /// The path has a character outside `[0-9a-z./-]` or a trailing `//`.
    BadPath,
    /// The path exceeds the server's length limit.
    PathTooLong,
    /// The connection already holds the maximum number of subscriptions.
    TooManySubscriptions,
    /// A frame type the protocol does not use (binary).
    Unsupported,
    /// The connection sends commands faster than the server's rate limit.
    RateLimited,
    /// The event could not be stored; it was not published.
    Storage,
    /// The server is shutting down and accepts no more events.
    ShuttingDown,
    /// The store is full (its size limit, or the free-space reserve of its disk): the event was
    /// not stored.
    StoreFull,
    /// The command needs a grant the connection's token (or, without one, the server's
    /// anonymous grants) does not give: reading (subscribing to) or sending to that path. It
    /// was not executed; the connection stays open.
    Forbidden,
    /// The server holds its whole memory budget for its clients: the send was not stored;
    /// retry later.
    Overloaded,
    /// A token presented in-band (`&JWT`) was refused: malformed, badly signed, expired,
    /// failing `iss`/`aud`, or of another `sub` than the connection's. The connection keeps
    /// its previous token and stays open.
    Unauthorized,
    /// A subscription was ended by the server (no ack key; the message starts with the
    /// normalized path): after an in-band token refresh, the new token no longer covers it.
    SubscriptionEnded,
}

impl ErrorCode {
    /// All codes.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Malformed,
        ErrorCode::BadPath,
        ErrorCode::PathTooLong,
        ErrorCode::TooManySubscriptions,
        ErrorCode::Unsupported,
        ErrorCode::RateLimited,
        ErrorCode::Storage,
        ErrorCode::ShuttingDown,
        ErrorCode::StoreFull,
        ErrorCode::Forbidden,
        ErrorCode::Overloaded,
        ErrorCode::Unauthorized,
        ErrorCode::SubscriptionEnded,
    ];

    /// The code as written on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::BadPath => "bad-path",
            ErrorCode::PathTooLong => "path-too-long",
            ErrorCode::TooManySubscriptions => "too-many-subscriptions",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::Storage => "storage",
            ErrorCode::ShuttingDown => "shutting-down",
            ErrorCode::StoreFull => "store-full",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::SubscriptionEnded => "subscription-ended",
        }
    }

    /// The code for a wire string, if known.
    pub fn from_wire(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandErrorKind {
    /// Nothing after the (optional) ack key.
    Empty,
    /// `#` with no closing `#`.
    UnterminatedAck,
    /// The first byte is not one of `+ - : @`.
    UnknownCommand(u8),
    /// `:path` with no `:` before the data.
    MissingData,
    /// `~` followed by something else than `+` or `?` (the byte, if any).
    UnknownPresence(Option<u8>),
    /// `*ID:...` whose id is empty, longer than [`MAX_SEND_ID_BYTES`] or has a character
    /// outside `A-Z a-z 0-9 . _ ~ -` (or no `:` after it).
    BadSendId,
    /// The path is invalid.
    Path(PathError),
}

impl CommandErrorKind {
    /// The error code this refusal is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            CommandErrorKind::Path(PathError::TooLong { .. } | PathError::TooDeep { .. }) => ErrorCode::PathTooLong,
            CommandErrorKind::Path(_) => ErrorCode::BadPath,
            _ => ErrorCode::Malformed,
        }
    }
}

impl fmt::Display for CommandErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandErrorKind::Empty => f.write_str("empty command"),
            CommandErrorKind::UnterminatedAck => f.write_str("ack key has no closing '#'"),
            CommandErrorKind::UnknownCommand(b) if b.is_ascii_graphic() => {
                write!(f, "unknown command '{}' (expected one of + - : @)", *b as char)
            }
            CommandErrorKind::UnknownCommand(b) => write!(f, "unknown command byte 0x{b:02x} (expected one of + - : @)"),
            CommandErrorKind::MissingData => f.write_str("send needs ':' between path and data (:/path:data)"),
            CommandErrorKind::UnknownPresence(_) => f.write_str("unknown presence command (expected ~+path or ~?path)"),
            CommandErrorKind::BadSendId => {
                f.write_str("a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; the command was not executed")
            }
            CommandErrorKind::Path(e) => e.fmt(f),
        }
    }
}

/// A refused command, with the ack key when one could be read, so that the reply can carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError<'a> {
    /// The ack key, if the command had a complete one.
    pub ack: Option<&'a [u8]>,
    /// What is wrong.
    pub kind: CommandErrorKind,
}

impl fmt::Display for CommandError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl core::error::Error for CommandError<'_> {}

impl<'a> Command<'a> {
    /// Parses one command message with no path length limit.
    pub fn parse(msg: &'a [u8]) -> Result<Command<'a>, CommandError<'a>> {
        Command::parse_with_limit(msg, usize::MAX)
    }

    /// Parses one command message; normalized paths longer than `max_path` are refused.
    pub fn parse_with_limit(msg: &'a [u8], max_path: usize) -> Result<Command<'a>, CommandError<'a>> {
        let (ack, body) = match msg.first() {
            Some(b'#') => {
                let rest = &msg[1..];
                let end =
                    rest.iter().position(|&b| b == b'#').ok_or(CommandError { ack: None, kind: CommandErrorKind::UnterminatedAck })?;
                (Some(&rest[..end]), &rest[end + 1..])
            }
            _ => (None, msg),
        };
        let err = |kind| CommandError { ack, kind };
        let Some((&cmd, rest)) = body.split_first() else {
            return Err(err(CommandErrorKind::Empty));
        };
        let path = |raw: &'a [u8]| path::normalize_with_limit(raw, max_path).map_err(|e| err(CommandErrorKind::Path(e)));
        let op = match cmd {
            b'+' => Op::Subscribe(path(rest)?),
            b'-' => Op::Unsubscribe(path(rest)?),
            b':' => {
                let colon = rest.iter().position(|&b| b == b':').ok_or_else(|| err(CommandErrorKind::MissingData))?;
                Op::Send { path: path(&rest[..colon])?, data: &rest[colon + 1..], id: None }
            }
            b'*' => {
                // The id runs to the first ':'; then exactly as a send.
                let end = rest.iter().position(|&b| b == b':').ok_or_else(|| err(CommandErrorKind::BadSendId))?;
                let id = &rest[..end];
                if !is_valid_send_id(id) {
                    return Err(err(CommandErrorKind::BadSendId));
                }
                let rest = &rest[end + 1..];
                let colon = rest.iter().position(|&b| b == b':').ok_or_else(|| err(CommandErrorKind::MissingData))?;
                Op::Send { path: path(&rest[..colon])?, data: &rest[colon + 1..], id: Some(id) }
            }
            b'@' => Op::Timestamp,
            b'&' => Op::Refresh(rest),
            b'~' => match rest.split_first() {
                Some((b'+', p)) => Op::PresenceWatch(path(p)?),
                Some((b'?', p)) => Op::PresenceQuery(path(p)?),
                other => return Err(err(CommandErrorKind::UnknownPresence(other.map(|(b, _)| *b)))),
            },
            other => return Err(err(CommandErrorKind::UnknownCommand(other))),
        };
        Ok(Command { ack, op })
    }

    /// Appends the command's wire form to `out`. The ack key must not contain `#`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Some(key) = self.ack {
            debug_assert!(!key.contains(&b'#'), "ack keys cannot contain '#'");
            out.push(b'#');
            out.extend_from_slice(key);
            out.push(b'#');
        }
        match &self.op {
            Op::Subscribe(p) => {
                out.push(b'+');
                out.extend_from_slice(p.as_bytes());
            }
            Op::Unsubscribe(p) => {
                out.push(b'-');
                out.extend_from_slice(p.as_bytes());
            }
            Op::Send { path, data, id } => {
                if let Some(id) = id {
                    debug_assert!(is_valid_send_id(id), "invalid send id");
                    out.push(b'*');
                    out.extend_from_slice(id);
                }
                out.push(b':');
                out.extend_from_slice(path.as_bytes());
                out.push(b':');
                out.extend_from_slice(data);
            }
            Op::Timestamp => out.push(b'@'),
            Op::Refresh(token) => {
                out.push(b'&');
                out.extend_from_slice(token);
            }
            Op::PresenceWatch(p) => {
                out.extend_from_slice(b"~+");
                out.extend_from_slice(p.as_bytes());
            }
            Op::PresenceQuery(p) => {
                out.extend_from_slice(b"~?");
                out.extend_from_slice(p.as_bytes());
            }
        }
    }

    /// The wire form as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

/// An event as delivered live and as stored in the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Event<'a> {
    /// The event's unique timestamp.
    pub ts: Timestamp,
    /// The normalized path it was sent to.
    pub path: Cow<'a, str>,
    /// The data, unescaped.
    pub data: Cow<'a, [u8]>,
    /// Who sent it, as the server verified it: only in the extended line (**Extension**
    /// `ext=sender`, `docs/PROTOCOL.md` 6.1.1); `None` in an original line.
    pub sender: Option<Sender>,
}

/// The longest `sub` a token may have, in bytes: the server refuses a longer one.
pub const MAX_SUB_BYTES: usize = 256;

/// Who sent an event, as the server verified it (**Extension** `ext=sender`, `docs/PROTOCOL.md`
/// 6.1.1). Its wire form follows the `~` of the extended event line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sender {
    /// `=sub`: a connection with a verified token, whose `sub` this is.
    User(String),
    /// `-`: a connection without a token (every connection when the server's auth is off).
    Anonymous,
    /// `*`: the application embedding the server (`Ivy::publish`).
    Application,
    /// `?`: unknown: stored before the server recorded senders.
    Unknown,
}

impl Sender {
    /// Appends the wire form (`=escaped-sub`, `-`, `*` or `?`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Sender::User(sub) => {
                out.push(b'=');
                escape_sub_into(sub.as_bytes(), out);
            }
            Sender::Anonymous => out.push(b'-'),
            Sender::Application => out.push(b'*'),
            Sender::Unknown => out.push(b'?'),
        }
    }

    /// Length of the wire form.
    pub fn wire_len(&self) -> usize {
        match self {
            Sender::User(sub) => 1 + crate::escape::escaped_sub_len(sub.as_bytes()),
            _ => 1,
        }
    }

    /// The wire form as bytes.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Parses the wire form.
    pub fn parse(wire: &[u8]) -> Result<Sender, LineError> {
        match wire {
            b"-" => Ok(Sender::Anonymous),
            b"*" => Ok(Sender::Application),
            b"?" => Ok(Sender::Unknown),
            [b'=', sub @ ..] if !sub.is_empty() => {
                let raw = unescape_sub(sub).map_err(LineError::Escape)?;
                String::from_utf8(raw.into_owned()).map(Sender::User).map_err(|_| LineError::Syntax("event sender is not UTF-8"))
            }
            _ => Err(LineError::Syntax("event sender must be '=sub', '-', '*' or '?'")),
        }
    }
}

impl Event<'_> {
    /// Length of the encoded line (the extended one when the event has a sender).
    pub fn encoded_len(&self) -> usize {
        event_line_len(self.ts, &self.path, &self.data) + self.sender.as_ref().map_or(0, |s| 1 + s.wire_len())
    }

    /// Appends `@ts:/path:escaped-data` to `out`, or the extended line
    /// `@ts~sender:/path:escaped-data` when the event has a sender.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match &self.sender {
            None => encode_event(self.ts, &self.path, &self.data, out),
            Some(sender) => {
                let mut wire = Vec::new();
                sender.encode(&mut wire);
                encode_event_from(self.ts, &wire, &self.path, &self.data, out);
            }
        }
    }

    /// Who sent it, when the line said (`ext=sender`): see [`Event::sender`](Event#structfield.sender).
    pub fn sender(&self) -> Option<&Sender> {
        self.sender.as_ref()
    }

    /// An owned copy.
    pub fn into_owned(self) -> Event<'static> {
        Event { ts: self.ts, path: Cow::Owned(self.path.into_owned()), data: Cow::Owned(self.data.into_owned()), sender: self.sender }
    }
}

/// Length of `@ts:path:escaped(data)` for a timestamp with at most ten second digits (the
/// case until the year 2286; longer seconds add their extra digits).
pub fn event_line_len(ts: Timestamp, path: &str, data: &[u8]) -> usize {
    let secs_digits = if ts.secs() >= 10_000_000_000 { ts.secs().ilog10() as usize + 1 } else { 10 };
    1 + secs_digits + 1 + 9 + 1 + path.len() + 1 + escaped_len(data)
}

/// Appends the event line `@ts:path:escaped(data)` to `out`.
pub fn encode_event(ts: Timestamp, path: &str, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(event_line_len(ts, path, data));
    out.push(b'@');
    ts.write_to(out);
    out.push(b':');
    out.extend_from_slice(path.as_bytes());
    out.push(b':');
    escape_into(data, out);
}

/// Appends the extended event line `@ts~sender:path:escaped(data)` to `out` (**Extension**
/// `ext=sender`), `sender` being the sender's wire form ([`Sender::encode`]).
pub fn encode_event_from(ts: Timestamp, sender: &[u8], path: &str, data: &[u8], out: &mut Vec<u8>) {
    out.reserve(event_line_len(ts, path, data) + 1 + sender.len());
    out.push(b'@');
    ts.write_to(out);
    out.push(b'~');
    out.extend_from_slice(sender);
    out.push(b':');
    out.extend_from_slice(path.as_bytes());
    out.push(b':');
    escape_into(data, out);
}

/// The extended form of an original event line `line` (`@ts:rest`): `@ts~sender:rest`; `None`
/// when `line` is not an event line.
pub fn extend_event_line(line: &[u8], sender: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let colon = line.iter().position(|&b| b == b':').filter(|_| line.first() == Some(&b'@'))?;
    out.reserve(line.len() + 1 + sender.len());
    out.extend_from_slice(&line[..colon]);
    out.push(b'~');
    out.extend_from_slice(sender);
    out.extend_from_slice(&line[colon..]);
    Some(())
}

/// Appends the success reply `#key#@ts` to `out`.
pub fn encode_ack(key: &[u8], ts: Timestamp, out: &mut Vec<u8>) {
    out.push(b'#');
    out.extend_from_slice(key);
    out.extend_from_slice(b"#@");
    ts.write_to(out);
}

/// Appends the error reply `[#key#]!code message` to `out`. Newlines in `message` are
/// replaced by spaces so that the reply stays one line.
pub fn encode_error(key: Option<&[u8]>, code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    if let Some(key) = key {
        out.push(b'#');
        out.extend_from_slice(key);
        out.push(b'#');
    }
    out.push(b'!');
    out.extend_from_slice(code.as_str().as_bytes());
    out.push(b' ');
    out.extend(message.bytes().map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }));
}

/// One line from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerLine<'a> {
    /// A published event.
    Event(Event<'a>),
    /// Success reply to the acked command with this key.
    Ack {
        /// The ack key, raw.
        key: &'a [u8],
        /// For a send, the event's timestamp; for a subscribe or unsubscribe, the position
        /// from which the change holds; for `@`, the server time.
        ts: Timestamp,
    },
    /// Error reply, with the key of the command it answers when that had one.
    Error {
        /// The ack key of the refused command.
        key: Option<&'a [u8]>,
        /// The error code (see [`ErrorCode::from_wire`]); unknown codes are kept as text.
        code: &'a str,
        /// Human-readable reason.
        message: &'a str,
    },
    /// A presence line (`^=`, `^.`, `^~`; extension, sent only to connections that used `~`).
    Presence(PresenceLine<'a>),
}

/// Why a server line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineError {
    /// The line does not match the grammar.
    Syntax(&'static str),
    /// Bad timestamp.
    Timestamp(TimestampError),
    /// The event's path is not a normalized path.
    Path(PathError),
    /// The event's data has an undefined escape.
    Escape(UnescapeError),
    /// A presence line that does not parse.
    Presence(PresenceError),
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::Syntax(s) => f.write_str(s),
            LineError::Timestamp(e) => e.fmt(f),
            LineError::Path(e) => e.fmt(f),
            LineError::Escape(e) => e.fmt(f),
            LineError::Presence(e) => e.fmt(f),
        }
    }
}

impl core::error::Error for LineError {}

/// Parses an event line `@ts:path:escaped-data` (a live event or a log line), or the extended
/// line `@ts~sender:path:escaped-data` (**Extension** `ext=sender`), which sets
/// [`Event::sender`].
pub fn parse_event(line: &[u8]) -> Result<Event<'_>, LineError> {
    let rest = line.strip_prefix(b"@").ok_or(LineError::Syntax("event must start with '@'"))?;
    let c1 = rest.iter().position(|&b| b == b':').ok_or(LineError::Syntax("event has no ':' after the timestamp"))?;
    // The extended line (`ext=sender`): `@ts~sender:...`; the escaped sender has no ':'.
    let (ts, sender) = match rest[..c1].iter().position(|&b| b == b'~') {
        Some(t) => (&rest[..t], Some(Sender::parse(&rest[t + 1..c1])?)),
        None => (&rest[..c1], None),
    };
    let ts = Timestamp::parse(ts).map_err(LineError::Timestamp)?;
    let rest = &rest[c1 + 1..];
    let c2 = rest.iter().position(|&b| b == b':').ok_or(LineError::Syntax("event has no ':' after the path"))?;
    let raw_path = &rest[..c2];
    let path = match path::normalize(raw_path).map_err(LineError::Path)? {
        Cow::Borrowed(p) if p.len() == raw_path.len() => p,
        _ => return Err(LineError::Syntax("event path is not normalized")),
    };
    let data = unescape(&rest[c2 + 1..]).map_err(LineError::Escape)?;
    Ok(Event { ts, path: Cow::Borrowed(path), data, sender })
}

/// Parses any line from the server.
pub fn parse_line(line: &[u8]) -> Result<ServerLine<'_>, LineError> {
    let (key, body) = match line.first() {
        Some(b'@') => return parse_event(line).map(ServerLine::Event),
        Some(b'#') => {
            let rest = &line[1..];
            let end = rest.iter().position(|&b| b == b'#').ok_or(LineError::Syntax("ack key has no closing '#'"))?;
            (Some(&rest[..end]), &rest[end + 1..])
        }
        Some(b'!') => (None, line),
        Some(b'^') => return parse_presence(line).map(ServerLine::Presence).map_err(LineError::Presence),
        _ => return Err(LineError::Syntax("line must start with '@', '#', '!' or '^'")),
    };
    match body.split_first() {
        Some((b'@', ts)) => {
            let key = key.ok_or(LineError::Syntax("timestamp reply without ack key"))?;
            Ok(ServerLine::Ack { key, ts: Timestamp::parse(ts).map_err(LineError::Timestamp)? })
        }
        Some((b'!', rest)) => {
            let text = core::str::from_utf8(rest).map_err(|_| LineError::Syntax("error reply is not UTF-8"))?;
            let (code, message) = text.split_once(' ').unwrap_or((text, ""));
            Ok(ServerLine::Error { key, code, message })
        }
        _ => Err(LineError::Syntax("reply must continue with '@' or '!' after the ack key")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(target_arch = "wasm32"))]
    use proptest::prelude::*;
    use std::prelude::rust_2024::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn cmd(s: &str) -> Result<Command<'_>, CommandError<'_>> {
        Command::parse(s.as_bytes())
    }

    #[test]
    fn parses_the_original_commands() {
        assert_eq!(cmd("+/a/b").unwrap(), Command { ack: None, op: Op::Subscribe("/a/b".into()) });
        assert_eq!(cmd("#k#-a/b/").unwrap(), Command { ack: Some(b"k"), op: Op::Unsubscribe("/a/b".into()) });
        assert_eq!(
            cmd("#1#:/a:x:y#z\n\r").unwrap(),
            Command { ack: Some(b"1"), op: Op::Send { path: "/a".into(), data: b"x:y#z\n\r", id: None } }
        );
        assert_eq!(cmd(":/a:").unwrap().op, Op::Send { path: "/a".into(), data: b"", id: None });
        assert_eq!(cmd("##@whatever").unwrap(), Command { ack: Some(b""), op: Op::Timestamp });
        assert_eq!(cmd("+").unwrap().op, Op::Subscribe("/".into()));
        assert_eq!(cmd("+/").unwrap().op, Op::Subscribe("/".into()));
    }

    #[test]
    fn parses_the_refresh_command() {
        assert_eq!(cmd("#7#&a.b.c").unwrap(), Command { ack: Some(b"7"), op: Op::Refresh(b"a.b.c") });
        assert_eq!(cmd("&").unwrap().op, Op::Refresh(b""), "an empty token is the server's to refuse");
        assert_eq!(Command { ack: Some(b"1"), op: Op::Refresh(b"x.y.z") }.to_bytes(), b"#1#&x.y.z");
        assert_eq!(ErrorCode::from_wire("subscription-ended"), Some(ErrorCode::SubscriptionEnded));
        assert_eq!(ErrorCode::Unauthorized.as_str(), "unauthorized");
    }

    #[test]
    fn parses_sends_with_ids() {
        assert_eq!(
            cmd("#k#*a.B_9~-:/a/b/:x:y").unwrap(),
            Command { ack: Some(b"k"), op: Op::Send { path: "/a/b".into(), data: b"x:y", id: Some(b"a.B_9~-") } }
        );
        assert_eq!(cmd("*i::").unwrap().op, Op::Send { path: "/".into(), data: b"", id: Some(b"i") });
        let long = format!("*{}:/a:x", "z".repeat(64));
        assert_eq!(cmd(&long).unwrap().op, Op::Send { path: "/a".into(), data: b"x", id: Some("z".repeat(64).as_bytes()) });
        assert_eq!(
            Command { ack: Some(b"1"), op: Op::Send { path: "/a".into(), data: b"d", id: Some(b"x.1") } }.to_bytes(),
            b"#1#*x.1:/a:d"
        );
        for bad in ["#k#*:/a:x", "#k#*a b:/a:x", "#k#*a#:/a:x", "#k#*a/b:/a:x", "#k#*a%41:/a:x", "#k#*abc", "#k#*\u{e9}:/a:x"] {
            let e = cmd(bad).unwrap_err();
            assert_eq!((e.ack, e.kind.code()), (Some(&b"k"[..]), ErrorCode::Malformed), "{bad}");
            assert_eq!(e.kind, CommandErrorKind::BadSendId, "{bad}");
        }
        let too_long = format!("#k#*{}:/a:x", "z".repeat(65));
        let e = cmd(&too_long).unwrap_err();
        assert_eq!(e.kind, CommandErrorKind::BadSendId);
        assert_eq!(e.kind.to_string(), "a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; the command was not executed");
        assert_eq!(cmd("*a:/a").unwrap_err().kind, CommandErrorKind::MissingData);
        assert_eq!(cmd("*a:/A:x").unwrap_err().kind.code(), ErrorCode::BadPath);
        assert!(!is_valid_send_id(b"") && is_valid_send_id(b"~") && !is_valid_send_id(b"a:b"));
    }

    #[test]
    fn parses_the_presence_commands() {
        assert_eq!(cmd("#p#~+/chat/a/").unwrap(), Command { ack: Some(b"p"), op: Op::PresenceWatch("/chat/a".into()) });
        assert_eq!(cmd("~?").unwrap().op, Op::PresenceQuery("/".into()));
        assert_eq!(cmd("~+").unwrap().op, Op::PresenceWatch("/".into()));
        assert_eq!(cmd("#k#~x/a").unwrap_err(), CommandError { ack: Some(b"k"), kind: CommandErrorKind::UnknownPresence(Some(b'x')) });
        assert_eq!(cmd("~").unwrap_err().kind, CommandErrorKind::UnknownPresence(None));
        assert_eq!(cmd("~").unwrap_err().to_string(), "unknown presence command (expected ~+path or ~?path)");
        assert_eq!(cmd("~+/A").unwrap_err().kind.code(), ErrorCode::BadPath);
        assert_eq!(Command { ack: None, op: Op::PresenceQuery("/a".into()) }.to_bytes(), b"~?/a");
        assert_eq!(Command { ack: Some(b"1"), op: Op::PresenceWatch("/".into()) }.to_bytes(), b"#1#~+/");
    }

    #[test]
    fn parses_the_presence_lines() {
        assert!(matches!(parse_line(b"^./a:{\"count\":0}"), Ok(ServerLine::Presence(PresenceLine::End { count: 0, .. }))));
        assert!(matches!(parse_line(b"^./a:{}"), Err(LineError::Presence(_))));
        assert!(matches!(parse_line(b"^x/a:{}"), Err(LineError::Presence(_))));
    }

    #[test]
    fn refuses_with_key_when_known() {
        assert_eq!(cmd("").unwrap_err(), CommandError { ack: None, kind: CommandErrorKind::Empty });
        assert_eq!(cmd("#k#").unwrap_err(), CommandError { ack: Some(b"k"), kind: CommandErrorKind::Empty });
        assert_eq!(cmd("#k").unwrap_err().kind, CommandErrorKind::UnterminatedAck);
        assert_eq!(cmd("#k#x").unwrap_err(), CommandError { ack: Some(b"k"), kind: CommandErrorKind::UnknownCommand(b'x') });
        assert_eq!(cmd(":/a").unwrap_err().kind, CommandErrorKind::MissingData);
        assert_eq!(cmd("+/A").unwrap_err().kind.code(), ErrorCode::BadPath);
        assert_eq!(Command::parse_with_limit(b"+/abc", 3).unwrap_err().kind.code(), ErrorCode::PathTooLong);
    }

    #[test]
    fn server_lines() {
        let mut v = Vec::new();
        encode_event(Timestamp::new(1, 2).unwrap(), "/a", b"50%\nx", &mut v);
        assert_eq!(v, b"@0000000001.000000002:/a:50%25%0Ax");
        assert_eq!(
            parse_line(&v).unwrap(),
            ServerLine::Event(Event { ts: Timestamp::new(1, 2).unwrap(), path: "/a".into(), data: Cow::Borrowed(b"50%\nx"), sender: None })
        );
        v.clear();
        encode_ack(b"", Timestamp::new(3, 4).unwrap(), &mut v);
        assert_eq!(v, b"##@0000000003.000000004");
        assert_eq!(parse_line(&v).unwrap(), ServerLine::Ack { key: b"", ts: Timestamp::new(3, 4).unwrap() });
        v.clear();
        encode_error(Some(b"k"), ErrorCode::BadPath, "bad\npath", &mut v);
        assert_eq!(v, b"#k#!bad-path bad path");
        assert_eq!(parse_line(&v).unwrap(), ServerLine::Error { key: Some(b"k"), code: "bad-path", message: "bad path" });
        assert_eq!(
            parse_line(b"!malformed empty command").unwrap(),
            ServerLine::Error { key: None, code: "malformed", message: "empty command" }
        );
        assert!(parse_line(b"@1.000000000:/A:x").is_err());
        assert!(parse_line(b"@1.000000000:/a/:x").is_err());
        assert!(parse_line(b"@1.000000000:/a:%zz").is_err());
        assert!(parse_line(b"x").is_err());
        assert_eq!(event_line_len(Timestamp::new(1, 2).unwrap(), "/a", b"50%\nx"), 34);
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(c.as_str()), Some(c));
        }
    }

    #[test]
    fn extended_event_lines() {
        let ts = Timestamp::new(1, 2).unwrap();
        let ev = |sender: Option<Sender>| Event { ts, path: "/a".into(), data: Cow::Borrowed(b"x:y"), sender };
        for (sender, wire) in [
            (Sender::User("ada".into()), &b"@0000000001.000000002~=ada:/a:x:y"[..]),
            (Sender::Anonymous, b"@0000000001.000000002~-:/a:x:y"),
            (Sender::Application, b"@0000000001.000000002~*:/a:x:y"),
            (Sender::Unknown, b"@0000000001.000000002~?:/a:x:y"),
            (Sender::User("a:b%c\nd\re".into()), b"@0000000001.000000002~=a%3Ab%25c%0Ad%0De:/a:x:y"),
            (Sender::User("~=bob".into()), b"@0000000001.000000002~=~=bob:/a:x:y"),
        ] {
            let mut v = Vec::new();
            ev(Some(sender.clone())).encode(&mut v);
            assert_eq!(v, wire);
            assert_eq!(ev(Some(sender.clone())).encoded_len(), wire.len());
            assert_eq!(parse_line(wire).unwrap(), ServerLine::Event(ev(Some(sender.clone()))));
            let (mut plain, mut extended) = (Vec::new(), Vec::new());
            encode_event(ts, "/a", b"x:y", &mut plain);
            extend_event_line(&plain, &sender.to_wire(), &mut extended).unwrap();
            assert_eq!(extended, wire);
        }
        // Data that looks like a sender is data: the sender is only ever before the first ':'.
        assert_eq!(parse_event(b"@0000000001.000000002:/a:~=bob:x").unwrap().sender, None);
        assert_eq!(&*parse_event(b"@0000000001.000000002:/a:~=bob:x").unwrap().data, b"~=bob:x");
        for bad in [
            &b"@1.000000002~:/a:x"[..],
            b"@1.000000002~=:/a:x",
            b"@1.000000002~x:/a:x",
            b"@1.000000002~=a%3a:/a:x",
            b"@1.000000002~=\xff:/a:x",
        ] {
            assert!(parse_line(bad).is_err(), "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(extend_event_line(b"#k#@1.000000002", b"-", &mut Vec::new()), None);
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn arb_path() -> impl Strategy<Value = String> {
        "(/[a-z0-9.-]{1,6}){0,4}".prop_map(|p| if p.is_empty() { "/".to_string() } else { p })
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn arb_op() -> impl Strategy<Value = (u8, String, Vec<u8>)> {
        (0u8..8, arb_path(), proptest::collection::vec(any::<u8>(), 0..64))
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest! {
        #[test]
        fn command_round_trip(ack in proptest::option::of(proptest::collection::vec(any::<u8>().prop_filter("no #", |b| *b != b'#'), 0..8)), (k, p, data) in arb_op()) {
            let op = match k {
                0 => Op::Subscribe(p.into()),
                1 => Op::Unsubscribe(p.into()),
                2 => Op::Send { path: p.into(), data: &data, id: None },
                3 => Op::Refresh(&data),
                4 => Op::PresenceWatch(p.into()),
                5 => Op::PresenceQuery(p.into()),
                6 => Op::Send { path: p.into(), data: &data, id: Some(b"Ab.9_~-x") },
                _ => Op::Timestamp,
            };
            let c = Command { ack: ack.as_deref(), op };
            let bytes = c.to_bytes();
            prop_assert_eq!(Command::parse(&bytes).unwrap(), c);
        }

        #[test]
        fn extended_event_round_trip(sub in "[a-z:%\n\r=~é-]{1,20}", p in arb_path(), data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let e = Event { ts: Timestamp::new(5, 6).unwrap(), path: p.into(), data: data.into(), sender: Some(Sender::User(sub)) };
            let mut v = Vec::new();
            e.encode(&mut v);
            prop_assert_eq!(v.len(), e.encoded_len());
            prop_assert!(!v.contains(&b'\n'));
            prop_assert_eq!(parse_event(&v).unwrap(), e);
        }

        #[test]
        fn event_round_trip(secs in any::<u64>(), nanos in 0u32..1_000_000_000, p in arb_path(), data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let e = Event { ts: Timestamp::new(secs, nanos).unwrap(), path: p.into(), data: data.into(), sender: None };
            let mut v = Vec::new();
            e.encode(&mut v);
            prop_assert_eq!(v.len(), e.encoded_len());
            prop_assert!(!v.contains(&b'\n'));
            prop_assert_eq!(parse_line(&v).unwrap(), ServerLine::Event(e));
        }

        #[test]
        fn reply_round_trip(key in "[^#]{0,8}", secs in any::<u64>(), nanos in 0u32..1_000_000_000, msg in "[^\n\r]{0,40}") {
            let ts = Timestamp::new(secs, nanos).unwrap();
            let mut v = Vec::new();
            encode_ack(key.as_bytes(), ts, &mut v);
            prop_assert_eq!(parse_line(&v).unwrap(), ServerLine::Ack { key: key.as_bytes(), ts });
            for code in ErrorCode::ALL {
                v.clear();
                encode_error(Some(key.as_bytes()), code, &msg, &mut v);
                prop_assert_eq!(parse_line(&v).unwrap(), ServerLine::Error { key: Some(key.as_bytes()), code: code.as_str(), message: &msg });
            }
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Command::parse(&bytes);
            let _ = parse_line(&bytes);
        }
    }
}
