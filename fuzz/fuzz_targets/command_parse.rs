//! The command parser (`Command::parse`), fed any message a client could send.
//!
//! Invariants: no panic; a send's id is a valid one; a parsed command re-encodes to a message that parses to the same
//! command; a path limit only adds `path-too-long` refusals; a refusal's error line is one
//! line that the line parser reads back with the same key and code.

#![no_main]

use ivy_client_core::path::{PathError, is_normalized};
use ivy_client_core::wire::{Command, CommandErrorKind, Op, ServerLine, encode_error, is_valid_send_id, parse_line};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 16;

fuzz_target!(|msg: &[u8]| {
    let limited = Command::parse_with_limit(msg, LIMIT);
    match Command::parse(msg) {
        Ok(cmd) => {
            if let Some(key) = cmd.ack {
                assert!(!key.contains(&b'#'));
            }
            match &cmd.op {
                Op::Subscribe(p) | Op::Unsubscribe(p) | Op::Send { path: p, .. } | Op::PresenceWatch(p) | Op::PresenceQuery(p) => assert!(is_normalized(p), "{p:?}"),
                Op::Timestamp | Op::Refresh(_) => {}
            }
            if let Op::Send { id: Some(id), .. } = &cmd.op {
                assert!(is_valid_send_id(id), "{id:?}");
            }
            let encoded = cmd.to_bytes();
            assert_eq!(Command::parse(&encoded).as_ref(), Ok(&cmd), "re-encoded as {encoded:?}");
            match limited {
                Ok(c) => assert_eq!(c, cmd),
                Err(e) => assert!(matches!(e.kind, CommandErrorKind::Path(PathError::TooLong { max: LIMIT, .. })), "{e:?}"),
            }
        }
        Err(e) => {
            assert_eq!(limited.as_ref().err(), Some(&e), "a limit cannot change another refusal");
            let message = e.to_string();
            let mut line = Vec::new();
            encode_error(e.ack, e.kind.code(), &message, &mut line);
            assert!(!line.contains(&b'\n') || e.ack.is_some_and(|k| k.contains(&b'\n')));
            match parse_line(&line) {
                Ok(ServerLine::Error { key, code, .. }) => {
                    assert_eq!(key, e.ack);
                    assert_eq!(code, e.kind.code().as_str());
                }
                other => panic!("error line {line:?} parsed as {other:?}"),
            }
        }
    }
});
