//! Tuning of the client state machine.

use super::Millis;

/// Tuning of the client: `Config::default()` and then the setters, for example
/// `Config::default().max_backoff(10_000).offline_queue(0)`.
///
/// New fields may be added (the struct is `#[non_exhaustive]`), each with a default, so
/// code that uses the setters keeps compiling. Durations are in milliseconds ([`Millis`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Smallest reconnect backoff ceiling: the first retry waits a random time up to this.
    /// Default: 250 ms.
    pub min_backoff: Millis,
    /// Largest reconnect backoff ceiling; it wins when below `min_backoff`. Default: 30 s.
    pub max_backoff: Millis,
    /// How long one connection attempt may take. Default: 10 s.
    pub connect_timeout: Millis,
    /// How long a send or timestamp request waits for its reply, and how long a send may
    /// wait in the offline queue. Default: 30 s.
    pub request_timeout: Millis,
    /// With no frame received for this long, the client sends a probe (`@`). Default: 30 s.
    pub idle_timeout: Millis,
    /// With no frame received this long after a probe, the connection is dead: reconnect.
    /// Default: 10 s.
    pub probe_timeout: Millis,
    /// Events per log page when backfilling (the server may cap it; 0 counts as 1).
    /// Default: 1000.
    pub page_limit: u32,
    /// Sends queued while disconnected; 0 fails them at once. Default: 1000.
    pub offline_queue: usize,
    /// Live events buffered per subscription while it backfills; beyond this, buffered live
    /// events are dropped and fetched from the log instead (memory stays bounded).
    /// Default: 10,000.
    pub max_buffered: usize,
    /// The server's message size limit (its `--max-message-size`), in bytes: a send whose
    /// command (ack key included) is larger fails with [`ClientError::TooLarge`](super::ClientError::TooLarge)
    /// instead of being sent, since the server would close the connection over it. 0: no
    /// check. Default: 65,536, the server's default.
    pub max_message_size: usize,
    /// Ask for verified senders (**Extension** `ext=sender`, `docs/PROTOCOL.md` 6.1.1): the
    /// WebSocket URL ([`Config::ws_url`]) and the log pages ask for the extended event lines,
    /// and every event then has its [`Event::sender`](crate::wire::Event::sender), except the
    /// client's own sends delivered to its own subscriptions: the server does not echo them,
    /// the client inserts them from the send's ack and does not know its own verified identity
    /// (it does not decode its token), so their `sender` is `None`. Default: false (the
    /// original lines, `sender` always `None`).
    pub senders: bool,
    /// Whether the driver has a token provider: a way to get a fresh token on request
    /// ([`Action::NeedToken`](super::Action::NeedToken), answered with
    /// [`Client::handle_token`](super::Client::handle_token)). With one, the client asks for a
    /// fresh token ahead of its token's expiry and refreshes it in-band, and asks once more
    /// after a connection is refused for its token; without one, a refused token ends the
    /// client in [`ConnState::Unauthorized`](super::ConnState::Unauthorized). Default: false.
    pub token_provider: bool,
    /// How long after a send was first written the server still recognizes its id (its
    /// `--idempotency-window`, `docs/PROTOCOL.md` 5.9): a send whose ack was lost (the
    /// connection dropped, or no reply came in [`Config::request_timeout`]) is resent with the
    /// same id on the next connection while less than this has passed since it was first
    /// written, and then stored at most once; past it, the send fails with
    /// [`ClientError::WindowPassed`](super::ClientError::WindowPassed), which is uncertain.
    /// Set it no longer than the server's window. 0: never resend (a lost ack is
    /// [`ClientError::ConnectionLost`](super::ClientError::ConnectionLost), as without ids).
    /// Default: 600,000 (10 minutes, the server's default).
    pub idempotency_window: Millis,
    /// 12 random bytes from the driver's random source (`getrandom`,
    /// `crypto.getRandomValues`): the client's instance, the first part of its send ids
    /// (`<instance>.<counter>`, the instance written as 16 base64url characters). Send ids
    /// must not repeat between clients of one sender (a token's `sub`, or every anonymous
    /// client): give each client its own random bytes. `None`: derived from the seed of
    /// [`Client::new`](super::Client::new), which is only as unique as that seed (fine for
    /// tests). Default: `None`.
    pub instance: Option<[u8; 12]>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            min_backoff: 250,
            max_backoff: 30_000,
            connect_timeout: 10_000,
            request_timeout: 30_000,
            idle_timeout: 30_000,
            probe_timeout: 10_000,
            page_limit: 1000,
            offline_queue: 1000,
            max_buffered: 10_000,
            max_message_size: 65_536,
            senders: false,
            token_provider: false,
            idempotency_window: 600_000,
            instance: None,
        }
    }
}

impl Config {
    /// Sets [`Config::min_backoff`].
    pub fn min_backoff(mut self, ms: Millis) -> Self {
        self.min_backoff = ms;
        self
    }

    /// Sets [`Config::max_backoff`].
    pub fn max_backoff(mut self, ms: Millis) -> Self {
        self.max_backoff = ms;
        self
    }

    /// Sets [`Config::connect_timeout`].
    pub fn connect_timeout(mut self, ms: Millis) -> Self {
        self.connect_timeout = ms;
        self
    }

    /// Sets [`Config::request_timeout`].
    pub fn request_timeout(mut self, ms: Millis) -> Self {
        self.request_timeout = ms;
        self
    }

    /// Sets [`Config::idle_timeout`].
    pub fn idle_timeout(mut self, ms: Millis) -> Self {
        self.idle_timeout = ms;
        self
    }

    /// Sets [`Config::probe_timeout`].
    pub fn probe_timeout(mut self, ms: Millis) -> Self {
        self.probe_timeout = ms;
        self
    }

    /// Sets [`Config::page_limit`].
    pub fn page_limit(mut self, events: u32) -> Self {
        self.page_limit = events;
        self
    }

    /// Sets [`Config::max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`Config::senders`].
    pub fn senders(mut self, on: bool) -> Self {
        self.senders = on;
        self
    }

    /// The URL to open the WebSocket with: the endpoint `ws` ([`crate::http::Endpoints::ws`])
    /// with `?ext=sender` when [`Config::senders`] is set.
    pub fn ws_url(&self, ws: &str) -> alloc::string::String {
        crate::http::with_senders(ws.into(), self.senders)
    }

    /// Sets [`Config::token_provider`].
    pub fn token_provider(mut self, present: bool) -> Self {
        self.token_provider = present;
        self
    }

    /// Sets [`Config::idempotency_window`].
    pub fn idempotency_window(mut self, ms: Millis) -> Self {
        self.idempotency_window = ms;
        self
    }

    /// Sets [`Config::instance`] (12 random bytes).
    pub fn instance(mut self, random: [u8; 12]) -> Self {
        self.instance = Some(random);
        self
    }

    /// Sets [`Config::offline_queue`].
    pub fn offline_queue(mut self, sends: usize) -> Self {
        self.offline_queue = sends;
        self
    }

    /// Sets [`Config::max_buffered`].
    pub fn max_buffered(mut self, events: usize) -> Self {
        self.max_buffered = events;
        self
    }

    /// The backoff ceiling after `attempt` consecutive failures: `min_backoff` doubled per
    /// failure after the first, at most `max_backoff`, and at least 1.
    pub(super) fn backoff_ceiling(&self, attempt: u32) -> Millis {
        let exp = self.min_backoff.saturating_mul(1u64 << attempt.min(32).saturating_sub(1));
        // Not `clamp`, which panics when the bounds are crossed: a `max_backoff` below
        // `min_backoff` (a user's option) caps it.
        exp.max(self.min_backoff).min(self.max_backoff).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn backoff_grows_to_its_ceiling_and_crossed_bounds_do_not_panic() {
        let cfg = Config::default().min_backoff(250).max_backoff(30_000);
        let ceilings: alloc::vec::Vec<Millis> = (0..10).map(|a| cfg.backoff_ceiling(a)).collect();
        assert_eq!(ceilings, [250, 250, 500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]);
        assert_eq!(cfg.backoff_ceiling(u32::MAX), 30_000);
        let crossed = Config::default().min_backoff(250).max_backoff(100);
        assert!((0..40).all(|a| crossed.backoff_ceiling(a) == 100));
        let zero = Config::default().min_backoff(0).max_backoff(0);
        assert_eq!(zero.backoff_ceiling(3), 1);
    }

    #[test]
    fn setters_set_their_field_and_defaults_are_the_documented_ones() {
        let d = Config::default();
        assert_eq!(
            (d.min_backoff, d.max_backoff, d.connect_timeout, d.request_timeout, d.idle_timeout, d.probe_timeout),
            (250, 30_000, 10_000, 30_000, 30_000, 10_000)
        );
        assert_eq!((d.page_limit, d.offline_queue, d.max_buffered), (1000, 1000, 10_000));
        assert_eq!((d.idempotency_window, d.instance), (600_000, None));
        let c = Config::default()
            .min_backoff(1)
            .max_backoff(2)
            .connect_timeout(3)
            .request_timeout(4)
            .idle_timeout(5)
            .probe_timeout(6)
            .page_limit(7)
            .offline_queue(8)
            .max_buffered(9)
            .idempotency_window(10)
            .instance([11; 12]);
        assert_eq!(
            (c.min_backoff, c.max_backoff, c.connect_timeout, c.request_timeout, c.idle_timeout, c.probe_timeout),
            (1, 2, 3, 4, 5, 6)
        );
        assert_eq!((c.page_limit, c.offline_queue, c.max_buffered), (7, 8, 9));
        assert_eq!((c.idempotency_window, c.instance), (10, Some([11; 12])));
    }
}
