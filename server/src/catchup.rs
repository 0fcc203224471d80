//! Catching up from the log: which of a log's lines a connection that fell behind is owed.
//!
//! A connection behind (see [`crate::conn::Outbox`]) rejoins live delivery at a position P and
//! is owed, from the log, the events after the point where it fell behind and up to P that live
//! delivery would have given it: those of its subscriptions (each within the part of the log
//! during which it held), once each, without its own. The writer reads them from one log, that
//! of the deepest channel every subscription is within (the channel itself for a single
//! subscription), page by page, and keeps the lines this [`Filter`] wants. Log lines are the
//! live lines, byte for byte.

use std::collections::HashMap;
use std::sync::Arc;

use ivy_client_core::Timestamp;
use ivy_client_core::path::{ROOT, ancestors, is_within};

/// The lines a connection is owed (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct Filter {
    /// Per channel, the parts of the log `(after, up to]` during which it was subscribed.
    windows: HashMap<Arc<str>, Vec<(Timestamp, Timestamp)>>,
    /// The connection's own events, ascending.
    own: Vec<Timestamp>,
    /// The log to read.
    channel: Option<Arc<str>>,
}

impl Filter {
    /// The filter of windows `(channel, after, up to]` and own events (ascending).
    pub(crate) fn new(windows: Vec<(Arc<str>, Timestamp, Timestamp)>, own: Vec<Timestamp>) -> Filter {
        let mut channel: Option<Arc<str>> = None;
        let mut by_channel: HashMap<Arc<str>, Vec<(Timestamp, Timestamp)>> = HashMap::new();
        for (ch, after, until) in windows {
            channel = Some(match channel {
                None => ch.clone(),
                Some(c) => common(&c, &ch),
            });
            by_channel.entry(ch).or_default().push((after, until));
        }
        Filter { windows: by_channel, own, channel }
    }

    /// The channel whose log holds every line owed (none: nothing is).
    pub(crate) fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// Whether the event at `ts` on `path` is owed.
    pub(crate) fn wants(&self, ts: Timestamp, path: &str) -> bool {
        if self.own.binary_search(&ts).is_ok() {
            return false;
        }
        ancestors(path).any(|ch| self.windows.get(ch).is_some_and(|w| w.iter().any(|&(after, until)| after < ts && ts <= until)))
    }
}

/// The deepest channel that both `a` and `b` are within.
fn common(a: &Arc<str>, b: &str) -> Arc<str> {
    if is_within(b, a) {
        return a.clone();
    }
    match ancestors(a).find(|c| is_within(b, c)) {
        Some(c) => c.into(),
        None => ROOT.into(),
    }
}

/// The timestamp and path of a log line (`@ts:path:data`, or the extended `@ts~sender:path:data`).
pub(crate) fn split_line(line: &[u8]) -> Option<(Timestamp, &str)> {
    let rest = line.strip_prefix(b"@")?;
    let c1 = rest.iter().position(|&b| b == b':')?;
    let head = &rest[..c1];
    let ts = Timestamp::parse(head.iter().position(|&b| b == b'~').map_or(head, |t| &head[..t])).ok()?;
    let rest = &rest[c1 + 1..];
    let c2 = rest.iter().position(|&b| b == b':')?;
    Some((ts, std::str::from_utf8(&rest[..c2]).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(n: u128) -> Timestamp {
        Timestamp::from_nanos(n)
    }

    fn w(ch: &str, after: u128, until: u128) -> (Arc<str>, Timestamp, Timestamp) {
        (ch.into(), t(after), t(until))
    }

    #[test]
    fn the_log_read_is_the_deepest_common_channel() {
        let ch = |ws: Vec<(Arc<str>, Timestamp, Timestamp)>| Filter::new(ws, vec![]).channel().map(str::to_string);
        assert_eq!(ch(vec![]), None);
        assert_eq!(ch(vec![w("/a/b", 0, 9)]).as_deref(), Some("/a/b"));
        assert_eq!(ch(vec![w("/a/b", 0, 9), w("/a", 0, 9)]).as_deref(), Some("/a"));
        assert_eq!(ch(vec![w("/a", 0, 9), w("/a/b/c", 0, 9)]).as_deref(), Some("/a"));
        assert_eq!(ch(vec![w("/a/b", 0, 9), w("/a/c", 0, 9)]).as_deref(), Some("/a"));
        assert_eq!(ch(vec![w("/a/b", 0, 9), w("/ab", 0, 9)]).as_deref(), Some("/"));
        assert_eq!(ch(vec![w("/a//b", 0, 9), w("/a/c", 0, 9)]).as_deref(), Some("/a"));
    }

    #[test]
    fn lines_are_owed_within_their_windows_and_never_twice_or_own() {
        // /a from 10 on, /a/b from 0 to 20 (unsubscribed), /x from 0; own event at 15.
        let f = Filter::new(vec![w("/a", 10, 100), w("/a/b", 0, 20), w("/x", 0, 100)], vec![t(15)]);
        assert_eq!(f.channel(), Some("/"));
        assert!(f.wants(t(5), "/a/b/c"), "through /a/b");
        assert!(!f.wants(t(5), "/a/c"), "before /a held");
        assert!(f.wants(t(11), "/a/c"));
        assert!(!f.wants(t(15), "/a/b"), "its own");
        assert!(f.wants(t(25), "/a/b"), "through /a");
        assert!(!f.wants(t(10), "/a"), "the position itself was before the subscription");
        assert!(f.wants(t(100), "/x/y"));
        assert!(!f.wants(t(101), "/x"), "after the rejoin");
        assert!(!f.wants(t(50), "/y"));
    }

    #[test]
    fn log_lines_split() {
        assert_eq!(split_line(b"@0000000001.000000002:/a/b:x:y"), Some((Timestamp::new(1, 2).unwrap(), "/a/b")));
        assert_eq!(split_line(b"@0000000001.000000002~=a%3Ab:/a/b:x:y"), Some((Timestamp::new(1, 2).unwrap(), "/a/b")));
        assert_eq!(split_line(b"@0000000001.000000002~-:/a:x"), Some((Timestamp::new(1, 2).unwrap(), "/a")));
        assert_eq!(split_line(b"#k#@0000000001.000000002"), None);
        assert_eq!(split_line(b"@x:/a:b"), None);
    }
}
