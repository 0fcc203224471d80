//! Escaping of event data, server to client only: `%` becomes `%25`, then a newline becomes
//! `%0A`. Nothing else is escaped (not `\r`, `:`, tabs or non-ASCII bytes). Data sent by a
//! client is raw and is never unescaped by the server.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

/// An escape sequence other than `%25` and `%0A` in escaped data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnescapeError {
    /// Byte offset of the offending `%`.
    pub at: usize,
}

impl fmt::Display for UnescapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid escape at byte {}: only %25 and %0A are defined", self.at)
    }
}

impl core::error::Error for UnescapeError {}

/// The length of `data` once escaped.
pub fn escaped_len(data: &[u8]) -> usize {
    data.len() + 2 * data.iter().filter(|&&b| b == b'%' || b == b'\n').count()
}

/// Appends the escaped form of `data` to `out`.
pub fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(escaped_len(data));
    let mut start = 0;
    for (i, &b) in data.iter().enumerate() {
        let rep: &[u8] = match b {
            b'%' => b"%25",
            b'\n' => b"%0A",
            _ => continue,
        };
        out.extend_from_slice(&data[start..i]);
        out.extend_from_slice(rep);
        start = i + 1;
    }
    out.extend_from_slice(&data[start..]);
}

/// The escaped form of `data`, borrowed when nothing needs escaping.
pub fn escape(data: &[u8]) -> Cow<'_, [u8]> {
    if data.iter().any(|&b| b == b'%' || b == b'\n') {
        let mut out = Vec::new();
        escape_into(data, &mut out);
        Cow::Owned(out)
    } else {
        Cow::Borrowed(data)
    }
}

/// Reverses [`escape`]. Strict: any `%` not followed by `25` or `0A` is an error, so that
/// `unescape(escape(x)) == x` and nothing ambiguous is accepted.
pub fn unescape(data: &[u8]) -> Result<Cow<'_, [u8]>, UnescapeError> {
    let Some(first) = data.iter().position(|&b| b == b'%') else {
        return Ok(Cow::Borrowed(data));
    };
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&data[..first]);
    let mut i = first;
    while i < data.len() {
        let b = data[i];
        if b == b'%' {
            match data.get(i + 1..i + 3) {
                Some(b"25") => out.push(b'%'),
                Some(b"0A") => out.push(b'\n'),
                _ => return Err(UnescapeError { at: i }),
            }
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

/// The length of a token's `sub` once escaped for the extended event line ([`escape_sub_into`]).
pub fn escaped_sub_len(sub: &[u8]) -> usize {
    sub.len() + 2 * sub.iter().filter(|&&b| matches!(b, b'%' | b'\n' | b'\r' | b':')).count()
}

/// Appends the escaped form of a sender's `sub` (**Extension** `ext=sender`, `docs/PROTOCOL.md`
/// 6.1.1): `%` becomes `%25`, LF `%0A`, CR `%0D` and `:` `%3A`, so that the sub stays on one
/// line and ends at the first `:` of the line.
pub fn escape_sub_into(sub: &[u8], out: &mut Vec<u8>) {
    out.reserve(escaped_sub_len(sub));
    let mut start = 0;
    for (i, &b) in sub.iter().enumerate() {
        let rep: &[u8] = match b {
            b'%' => b"%25",
            b'\n' => b"%0A",
            b'\r' => b"%0D",
            b':' => b"%3A",
            _ => continue,
        };
        out.extend_from_slice(&sub[start..i]);
        out.extend_from_slice(rep);
        start = i + 1;
    }
    out.extend_from_slice(&sub[start..]);
}

/// Reverses [`escape_sub_into`] in one left-to-right pass. Strict: a `%` not followed by `25`,
/// `0A`, `0D` or `3A`, or a raw `:`, LF or CR, is an error.
pub fn unescape_sub(sub: &[u8]) -> Result<Cow<'_, [u8]>, UnescapeError> {
    if let Some(at) = sub.iter().position(|&b| matches!(b, b'\n' | b'\r' | b':')) {
        return Err(UnescapeError { at });
    }
    let Some(first) = sub.iter().position(|&b| b == b'%') else {
        return Ok(Cow::Borrowed(sub));
    };
    let mut out = Vec::with_capacity(sub.len());
    out.extend_from_slice(&sub[..first]);
    let mut i = first;
    while i < sub.len() {
        let b = sub[i];
        if b == b'%' {
            out.push(match sub.get(i + 1..i + 3) {
                Some(b"25") => b'%',
                Some(b"0A") => b'\n',
                Some(b"0D") => b'\r',
                Some(b"3A") => b':',
                _ => return Err(UnescapeError { at: i }),
            });
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(not(target_arch = "wasm32"))]
    use proptest::prelude::*;
    use std::prelude::rust_2024::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn original_rules() {
        assert_eq!(&*escape(b"a%b\nc"), b"a%25b%0Ac");
        // A client sending the three characters `%0A` is broadcast as `%250A`.
        assert_eq!(&*escape(b"%0A"), b"%250A");
        assert_eq!(&*escape(b"\r\t:#\xff"), b"\r\t:#\xff");
        assert!(matches!(escape(b"plain"), Cow::Borrowed(_)));
        assert_eq!(&*unescape(b"%250A").unwrap(), b"%0A");
        assert_eq!(unescape(b"%2"), Err(UnescapeError { at: 0 }));
        assert_eq!(unescape(b"ab%0a"), Err(UnescapeError { at: 2 }));
    }

    #[test]
    fn sub_rules() {
        let esc = |s: &[u8]| {
            let mut v = Vec::new();
            escape_sub_into(s, &mut v);
            v
        };
        assert_eq!(esc(b"ada"), b"ada");
        assert_eq!(esc(b"a:b%c\nd\re"), b"a%3Ab%25c%0Ad%0De");
        assert_eq!(esc(b"%3A"), b"%253A");
        assert_eq!(&*unescape_sub(b"a%3Ab%25c%0Ad%0De").unwrap(), b"a:b%c\nd\re");
        assert_eq!(&*unescape_sub(b"%253A").unwrap(), b"%3A");
        assert!(matches!(unescape_sub(b"plain"), Ok(Cow::Borrowed(_))));
        assert_eq!(unescape_sub(b"a:b"), Err(UnescapeError { at: 1 }));
        assert_eq!(unescape_sub(b"a%3a"), Err(UnescapeError { at: 1 }));
        assert_eq!(unescape_sub(b"a%"), Err(UnescapeError { at: 1 }));
    }

    #[cfg(not(target_arch = "wasm32"))]
    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let esc = escape(&data);
            prop_assert!(!esc.contains(&b'\n'));
            prop_assert_eq!(esc.len(), escaped_len(&data));
            prop_assert_eq!(&*unescape(&esc).unwrap(), &data[..]);
        }

        #[test]
        fn round_trip_percent_heavy(data in proptest::collection::vec(prop_oneof![Just(b'%'), Just(b'\n'), Just(b'0'), Just(b'A'), Just(b'2'), Just(b'5')], 0..64)) {
            let esc = escape(&data);
            prop_assert_eq!(&*unescape(&esc).unwrap(), &data[..]);
        }

        #[test]
        fn sub_round_trip(sub in proptest::collection::vec(prop_oneof![Just(b'%'), Just(b'\n'), Just(b'\r'), Just(b':'), Just(b'0'), Just(b'A'), Just(b'3'), Just(b'D'), any::<u8>()], 0..64)) {
            let mut esc = Vec::new();
            escape_sub_into(&sub, &mut esc);
            prop_assert!(!esc.iter().any(|&b| matches!(b, b'\n' | b'\r' | b':')));
            prop_assert_eq!(esc.len(), escaped_sub_len(&sub));
            prop_assert_eq!(&*unescape_sub(&esc).unwrap(), &sub[..]);
        }

        #[test]
        fn unescape_sub_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unescape_sub(&data);
        }

        #[test]
        fn unescape_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unescape(&data);
        }
    }
}
