//! Presence lines (**Extension**, `docs/PROTOCOL.md` 5.10 and 6.5): who is subscribed to a
//! channel, as the server reports it to a connection that asked with `~+PATH` (watch) or
//! `~?PATH` (one-off query).
//!
//! ```text
//! ^=C:{"count":N,"members":[{"sub":"ada","info":{..},"conns":2},{"anon":"9f3c..","conns":1}]}
//! ^.P:{"count":N}
//! ^~C:{"join":[{"sub":"ada","info":{..}}],"leave":[{"anon":"9f3c.."}],"count":N}
//! ^~C:{"joined":J,"left":L,"count":N}
//! ```
//!
//! `^=` is the snapshot of one channel `C` (one line per channel with members at or below the
//! watched or queried path, in path order; without `members` above the server's
//! `--presence-max-list`), `^.` ends the snapshot of `P` with the number of distinct members of
//! `P`, and `^~` is a change of channel `C` (coalesced per 100 ms tick; counts only above the
//! list limit). Paths are normalized paths (they never contain `:`), the payload is compact JSON
//! on one line.
//!
//! This module parses the payloads with a small JSON reader of its own (the crate has no
//! dependencies): it reads the fields above, skips unknown ones (forward compatibility), and
//! keeps a member's `info` as its raw JSON text (an object), for the application to decode.

use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Ordering;
use core::fmt;

use crate::path;

/// Who a member is: a token's `sub`, or an anonymous connection's server-assigned id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MemberId {
    /// A token's `sub` (`{"sub":"ada"}`): every connection with that token's sub is this member.
    Sub(String),
    /// An anonymous connection (`{"anon":"9f3c0a..."}`): 16 hex digits, random per connection,
    /// so an anonymous reload is a new member.
    Anon(String),
}

impl MemberId {
    /// The id's text (the `sub`, or the anonymous id).
    pub fn as_str(&self) -> &str {
        match self {
            MemberId::Sub(s) | MemberId::Anon(s) => s,
        }
    }

    /// Whether this is an anonymous member.
    pub fn is_anonymous(&self) -> bool {
        matches!(self, MemberId::Anon(_))
    }
}

impl Ord for MemberId {
    /// Subs before anonymous members, each in byte order of their text.
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (MemberId::Sub(a), MemberId::Sub(b)) | (MemberId::Anon(a), MemberId::Anon(b)) => a.cmp(b),
            (MemberId::Sub(_), MemberId::Anon(_)) => Ordering::Less,
            (MemberId::Anon(_), MemberId::Sub(_)) => Ordering::Greater,
        }
    }
}

impl PartialOrd for MemberId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberId::Sub(s) => f.write_str(s),
            MemberId::Anon(a) => write!(f, "anon:{a}"),
        }
    }
}

/// A member as a presence line reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Who.
    pub id: MemberId,
    /// The public info of the member's token (its `info` claim), as compact JSON text (an
    /// object); `None` without one (always for anonymous members).
    pub info: Option<String>,
    /// Its connections subscribed at the channel (a snapshot's `conns`); in a view over a
    /// subtree, summed over its channels. A `^~` join carries no count: it counts 1.
    pub conns: u32,
}

/// The snapshot of one channel (`^=C:JSON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSnapshot {
    /// Its members.
    pub count: u64,
    /// The members, sorted as the server sent them; `None` when the channel has more than the
    /// server's `--presence-max-list` members (the line has the count only).
    pub members: Option<Vec<Member>>,
}

/// A change of one channel (`^~C:JSON`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelChange {
    /// The members that joined (their `conns` is 1).
    pub join: Vec<Member>,
    /// The members that left (their info as the server sent it, usually none).
    pub leave: Vec<Member>,
    /// Counts only (above `--presence-max-list`): how many joined and left; `join` and `leave`
    /// are then empty.
    pub counts: Option<(u64, u64)>,
    /// The channel's members after the change.
    pub count: u64,
}

/// A presence line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceLine<'a> {
    /// `^=C:JSON`: the snapshot of channel `channel`.
    Snapshot {
        /// The channel (normalized).
        channel: Cow<'a, str>,
        /// Its members.
        snapshot: ChannelSnapshot,
    },
    /// `^.P:{"count":N}`: the end of the snapshot of `path`, which has `count` distinct members.
    End {
        /// The watched or queried path (normalized).
        path: Cow<'a, str>,
        /// Distinct members of the subtree.
        count: u64,
    },
    /// `^~C:JSON`: a change of channel `channel`.
    Change {
        /// The channel (normalized).
        channel: Cow<'a, str>,
        /// What changed.
        change: ChannelChange,
    },
}

impl PresenceLine<'_> {
    /// An owned copy.
    pub fn into_owned(self) -> PresenceLine<'static> {
        match self {
            PresenceLine::Snapshot { channel, snapshot } => PresenceLine::Snapshot { channel: Cow::Owned(channel.into_owned()), snapshot },
            PresenceLine::End { path, count } => PresenceLine::End { path: Cow::Owned(path.into_owned()), count },
            PresenceLine::Change { channel, change } => PresenceLine::Change { channel: Cow::Owned(channel.into_owned()), change },
        }
    }
}

/// Why a presence line could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceError(pub &'static str);

impl fmt::Display for PresenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl core::error::Error for PresenceError {}

/// Parses a presence line (`^=`, `^.` or `^~`, the whole line).
pub fn parse_presence(line: &[u8]) -> Result<PresenceLine<'_>, PresenceError> {
    let rest = line.strip_prefix(b"^").ok_or(PresenceError("presence line must start with '^'"))?;
    let (&kind, rest) = rest.split_first().ok_or(PresenceError("presence line has no kind after '^'"))?;
    let colon = rest.iter().position(|&b| b == b':').ok_or(PresenceError("presence line has no ':' after the path"))?;
    let raw = &rest[..colon];
    let channel = match path::normalize(raw) {
        Ok(Cow::Borrowed(p)) if p.len() == raw.len() => Cow::Borrowed(p),
        _ => return Err(PresenceError("presence line's path is not a normalized path")),
    };
    let json = &rest[colon + 1..];
    match kind {
        b'=' => Ok(PresenceLine::Snapshot { channel, snapshot: parse_snapshot(json)? }),
        b'.' => {
            let mut count = None;
            Json::new(json).object(|j, key| {
                match key {
                    "count" => count = Some(j.u64()?),
                    _ => j.skip()?,
                }
                Ok(())
            })?;
            Ok(PresenceLine::End { path: channel, count: count.ok_or(PresenceError("presence end has no count"))? })
        }
        b'~' => Ok(PresenceLine::Change { channel, change: parse_change(json)? }),
        _ => Err(PresenceError("presence line must be '^=', '^.' or '^~'")),
    }
}

fn parse_snapshot(json: &[u8]) -> Result<ChannelSnapshot, PresenceError> {
    let (mut count, mut members) = (None, None);
    Json::new(json).object(|j, key| {
        match key {
            "count" => count = Some(j.u64()?),
            "members" => members = Some(j.members()?),
            _ => j.skip()?,
        }
        Ok(())
    })?;
    Ok(ChannelSnapshot { count: count.ok_or(PresenceError("presence snapshot has no count"))?, members })
}

fn parse_change(json: &[u8]) -> Result<ChannelChange, PresenceError> {
    let mut c = ChannelChange { join: Vec::new(), leave: Vec::new(), counts: None, count: 0 };
    let (mut count, mut joined, mut left) = (None, None, None);
    Json::new(json).object(|j, key| {
        match key {
            "join" => c.join = j.members()?,
            "leave" => c.leave = j.members()?,
            "joined" => joined = Some(j.u64()?),
            "left" => left = Some(j.u64()?),
            "count" => count = Some(j.u64()?),
            _ => j.skip()?,
        }
        Ok(())
    })?;
    c.count = count.ok_or(PresenceError("presence change has no count"))?;
    if joined.is_some() || left.is_some() {
        c.counts = Some((joined.unwrap_or(0), left.unwrap_or(0)));
    }
    Ok(c)
}

/// A JSON reader over one compact document: enough for the presence payloads.
struct Json<'a> {
    s: &'a [u8],
    at: usize,
    depth: u32,
}

type R<T> = Result<T, PresenceError>;

/// Nesting beyond this is refused (the server's info claims are at most 1024 bytes).
const MAX_DEPTH: u32 = 64;

impl<'a> Json<'a> {
    fn new(s: &'a [u8]) -> Json<'a> {
        Json { s, at: 0, depth: 0 }
    }

    fn ws(&mut self) {
        while self.s.get(self.at).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.s.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, b: u8, what: &'static str) -> R<()> {
        if self.eat(b) { Ok(()) } else { Err(PresenceError(what)) }
    }

    /// The whole document is one object: `f` is called with each key, and must read its value.
    fn object(mut self, f: impl FnMut(&mut Json<'a>, &str) -> R<()>) -> R<()> {
        self.members_of(f)?;
        self.ws();
        if self.at != self.s.len() { Err(PresenceError("presence JSON has trailing bytes")) } else { Ok(()) }
    }

    fn members_of(&mut self, mut f: impl FnMut(&mut Json<'a>, &str) -> R<()>) -> R<()> {
        self.expect(b'{', "presence JSON: expected an object")?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(PresenceError("presence JSON nests too deep"));
        }
        if !self.eat(b'}') {
            loop {
                if self.peek() != Some(b'"') {
                    return Err(PresenceError("presence JSON: expected a key"));
                }
                let key = self.string()?;
                self.expect(b':', "presence JSON: expected ':' after a key")?;
                f(self, &key)?;
                if self.eat(b'}') {
                    break;
                }
                self.expect(b',', "presence JSON: expected ',' or '}'")?;
            }
        }
        self.depth -= 1;
        Ok(())
    }

    fn array(&mut self, mut f: impl FnMut(&mut Json<'a>) -> R<()>) -> R<()> {
        self.expect(b'[', "presence JSON: expected an array")?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(PresenceError("presence JSON nests too deep"));
        }
        if !self.eat(b']') {
            loop {
                f(self)?;
                if self.eat(b']') {
                    break;
                }
                self.expect(b',', "presence JSON: expected ',' or ']'")?;
            }
        }
        self.depth -= 1;
        Ok(())
    }

    /// `[{"sub":..|"anon":.., "info":{..}?, "conns":N?}, ...]`
    fn members(&mut self) -> R<Vec<Member>> {
        let mut out = Vec::new();
        self.array(|j| {
            let (mut id, mut info, mut conns) = (None, None, 1u32);
            j.members_of(|j, key| {
                match key {
                    "sub" => id = Some(MemberId::Sub(j.string()?)),
                    "anon" => id = Some(MemberId::Anon(j.string()?)),
                    "info" if j.peek() == Some(b'{') => {
                        let start = j.at;
                        j.skip()?;
                        info = core::str::from_utf8(&j.s[start..j.at]).ok().map(String::from);
                    }
                    "info" => j.skip()?, // null, or not an object: no info
                    "conns" => conns = u32::try_from(j.u64()?).unwrap_or(u32::MAX),
                    _ => j.skip()?,
                }
                Ok(())
            })?;
            out.push(Member { id: id.ok_or(PresenceError("presence member has neither sub nor anon"))?, info, conns });
            Ok(())
        })?;
        Ok(out)
    }

    fn u64(&mut self) -> R<u64> {
        self.ws();
        let start = self.at;
        let mut n: u64 = 0;
        while let Some(d) = self.s.get(self.at).filter(|b| b.is_ascii_digit()) {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(PresenceError("presence JSON: number too large"))?;
            self.at += 1;
        }
        if self.at == start || matches!(self.s.get(self.at), Some(b'.' | b'e' | b'E')) {
            return Err(PresenceError("presence JSON: expected a non-negative integer"));
        }
        Ok(n)
    }

    fn string(&mut self) -> R<String> {
        self.expect(b'"', "presence JSON: expected a string")?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&b) = self.s.get(self.at) else { return Err(PresenceError("presence JSON: unterminated string")) };
            self.at += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.at) else { return Err(PresenceError("presence JSON: unterminated string")) };
                    self.at += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi) {
                                if self.s.get(self.at..self.at + 2) != Some(b"\\u") {
                                    return Err(PresenceError("presence JSON: unpaired surrogate"));
                                }
                                self.at += 2;
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return Err(PresenceError("presence JSON: unpaired surrogate"));
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or(PresenceError("presence JSON: unpaired surrogate"))?
                        }
                        _ => return Err(PresenceError("presence JSON: bad escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0..0x20 => return Err(PresenceError("presence JSON: control character in a string")),
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| PresenceError("presence JSON: string is not UTF-8"))
    }

    fn hex4(&mut self) -> R<u32> {
        let digits = self.s.get(self.at..self.at + 4).ok_or(PresenceError("presence JSON: short \\u escape"))?;
        let mut v = 0;
        for &d in digits {
            v = v * 16 + char::from(d).to_digit(16).ok_or(PresenceError("presence JSON: bad \\u escape"))?;
        }
        self.at += 4;
        Ok(v)
    }

    /// Skips one value of any type, checking its syntax.
    fn skip(&mut self) -> R<()> {
        match self.peek() {
            Some(b'{') => self.members_of(|j, _| j.skip()),
            Some(b'[') => self.array(Json::skip),
            Some(b'"') => self.string().map(drop),
            Some(b't') => self.word(b"true"),
            Some(b'f') => self.word(b"false"),
            Some(b'n') => self.word(b"null"),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                while self.s.get(self.at).is_some_and(|b| matches!(b, b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')) {
                    self.at += 1;
                }
                if self.s[start..self.at].iter().any(u8::is_ascii_digit) { Ok(()) } else { Err(PresenceError("presence JSON: bad number")) }
            }
            _ => Err(PresenceError("presence JSON: expected a value")),
        }
    }

    fn word(&mut self, w: &'static [u8]) -> R<()> {
        if self.s.get(self.at..self.at + w.len()) == Some(w) {
            self.at += w.len();
            Ok(())
        } else {
            Err(PresenceError("presence JSON: expected a value"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use std::prelude::rust_2024::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn sub(s: &str, info: Option<&str>, conns: u32) -> Member {
        Member { id: MemberId::Sub(s.into()), info: info.map(String::from), conns }
    }

    #[test]
    fn parses_the_three_lines() {
        let l = parse_presence(br#"^=/chat/a:{"count":2,"members":[{"sub":"ada","info":{"name":"Ada \"L\"","n":[1,2.5e3,null,true]},"conns":2},{"anon":"9f3c0a1b2c3d4e5f","conns":1}]}"#).unwrap();
        assert_eq!(
            l,
            PresenceLine::Snapshot {
                channel: "/chat/a".into(),
                snapshot: ChannelSnapshot {
                    count: 2,
                    members: Some(vec![
                        sub("ada", Some(r#"{"name":"Ada \"L\"","n":[1,2.5e3,null,true]}"#), 2),
                        Member { id: MemberId::Anon("9f3c0a1b2c3d4e5f".into()), info: None, conns: 1 },
                    ])
                }
            }
        );
        assert_eq!(
            parse_presence(br#"^=/:{"count":5000}"#).unwrap(),
            PresenceLine::Snapshot { channel: "/".into(), snapshot: ChannelSnapshot { count: 5000, members: None } }
        );
        assert_eq!(parse_presence(br#"^./chat:{"count":3}"#).unwrap(), PresenceLine::End { path: "/chat".into(), count: 3 });
        assert_eq!(
            parse_presence(br#"^~/chat:{"join":[{"sub":"b\u00e9\ud83d\ude00"}],"leave":[{"anon":"00"}],"count":7,"future":{"x":[]}}"#)
                .unwrap(),
            PresenceLine::Change {
                channel: "/chat".into(),
                change: ChannelChange {
                    join: vec![sub("bé😀", None, 1)],
                    leave: vec![Member { id: MemberId::Anon("00".into()), info: None, conns: 1 }],
                    counts: None,
                    count: 7
                }
            }
        );
        assert_eq!(
            parse_presence(br#"^~/c:{"joined":900,"left":3,"count":1500}"#).unwrap(),
            PresenceLine::Change {
                channel: "/c".into(),
                change: ChannelChange { join: vec![], leave: vec![], counts: Some((900, 3)), count: 1500 }
            }
        );
        assert_eq!(
            parse_presence(br#"^~/c:{"leave":[{"sub":"x","info":null}],"count":0}"#).unwrap(),
            PresenceLine::Change {
                channel: "/c".into(),
                change: ChannelChange { join: vec![], leave: vec![sub("x", None, 1)], counts: None, count: 0 }
            }
        );
    }

    #[test]
    fn refuses_what_is_not_a_presence_line() {
        for bad in [
            &b"^"[..],
            b"^=",
            b"^=/a",
            b"^x/a:{\"count\":1}",
            b"^=/A:{\"count\":1}",
            b"^=/a/:{\"count\":1}",
            b"^=/a:{}",
            b"^=/a:{\"count\":-1}",
            b"^=/a:{\"count\":1.5}",
            b"^=/a:{\"count\":1} x",
            b"^=/a:{\"count\":1,}",
            b"^=/a:{\"count\":99999999999999999999999}",
            b"^=/a:{\"count\":1,\"members\":[{\"conns\":1}]}",
            b"^=/a:{\"count\":1,\"members\":[{\"sub\":\"a\x01\"}]}",
            b"^=/a:{\"count\":1,\"members\":[{\"sub\":\"\\ud800\"}]}",
            b"^=/a:{\"count\":1,\"members\":[{\"sub\":\"\\q\"}]}",
            b"^=/a:{\"count\":1,\"members\":[{\"sub\":\"a\"",
            b"^./a:{\"members\":[]}",
            b"^~/a:{\"join\":[]}",
            b"^~/a:{\"x\":tru,\"count\":1}",
        ] {
            assert!(parse_presence(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = alloc::format!("^=/a:{{\"count\":1,\"x\":{}{}}}", "[".repeat(100), "]".repeat(100));
        assert!(parse_presence(deep.as_bytes()).is_err());
    }

    #[test]
    fn member_order_puts_subs_first() {
        let mut ids = vec![MemberId::Anon("0".into()), MemberId::Sub("z".into()), MemberId::Sub("a".into())];
        ids.sort();
        assert_eq!(ids, [MemberId::Sub("a".into()), MemberId::Sub("z".into()), MemberId::Anon("0".into())]);
        assert_eq!(ids[2].to_string(), "anon:0");
        assert!(ids[2].is_anonymous() && ids[0].as_str() == "a");
    }
}
