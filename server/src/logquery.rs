//! Parsing of the log endpoint's query string (`n`, `after`, `limit`).

use ivy_client_core::Timestamp;

/// What a log request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogQuery {
    /// No parameter: the whole log (the original's format).
    All,
    /// `n=K`: the last K events.
    Last(u64),
    /// `after` and/or `limit`: a cursor page.
    Page {
        /// Exclusive lower bound.
        after: Option<Timestamp>,
        /// Requested page size (capped by the server).
        limit: Option<u64>,
    },
}

fn percent_decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
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

fn positive(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|&n| n >= 1)
}

/// Parses a raw query string. Unknown parameters are ignored; the error is the one-line
/// reason sent with status 400.
pub fn parse(raw: Option<&str>) -> Result<LogQuery, String> {
    let (mut n, mut after, mut limit) = (None, None, None);
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match k {
            "n" => &mut n,
            "after" => &mut after,
            "limit" => &mut limit,
            _ => continue,
        };
        if slot.is_some() {
            return Err(format!("parameter {k} given more than once"));
        }
        *slot = Some(percent_decode(v).ok_or_else(|| format!("parameter {k} is not valid percent-encoded UTF-8"))?);
    }
    let n = n.map(|v| positive(v.trim()).ok_or("invalid line count")).transpose()?;
    let limit = limit.map(|v| positive(v.trim()).ok_or("invalid limit: must be an integer >= 1")).transpose()?;
    let after = after.map(|v| v.trim().parse::<Timestamp>().map_err(|e| format!("invalid after timestamp: {e}"))).transpose()?;
    match (n, after, limit) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err("n cannot be combined with after or limit".into()),
        (Some(k), None, None) => Ok(LogQuery::Last(k)),
        (None, None, None) => Ok(LogQuery::All),
        (None, after, limit) => Ok(LogQuery::Page { after, limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse(None), Ok(LogQuery::All));
        assert_eq!(parse(Some("")), Ok(LogQuery::All));
        assert_eq!(parse(Some("n=3")), Ok(LogQuery::Last(3)));
        assert_eq!(parse(Some("x=1&n=3")), Ok(LogQuery::Last(3)));
        assert_eq!(parse(Some("n=0")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=-1")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=abc")), Err("invalid line count".into()));
        assert_eq!(parse(Some("n=")), Err("invalid line count".into()));
        let t = Timestamp::new(1_700_000_000, 5).unwrap();
        assert_eq!(parse(Some("after=1700000000.000000005&limit=10")), Ok(LogQuery::Page { after: Some(t), limit: Some(10) }));
        assert_eq!(parse(Some("after=%401700000000.000000005")), Ok(LogQuery::Page { after: Some(t), limit: None }));
        assert_eq!(parse(Some("after=@1700000000.000000005")), Ok(LogQuery::Page { after: Some(t), limit: None }));
        assert_eq!(parse(Some("limit=2")), Ok(LogQuery::Page { after: None, limit: Some(2) }));
        assert!(parse(Some("after=17")).unwrap_err().starts_with("invalid after timestamp"));
        assert!(parse(Some("limit=0")).unwrap_err().starts_with("invalid limit"));
        assert!(parse(Some("n=1&after=1.000000000")).is_err());
        assert!(parse(Some("n=1&n=2")).is_err());
        assert!(parse(Some("after=%zz")).is_err());
        assert_eq!(parse(Some("n=99999999999999999999")), Err("invalid line count".into()));
    }
}
