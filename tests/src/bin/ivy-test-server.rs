//! `ivy-test-server`: the `ivy-server` binary (the same code, [`ivy_server::cli::main_with`])
//! with a wall clock that tests can freeze.
//!
//! Same flags as `ivy-server`. With `IVY_TEST_FROZEN_CLOCK=SECONDS` set, the wall clock reads
//! that second forever, which models a clock that stepped back: event timestamps then advance
//! by one nanosecond per event from the newest one, which is exactly the situation in which a
//! server that resumed after the newest surviving event would hand out the timestamps of
//! events lost in a crash a second time. The crash tests use it; nothing else should.

use std::process::ExitCode;

use ivy_client_core::Timestamp;
use ivy_server::WallClock;

fn main() -> ExitCode {
    let wall = match std::env::var("IVY_TEST_FROZEN_CLOCK") {
        Ok(v) => match v.parse::<u64>() {
            Ok(secs) => {
                let frozen = Timestamp::new(secs, 0).unwrap_or(Timestamp::ZERO);
                WallClock::from_fn(move || frozen)
            }
            Err(_) => {
                eprintln!("ivy-test-server: IVY_TEST_FROZEN_CLOCK must be whole seconds, got {v:?}");
                return ExitCode::from(2);
            }
        },
        Err(_) => WallClock::system(),
    };
    ivy_server::cli::main_with(wall)
}
