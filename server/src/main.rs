//! The `ivy-server` binary: parses flags, sets up logging, binds, runs until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use ivy_server::Config;
use tracing_subscriber::EnvFilter;

// The sequencer spends much of its time in the allocator under sled's inserts (issue 7,
// docs/BENCHMARKS.md): mimalloc is faster there than glibc's malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ivy-server: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(2);
        }
    };
    match listener.local_addr() {
        // A stable line for scripts and tests that bind port 0.
        Ok(addr) => println!("ivy-server listening on http://{addr}"),
        Err(e) => eprintln!("ivy-server: {e}"),
    }
    match ivy_server::run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ivy-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
