//! The `ivy-server` binary: everything is in [`ivy_server::cli`].

use std::process::ExitCode;

// The sequencer spends much of its time in the allocator under sled's inserts
// (docs/BENCHMARKS.md): mimalloc is faster there than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    ivy_server::cli::main()
}
