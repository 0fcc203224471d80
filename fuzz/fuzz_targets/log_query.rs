//! The log endpoint's query string parser (`ivy_server::logquery::parse`).
//!
//! Invariants: no panic; a refusal is a one-line reason; `n` and `limit` are at least 1; an
//! accepted query written back in canonical form parses to the same query.

#![no_main]

use ivy_server::logquery::{LogQuery, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // axum hands the handler the raw query as a `&str`.
    let Ok(raw) = std::str::from_utf8(data) else { return };
    match parse(Some(raw)) {
        Ok(q) => {
            let canonical = match q {
                LogQuery::All => String::new(),
                LogQuery::Last(k) => {
                    assert!(k >= 1);
                    format!("n={k}")
                }
                LogQuery::Page { after, limit } => {
                    assert!(after.is_some() || limit.is_some());
                    let mut parts = Vec::new();
                    if let Some(a) = after {
                        parts.push(format!("after={a}"));
                    }
                    if let Some(l) = limit {
                        assert!(l >= 1);
                        parts.push(format!("limit={l}"));
                    }
                    parts.join("&")
                }
            };
            assert_eq!(parse(Some(&canonical)), Ok(q), "canonical form {canonical:?}");
        }
        Err(reason) => {
            assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
        }
    }
});
