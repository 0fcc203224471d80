//! Path normalization (`path::normalize`) and the ancestor chain used for bubbling.
//!
//! Invariants: no panic; a normalized path is `/` or `/` followed by path bytes, not ending
//! with `/`; normalization is idempotent and borrows when nothing changes; the ancestor chain
//! starts with the path, ends with the root, shrinks strictly, holds only normalized
//! prefixes of the path, and everything in it contains the path (`is_within`); the length
//! limit refuses exactly the paths longer than it.

#![no_main]

use std::borrow::Cow;

use ivy_client_core::path::{PathError, ROOT, ancestors, is_normalized, is_path_byte, is_within, normalize, normalize_with_limit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    let Ok(p) = normalize(raw) else {
        let e = normalize(raw).unwrap_err();
        let _ = e.to_string();
        assert!(!matches!(e, PathError::TooLong { .. }));
        assert!(normalize_with_limit(raw, 8).is_err());
        return;
    };
    assert!(p.starts_with('/'), "{p:?}");
    assert!(p.bytes().all(is_path_byte), "{p:?}");
    assert!(p == ROOT || !p.ends_with('/'), "{p:?}");
    assert!(is_normalized(&p));
    let again = normalize(p.as_bytes()).expect("a normalized path is valid");
    assert!(matches!(again, Cow::Borrowed(q) if q == p), "not idempotent: {p:?} -> {again:?}");

    let chain: Vec<&str> = ancestors(&p).take(p.len() + 2).collect();
    assert!(chain.len() <= p.len() + 1, "ancestor chain of {p:?} does not end");
    assert_eq!(chain[0], &*p);
    assert_eq!(*chain.last().expect("non-empty"), ROOT);
    for w in chain.windows(2) {
        assert!(w[1].len() < w[0].len(), "{chain:?}");
        assert!(p.starts_with(w[1]), "{chain:?}");
    }
    for a in &chain {
        assert!(is_normalized(a), "{a:?} in the chain of {p:?}");
        assert!(is_within(&p, a));
    }

    for max in [0, 1, 8, 255] {
        match normalize_with_limit(raw, max) {
            Ok(q) => assert!(q == p && q.len() <= max),
            Err(PathError::TooLong { len, max: m }) => assert!(len == p.len() && m == max && len > max),
            Err(e) => panic!("limit {max} gave {e:?} for a valid path {p:?}"),
        }
    }
});
