//! Test helper: runs an `ivy-server` child on a fixed port and restarts it on request, so that
//! tests running inside a browser can restart the server they talk to.
//!
//! `ivy-test-control --data DIR` prints one line, `control http://CTRL server ws://ADDR`, then
//! serves `GET /restart` (SIGKILL the server, start it again on the same port and data
//! directory; answers once it listens) and `GET /stop`. CORS is open; it listens on loopback
//! only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Mutex;

struct Server {
    data: PathBuf,
    addr: SocketAddr,
    child: Option<tokio::process::Child>,
}

async fn spawn(data: &PathBuf, listen: &str) -> (tokio::process::Child, SocketAddr) {
    let bin = std::env::current_exe().expect("exe").with_file_name("ivy-server");
    let mut child = tokio::process::Command::new(bin)
        .args(["--listen", listen, "--data"])
        .arg(data)
        // Presence leaves within a second (the browser tests' presence watch).
        .args(["--presence-linger", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ivy-server (build it first)");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next_line().await.expect("read").expect("listening line");
    let addr = line.rsplit("http://").next().and_then(|a| a.trim().parse().ok()).expect("address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(data) = args.iter().position(|a| a == "--data").and_then(|i| args.get(i + 1)).map(PathBuf::from) else {
        eprintln!("usage: ivy-test-control --data DIR");
        std::process::exit(2);
    };
    let (child, addr) = spawn(&data, "127.0.0.1:0").await;
    let state = Arc::new(Mutex::new(Server { data, addr, child: Some(child) }));
    let restart = {
        let state = state.clone();
        move || async move {
            let mut s = state.lock().await;
            if let Some(mut c) = s.child.take() {
                let _ = c.kill().await;
            }
            let listen = s.addr.to_string();
            let (child, _) = spawn(&s.data, &listen).await;
            s.child = Some(child);
            ([("access-control-allow-origin", "*")], "restarted")
        }
    };
    let stop = {
        let state = state.clone();
        move || async move {
            if let Some(mut c) = state.lock().await.child.take() {
                let _ = c.kill().await;
            }
            ([("access-control-allow-origin", "*")], "stopped")
        }
    };
    let app = Router::new().route("/restart", get(restart)).route("/stop", get(stop));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!("control http://{} server ws://{addr}", listener.local_addr().expect("addr"));
    // Never leave the server behind: it would outlive us and hold our caller's pipes open.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        r = axum::serve(listener, app) => r.expect("serve"),
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(mut c) = state.lock().await.child.take() {
        let _ = c.kill().await;
    }
}
