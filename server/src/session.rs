//! The protocol of one WebSocket connection, sans-IO: a frame in, a decision out.
//!
//! [`Session`] holds what a connection's commands depend on (its subscriptions and their
//! limit, its rate limiter, its access: what its token grants; its presence commands `~+` and `~?`) and decides what each frame
//! asks for ([`Outcome`]). It does no I/O and reads no clock: the WebSocket module
//! (`ws.rs`) feeds it frames with the time, carries out its decisions (queue a reply,
//! subscribe on the fan-out, publish through the engine) and writes the results.
//!
//! Adding a command means: a variant in the core's `wire::Op`, an [`Outcome`] here, and
//! carrying it out in `ws::execute`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::ops::Range;

use axum::extract::ws::Utf8Bytes;
use ivy_client_core::Timestamp;
use ivy_client_core::path;
use ivy_client_core::wire::{Command, CommandErrorKind, ErrorCode, Op, encode_ack, encode_error};

use tokio::sync::OwnedSemaphorePermit;

use crate::Config;
use crate::auth::{Access, Need};
use crate::budget::Charge;
use crate::conn::ReplySlot;
use crate::engine::{Origin, PublishError};
use crate::ratelimit::{ByteLimiter, IdentityBudget, RateLimiter};

/// Longest ack key accepted, in bytes. A reply repeats its command's key, and a connection
/// can have `--queue-length` replies pending: long keys would multiply its memory (64 KiB
/// keys cost about 127 MiB per connection before this limit).
pub(crate) const MAX_ACK_KEY: usize = 64;

/// In-band token refreshes a connection may make (with auth on), per second and in a burst:
/// each one verifies a signature (an RSA verification costs far more than any other command),
/// and a client needs one per token lifetime.
pub(crate) const REFRESH_RATE: u32 = 1;
/// See [`REFRESH_RATE`].
pub(crate) const REFRESH_BURST: u32 = 10;

/// What a frame asks the connection to do.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome<'a> {
    /// Reply with this line (a refusal or an error).
    Reply(Vec<u8>),
    /// Reply with this prepared line (allocates nothing).
    Prepared(Utf8Bytes),
    /// Subscribe to `path`; acknowledge with the position when `ack` is set.
    Subscribe {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The normalized path.
        path: Cow<'a, str>,
    },
    /// Unsubscribe from `path`; acknowledge with the position when `ack` is set.
    Unsubscribe {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The normalized path.
        path: Cow<'a, str>,
    },
    /// `~+path`: subscribe to `path` as [`Outcome::Subscribe`] does and watch its presence
    /// (the snapshot, then the reply, at the next presence tick).
    PresenceWatch {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The normalized path.
        path: Cow<'a, str>,
    },
    /// `~?path`: the presence of `path` now (snapshot lines, then the reply `#key#@now`).
    PresenceQuery {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The normalized path.
        path: Cow<'a, str>,
    },
    /// Publish the bytes `data` of the frame on `path`.
    Send {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The normalized path.
        path: Cow<'a, str>,
        /// Where the data is in the frame.
        data: Range<usize>,
        /// Where the send's id is in the frame (`*ID:path:data`), if it has one.
        id: Option<Range<usize>>,
    },
    /// Reply with the server time, `#key#@ts` (`##@ts` without a key).
    Time {
        /// The ack key.
        ack: Option<&'a [u8]>,
    },
    /// `&token`: verify `token` and hand the verdict to [`Session::refresh`] (the read loop
    /// does both: the expiry timer and the fan-out are its own).
    Refresh {
        /// The ack key.
        ack: Option<&'a [u8]>,
        /// The token as sent.
        token: &'a [u8],
    },
}

/// What an accepted in-band token changed ([`Session::refresh`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Refreshed {
    /// The subscriptions the new grants no longer cover, removed from the session, each with
    /// its `!subscription-ended` line (in path order), to remove from the fan-out and announce
    /// before the reply.
    pub(crate) ended: Vec<(Box<str>, Vec<u8>)>,
    /// The identity (`sub`) a connection opened without a token took: its byte budget
    /// applies from now on.
    pub(crate) new_identity: Option<Box<str>>,
}

/// Replies prepared once per server, so that refusing a flood allocates nothing per command
/// when it carries no ack key.
#[derive(Debug)]
pub(crate) struct Refusals {
    rate_limited_message: Box<str>,
    rate_limited_keyless: Utf8Bytes,
    bytes_limited_message: Box<str>,
    identity_bytes_limited_message: Box<str>,
    /// The refusals counted by reason (`/metrics`).
    pub(crate) counts: crate::metrics::Refused,
    /// Whether the engine honours send ids ([`crate::engine::Engine::send_ids`]); if not,
    /// `*ID:` sends are refused as a server without them refuses them.
    pub(crate) send_ids: bool,
}

impl Refusals {
    pub(crate) fn new(config: &Config) -> Refusals {
        let message = format!(
            "too many commands: the limit is {} per second (bursts of {}); this command was not executed",
            config.rate_limit,
            config.rate_burst.max(1)
        );
        let mut line = Vec::new();
        encode_error(None, ErrorCode::RateLimited, &message, &mut line);
        Refusals {
            rate_limited_keyless: String::from_utf8_lossy(&line).into_owned().into(),
            rate_limited_message: message.into_boxed_str(),
            bytes_limited_message: format!(
                "too many bytes: the limit is {} bytes stored per second (bursts of {}), an event counting its line plus 16 bytes per level of its path; this send was not executed",
                config.byte_rate, config.byte_burst
            )
            .into_boxed_str(),
            identity_bytes_limited_message: format!(
                "too many bytes for this identity: its connections together may store {} bytes per second (bursts of {}); this send was not executed",
                config.byte_rate_per_identity, config.byte_burst_per_identity
            )
            .into_boxed_str(),
            counts: crate::metrics::Refused::default(),
            send_ids: true,
        }
    }

    /// The refusals of a server whose engine honours send ids or not.
    pub(crate) fn with_send_ids(mut self, send_ids: bool) -> Refusals {
        self.send_ids = send_ids;
        self
    }

    /// The refusals, counted in `counts`.
    pub(crate) fn with_counts(mut self, counts: crate::metrics::Refused) -> Refusals {
        self.counts = counts;
        self
    }

    fn rate_limited(&self, key: Option<&[u8]>) -> Outcome<'static> {
        self.counts.rate_limited.inc();
        match key {
            None => Outcome::Prepared(self.rate_limited_keyless.clone()),
            Some(key) => Outcome::Reply(error_line(Some(key), ErrorCode::RateLimited, &self.rate_limited_message)),
        }
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub(crate) struct Session {
    subs: HashSet<Box<str>>,
    max_subscriptions: usize,
    max_path_length: usize,
    max_path_depth: usize,
    limiter: Option<RateLimiter>,
    /// Subscribes and unsubscribes (`--subscribe-rate`): a pacer.
    churn: Option<RateLimiter>,
    /// How long to wait before reading the next command (nanoseconds), set by a subscription
    /// change beyond the budget.
    pause: u64,
    bytes: Option<ByteLimiter>,
    /// The byte budget of the connection's identity, shared with its other connections.
    identity: Option<std::sync::Arc<IdentityBudget>>,
    /// In-band refreshes ([`REFRESH_RATE`]).
    refreshes: Option<RateLimiter>,
    /// What the connection may read and write (verified at the handshake, and again at each
    /// in-band refresh).
    access: Access,
    /// Who its events are from (its token's `sub`, or anonymous), stored with each of them.
    origin: Origin,
}

/// Who the events of a connection with `access` are from: its token's `sub`, or anonymous (no
/// token, or auth off).
pub(crate) fn origin_of(access: &Access) -> Origin {
    match access {
        Access::Granted(p) => p.sub.as_deref().map_or(Origin::ANONYMOUS, Origin::user),
        Access::Open => Origin::ANONYMOUS,
    }
}

impl Session {
    /// Who the connection's events are from (recorded with each, `ext=sender`). When the
    /// connection's identity changes (a token presented in-band), so does this.
    pub(crate) fn origin(&self) -> &Origin {
        &self.origin
    }

    /// A new connection's session under `config`'s limits, with `access` (what its token, or
    /// the lack of one, grants).
    pub(crate) fn new(config: &Config, access: Access) -> Session {
        Session {
            origin: origin_of(&access),
            access,
            subs: HashSet::new(),
            max_subscriptions: config.max_subscriptions,
            max_path_length: config.max_path_length,
            max_path_depth: config.max_path_depth,
            limiter: RateLimiter::new(config.rate_limit, config.rate_burst),
            churn: RateLimiter::new(config.subscribe_rate, config.subscribe_burst),
            pause: 0,
            bytes: ByteLimiter::new(config.byte_rate, config.byte_burst),
            identity: None,
            refreshes: RateLimiter::new(REFRESH_RATE, REFRESH_BURST),
        }
    }

    /// The session with its identity's byte budget (`--byte-rate-per-identity`).
    pub(crate) fn with_identity_budget(mut self, budget: Option<std::sync::Arc<IdentityBudget>>) -> Session {
        self.identity = budget;
        self
    }

    /// Whether a command arriving at `now` (nanoseconds from any fixed origin, never
    /// decreasing) is within the rate limit; a refused one costs nothing.
    fn allowed(&mut self, now: u64) -> bool {
        self.limiter.as_mut().is_none_or(|l| l.check(now))
    }

    /// Whether storing `len` data bytes on `path` fits the connection's byte budget at `now`
    /// and its identity's (spent from both if so): `Err(true)` when the identity's refused it,
    /// `Err(false)` when the connection's did.
    fn bytes_allowed(&mut self, now: u64, path: &str, len: usize) -> Result<(), bool> {
        if self.bytes.is_none() && self.identity.is_none() {
            return Ok(());
        }
        // What the store keeps: the line once, 16 bytes per level, copies of a short line.
        let cost = crate::engine::stored_cost(path, len).1 as u64;
        if self.bytes.as_ref().is_some_and(|b| !b.fits(now)) {
            return Err(false);
        }
        if self.identity.as_ref().is_some_and(|i| !i.fits()) {
            return Err(true);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.check(now, cost);
        }
        if let Some(i) = &self.identity {
            i.spend(cost);
        }
        Ok(())
    }

    /// A text frame arrived at `now`.
    pub(crate) fn on_text<'a>(&mut self, now: u64, frame: &'a [u8], refusals: &Refusals) -> Outcome<'a> {
        if !self.allowed(now) {
            return refusals.rate_limited(ack_key(frame).filter(|k| k.len() <= MAX_ACK_KEY));
        }
        let key_len = frame.strip_prefix(b"#").map(|rest| rest.iter().position(|&b| b == b'#').unwrap_or(rest.len()));
        if key_len.is_some_and(|n| n > MAX_ACK_KEY) {
            let msg = format!("ack key longer than {MAX_ACK_KEY} bytes; the command was not executed");
            return Outcome::Reply(error_line(None, ErrorCode::Malformed, &msg));
        }
        let cmd = match Command::parse_with_limit(frame, self.max_path_length) {
            Ok(cmd) => cmd,
            Err(e) => return Outcome::Reply(error_line(e.ack, e.kind.code(), &e.kind.to_string())),
        };
        let ack = cmd.ack;
        let watch = matches!(cmd.op, Op::PresenceWatch(_));
        if let Op::Subscribe(p) | Op::Unsubscribe(p) | Op::Send { path: p, .. } | Op::PresenceWatch(p) | Op::PresenceQuery(p) = &cmd.op {
            if let Err(e) = path::check_depth(p, self.max_path_depth) {
                return Outcome::Reply(error_line(ack, ErrorCode::PathTooLong, &e.to_string()));
            }
        }
        // The grants, per command: a comparison of paths, no allocation unless refused.
        let need = match &cmd.op {
            Op::Subscribe(p) | Op::PresenceWatch(p) | Op::PresenceQuery(p) => Some((Need::Read, p)),
            Op::Send { path, .. } => Some((Need::Write, path)),
            Op::Unsubscribe(_) | Op::Timestamp | Op::Refresh(_) => None,
        };
        if let Some((need, p)) = need {
            if !self.access.allows(need, p) {
                refusals.counts.forbidden.inc();
                return Outcome::Reply(error_line(ack, ErrorCode::Forbidden, &self.access.refusal(need, p)));
            }
        }
        if let (Op::Subscribe(_) | Op::Unsubscribe(_) | Op::PresenceWatch(_), Some(churn)) = (&cmd.op, self.churn.as_mut()) {
            self.pause = churn.take(now);
        }
        match cmd.op {
            Op::Subscribe(path) | Op::PresenceWatch(path) => {
                if !self.subs.contains(&*path) {
                    if self.subs.len() >= self.max_subscriptions {
                        let msg = format!("this connection already holds {} subscriptions, the limit", self.subs.len());
                        return Outcome::Reply(error_line(ack, ErrorCode::TooManySubscriptions, &msg));
                    }
                    self.subs.insert(path.as_ref().into());
                }
                match watch {
                    true => Outcome::PresenceWatch { ack, path },
                    false => Outcome::Subscribe { ack, path },
                }
            }
            Op::PresenceQuery(path) => Outcome::PresenceQuery { ack, path },
            Op::Unsubscribe(path) => {
                self.subs.remove(&*path);
                Outcome::Unsubscribe { ack, path }
            }
            Op::Timestamp => Outcome::Time { ack },
            Op::Refresh(_) if matches!(self.access, Access::Granted(_)) && self.refreshes.as_mut().is_some_and(|r| !r.check(now)) => {
                let msg = format!(
                    "too many token refreshes: at most {REFRESH_RATE} per second (bursts of {REFRESH_BURST}); this one was not executed"
                );
                Outcome::Reply(error_line(ack, ErrorCode::RateLimited, &msg))
            }
            Op::Refresh(token) => Outcome::Refresh { ack, token },
            Op::Send { id: Some(_), .. } if !refusals.send_ids => {
                // As a server without send ids answers (5.9): the client falls back to plain sends.
                Outcome::Reply(error_line(ack, ErrorCode::Malformed, &CommandErrorKind::UnknownCommand(b'*').to_string()))
            }
            Op::Send { path, data, id } => match (offset_in(frame, data), id.map(|id| offset_in(frame, id).map(|s| s..s + id.len()))) {
                (_, Some(None)) | (None, _) => {
                    Outcome::Reply(error_line(ack, ErrorCode::Malformed, "internal error: data outside the command"))
                }
                (Some(start), id) => match self.bytes_allowed(now, &path, data.len()) {
                    Ok(()) => Outcome::Send { ack, path, data: start..start + data.len(), id: id.flatten() },
                    Err(identity) => {
                        refusals.counts.bytes(identity);
                        let why = if identity { &refusals.identity_bytes_limited_message } else { &refusals.bytes_limited_message };
                        Outcome::Reply(error_line(ack, ErrorCode::RateLimited, why))
                    }
                },
            },
        }
    }

    /// A binary frame arrived at `now`.
    pub(crate) fn on_binary(&mut self, now: u64, refusals: &Refusals) -> Outcome<'static> {
        if !self.allowed(now) {
            return refusals.rate_limited(None);
        }
        Outcome::Reply(error_line(
            None,
            ErrorCode::Unsupported,
            "binary frames are not part of the protocol; send each command as a text frame",
        ))
    }

    /// How long (nanoseconds) the connection must wait before its next command is read: a
    /// subscription change beyond `--subscribe-burst` paces the connection to
    /// `--subscribe-rate` (0: no wait). Taken once.
    pub(crate) fn take_pause(&mut self) -> u64 {
        std::mem::take(&mut self.pause)
    }

    /// Applies a token presented in-band (`&JWT`), as verified by the server's rules
    /// (`verified`: what it grants, or why it was refused). `Err(reason)` for the
    /// `!unauthorized` reply: a refused token, or one of another `sub` than the connection's;
    /// the connection keeps its token. With auth off the token is ignored (`Ok`, nothing
    /// changes). Otherwise the new grants apply to every later command, and the subscriptions
    /// they no longer cover are removed (returned, to end on the fan-out).
    pub(crate) fn refresh(&mut self, verified: Result<Access, crate::auth::TokenError>) -> Result<Refreshed, String> {
        let Access::Granted(old) = &self.access else { return Ok(Refreshed::default()) };
        let new = match verified {
            Err(e) => return Err(e.0),
            Ok(Access::Open) => return Ok(Refreshed::default()),
            Ok(Access::Granted(new)) => new,
        };
        if let Some(sub) = &old.sub {
            if new.sub.as_ref() != Some(sub) {
                return Err(format!("a refreshed token must have the same sub ({sub:?})"));
            }
        }
        let new_identity = if old.sub.is_none() { new.sub.clone() } else { None };
        let mut lost: Vec<Box<str>> = self.subs.iter().filter(|p| !new.read.covers(p)).cloned().collect();
        lost.sort();
        let who = new.sub.as_deref().unwrap_or_default();
        let ended = lost
            .into_iter()
            .map(|path| {
                self.subs.remove(&path);
                let why = format!("{path} the new token of {who:?} has no read grant covering {path}");
                let line = error_line(None, ErrorCode::SubscriptionEnded, &why);
                (path, line)
            })
            .collect();
        self.access = Access::Granted(new);
        // A connection without a token that took one in-band sends as its sub from now on.
        self.origin = origin_of(&self.access);
        Ok(Refreshed { ended, new_identity })
    }

    /// Sets the byte budget of the connection's identity (one taken in-band).
    pub(crate) fn set_identity_budget(&mut self, budget: Option<std::sync::Arc<IdentityBudget>>) {
        self.identity = budget;
    }

    /// What the connection may do, and who it is.
    pub(crate) fn access(&self) -> &Access {
        &self.access
    }

    /// The `exp` of the connection's token, if it has one (seconds since the Unix epoch).
    pub(crate) fn expires(&self) -> Option<u64> {
        self.access.expires()
    }

    /// The connection's subscriptions, to remove from the fan-out when it closes.
    pub(crate) fn subscriptions(&self) -> impl Iterator<Item = &str> {
        self.subs.iter().map(|s| &**s)
    }
}

/// Where `inner` starts in `outer`, if it is a part of it.
fn offset_in(outer: &[u8], inner: &[u8]) -> Option<usize> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    (start.checked_add(inner.len())? <= outer.len()).then_some(start)
}

/// The ack key of a command that is refused before parsing (`#key#...`), if complete.
fn ack_key(msg: &[u8]) -> Option<&[u8]> {
    let rest = msg.strip_prefix(b"#")?;
    rest.iter().position(|&b| b == b'#').map(|end| &rest[..end])
}

/// The length of a timestamp's wire form (`SECONDS.NANOS`, at least ten second digits).
fn timestamp_len(ts: Timestamp) -> usize {
    let secs = ts.secs();
    (if secs >= 10_000_000_000 { secs.ilog10() as usize + 1 } else { 10 }) + 1 + 9
}

/// `#key#@ts`, allocated at its size (a reply may wait in a queue for long).
pub(crate) fn ack_line(key: &[u8], ts: Timestamp) -> Vec<u8> {
    let mut line = Vec::with_capacity(key.len() + 3 + timestamp_len(ts));
    encode_ack(key, ts, &mut line);
    debug_assert_eq!(line.len(), line.capacity());
    line
}

/// `[#key#]!code message`, allocated at its size.
pub(crate) fn error_line(key: Option<&[u8]>, code: ErrorCode, message: &str) -> Vec<u8> {
    let len = key.map_or(0, |k| k.len() + 2) + 1 + code.as_str().len() + 1 + message.len();
    let mut line = Vec::with_capacity(len);
    encode_error(key, code, message, &mut line);
    debug_assert_eq!(line.len(), line.capacity());
    line
}

/// The wire code of a failed publish.
fn publish_error_code(e: &PublishError) -> ErrorCode {
    match e {
        PublishError::Storage(_) => ErrorCode::Storage,
        PublishError::InvalidPath(_) => ErrorCode::BadPath,
        PublishError::InvalidId => ErrorCode::Malformed,
        PublishError::ShuttingDown => ErrorCode::ShuttingDown,
        PublishError::StoreFull(_) => ErrorCode::StoreFull,
    }
}

/// The reply a send is owed: its ack key and the place reserved for it in the connection's
/// queue. The engine completes it; it encodes the outcome as `#key#@ts` or an error line.
#[derive(Debug)]
pub(crate) struct PendingReply {
    slot: ReplySlot,
    key: Option<Box<[u8]>>,
    /// The connection's share of the engine's queue, given back with the reply.
    _share: Option<OwnedSemaphorePermit>,
    /// The send's frame, counted in the memory budget until then.
    _charge: Option<Charge>,
}

impl PendingReply {
    pub(crate) fn new(slot: ReplySlot, key: Option<&[u8]>, share: Option<OwnedSemaphorePermit>) -> PendingReply {
        PendingReply { slot, key: key.map(Box::from), _share: share, _charge: None }
    }

    /// Counts the send in the memory budget until it is answered.
    pub(crate) fn charged(mut self, charge: Charge) -> PendingReply {
        self._charge = Some(charge);
        self
    }

    /// Queues the reply (a keyless send that succeeded gets none: its place is given back).
    pub(crate) fn complete(self, result: Result<Timestamp, PublishError>) {
        let line = match (result, self.key) {
            // Right after its event, before any later one, also while the connection is behind.
            (Ok(ts), Some(key)) => return self.slot.send_line_at(ts, ack_line(&key, ts)),
            (Ok(_), None) => return,
            // The store's own error (paths, OS codes) is for the server's log, not the client.
            (Err(PublishError::Storage(e)), key) => error_line(key.as_deref(), ErrorCode::Storage, PublishError::storage_reason(&e)),
            (Err(e), key) => error_line(key.as_deref(), publish_error_code(&e), &e.to_string()),
        };
        self.slot.send(crate::conn::text(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(config: &Config) -> (Session, Refusals) {
        (Session::new(config, Access::Open), Refusals::new(config))
    }

    fn reply(o: Outcome<'_>) -> String {
        match o {
            Outcome::Reply(line) => String::from_utf8(line).unwrap(),
            Outcome::Prepared(line) => line.as_str().to_string(),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn commands_become_decisions() {
        let (mut s, r) = session(&Config::default());
        assert_eq!(s.on_text(0, b"#1#+/a/", &r), Outcome::Subscribe { ack: Some(b"1"), path: "/a".into() });
        assert_eq!(s.on_text(0, b"-/a", &r), Outcome::Unsubscribe { ack: None, path: "/a".into() });
        assert_eq!(s.on_text(0, b"##@x", &r), Outcome::Time { ack: Some(b"") });
        let frame = b"#k#:/a/b:x:y";
        assert_eq!(s.on_text(0, frame, &r), Outcome::Send { ack: Some(b"k"), path: "/a/b".into(), data: 9..12, id: None });
        assert_eq!(&frame[9..12], b"x:y");
        let frame = b"#k#*i.1:/a/b:x:y";
        assert_eq!(s.on_text(0, frame, &r), Outcome::Send { ack: Some(b"k"), path: "/a/b".into(), data: 13..16, id: Some(4..7) });
        assert_eq!((&frame[4..7], &frame[13..16]), (&b"i.1"[..], &b"x:y"[..]));
        assert_eq!(
            reply(s.on_text(0, b"#4#*bad id:/a:x", &r)),
            "#4#!malformed a send id is 1 to 64 characters of A-Z a-z 0-9 . _ ~ -; the command was not executed"
        );
        assert_eq!(reply(s.on_text(0, b"#2#+/A", &r)), "#2#!bad-path invalid character 'A' at byte 1 of path (allowed: a-z 0-9 . - /)");
        assert!(reply(s.on_text(0, b"#3#?", &r)).starts_with("#3#!malformed unknown command '?'"));
        assert!(reply(s.on_binary(0, &r)).starts_with("!unsupported binary frames"));
    }

    #[test]
    fn presence_commands_are_subscriptions_and_reads() {
        use crate::auth::{Grants, Principal};
        use std::sync::Arc;
        let config = Config::default().max_subscriptions(1);
        let principal = Principal {
            sub: Some("ada".into()),
            read: Grants::new(&["/chat"]).unwrap(),
            write: Grants::new(&["/chat"]).unwrap(),
            exp: None,
            jti: None,
            info: None,
        };
        let mut s = Session::new(&config, Access::Granted(Arc::new(principal)));
        let r = Refusals::new(&config);
        assert_eq!(s.on_text(0, b"#1#~+/chat/a/", &r), Outcome::PresenceWatch { ack: Some(b"1"), path: "/chat/a".into() });
        assert_eq!(s.on_text(0, b"+/chat/a", &r), Outcome::Subscribe { ack: None, path: "/chat/a".into() }, "the same subscription");
        assert_eq!(s.on_text(0, b"#2#~?/chat", &r), Outcome::PresenceQuery { ack: Some(b"2"), path: "/chat".into() });
        assert_eq!(
            reply(s.on_text(0, b"#3#~?/", &r)),
            "#3#!forbidden the token of \"ada\" has no read grant covering / (a subscription delivers the path's whole subtree)"
        );
        assert!(reply(s.on_text(0, b"#4#~+/", &r)).starts_with("#4#!forbidden "));
        assert_eq!(
            reply(s.on_text(0, b"#5#~+/chat/b", &r)),
            "#5#!too-many-subscriptions this connection already holds 1 subscriptions, the limit"
        );
        assert_eq!(reply(s.on_text(0, b"#6#~-/chat", &r)), "#6#!malformed unknown presence command (expected ~+path or ~?path)");
        assert_eq!(s.subscriptions().collect::<Vec<_>>(), ["/chat/a"]);
    }

    #[test]
    fn the_subscription_limit_counts_distinct_paths_and_frees_on_unsubscribe() {
        let config = Config::default().max_subscriptions(2);
        let (mut s, r) = session(&config);
        assert!(matches!(s.on_text(0, b"+/a", &r), Outcome::Subscribe { .. }));
        assert!(matches!(s.on_text(0, b"+/a", &r), Outcome::Subscribe { .. }), "again: idempotent, not counted twice");
        assert!(matches!(s.on_text(0, b"+/b", &r), Outcome::Subscribe { .. }));
        assert_eq!(
            reply(s.on_text(0, b"#9#+/c", &r)),
            "#9#!too-many-subscriptions this connection already holds 2 subscriptions, the limit"
        );
        assert!(matches!(s.on_text(0, b"-/a", &r), Outcome::Unsubscribe { .. }));
        assert!(matches!(s.on_text(0, b"+/c", &r), Outcome::Subscribe { .. }));
        let mut subs: Vec<&str> = s.subscriptions().collect();
        subs.sort();
        assert_eq!(subs, ["/b", "/c"]);
    }

    #[test]
    fn the_rate_limit_refuses_with_the_key_and_then_recovers() {
        let config = Config::default().rate_limit(1000).rate_burst(2);
        let (mut s, r) = session(&config);
        assert!(matches!(s.on_text(0, b"@", &r), Outcome::Time { .. }));
        assert!(matches!(s.on_text(0, b"@", &r), Outcome::Time { .. }));
        let keyed = reply(s.on_text(0, b"#5#:/a:x", &r));
        assert!(keyed.starts_with("#5#!rate-limited too many commands: the limit is 1000 per second (bursts of 2)"), "{keyed}");
        assert!(matches!(s.on_text(0, b"@", &r), Outcome::Prepared(_)), "keyless refusals are prepared lines");
        assert!(reply(s.on_binary(0, &r)).starts_with("!rate-limited"));
        // A refused command is not executed: the subscription below is not recorded.
        assert!(reply(s.on_text(0, b"+/z", &r)).starts_with("!rate-limited"));
        assert_eq!(s.subscriptions().count(), 0);
        assert!(matches!(s.on_text(1_000_000, b"+/z", &r), Outcome::Subscribe { .. }), "a token back after 1 ms");
    }

    #[test]
    fn subscription_changes_beyond_their_burst_pace_the_connection() {
        let config = Config::default().subscribe_rate(1000).subscribe_burst(3);
        let (mut s, r) = session(&config);
        assert!(matches!(s.on_text(0, b"+/a", &r), Outcome::Subscribe { .. }));
        assert!(matches!(s.on_text(0, b"-/a", &r), Outcome::Unsubscribe { .. }));
        assert!(matches!(s.on_text(0, b"+/b", &r), Outcome::Subscribe { .. }));
        assert_eq!(s.take_pause(), 0, "within the burst: no wait");
        assert!(matches!(s.on_text(0, b"#4#+/c", &r), Outcome::Subscribe { .. }), "executed, never refused");
        assert_eq!(s.take_pause(), 1_000_000, "beyond it: the next command waits an interval");
        assert_eq!(s.take_pause(), 0, "taken once");
        assert!(matches!(s.on_text(0, b":/a:x", &r), Outcome::Send { .. }));
        assert!(matches!(s.on_text(0, b"@", &r), Outcome::Time { .. }));
        assert_eq!(s.take_pause(), 0, "other commands take nothing from the budget");
        let (mut s, r) = session(&Config::default().subscribe_rate(0).subscribe_burst(1));
        assert!((0..100).all(|i| matches!(s.on_text(0, format!("+/{}", i % 2).as_bytes(), &r), Outcome::Subscribe { .. })));
        assert_eq!(s.take_pause(), 0, "0: no limit");
    }

    #[test]
    fn paths_deeper_than_the_limit_are_refused() {
        let (mut s, r) = session(&Config::default().max_path_depth(2));
        assert!(matches!(s.on_text(0, b"+/a/b", &r), Outcome::Subscribe { .. }));
        for cmd in [&b"#1#+/a/b/c"[..], b"#1#-/a/b/c", b"#1#:/a/b/c:x"] {
            assert_eq!(reply(s.on_text(0, cmd, &r)), "#1#!path-too-long path has 3 levels, the limit is 2");
        }
        assert_eq!(s.subscriptions().count(), 1);
    }

    #[test]
    fn a_storage_failure_reaches_the_client_without_the_stores_own_error() {
        let (conn, mut rx, _) = crate::conn::Conn::new(crate::fanout::ConnId(1), 4);
        let e = std::io::Error::other("Os { code: 28, kind: StorageFull } in /var/lib/ivy/db");
        PendingReply::new(conn.try_reserve().unwrap(), Some(b"k"), None).complete(Err(PublishError::storage(e)));
        PendingReply::new(conn.try_reserve().unwrap(), None, None).complete(Err(PublishError::ShuttingDown));
        let text = |m| match m {
            Some(axum::extract::ws::Message::Text(t)) => t.as_str().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(text(rx.try_recv().ok()), "#k#!storage event not stored: the store failed; the server's log has the details");
        assert_eq!(text(rx.try_recv().ok()), "!shutting-down server is shutting down");
    }

    #[test]
    fn ack_keys_are_short() {
        let (mut s, r) = session(&Config::default());
        let key = "k".repeat(MAX_ACK_KEY);
        assert_eq!(s.on_text(0, format!("#{key}#@").as_bytes(), &r), Outcome::Time { ack: Some(key.as_bytes()) });
        let long = "k".repeat(MAX_ACK_KEY + 1);
        assert_eq!(
            reply(s.on_text(0, format!("#{long}#+/a").as_bytes(), &r)),
            "!malformed ack key longer than 64 bytes; the command was not executed"
        );
        assert_eq!(reply(s.on_text(0, b"#k", &r)), "!malformed ack key has no closing '#'");
        assert_eq!(
            reply(s.on_text(0, format!("#{long}").as_bytes(), &r)),
            "!malformed ack key longer than 64 bytes; the command was not executed"
        );
        assert_eq!(s.subscriptions().count(), 0);
    }

    #[test]
    fn the_byte_rate_counts_stored_bytes_and_refuses_with_the_key() {
        let config = Config::default().byte_rate(1000).byte_burst(1000);
        let (mut s, r) = session(&config);
        let data = "x".repeat(600);
        // 600 + 2 + 32 bytes of line, plus 16 per level (root and /a): within the burst, then
        // overdrawn.
        assert!(matches!(s.on_text(0, format!(":/a:{data}").as_bytes(), &r), Outcome::Send { .. }));
        assert!(matches!(s.on_text(0, format!(":/a:{data}").as_bytes(), &r), Outcome::Send { .. }));
        let refused = reply(s.on_text(0, format!("#k#:/a:{data}").as_bytes(), &r));
        assert!(refused.starts_with("#k#!rate-limited too many bytes: the limit is 1000 bytes stored per second"), "{refused}");
        assert!(matches!(s.on_text(0, b"+/a", &r), Outcome::Subscribe { .. }), "other commands are not affected");
        assert!(matches!(s.on_text(2_000_000_000, format!(":/a:{data}").as_bytes(), &r), Outcome::Send { .. }), "refilled");
    }

    #[test]
    fn commands_beyond_the_grants_are_forbidden_and_not_executed() {
        use crate::auth::{Grants, Principal};
        use std::sync::Arc;
        let config = Config::default();
        let principal = Principal {
            sub: Some("ada".into()),
            read: Grants::new(&["/chat"]).unwrap(),
            write: Grants::new(&["/chat/lobby"]).unwrap(),
            exp: Some(1),
            jti: None,
            info: None,
        };
        let mut s = Session::new(&config, Access::Granted(Arc::new(principal)));
        let r = Refusals::new(&config);
        assert!(matches!(s.on_text(0, b"+/chat/room1", &r), Outcome::Subscribe { .. }));
        assert!(matches!(s.on_text(0, b"+/chat", &r), Outcome::Subscribe { .. }));
        assert_eq!(
            reply(s.on_text(0, b"#1#+/", &r)),
            "#1#!forbidden the token of \"ada\" has no read grant covering / (a subscription delivers the path's whole subtree)"
        );
        assert!(reply(s.on_text(0, b"+/chatter", &r)).starts_with("!forbidden "));
        assert!(matches!(s.on_text(0, b":/chat/lobby/x:hi", &r), Outcome::Send { .. }));
        assert_eq!(reply(s.on_text(0, b"#2#:/chat:hi", &r)), "#2#!forbidden the token of \"ada\" has no write grant covering /chat");
        assert!(matches!(s.on_text(0, b"-/anything", &r), Outcome::Unsubscribe { .. }), "unsubscribing needs no grant");
        assert!(matches!(s.on_text(0, b"@", &r), Outcome::Time { .. }));
        let mut subs: Vec<&str> = s.subscriptions().collect();
        subs.sort();
        assert_eq!(subs, ["/chat", "/chat/room1"], "refused subscriptions are not recorded");
        assert_eq!(s.expires(), Some(1));
    }

    #[test]
    fn a_refresh_replaces_the_grants_and_ends_what_they_no_longer_cover() {
        use crate::auth::{Grants, Principal, TokenError};
        use std::sync::Arc;
        let granted = |sub: Option<&str>, read: &[&str], exp| {
            Access::Granted(Arc::new(Principal {
                sub: sub.map(Into::into),
                read: Grants::new(read).unwrap(),
                write: Grants::new(read).unwrap(),
                exp,
                jti: None,
                info: None,
            }))
        };
        let config = Config::default();
        let r = Refusals::new(&config);
        let mut s = Session::new(&config, granted(Some("ada"), &["/chat"], Some(10)));
        assert_eq!(s.on_text(0, b"#1#&a.b.c", &r), Outcome::Refresh { ack: Some(b"1"), token: b"a.b.c" });
        for p in [&b"+/chat/room1"[..], b"+/chat/room2", b"+/chat"] {
            assert!(matches!(s.on_text(0, p, &r), Outcome::Subscribe { .. }));
        }
        // Refused: the connection keeps its token, its grants and its deadline.
        assert_eq!(s.refresh(Err(TokenError("token expired".into()))), Err("token expired".into()));
        assert_eq!(s.refresh(Ok(granted(Some("bob"), &["/"], Some(99)))), Err("a refreshed token must have the same sub (\"ada\")".into()));
        assert_eq!((s.expires(), s.subscriptions().count()), (Some(10), 3));
        // Fewer grants: the subscriptions outside them end, in path order, announced.
        let done = s.refresh(Ok(granted(Some("ada"), &["/chat/room1"], Some(20)))).unwrap();
        let ended: Vec<(&str, String)> = done.ended.iter().map(|(p, l)| (&**p, String::from_utf8(l.clone()).unwrap())).collect();
        assert_eq!(
            ended,
            [
                ("/chat", "!subscription-ended /chat the new token of \"ada\" has no read grant covering /chat".to_string()),
                (
                    "/chat/room2",
                    "!subscription-ended /chat/room2 the new token of \"ada\" has no read grant covering /chat/room2".to_string()
                ),
            ]
        );
        assert_eq!(done.new_identity, None);
        assert_eq!((s.expires(), s.subscriptions().collect::<Vec<_>>()), (Some(20), vec!["/chat/room1"]));
        assert!(reply(s.on_text(0, b"#2#+/chat/room2", &r)).starts_with("#2#!forbidden "));
        // More grants: more allowed.
        assert!(s.refresh(Ok(granted(Some("ada"), &["/"], Some(30)))).unwrap().ended.is_empty());
        assert!(matches!(s.on_text(0, b"+/other", &r), Outcome::Subscribe { .. }));

        // Without a token, a connection takes the identity of the first one it presents.
        let mut anon = Session::new(&config, granted(None, &["/public"], None));
        assert!(matches!(anon.on_text(0, b"+/public", &r), Outcome::Subscribe { .. }));
        let done = anon.refresh(Ok(granted(Some("eve"), &["/private"], Some(5)))).unwrap();
        assert_eq!(done.new_identity.as_deref(), Some("eve"));
        assert_eq!(done.ended.len(), 1, "its anonymous subscription is not covered by this test's grants");
        assert_eq!(anon.expires(), Some(5));
        assert!(anon.refresh(Ok(granted(Some("mallory"), &["/"], Some(5)))).is_err(), "then it is eve's");

        // Refreshes are paced: each verifies a signature.
        let mut paced = Session::new(&config, granted(Some("ada"), &["/"], Some(5)));
        for _ in 0..REFRESH_BURST {
            assert!(matches!(paced.on_text(0, b"&x", &r), Outcome::Refresh { .. }));
        }
        assert_eq!(
            reply(paced.on_text(0, b"#9#&x", &r)),
            "#9#!rate-limited too many token refreshes: at most 1 per second (bursts of 10); this one was not executed"
        );
        assert!(matches!(paced.on_text(1_000_000_000, b"&x", &r), Outcome::Refresh { .. }), "one more a second later");

        // Auth off: accepted and ignored (and not paced: nothing is verified).
        let mut open = Session::new(&config, Access::Open);
        assert!(matches!(open.on_text(0, b"+/x", &r), Outcome::Subscribe { .. }));
        assert_eq!(open.refresh(Ok(Access::Open)), Ok(Refreshed::default()));
        assert!((0..100).all(|_| matches!(open.on_text(0, b"&x", &r), Outcome::Refresh { .. })));
        assert_eq!((open.expires(), open.subscriptions().count()), (None, 1));
    }

    #[test]
    fn offsets_are_checked() {
        let outer = b"abcdef";
        assert_eq!(offset_in(outer, &outer[2..4]), Some(2));
        assert_eq!(offset_in(outer, &outer[6..]), Some(6));
        let elsewhere = outer[2..4].to_vec();
        assert_eq!(offset_in(outer, &elsewhere), None);
    }
}
