//! The server's metrics, exposed by `GET /metrics` in the Prometheus text format
//! ([`crate::Ivy::ops_router`]) and by [`crate::Ivy::metrics`].
//!
//! Built on `prometheus-client` (the Prometheus project's Rust client): one registry per
//! [`crate::Ivy`], no global state, so that an embedding application with a registry or a
//! metrics recorder of its own, or two servers in one process, do not collide (the `metrics`
//! crate's exporters install a process-wide recorder). Its counters are atomics behind an
//! `Arc`: every handle the hot paths use is resolved once, when the server opens (no label
//! lookup, no lock, no allocation when counting).
//!
//! What counting costs where it is frequent:
//!
//! - deliveries: the fan-out adds up, in two local integers, the events it queued and their
//!   bytes while it delivers a batch, and adds them to the counters once per batch (three
//!   atomic additions per group commit, whatever the number of subscribers); catch-up from
//!   the log counts per page read;
//! - group commits: a histogram observation of the batch's size and of the time its append
//!   and flush took, once per group commit (the histogram takes its own lock, uncontended:
//!   only the sequencer observes it);
//! - refusals, closes, log reads: one atomic addition each (and a histogram observation per
//!   log read);
//! - what is a state rather than a count (connections, subscriptions, outbound queues, the
//!   memory budget) is sampled when `/metrics` is scraped, and costs nothing in between.
//!
//! No metric carries a channel name, a path or an identity: the labels are close codes,
//! refusal reasons and status codes, a bounded set.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::engine::PublishError;

/// A label set of one label.
type Label = [(&'static str, &'static str); 1];

/// The close codes counted by name; any other code is counted as `other`.
const CLOSE_CODES: [(u16, &str); 9] = [
    (crate::conn::PEER_GONE, "none"),
    (0, "1001"),
    (1001, "1001"),
    (1002, "1002"),
    (1007, "1007"),
    (1009, "1009"),
    (4000, "4000"),
    (4001, "4001"),
    (4003, "4003"),
];

/// The status codes of log reads counted by name; any other as `other`.
const LOG_STATUSES: [(u16, &str); 9] =
    [(200, "200"), (304, "304"), (400, "400"), (401, "401"), (403, "403"), (404, "404"), (500, "500"), (503, "503"), (0, "other")];

/// Deliveries, counted by the fan-out once per batch and by catch-up once per page.
#[derive(Debug, Clone, Default)]
pub(crate) struct Delivery {
    published: Counter,
    events: Counter,
    bytes: Counter,
}

impl Delivery {
    /// A batch of `published` stored events is handed to delivery (counted before any of
    /// their sends is acknowledged, so that `/info` read after an ack counts the event).
    #[inline]
    pub(crate) fn published(&self, published: usize) {
        self.published.inc_by(published as u64);
    }

    /// A batch was delivered: `events` queued for subscribers, `bytes` their lines' bytes.
    #[inline]
    pub(crate) fn batch(&self, events: u64, bytes: u64) {
        self.caught_up(events, bytes);
    }

    /// `events` of `bytes` were written to a connection from the log (catching up).
    #[inline]
    pub(crate) fn caught_up(&self, events: u64, bytes: u64) {
        if events > 0 {
            self.events.inc_by(events);
            self.bytes.inc_by(bytes);
        }
    }

    /// Events published since the server started.
    pub(crate) fn published_total(&self) -> u64 {
        self.published.get()
    }
}

/// Commands refused, by reason.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refused {
    pub(crate) rate_limited: Counter,
    pub(crate) bytes_rate_limited: Counter,
    pub(crate) identity_bytes_rate_limited: Counter,
    pub(crate) forbidden: Counter,
    pub(crate) overloaded: Counter,
}

impl Refused {
    /// A send refused by a byte budget: the identity's (`identity`) or the connection's.
    pub(crate) fn bytes(&self, identity: bool) {
        if identity {
            self.identity_bytes_rate_limited.inc()
        } else {
            self.bytes_rate_limited.inc()
        };
    }
}

/// What an engine reports: its group commits and the events it refused. Given to the engine
/// in [`crate::engine::Context::metrics`]; cheap to clone (its handles are shared).
#[derive(Debug, Clone)]
pub struct EngineMetrics {
    commit_events: Histogram,
    commit_seconds: Histogram,
    store_full: Counter,
    storage: Counter,
    shutting_down: Counter,
    idempotency_keys: Gauge,
    idempotency_replays: Counter,
    idempotency_evicted: Counter,
}

impl Default for EngineMetrics {
    fn default() -> EngineMetrics {
        EngineMetrics {
            // 1, 2, 4, ... 4096 (the sequencer's batch limit).
            commit_events: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            // 50 µs to about 3.3 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            store_full: Counter::default(),
            storage: Counter::default(),
            shutting_down: Counter::default(),
            idempotency_keys: Gauge::default(),
            idempotency_replays: Counter::default(),
            idempotency_evicted: Counter::default(),
        }
    }
}

impl EngineMetrics {
    /// A group commit of `events` events was stored (appended and made as durable as the
    /// engine promises) in `took`. Once per group commit.
    pub fn group_commit(&self, events: usize, took: Duration) {
        self.commit_events.observe(events as f64);
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// `events` events were refused with `error` (not stored).
    pub fn refused(&self, events: usize, error: &PublishError) {
        let counter = match error {
            PublishError::StoreFull(_) => &self.store_full,
            PublishError::ShuttingDown => &self.shutting_down,
            PublishError::Storage(_) | PublishError::InvalidPath(_) | PublishError::InvalidId => &self.storage,
        };
        counter.inc_by(events as u64);
    }

    /// The engine remembers `n` send ids (`ivy_idempotency_keys`).
    pub fn idempotency_keys(&self, n: usize) {
        self.idempotency_keys.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `n` sends were repeats of stored ones, answered with the first one's timestamp
    /// (`ivy_idempotency_replays_total`).
    pub fn replayed(&self, n: usize) {
        self.idempotency_replays.inc_by(n as u64);
    }

    /// `n` ids were forgotten before their window ended, beyond the key limit
    /// (`ivy_idempotency_evicted_total`).
    pub fn evicted(&self, n: usize) {
        self.idempotency_evicted.inc_by(n as u64);
    }
}

/// Log reads (`GET /log/...`): how many, by status, and how long until their answer began.
#[derive(Debug, Clone)]
pub(crate) struct LogReads {
    by_status: Vec<(u16, Counter)>,
    seconds: Histogram,
}

impl LogReads {
    /// A log read answered `status` after `took` (until its headers; a streamed body goes on).
    pub(crate) fn read(&self, status: u16, took: Duration) {
        let counter = self.by_status.iter().find(|(s, _)| *s == status).or_else(|| self.by_status.last());
        if let Some((_, c)) = counter {
            c.inc();
        }
        self.seconds.observe(took.as_secs_f64());
    }
}

/// What is sampled when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Open WebSocket connections.
    pub(crate) connections: usize,
    /// Of them, those behind (catching up from the log).
    pub(crate) behind: usize,
    /// Subscriptions of all connections.
    pub(crate) subscriptions: usize,
    /// Bytes of text lines in the outbound queues, summed over the connections.
    pub(crate) queued_bytes: usize,
    /// The most bytes one connection's outbound queue holds.
    pub(crate) queued_bytes_max: usize,
    /// Bytes held for clients (the memory budget's count).
    pub(crate) budget_used: usize,
    /// Seconds since the server started.
    pub(crate) uptime: f64,
}

/// The sampled gauges.
#[derive(Debug, Default)]
struct Sampled {
    connections: Gauge,
    behind: Gauge,
    subscriptions: Gauge,
    queued_bytes: Gauge,
    queued_bytes_max: Gauge,
    budget_used: Gauge,
    uptime: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// The server's metrics (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) delivery: Delivery,
    pub(crate) refused: Refused,
    pub(crate) engine: EngineMetrics,
    pub(crate) log_reads: LogReads,
    closes: Vec<(u16, Counter)>,
    sampled: Sampled,
}

/// How a metric's text is formatted ([`Metrics::encode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// The Prometheus text format, version 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text (what Prometheus asks for first, in `Accept`).
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of the format.
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

impl Metrics {
    /// The metrics of a server of `version`, node `node_id`, engine `engine` (its labels on
    /// `ivy_info`), memory budget `budget_limit`.
    pub(crate) fn new(version: &str, node_id: &str, engine: &str, budget_limit: usize) -> Metrics {
        let mut r = Registry::default();
        let info = Family::<Vec<(&'static str, String)>, Gauge>::default();
        info.get_or_create(&vec![("version", version.to_string()), ("node_id", node_id.to_string()), ("engine", engine.to_string())])
            .set(1);
        r.register("ivy_info", "The server: its version, node id and engine (the value is always 1)", info);

        let delivery = Delivery::default();
        r.register(
            "ivy_events_published",
            "Events stored and handed to delivery by this node since it started",
            delivery.published.clone(),
        );
        r.register(
            "ivy_deliveries",
            "Events delivered to connections: queued for a subscriber live, or written to one catching up from the log",
            delivery.events.clone(),
        );
        r.register("ivy_delivered_bytes", "Bytes of the event lines delivered (ivy_deliveries)", delivery.bytes.clone());

        let refused_family = Family::<Label, Counter>::default();
        let reason = |r: &'static str| refused_family.get_or_create(&[("reason", r)]).clone();
        let refused = Refused {
            rate_limited: reason("rate_limited"),
            bytes_rate_limited: reason("bytes_rate_limited"),
            identity_bytes_rate_limited: reason("identity_bytes_rate_limited"),
            forbidden: reason("forbidden"),
            overloaded: reason("overloaded"),
        };
        r.register(
            "ivy_commands_refused",
            "WebSocket commands refused: rate_limited (--rate-limit), bytes_rate_limited (--byte-rate), identity_bytes_rate_limited \
             (--byte-rate-per-identity), forbidden (no grant), overloaded (--memory-budget used up)",
            refused_family,
        );

        let closes_family = Family::<Label, Counter>::default();
        let mut closes: Vec<(u16, Counter)> =
            CLOSE_CODES.iter().map(|&(code, label)| (code, closes_family.get_or_create(&[("code", label)]).clone())).collect();
        // Last: what any other code counts in.
        closes.push((u16::MAX, closes_family.get_or_create(&[("code", "other")]).clone()));
        r.register(
            "ivy_connections_closed",
            "WebSocket connections closed, by the close code the server sent (none: the client closed or vanished first)",
            closes_family,
        );

        let failures = Family::<Label, Counter>::default();
        let failure = |r: &'static str| failures.get_or_create(&[("reason", r)]).clone();
        let engine = EngineMetrics {
            store_full: failure("store_full"),
            storage: failure("storage"),
            shutting_down: failure("shutting_down"),
            ..EngineMetrics::default()
        };
        r.register("ivy_group_commit_events", "Events per group commit", engine.commit_events.clone());
        r.register(
            "ivy_idempotency_keys",
            "Send ids the engine remembers (--idempotency-window, --idempotency-max-keys)",
            engine.idempotency_keys.clone(),
        );
        r.register(
            "ivy_idempotency_replays",
            "Sends with an id already stored (repeats): answered with the first one's timestamp, nothing stored",
            engine.idempotency_replays.clone(),
        );
        r.register(
            "ivy_idempotency_evicted",
            "Send ids forgotten before their window ended, beyond --idempotency-max-keys",
            engine.idempotency_evicted.clone(),
        );
        r.register("ivy_group_commit_seconds", "Time to store a group commit (append and flush)", engine.commit_seconds.clone());
        r.register("ivy_events_refused", "Events the engine did not store: store_full, storage (a write failed), shutting_down", failures);

        let log_family = Family::<Label, Counter>::default();
        let by_status = LOG_STATUSES.iter().map(|&(s, label)| (s, log_family.get_or_create(&[("code", label)]).clone())).collect();
        // 0.5 ms to about 8 s.
        let log_reads = LogReads { by_status, seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 15)) };
        r.register("ivy_log_reads", "Log reads (GET and HEAD /log/...), by HTTP status", log_family);
        r.register("ivy_log_read_seconds", "Time from a log read's arrival to its answer's headers", log_reads.seconds.clone());

        let sampled = Sampled::default();
        r.register("ivy_connections", "Open WebSocket connections", sampled.connections.clone());
        r.register(
            "ivy_connections_behind",
            "Connections whose outbound queue overflowed and that are catching up from the log",
            sampled.behind.clone(),
        );
        r.register("ivy_subscriptions", "Subscriptions of all connections", sampled.subscriptions.clone());
        r.register(
            "ivy_outbound_queue_bytes",
            "Bytes of lines waiting in the connections' outbound queues, summed (sampled at scrape)",
            sampled.queued_bytes.clone(),
        );
        r.register(
            "ivy_outbound_queue_bytes_max",
            "The most bytes waiting in one connection's outbound queue (sampled at scrape)",
            sampled.queued_bytes_max.clone(),
        );
        r.register("ivy_memory_budget_used_bytes", "Bytes held for clients, counted in --memory-budget", sampled.budget_used.clone());
        let limit: Gauge = Gauge::default();
        limit.set(i64::try_from(budget_limit).unwrap_or(i64::MAX));
        r.register("ivy_memory_budget_bytes", "The memory budget (--memory-budget; 0: none)", limit);
        r.register("ivy_uptime_seconds", "Seconds since the server started", sampled.uptime.clone());

        Metrics { registry: r, delivery, refused, engine, log_reads, closes, sampled }
    }

    /// A connection ended with `code` (`conn::Ending::code`).
    pub(crate) fn closed(&self, code: u16) {
        let counter = self.closes.iter().find(|(c, _)| *c == code).or_else(|| self.closes.last());
        if let Some((_, c)) = counter {
            c.inc();
        }
    }

    /// The text of every metric, with the sampled ones set from `sample`.
    pub(crate) fn encode(&self, sample: Sample, format: Format) -> String {
        let gauge = |g: &Gauge, v: usize| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        let s = &self.sampled;
        gauge(&s.connections, sample.connections);
        gauge(&s.behind, sample.behind);
        gauge(&s.subscriptions, sample.subscriptions);
        gauge(&s.queued_bytes, sample.queued_bytes);
        gauge(&s.queued_bytes_max, sample.queued_bytes_max);
        gauge(&s.budget_used, sample.budget_used);
        s.uptime.set(sample.uptime);
        let mut out = String::with_capacity(8 << 10);
        let encoded = match format {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry),
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &self.registry),
        };
        if let Err(e) = encoded {
            // Writing to a String does not fail; say so rather than serve half a page silently.
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }
}

/// Which format an `Accept` header asks for: OpenMetrics when it names it, otherwise the
/// Prometheus text format.
pub(crate) fn format_for(accept: Option<&str>) -> Format {
    match accept {
        Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
        _ => Format::Prometheus,
    }
}

/// The label of a close code in `ivy_connections_closed`.
#[cfg(test)]
fn close_label(code: u16) -> &'static str {
    CLOSE_CODES.iter().find(|(c, _)| *c == code).map_or("other", |(_, l)| l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn counts_show_in_both_formats() {
        let m = Metrics::new("1.2.3", "node-a", "memory", 1024);
        m.delivery.published(3);
        m.delivery.batch(6, 600);
        m.delivery.caught_up(2, 200);
        m.refused.rate_limited.inc();
        m.refused.bytes(true);
        m.closed(1009);
        m.closed(0);
        m.closed(4242);
        m.engine.group_commit(3, Duration::from_millis(2));
        m.engine.refused(2, &PublishError::StoreFull("full".into()));
        m.log_reads.read(200, Duration::from_millis(1));
        m.log_reads.read(418, Duration::from_millis(1));
        let sample = Sample { connections: 4, subscriptions: 5, queued_bytes_max: 7, uptime: 1.5, ..Sample::default() };
        let text = m.encode(sample, Format::Prometheus);
        assert_eq!(value(&text, "ivy_events_published_total"), 3.0);
        assert_eq!(value(&text, "ivy_deliveries_total"), 8.0);
        assert_eq!(value(&text, "ivy_delivered_bytes_total"), 800.0);
        assert_eq!(value(&text, "ivy_commands_refused_total{reason=\"rate_limited\"}"), 1.0);
        assert_eq!(value(&text, "ivy_commands_refused_total{reason=\"identity_bytes_rate_limited\"}"), 1.0);
        assert_eq!(value(&text, "ivy_connections_closed_total{code=\"1009\"}"), 1.0);
        assert_eq!(value(&text, "ivy_connections_closed_total{code=\"1001\"}"), 1.0);
        assert_eq!(value(&text, "ivy_connections_closed_total{code=\"other\"}"), 1.0);
        assert_eq!(value(&text, "ivy_group_commit_events_count"), 1.0);
        assert_eq!(value(&text, "ivy_group_commit_events_sum"), 3.0);
        assert_eq!(value(&text, "ivy_events_refused_total{reason=\"store_full\"}"), 2.0);
        assert_eq!(value(&text, "ivy_log_reads_total{code=\"200\"}"), 1.0);
        assert_eq!(value(&text, "ivy_log_reads_total{code=\"other\"}"), 1.0);
        assert_eq!(value(&text, "ivy_connections"), 4.0);
        assert_eq!(value(&text, "ivy_subscriptions"), 5.0);
        assert_eq!(value(&text, "ivy_outbound_queue_bytes_max"), 7.0);
        assert_eq!(value(&text, "ivy_memory_budget_bytes"), 1024.0);
        assert_eq!(value(&text, "ivy_uptime_seconds"), 1.5);
        assert!(text.contains("ivy_info{version=\"1.2.3\",node_id=\"node-a\",engine=\"memory\"} 1"), "{text}");
        assert!(!text.contains("# EOF"));
        let open = m.encode(sample, Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert_eq!(value(&open, "ivy_deliveries_total"), 8.0);
        assert_eq!(close_label(1), "none");
        assert_eq!(format_for(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")), Format::OpenMetrics);
        assert_eq!(format_for(Some("*/*")), Format::Prometheus);
        assert_eq!(format_for(None), Format::Prometheus);
    }
}
