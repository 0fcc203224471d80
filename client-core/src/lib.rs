//! The Ivy protocol in one sans-IO crate: no sockets, clocks or runtime inside.
//!
//! This crate holds everything both sides of the Ivy hierarchical pub/sub protocol agree on,
//! as pure functions over bytes, so that the reference server, the tokio client and the
//! WebAssembly client share one implementation:
//!
//! - [`wire`]: parse and encode every command and server line (events, acks, errors);
//! - [`escape`]: the data escaping rules (`%` to `%25`, newline to `%0A`);
//! - [`path`]: channel path normalization, validation and the ancestor chain;
//! - [`presence`]: the presence lines' payloads (who is subscribed; extension);
//! - [`timestamp`]: event timestamps, their wire form and their ordered storage key form;
//! - [`http`]: the server's endpoints from its base URL, and the log endpoint's query
//!   ([`http::LogQuery`], parsed by the server and written by the clients) and body;
//! - [`client`]: the client state machine (subscriptions, acks, reconnect with backoff, log
//!   backfill, and sends with ids that are resent after a reconnect when their ack was lost,
//!   so that each is stored once: [Sends](client#sends-while-disconnected-and-lost-acks)) that
//!   the tokio and browser drivers run.
//!
//! The subprotocol name ([`SUBPROTOCOL`]) and the close codes ([`close_code`]) are defined
//! here once, for the server, both clients, the tests and the benchmarks.
//!
//! The wire protocol itself is specified in `docs/PROTOCOL.md` at the repository root.
//!
//! ```
//! use ivy_client_core::wire::{Command, Op, parse_line, ServerLine};
//!
//! let cmd = Command::parse(b"#1#:/chat/room1:hello").unwrap();
//! assert_eq!(cmd.ack, Some(&b"1"[..]));
//! assert!(matches!(cmd.op, Op::Send { ref path, data: b"hello", .. } if path == "/chat/room1"));
//!
//! let line = parse_line(b"@1700000000.000000001:/chat/room1:50%25 off%0Atoday").unwrap();
//! let ServerLine::Event(ev) = line else { panic!() };
//! assert_eq!(&*ev.data, b"50% off\ntoday");
//! ```

#![no_std]
// Only `core` and `alloc`: the WebAssembly package is built without the standard library
// (no formatting machinery from its panic handler), see client-wasm/README.md.

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod client;
pub mod escape;
pub mod http;
pub mod path;
pub mod presence;
pub mod timestamp;
pub mod wire;

pub use timestamp::Timestamp;
pub use wire::{Command, ErrorCode, Event, Op, SUBPROTOCOL, ServerLine, close_code};
