//! The server line parser (`parse_line`, `parse_event`), fed any line a server (or a corrupt
//! log) could produce; also the timestamp parser.
//!
//! Invariants: no panic; an event, ack or known error re-encodes to a line that parses to the
//! same value; an event line is also accepted by `parse_event`; a timestamp prints back to a
//! form that parses to the same timestamp.

#![no_main]

use ivy_client_core::Timestamp;
use ivy_client_core::wire::{ErrorCode, ServerLine, encode_ack, encode_error, parse_event, parse_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    match parse_line(line) {
        Ok(ServerLine::Event(ev)) => {
            assert_eq!(parse_event(line).as_ref(), Ok(&ev));
            let mut out = Vec::new();
            ev.encode(&mut out);
            assert_eq!(out.len(), ev.encoded_len());
            assert!(!out.contains(&b'\n'), "an encoded event is one line");
            assert_eq!(parse_line(&out), Ok(ServerLine::Event(ev.clone())), "re-encoded as {out:?}");
        }
        Ok(ServerLine::Ack { key, ts }) => {
            let mut out = Vec::new();
            encode_ack(key, ts, &mut out);
            assert_eq!(parse_line(&out), Ok(ServerLine::Ack { key, ts }));
        }
        Ok(ServerLine::Error { key, code, message }) => {
            if let Some(known) = ErrorCode::from_wire(code) {
                let mut out = Vec::new();
                encode_error(key, known, message, &mut out);
                let flat = message.replace(['\r', '\n'], " ");
                match parse_line(&out) {
                    Ok(ServerLine::Error { key: k, code: c, message: m }) => {
                        assert_eq!((k, c, m), (key, code, flat.as_str()));
                    }
                    other => panic!("error line {out:?} parsed as {other:?}"),
                }
            }
        }
        // Presence lines (extension): parsed without panic is the property.
        Ok(ServerLine::Presence(_)) => {}
        Err(e) => {
            let _ = e.to_string();
            if line.first() == Some(&b'@') {
                assert!(parse_event(line).is_err());
            }
        }
    }
    if let Ok(ts) = Timestamp::parse(line) {
        let printed = ts.to_string();
        assert_eq!(Timestamp::parse(printed.as_bytes()), Ok(ts), "{printed}");
        assert_eq!(Timestamp::from_be_bytes(&ts.to_be_bytes()), Some(ts));
    }
});
