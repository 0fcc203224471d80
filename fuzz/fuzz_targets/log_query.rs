//! The log endpoint's query string parser (`ivy_client_core::http::LogQuery::parse`, which the
//! server uses as `ivy_server::logquery::parse`).
//!
//! Invariants: no panic; a refusal is a one-line reason; an accepted page query has `after` or
//! `limit` (`n` and `limit` are at least 1 by their type); the canonical form the clients write
//! (`to_query`) parses back to the same query, and is what the server's parser reads too.

#![no_main]

use ivy_client_core::http::LogQuery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // axum hands the handler the raw query as a `&str`.
    let Ok(raw) = std::str::from_utf8(data) else { return };
    match LogQuery::parse(Some(raw)) {
        Ok(q) => {
            if let LogQuery::Page { after, limit } = q {
                assert!(after.is_some() || limit.is_some(), "{raw:?}");
            }
            let canonical = q.to_query();
            assert_eq!(LogQuery::parse(Some(&canonical)), Ok(q), "canonical form {canonical:?}");
            assert_eq!(ivy_server::logquery::parse(Some(&canonical)), Ok(q), "the server reads {canonical:?}");
        }
        Err(reason) => {
            let reason = reason.to_string();
            assert!(!reason.is_empty() && !reason.contains('\n'), "{reason:?}");
        }
    }
});
