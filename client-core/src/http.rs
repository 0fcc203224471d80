//! The HTTP side of the protocol: a server's endpoints derived from its base URL, the log
//! endpoint's query string (`GET /log/<path>?n=..|after=..&limit=..`) and its response body.
//!
//! The server parses queries with [`LogQuery::parse`] and the clients write them with
//! [`LogQuery::to_query`], so the format has one definition (`docs/PROTOCOL.md`, section 9).

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::num::NonZeroU64;

use crate::timestamp::{Timestamp, TimestampError};
use crate::wire::{Event, LineError, parse_event};

/// A server's endpoints, derived from its base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The WebSocket endpoint: `ws://host:port/prefix/ws` (`wss://` with TLS).
    pub ws: String,
    /// The HTTP base of the log endpoint: `http://host:port/prefix` (`https://` with TLS);
    /// log targets ([`LogQuery::target`]) are appended to it.
    pub http: String,
    /// Whether the URL asked for TLS (`wss://` or `https://`).
    pub tls: bool,
}

impl Endpoints {
    /// Derives the endpoints from `ws://host[:port][/prefix]` (or `http://`, `wss://`,
    /// `https://`); a trailing `/` or `/ws` is accepted.
    pub fn from_base(url: &str) -> Result<Endpoints, UrlError> {
        let bad = || UrlError::Malformed { url: url.into() };
        let (scheme, rest) = url.trim().split_once("://").ok_or_else(bad)?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => return Err(bad()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains(['?', '#', '@']) {
            return Err(bad());
        }
        let mut prefix = path.trim_end_matches('/');
        if let Some(p) = prefix.strip_suffix("/ws") {
            prefix = p;
        }
        if prefix.contains(['?', '#']) {
            return Err(bad());
        }
        let (ws, http) = if tls { ("wss", "https") } else { ("ws", "http") };
        Ok(Endpoints { ws: format!("{ws}://{authority}{prefix}/ws"), http: format!("{http}://{authority}{prefix}"), tls })
    }
}

/// A server URL that cannot be used. Nothing was attempted; fix the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlError {
    /// Not `ws://host[:port][/prefix]` (nor `wss://`, `http://`, `https://`).
    Malformed {
        /// The URL as given.
        url: String,
    },
    /// The URL asks for TLS (`wss://`, `https://`) and the driver has none built in.
    TlsUnsupported {
        /// The URL as given.
        url: String,
    },
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Malformed { url } => {
                write!(f, "invalid server URL \"{url}\": expected ws://host:port (or wss://, http://, https://)")
            }
            UrlError::TlsUnsupported { url } => {
                write!(f, "invalid server URL \"{url}\": TLS is not built into this client; use ws:// or http://")
            }
        }
    }
}

impl core::error::Error for UrlError {}

/// What a log request asks for: the query string of `GET /log/<path>`.
///
/// `n` cannot be combined with `after` or `limit`, so it is a variant of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LogQuery {
    /// No parameter: the whole log (the original's format).
    #[default]
    All,
    /// `n=K`: the last K events.
    Last(NonZeroU64),
    /// `after` and/or `limit`: a cursor page. [`LogQuery::parse`] returns this variant only
    /// with at least one of them; with neither, [`LogQuery::to_query`] writes no parameter,
    /// which asks for [`LogQuery::All`].
    Page {
        /// Exclusive lower bound (`None`: from the oldest event).
        after: Option<Timestamp>,
        /// Requested page size (capped by the server; `None`: the server's cap).
        limit: Option<NonZeroU64>,
    },
}

/// A parameter of the log query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogParam {
    /// `n`.
    N,
    /// `after`.
    After,
    /// `limit`.
    Limit,
}

impl LogParam {
    /// The parameter's name in the query string.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogParam::N => "n",
            LogParam::After => "after",
            LogParam::Limit => "limit",
        }
    }
}

/// Why a log query is refused. Its `Display` is the one-line reason the server sends with
/// status 400 (`docs/PROTOCOL.md`, section 9.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogQueryError {
    /// A parameter appears more than once.
    Repeated(LogParam),
    /// A value is not valid percent-encoded UTF-8.
    NotUtf8(LogParam),
    /// `n` is not an integer from 1 with at most 19 digits.
    LineCount,
    /// `limit` is not an integer from 1 with at most 19 digits.
    Limit,
    /// `after` is not a timestamp.
    After(TimestampError),
    /// `n` together with `after` or `limit`.
    Combined,
}

impl fmt::Display for LogQueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogQueryError::Repeated(p) => write!(f, "parameter {} given more than once", p.as_str()),
            LogQueryError::NotUtf8(p) => write!(f, "parameter {} is not valid percent-encoded UTF-8", p.as_str()),
            LogQueryError::LineCount => f.write_str("invalid line count"),
            LogQueryError::Limit => f.write_str("invalid limit: must be an integer >= 1"),
            LogQueryError::After(e) => write!(f, "invalid after timestamp: {e}"),
            LogQueryError::Combined => f.write_str("n cannot be combined with after or limit"),
        }
    }
}

impl core::error::Error for LogQueryError {}

fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                // Exactly two hex digits (`u8::from_str_radix` alone would take `+A`).
                let (hi, lo) = (hex_digit(*b.get(i + 1)?)?, hex_digit(*b.get(i + 2)?)?);
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn positive(v: &str) -> Option<NonZeroU64> {
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().and_then(NonZeroU64::new)
}

impl LogQuery {
    /// Parses a raw query string (`None`: the request had none). Unknown parameters are
    /// ignored. The checks run in the order that `docs/PROTOCOL.md` (9.4) gives.
    pub fn parse(raw: Option<&str>) -> Result<LogQuery, LogQueryError> {
        let (mut n, mut after, mut limit) = (None, None, None);
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (param, slot) = match k {
                "n" => (LogParam::N, &mut n),
                "after" => (LogParam::After, &mut after),
                "limit" => (LogParam::Limit, &mut limit),
                _ => continue,
            };
            if slot.is_some() {
                return Err(LogQueryError::Repeated(param));
            }
            *slot = Some(percent_decode(v).ok_or(LogQueryError::NotUtf8(param))?);
        }
        let n = n.map(|v| positive(v.trim()).ok_or(LogQueryError::LineCount)).transpose()?;
        let limit = limit.map(|v| positive(v.trim()).ok_or(LogQueryError::Limit)).transpose()?;
        let after = after.map(|v| v.trim().parse::<Timestamp>().map_err(LogQueryError::After)).transpose()?;
        LogQuery::combine(n, after, limit)
    }

    /// The query for separate parameters, as an application or a command line gives them,
    /// checked as the server would check them (the same errors): `n` and `limit` must be at
    /// least 1, and `n` cannot be combined with the others.
    pub fn from_parts(n: Option<u64>, after: Option<Timestamp>, limit: Option<u64>) -> Result<LogQuery, LogQueryError> {
        let n = n.map(|v| NonZeroU64::new(v).ok_or(LogQueryError::LineCount)).transpose()?;
        let limit = limit.map(|v| NonZeroU64::new(v).ok_or(LogQueryError::Limit)).transpose()?;
        LogQuery::combine(n, after, limit)
    }

    fn combine(n: Option<NonZeroU64>, after: Option<Timestamp>, limit: Option<NonZeroU64>) -> Result<LogQuery, LogQueryError> {
        match (n, after, limit) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(LogQueryError::Combined),
            (Some(k), None, None) => Ok(LogQuery::Last(k)),
            (None, None, None) => Ok(LogQuery::All),
            (None, after, limit) => Ok(LogQuery::Page { after, limit }),
        }
    }

    /// The query string, without `?`, in canonical form: `""`, `n=K`, `after=TS`, `limit=L` or
    /// `after=TS&limit=L`. [`LogQuery::parse`] reads it back as the same query, for every
    /// query it can return (counts have at most 19 digits there; larger ones are written as
    /// they are, and the server refuses them).
    pub fn to_query(&self) -> String {
        match self {
            LogQuery::All => String::new(),
            LogQuery::Last(k) => format!("n={k}"),
            LogQuery::Page { after: Some(a), limit: Some(l) } => format!("after={a}&limit={l}"),
            LogQuery::Page { after: Some(a), limit: None } => format!("after={a}"),
            LogQuery::Page { after: None, limit: Some(l) } => format!("limit={l}"),
            LogQuery::Page { after: None, limit: None } => String::new(),
        }
    }

    /// The request target for a normalized channel `path`: `/log{path}` (`/log/` for the root)
    /// followed by `?` and the query, if any. Append it to [`Endpoints::http`]. A `.` or `..`
    /// segment is written `%2e` or `%2e%2e`: HTTP clients (browsers, `fetch`, curl) remove
    /// dot segments from a URL, which would read another channel's log.
    pub fn target(&self, path: &str) -> String {
        // The root `/` gives `/log/`.
        let query = self.to_query();
        let path = escape_dot_segments(path);
        if query.is_empty() { format!("/log{path}") } else { format!("/log{path}?{query}") }
    }
}

/// The extension names a client may ask for with the `ext` query parameter of `/ws` and
/// `/log/...` (**Extension**, `docs/PROTOCOL.md` 2.6): verified senders.
pub const EXT_SENDER: &str = "sender";

/// `url` with `ext=sender` added to its query when `senders` is set (and unchanged
/// otherwise): the WebSocket URL or a log target of a client that wants the extended event
/// lines (`docs/PROTOCOL.md` 2.6 and 6.1.1).
pub fn with_senders(url: String, senders: bool) -> String {
    if !senders {
        return url;
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}ext={EXT_SENDER}")
}

/// Whether a raw query string asks for the `sender` extension (`ext=a,b,...` lists it; unknown
/// names are ignored, a repeated `ext` adds its names).
pub fn wants_senders(raw: Option<&str>) -> bool {
    extensions(raw).iter().any(|e| e == EXT_SENDER)
}

/// The names listed by the `ext` parameters of a raw query string (`ext=a,b`; a comma may be
/// written `%2C`; a repeated `ext` adds its names), each once, in order.
pub fn extensions(raw: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in raw.unwrap_or("").split('&').filter_map(|p| p.strip_prefix("ext=")) {
        let v = v.replace("%2C", ",").replace("%2c", ",");
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !out.iter().any(|o| o == name) {
                out.push(name.into());
            }
        }
    }
    out
}

/// `path` with its `.` and `..` segments percent-encoded (see [`LogQuery::target`]).
pub fn escape_dot_segments(path: &str) -> Cow<'_, str> {
    if !path.split('/').any(|s| s == "." || s == "..") {
        return Cow::Borrowed(path);
    }
    let parts: Vec<&str> = path
        .split('/')
        .map(|s| {
            if s == "." {
                "%2e"
            } else if s == ".." {
                "%2e%2e"
            } else {
                s
            }
        })
        .collect();
    Cow::Owned(parts.join("/"))
}

/// Parses a log response body (event lines joined by `\n`).
pub fn parse_log(body: &str) -> Result<Vec<Event<'static>>, LineError> {
    body.split('\n').filter(|l| !l.is_empty()).map(|l| parse_event(l.as_bytes()).map(Event::into_owned)).collect()
}

#[cfg(test)]
mod tests {
    use alloc::string::ToString;

    use super::*;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn parse(raw: Option<&str>) -> Result<LogQuery, String> {
        LogQuery::parse(raw).map_err(|e| e.to_string())
    }

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[test]
    fn extension_lists() {
        assert!(!wants_senders(None));
        assert!(wants_senders(Some("ext=sender")));
        assert!(wants_senders(Some("n=3&ext=presence,sender")));
        assert!(wants_senders(Some("ext=future%2Csender")));
        assert!(!wants_senders(Some("ext=senders")));
        assert!(!wants_senders(Some("next=sender")));
        assert_eq!(extensions(Some("ext=a,,b&ext=a,c")), ["a", "b", "c"]);
        assert_eq!(with_senders("ws://h/ws".into(), true), "ws://h/ws?ext=sender");
        assert_eq!(with_senders("/log/a?n=1".into(), true), "/log/a?n=1&ext=sender");
        assert_eq!(with_senders("/log/a".into(), false), "/log/a");
        // The log query ignores the parameter.
        assert_eq!(LogQuery::parse(Some("ext=sender&n=2")), Ok(LogQuery::Last(NonZeroU64::new(2).unwrap())));
    }

    #[test]
    fn parses() {
        assert_eq!(parse(None), Ok(LogQuery::All));
        assert_eq!(parse(Some("")), Ok(LogQuery::All));
        assert_eq!(parse(Some("n=3")), Ok(LogQuery::Last(nz(3))));
        assert_eq!(parse(Some("x=1&n=3")), Ok(LogQuery::Last(nz(3))));
        assert_eq!(parse(Some("n=0")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=-1")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=abc")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=")), Err("invalid line count".into()));
        let t = Timestamp::new(1_700_000_000, 5).unwrap();
        assert_eq!(parse(Some("after=1700000000.000000005&limit=10")), Ok(LogQuery::Page { after: Some(t), limit: Some(nz(10)) }));
        assert_eq!(parse(Some("after=%401700000000.000000005")), Ok(LogQuery::Page { after: Some(t), limit: None }));
        assert_eq!(parse(Some("after=@1700000000.000000005")), Ok(LogQuery::Page { after: Some(t), limit: None }));
        assert_eq!(parse(Some("limit=2")), Ok(LogQuery::Page { after: None, limit: Some(nz(2)) }));
        assert!(parse(Some("after=17")).unwrap_err().starts_with("invalid after timestamp"));
        assert!(parse(Some("limit=0")).unwrap_err().starts_with("invalid limit"));
        assert!(parse(Some("n=1&after=1.000000000")).is_err());
        assert!(parse(Some("n=1&n=2")).is_err());
        assert!(parse(Some("after=%zz")).is_err());
        assert_eq!(parse(Some("n=99999999999999999999")), Err("invalid line count".into()));
    }

    #[test]
    fn refusals_are_the_documented_reasons_in_the_documented_order() {
        // docs/PROTOCOL.md 9.4: the bodies of the 400 responses, byte for byte.
        let cases = [
            ("n=1&n=2", "parameter n given more than once"),
            ("after=1.000000000&after=2.000000000", "parameter after given more than once"),
            ("limit=1&limit=1", "parameter limit given more than once"),
            ("n=%ff", "parameter n is not valid percent-encoded UTF-8"),
            ("after=%zz", "parameter after is not valid percent-encoded UTF-8"),
            ("limit=%4", "parameter limit is not valid percent-encoded UTF-8"),
            // Two hex digits exactly: `%+1` is no escape (it once decoded as 0x01).
            ("limit=%+1", "parameter limit is not valid percent-encoded UTF-8"),
            ("n=%-1", "parameter n is not valid percent-encoded UTF-8"),
            ("n=0&limit=0&after=x", "invalid line count"),
            ("limit=0&after=x", "invalid limit: must be an integer >= 1"),
            ("limit=12345678901234567890", "invalid limit: must be an integer >= 1"),
            ("after=17", "invalid after timestamp: timestamp must be SECONDS.NANOSECONDS with 9 nanosecond digits"),
            ("n=1&limit=2", "n cannot be combined with after or limit"),
            ("n=1&after=1.000000000", "n cannot be combined with after or limit"),
            // A repeated parameter is found while reading, before any value is checked.
            ("n=0&limit=1&limit=2", "parameter limit given more than once"),
        ];
        for (raw, reason) in cases {
            assert_eq!(parse(Some(raw)), Err(reason.into()), "{raw}");
        }
        assert_eq!(parse(Some("n=+7+")), Ok(LogQuery::Last(nz(7))), "+ decodes to a space, which is trimmed");
        assert_eq!(parse(Some("n")), Err("invalid line count".into()), "a part without = has an empty value");
    }

    #[test]
    fn from_parts_checks_like_the_server() {
        let t = Timestamp::new(1, 0).unwrap();
        assert_eq!(LogQuery::from_parts(None, None, None), Ok(LogQuery::All));
        assert_eq!(LogQuery::from_parts(Some(5), None, None), Ok(LogQuery::Last(nz(5))));
        assert_eq!(LogQuery::from_parts(None, Some(t), None), Ok(LogQuery::Page { after: Some(t), limit: None }));
        assert_eq!(LogQuery::from_parts(None, None, Some(3)), Ok(LogQuery::Page { after: None, limit: Some(nz(3)) }));
        assert_eq!(LogQuery::from_parts(Some(0), None, Some(0)), Err(LogQueryError::LineCount));
        assert_eq!(LogQuery::from_parts(None, Some(t), Some(0)), Err(LogQueryError::Limit));
        assert_eq!(LogQuery::from_parts(Some(1), Some(t), None), Err(LogQueryError::Combined));
        assert_eq!(LogQuery::from_parts(Some(1), None, Some(1)), Err(LogQueryError::Combined));
    }

    #[test]
    fn queries_and_targets_round_trip() {
        let t = Timestamp::new(1_700_000_000, 5).unwrap();
        let queries = [
            (LogQuery::All, ""),
            (LogQuery::Last(nz(10)), "n=10"),
            (LogQuery::Last(nz(9_999_999_999_999_999_999)), "n=9999999999999999999"),
            (LogQuery::Page { after: Some(t), limit: None }, "after=1700000000.000000005"),
            (LogQuery::Page { after: None, limit: Some(nz(2)) }, "limit=2"),
            (LogQuery::Page { after: Some(t), limit: Some(nz(1000)) }, "after=1700000000.000000005&limit=1000"),
        ];
        for (q, s) in queries {
            assert_eq!(q.to_query(), s);
            assert_eq!(LogQuery::parse(Some(s)), Ok(q), "{s}");
        }
        // Counts of 20 digits are written as they are, and refused as the server refuses them.
        let huge = LogQuery::Last(nz(u64::MAX));
        assert_eq!(huge.to_query(), "n=18446744073709551615");
        assert_eq!(LogQuery::parse(Some(&huge.to_query())), Err(LogQueryError::LineCount));
        assert_eq!(LogQuery::Page { after: None, limit: None }.to_query(), "");
        assert_eq!(LogQuery::All.target("/"), "/log/");
        assert_eq!(LogQuery::All.target("/chat"), "/log/chat");
        // Dot segments, which HTTP clients would remove, are escaped.
        assert_eq!(LogQuery::All.target("/a/.."), "/log/a/%2e%2e");
        assert_eq!(LogQuery::All.target("/./a/..b/.c"), "/log/%2e/a/..b/.c");
        assert_eq!(LogQuery::Last(nz(3)).target("/chat/room1"), "/log/chat/room1?n=3");
        assert_eq!(LogQuery::Page { after: Some(t), limit: Some(nz(2)) }.target("/"), "/log/?after=1700000000.000000005&limit=2");
    }

    /// Query strings made of the parameters' names, other names and tricky values.
    #[cfg(not(target_arch = "wasm32"))]
    fn arb_query() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let name = prop_oneof![Just("n"), Just("after"), Just("limit"), Just("x"), Just("N"), Just("")];
        let value = prop_oneof![
            Just(String::new()),
            (0u64..30).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("1700000000.000000005".to_string()),
            Just("%401700000000.000000005".to_string()),
            Just("+12+".to_string()),
            Just("%zz".to_string()),
            Just("%ff".to_string()),
            "[0-9a-f%.@+ -]{0,12}",
        ];
        let part = (name, proptest::option::of(value)).prop_map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k.to_string(),
        });
        proptest::collection::vec(part, 0..4).prop_map(|parts| parts.join("&"))
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest::proptest! {
        #[test]
        fn accepted_queries_round_trip_through_their_canonical_form(raw in arb_query()) {
            match LogQuery::parse(Some(&raw)) {
                Ok(q) => {
                    if let LogQuery::Page { after, limit } = q {
                        proptest::prop_assert!(after.is_some() || limit.is_some());
                    }
                    proptest::prop_assert_eq!(LogQuery::parse(Some(&q.to_query())), Ok(q));
                }
                Err(e) => {
                    let reason = e.to_string();
                    proptest::prop_assert!(!reason.is_empty() && !reason.contains('\n'));
                }
            }
        }
    }

    #[test]
    fn endpoints_from_base_urls() {
        let e = Endpoints::from_base("ws://127.0.0.1:8080").unwrap();
        assert_eq!((e.ws.as_str(), e.http.as_str(), e.tls), ("ws://127.0.0.1:8080/ws", "http://127.0.0.1:8080", false));
        assert_eq!(Endpoints::from_base("http://h:1/").unwrap().ws, "ws://h:1/ws");
        assert_eq!(Endpoints::from_base("ws://h:1/ws").unwrap().http, "http://h:1");
        let p = Endpoints::from_base("ws://h/ivy/").unwrap();
        assert_eq!((p.ws.as_str(), p.http.as_str()), ("ws://h/ivy/ws", "http://h/ivy"));
        let s = Endpoints::from_base(" HTTPS://h/p/ ").unwrap();
        assert_eq!((s.ws.as_str(), s.http.as_str(), s.tls), ("wss://h/p/ws", "https://h/p", true));
        assert!(Endpoints::from_base("wss://h").unwrap().tls);
        for bad in ["h:1", "ftp://h", "ws://", "ws://h/x?y", "ws://u@h", "ws://h#x", "ws://h/a#b"] {
            assert_eq!(Endpoints::from_base(bad), Err(UrlError::Malformed { url: bad.into() }), "{bad}");
        }
        assert_eq!(
            UrlError::Malformed { url: "ftp://h".into() }.to_string(),
            "invalid server URL \"ftp://h\": expected ws://host:port (or wss://, http://, https://)"
        );
        assert_eq!(
            UrlError::TlsUnsupported { url: "wss://h".into() }.to_string(),
            "invalid server URL \"wss://h\": TLS is not built into this client; use ws:// or http://"
        );
    }

    #[test]
    fn log_bodies() {
        let body = "@1700000000.000000001:/a:x%0Ay\n@1700000000.000000002:/a/b:\n";
        let events = parse_log(body).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!((&*events[0].path, &*events[0].data), ("/a", &b"x\ny"[..]));
        assert_eq!(parse_log("").unwrap(), []);
        assert!(parse_log("@1700000000.000000001:/a:x\nnot a line\n").is_err());
    }
}
