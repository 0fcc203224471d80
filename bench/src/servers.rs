//! The servers under test, started as child processes so that their CPU time and memory can
//! be read from `/proc`.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ivy-server`, `--durability sync` (the default: ack and deliver after fsync).
    Ivy,
    /// `ivy-server --durability async`.
    IvyAsync,
    /// `nats-server` with its WebSocket listener.
    Nats,
    /// `ideal-broadcast` from this package.
    Ideal,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "ivy" => Kind::Ivy,
            "ivy-async" => Kind::IvyAsync,
            "nats" => Kind::Nats,
            "ideal" => Kind::Ideal,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ivy => "ivy",
            Kind::IvyAsync => "ivy-async",
            Kind::Nats => "nats",
            Kind::Ideal => "ideal",
        }
    }

    pub fn is_ivy(self) -> bool {
        matches!(self, Kind::Ivy | Kind::IvyAsync)
    }

    /// The WebSocket request path.
    pub fn ws_path(self) -> &'static str {
        if self.is_ivy() { "/ws" } else { "/" }
    }
}

/// How to find or start the servers.
#[derive(Debug, Clone)]
pub struct Launch {
    pub ivy_server: PathBuf,
    pub ideal: PathBuf,
    pub nats_server: String,
    /// An already running ivy-server to use instead of starting one (no CPU or memory figures).
    pub ivy_addr: Option<SocketAddr>,
    pub nofile: u64,
    pub data_dir: PathBuf,
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    child: Option<Child>,
    pid: Option<u32>,
    _dir: Option<tempfile::TempDir>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Server {
    pub async fn start(kind: Kind, launch: &Launch) -> Result<Server, String> {
        Server::start_with(kind, launch, &[]).await
    }

    /// [`Server::start`] with extra environment variables for ivy-server (its options).
    pub async fn start_with(kind: Kind, launch: &Launch, env: &[(&str, &str)]) -> Result<Server, String> {
        if kind.is_ivy()
            && let Some(addr) = launch.ivy_addr
        {
            return Ok(Server { addr, child: None, pid: None, _dir: None });
        }
        let port = free_port().map_err(|e| e.to_string())?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let dir = tempfile::Builder::new()
            .prefix("ivy-bench-")
            .tempdir_in(&launch.data_dir)
            .map_err(|e| format!("temp dir in {}: {e}", launch.data_dir.display()))?;
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={n}:{n}", n = launch.nofile)).arg("--");
        match kind {
            Kind::Ivy | Kind::IvyAsync => {
                cmd.arg(&launch.ivy_server)
                    .arg("--listen")
                    .arg(addr.to_string())
                    .arg("--data")
                    .arg(dir.path().join("data"))
                    .arg("--durability")
                    .arg(if kind == Kind::Ivy { "sync" } else { "async" })
                    // The benchmarks open up to 20,000 connections per loopback address (an
                    // environment variable, which servers from before the limit ignore).
                    .env("IVY_MAX_CONNECTIONS_PER_ADDRESS", "0")
                    .env("RUST_LOG", "warn")
                    .envs(env.iter().copied());
            }
            Kind::Ideal => {
                cmd.arg(&launch.ideal).arg(addr.to_string());
            }
            Kind::Nats => {
                let client_port = free_port().map_err(|e| e.to_string())?;
                let conf = dir.path().join("nats.conf");
                let text = format!(
                    "listen: \"127.0.0.1:{client_port}\"\nmax_connections: 1000000\nwebsocket {{\n  listen: \"127.0.0.1:{port}\"\n  no_tls: true\n}}\n"
                );
                std::fs::write(&conf, text).map_err(|e| e.to_string())?;
                cmd.arg(&launch.nats_server).arg("-c").arg(&conf);
            }
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::null()).stdin(Stdio::null()).kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| format!("starting {}: {e} (is it installed?)", kind.name()))?;
        let pid = child.id();
        let server = Server { addr, child: Some(child), pid, _dir: Some(dir) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not listen on {addr} within 20 s", kind.name()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(server)
    }

    /// The directory the server keeps its store in (none for `--ivy-addr`).
    pub fn data_dir(&self) -> Option<PathBuf> {
        self._dir.as_ref().map(|d| d.path().join("data"))
    }

    /// User plus system CPU seconds of the server process so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        self.pid.and_then(proc_cpu_secs)
    }

    /// Resident memory of the server process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
    }
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s, Linux's USER_HZ).
pub fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after the name (state is field 3).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The directory of the running executable (where cargo puts the sibling binaries).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| PathBuf::from("."))
}
