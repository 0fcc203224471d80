//! Event timestamps: `SSSSSSSSSS.NNNNNNNNN` (seconds zero-padded to at least ten digits,
//! always nine nanosecond digits). A timestamp is an event's identity: the server makes them
//! unique and strictly increasing, so they order events and serve as log cursors.

use alloc::vec::Vec;
use core::fmt;
use core::str::FromStr;

/// Nanoseconds in one second.
const NANOS_PER_SEC: u32 = 1_000_000_000;

/// A server timestamp (seconds and nanoseconds since the Unix epoch).
///
/// Ordering is chronological. [`Display`](fmt::Display) writes the wire form without the
/// leading `@` (`0001700000.000000042`); [`FromStr`] accepts it with or without the `@`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    secs: u64,
    nanos: u32,
}

/// Why a timestamp could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampError {
    /// Not `digits.9digits`.
    Syntax,
    /// The seconds do not fit in 64 bits.
    Overflow,
}

impl fmt::Display for TimestampError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimestampError::Syntax => f.write_str("timestamp must be SECONDS.NANOSECONDS with 9 nanosecond digits"),
            TimestampError::Overflow => f.write_str("timestamp seconds out of range"),
        }
    }
}

impl core::error::Error for TimestampError {}

impl Timestamp {
    /// The zero timestamp, before every event.
    pub const ZERO: Timestamp = Timestamp { secs: 0, nanos: 0 };
    /// The largest representable timestamp.
    pub const MAX: Timestamp = Timestamp { secs: u64::MAX, nanos: NANOS_PER_SEC - 1 };
    /// Length of [`Timestamp::to_be_bytes`].
    pub const BYTES: usize = 12;

    /// A timestamp from seconds and nanoseconds; `None` if `nanos >= 1_000_000_000`.
    pub const fn new(secs: u64, nanos: u32) -> Option<Timestamp> {
        if nanos < NANOS_PER_SEC { Some(Timestamp { secs, nanos }) } else { None }
    }

    /// A timestamp from nanoseconds since the epoch.
    pub const fn from_nanos(n: u128) -> Timestamp {
        let secs = n / NANOS_PER_SEC as u128;
        if secs > u64::MAX as u128 {
            return Timestamp::MAX;
        }
        Timestamp { secs: secs as u64, nanos: (n % NANOS_PER_SEC as u128) as u32 }
    }

    /// Whole seconds since the epoch.
    pub const fn secs(self) -> u64 {
        self.secs
    }

    /// Nanoseconds within the second (`0..1_000_000_000`).
    pub const fn subsec_nanos(self) -> u32 {
        self.nanos
    }

    /// Nanoseconds since the epoch.
    pub const fn as_nanos(self) -> u128 {
        self.secs as u128 * NANOS_PER_SEC as u128 + self.nanos as u128
    }

    /// The next representable timestamp (one nanosecond later), saturating at [`Timestamp::MAX`].
    pub const fn next(self) -> Timestamp {
        if self.nanos + 1 < NANOS_PER_SEC {
            Timestamp { secs: self.secs, nanos: self.nanos + 1 }
        } else if self.secs < u64::MAX {
            Timestamp { secs: self.secs + 1, nanos: 0 }
        } else {
            Timestamp::MAX
        }
    }

    /// The previous representable timestamp (one nanosecond earlier), saturating at
    /// [`Timestamp::ZERO`].
    pub const fn prev(self) -> Timestamp {
        if self.nanos > 0 {
            Timestamp { secs: self.secs, nanos: self.nanos - 1 }
        } else if self.secs > 0 {
            Timestamp { secs: self.secs - 1, nanos: NANOS_PER_SEC - 1 }
        } else {
            Timestamp::ZERO
        }
    }

    /// Twelve big-endian bytes (seconds, then nanoseconds) whose byte order is the time order:
    /// the storage key form.
    pub fn to_be_bytes(self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.secs.to_be_bytes());
        out[8..].copy_from_slice(&self.nanos.to_be_bytes());
        out
    }

    /// The inverse of [`Timestamp::to_be_bytes`]; `None` for a wrong length or nanoseconds out of range.
    pub fn from_be_bytes(b: &[u8]) -> Option<Timestamp> {
        if b.len() != Self::BYTES {
            return None;
        }
        let secs = u64::from_be_bytes(b[..8].try_into().ok()?);
        let nanos = u32::from_be_bytes(b[8..].try_into().ok()?);
        Timestamp::new(secs, nanos)
    }

    /// Appends the wire form without `@` (`%010d.%09d`) to `out`.
    pub fn write_to(self, out: &mut Vec<u8>) {
        let mut digits = [0u8; 20];
        let mut n = self.secs;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - i;
        for _ in len..10 {
            out.push(b'0');
        }
        out.extend_from_slice(&digits[i..]);
        out.push(b'.');
        let mut nd = [0u8; 9];
        let mut n = self.nanos;
        for d in nd.iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
        out.extend_from_slice(&nd);
    }

    /// Parses the wire form without `@`: one to twenty second digits, `.`, exactly nine
    /// nanosecond digits.
    pub fn parse(s: &[u8]) -> Result<Timestamp, TimestampError> {
        let dot = s.iter().position(|&b| b == b'.').ok_or(TimestampError::Syntax)?;
        let (sec, rest) = (&s[..dot], &s[dot + 1..]);
        if sec.is_empty() || sec.len() > 20 || rest.len() != 9 {
            return Err(TimestampError::Syntax);
        }
        let mut secs: u64 = 0;
        for &b in sec {
            if !b.is_ascii_digit() {
                return Err(TimestampError::Syntax);
            }
            secs = secs.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))).ok_or(TimestampError::Overflow)?;
        }
        let mut nanos: u32 = 0;
        for &b in rest {
            if !b.is_ascii_digit() {
                return Err(TimestampError::Syntax);
            }
            nanos = nanos * 10 + u32::from(b - b'0');
        }
        Ok(Timestamp { secs, nanos })
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}.{:09}", self.secs, self.nanos)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{self}")
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.strip_prefix('@').unwrap_or(s);
        Timestamp::parse(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::prelude::rust_2024::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn formats_like_the_original() {
        let t = Timestamp::new(1_700_000_000, 42).unwrap();
        assert_eq!(t.to_string(), "1700000000.000000042");
        assert_eq!(Timestamp::new(5, 0).unwrap().to_string(), "0000000005.000000000");
        let mut v = Vec::new();
        Timestamp::new(12_345_678_901, 999_999_999).unwrap().write_to(&mut v);
        assert_eq!(v, b"12345678901.999999999");
        let mut v = Vec::new();
        Timestamp::MAX.write_to(&mut v);
        assert_eq!(Timestamp::parse(&v), Ok(Timestamp::MAX));
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in
            ["", ".", "1.", "1.12345678", "1.1234567890", "a.000000000", "1.00000000a", "1.000000000.", "99999999999999999999999.000000000"]
        {
            assert!(Timestamp::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!("@0000000001.000000002".parse(), Ok(Timestamp::new(1, 2).unwrap()));
    }

    #[test]
    fn next_and_bytes_order() {
        let t = Timestamp::new(1, 999_999_999).unwrap();
        assert_eq!(t.next(), Timestamp::new(2, 0).unwrap());
        assert_eq!(t.next().prev(), t);
        assert_eq!(Timestamp::ZERO.prev(), Timestamp::ZERO);
        assert!(t.to_be_bytes() < t.next().to_be_bytes());
        assert_eq!(Timestamp::from_be_bytes(&t.to_be_bytes()), Some(t));
        assert_eq!(Timestamp::MAX.next(), Timestamp::MAX);
    }
}
