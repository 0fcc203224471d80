//! Channel paths: normalization, validation and the ancestor chain used for bubbling.
//!
//! Rules (compatible with the original, minus its bugs): surrounding ASCII whitespace is
//! trimmed; a missing leading `/` is added; one trailing `/` is removed (so `/a/` is `/a`,
//! and an empty path or `/` is the root channel `/`); the result must consist of `/`
//! followed by characters from `[0-9a-z./-]` and must not end with `/` (except the root), so
//! `/a//` is refused rather than becoming a channel that no normalized name can address.
//! `/a//b` and `/a/../b` are distinct, valid channels: paths are names, not file-system paths.
//! Normalization is idempotent: a normalized path sent again names the same channel.

use alloc::borrow::Cow;
use alloc::string::String;
use core::fmt;

/// The root channel, whose subscribers receive every event.
pub const ROOT: &str = "/";

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A byte outside `[0-9a-z./-]` (uppercase, `_`, space, `:`, non-ASCII, ...).
    InvalidChar {
        /// The offending byte.
        byte: u8,
        /// Its offset in the normalized path.
        at: usize,
    },
    /// Still ends with `/` after one trailing `/` was removed (`/a//`).
    TrailingSlash,
    /// Longer than the configured limit once normalized.
    TooLong {
        /// Length of the normalized path in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// More levels than the configured limit ([`depth`]).
    TooDeep {
        /// The path's depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::InvalidChar { byte, at } => {
                if byte.is_ascii_graphic() {
                    write!(f, "invalid character '{}' at byte {at} of path (allowed: a-z 0-9 . - /)", *byte as char)
                } else {
                    write!(f, "invalid byte 0x{byte:02x} at byte {at} of path (allowed: a-z 0-9 . - /)")
                }
            }
            PathError::TrailingSlash => f.write_str("path must not end with '/' (only one trailing '/' is removed)"),
            PathError::TooLong { len, max } => write!(f, "path is {len} bytes long, the limit is {max}"),
            PathError::TooDeep { depth, max } => write!(f, "path has {depth} levels, the limit is {max}"),
        }
    }
}

impl core::error::Error for PathError {}

/// The number of levels of a normalized path below the root: 0 for `/`, 1 for `/a`, 2 for
/// `/a/b`. An event of a path of depth d is in d + 1 logs (its own and its ancestors').
pub fn depth(path: &str) -> usize {
    if path == ROOT { 0 } else { path.bytes().filter(|&b| b == b'/').count() }
}

/// Refuses a normalized path deeper than `max` levels.
pub fn check_depth(path: &str, max: usize) -> Result<(), PathError> {
    match depth(path) {
        d if d > max => Err(PathError::TooDeep { depth: d, max }),
        _ => Ok(()),
    }
}

/// Whether `b` may appear in a normalized path.
#[inline]
pub const fn is_path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'/')
}

/// Normalizes and validates a raw path; borrows when the input is already normal.
pub fn normalize(raw: &[u8]) -> Result<Cow<'_, str>, PathError> {
    let trimmed = raw.trim_ascii();
    let mut body = trimmed;
    if body.len() > 1 && body.last() == Some(&b'/') {
        body = &body[..body.len() - 1];
    }
    if body.len() > 1 && body.last() == Some(&b'/') {
        return Err(PathError::TrailingSlash);
    }
    let leading = body.first() == Some(&b'/');
    let offset = usize::from(!leading);
    for (i, &b) in body.iter().enumerate() {
        if !is_path_byte(b) {
            return Err(PathError::InvalidChar { byte: b, at: i + offset });
        }
    }
    // Only path bytes (ASCII) remain, so this cannot fail.
    let s = core::str::from_utf8(body).map_err(|_| PathError::InvalidChar { byte: 0, at: 0 })?;
    if leading {
        Ok(Cow::Borrowed(s))
    } else if s.is_empty() {
        Ok(Cow::Borrowed(ROOT))
    } else {
        let mut owned = String::with_capacity(s.len() + 1);
        owned.push('/');
        owned.push_str(s);
        // `a/` trimmed to `a` above, then prefixed: `/a`. `/` alone is handled as leading.
        Ok(Cow::Owned(owned))
    }
}

/// [`normalize`] plus a length limit on the normalized path.
pub fn normalize_with_limit(raw: &[u8], max: usize) -> Result<Cow<'_, str>, PathError> {
    let p = normalize(raw)?;
    if p.len() > max {
        return Err(PathError::TooLong { len: p.len(), max });
    }
    Ok(p)
}

/// Whether `path` is already normalized and valid.
pub fn is_normalized(path: &str) -> bool {
    matches!(normalize(path.as_bytes()), Ok(Cow::Borrowed(p)) if p.len() == path.len())
}

/// The channel itself, then each ancestor, ending with the root: `/a/b` yields `/a/b`, `/a`,
/// `/`. An event on a path reaches the subscribers of exactly these channels. `path` must be
/// normalized.
pub fn ancestors(path: &str) -> Ancestors<'_> {
    Ancestors { path: Some(path) }
}

/// Iterator returned by [`ancestors`].
#[derive(Debug, Clone)]
pub struct Ancestors<'a> {
    path: Option<&'a str>,
}

impl<'a> Iterator for Ancestors<'a> {
    type Item = &'a str;
    fn next(&mut self) -> Option<&'a str> {
        let cur = self.path?;
        self.path = match cur.rfind('/') {
            _ if cur == ROOT => None,
            Some(0) | None => Some(ROOT),
            // Skip prefixes ending in `/` (`/a/` of `/a//b`): they are not channels.
            Some(i) => match cur[..i].trim_end_matches('/') {
                "" => Some(ROOT),
                p => Some(p),
            },
        };
        Some(cur)
    }
}

/// Whether an event on `path` reaches a subscriber of `channel` (the channel itself or an
/// ancestor). Both must be normalized.
pub fn is_within(path: &str, channel: &str) -> bool {
    ancestors(path).any(|a| a == channel)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(target_arch = "wasm32"))]
    use proptest::prelude::*;
    use std::prelude::rust_2024::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn n(s: &str) -> Result<String, PathError> {
        normalize(s.as_bytes()).map(Cow::into_owned)
    }

    #[test]
    fn depth_counts_levels_below_the_root() {
        assert_eq!([depth("/"), depth("/a"), depth("/a/b"), depth("/a//b")], [0, 1, 2, 3]);
        assert_eq!(check_depth("/a/b", 2), Ok(()));
        assert_eq!(check_depth("/a/b/c", 2), Err(PathError::TooDeep { depth: 3, max: 2 }));
        assert_eq!(PathError::TooDeep { depth: 3, max: 2 }.to_string(), "path has 3 levels, the limit is 2");
        assert_eq!(depth("/a/b"), ancestors("/a/b").count() - 1);
    }

    #[test]
    fn normalization() {
        assert_eq!(n("/a/b").unwrap(), "/a/b");
        assert_eq!(n("a/b").unwrap(), "/a/b");
        assert_eq!(n("  /a/b \t").unwrap(), "/a/b");
        assert_eq!(n("/a/n3/").unwrap(), "/a/n3"); // the original turned this into /a/n
        assert_eq!(n("/").unwrap(), "/");
        assert_eq!(n("").unwrap(), "/");
        assert_eq!(n("  ").unwrap(), "/");
        assert_eq!(n("//").unwrap(), "/");
        assert_eq!(n("/a//"), Err(PathError::TrailingSlash));
        assert_eq!(n("a//"), Err(PathError::TrailingSlash));
        assert_eq!(n("/a//b").unwrap(), "/a//b");
        assert_eq!(n("/a/../b").unwrap(), "/a/../b");
        assert_eq!(n("a/").unwrap(), "/a");
        assert!(matches!(normalize(b"/a/b"), Ok(Cow::Borrowed(_))));
        assert_eq!(n("/A"), Err(PathError::InvalidChar { byte: b'A', at: 1 }));
        assert_eq!(n("a_b"), Err(PathError::InvalidChar { byte: b'_', at: 2 }));
        assert!(n("/a b").is_err());
        assert!(n("/é").is_err());
        assert!(n("/a:b").is_err());
        assert_eq!(normalize_with_limit(b"/abcd", 4), Err(PathError::TooLong { len: 5, max: 4 }));
        assert!(is_normalized("/a"));
        assert!(!is_normalized("/a/"));
        assert!(!is_normalized("a"));
    }

    #[test]
    fn ancestor_chain() {
        assert_eq!(ancestors("/a/b/c").collect::<Vec<_>>(), ["/a/b/c", "/a/b", "/a", "/"]);
        assert_eq!(ancestors("/").collect::<Vec<_>>(), ["/"]);
        assert_eq!(ancestors("/a//b").collect::<Vec<_>>(), ["/a//b", "/a", "/"]);
        assert!(is_within("/a/b", "/a"));
        assert!(!is_within("/ab", "/a"));
        assert!(!is_within("/a", "/a/b"));
        assert!(is_within("/x", "/"));
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest! {
        #[test]
        fn normalize_is_idempotent(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(p) = normalize(&raw) {
                let again = normalize(p.as_bytes()).unwrap();
                prop_assert_eq!(&*again, &*p);
                prop_assert!(p.starts_with('/'));
                prop_assert!(is_normalized(&p));
            }
        }

        #[test]
        fn ancestors_are_channels(p in "/[a-c/.]{0,10}") {
            if let Ok(p) = normalize(p.as_bytes()) {
                let chain: Vec<&str> = ancestors(&p).collect();
                prop_assert_eq!(chain[0], &*p);
                prop_assert_eq!(*chain.last().unwrap(), ROOT);
                for w in chain.windows(2) {
                    prop_assert!(w[1].len() < w[0].len());
                    prop_assert!(w[0].starts_with(w[1]));
                }
                for a in chain {
                    prop_assert!(is_normalized(a), "{} not normalized", a);
                }
            }
        }
    }
}
