//! Shared helpers for the cross-crate tests: a real server on 127.0.0.1 port 0 with its sled
//! store in a temporary directory (in-process or as the `ivy-server` binary), a plain
//! WebSocket client, and a raw HTTP/1.1 client so that headers and bodies are checked byte for
//! byte.
//!
//! The engine switch: the tests about protocol behaviour run on the engine named by
//! `IVY_TEST_ENGINE` (`sled`, the default, `memory`, or `redis`: a real `redis-server` that the
//! tests start on a free loopback port with its own directory, [`RedisServer`]), so that every
//! engine runs the same suite; the tests about stored files and restarts ask for sled explicitly
//! ([`Setup::sled`], [`TestServer::start_sled_in`], [`ServerProcess::start_sled`]).

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use ivy_server::Config;

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A server running in this process.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// The Redis server it runs on, kept while it runs.
    pub redis: Option<Arc<RedisServer>>,
}

/// A fresh temporary data directory.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("ivy-test-").tempdir().expect("temp dir")
}

/// An engine the tests can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// The sled engine, its store in the test's directory.
    Sled,
    /// The in-memory engine.
    Memory,
    /// The Redis engine, on a `redis-server` of the test's own ([`RedisServer::for_dir`]).
    Redis,
}

impl EngineKind {
    /// The engine of the protocol tests: `IVY_TEST_ENGINE=memory`, or sled.
    pub fn from_env() -> EngineKind {
        match std::env::var("IVY_TEST_ENGINE").as_deref() {
            Ok("memory") => EngineKind::Memory,
            Ok("redis") => EngineKind::Redis,
            Ok("sled") | Err(_) => EngineKind::Sled,
            Ok(other) => panic!("IVY_TEST_ENGINE={other:?}: expected sled, memory or redis"),
        }
    }

    /// The `ivy-server` flags that select it (for Redis, on the Redis server of `dir`, which
    /// is returned to be kept while the server runs).
    pub fn flags(self, dir: &Path) -> (Vec<String>, Option<Arc<RedisServer>>) {
        match self {
            EngineKind::Sled => (Vec::new(), None),
            EngineKind::Memory => (vec!["--memory".into()], None),
            EngineKind::Redis => {
                let redis = RedisServer::for_dir(dir);
                (vec!["--redis".into(), redis.url()], Some(redis))
            }
        }
    }
}

/// A `redis-server` of the tests' own: a free loopback port, its directory, the append-only
/// file fsynced at every write (`--appendonly yes --appendfsync always`), killed (SIGKILL) when
/// the last handle is dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its directory (the append-only file is there).
    pub dir: PathBuf,
    child: Mutex<Option<std::process::Child>>,
}

/// The Redis servers of the test directories. Each lives as long as the thread that started
/// it (the test's): it is started with the parent-death signal SIGKILL (`setpriv
/// --pdeathsig`), so that it ends with its test whatever holds it (an engine built from a
/// [`Setup`] that was dropped still needs it), and never outlives the test binary.
static REDIS: Mutex<Vec<(PathBuf, Arc<RedisServer>)>> = Mutex::new(Vec::new());

impl RedisServer {
    /// The Redis server of a test's data directory: the one running, or a new one on
    /// `dir/redis` (which reloads its append-only file: a server restarted on the same
    /// directory finds its events).
    pub fn for_dir(dir: &Path) -> Arc<RedisServer> {
        let mut all = REDIS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Those whose test ended (their directory is gone) are forgotten.
        all.retain(|(d, _)| d.exists());
        if let Some((_, r)) = all.iter().find(|(d, _)| d == dir) {
            return r.clone();
        }
        let r = Arc::new(RedisServer::start(&dir.join("redis")));
        all.push((dir.to_path_buf(), r.clone()));
        r
    }

    /// Starts `redis-server` on a free port with its files in `dir` (created), and waits until
    /// it answers.
    pub fn start(dir: &Path) -> RedisServer {
        std::fs::create_dir_all(dir).expect("redis dir");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
            let server = RedisServer { port, dir: dir.to_path_buf(), child: Mutex::new(None) };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server did not start (is it installed? scripts/test.sh installs Debian's redis-server)");
    }

    /// Starts the process on its port and directory; whether it answers.
    fn spawn(&self) -> bool {
        // Killed when the thread that starts it ends (see [`REDIS`]), where setpriv exists.
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = std::process::Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "redis-server"]);
            c
        } else {
            std::process::Command::new("redis-server")
        };
        let child = cmd
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--protected-mode", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn redis-server (is it installed? scripts/test.sh installs Debian's redis-server)");
        *self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(child);
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            if self.ping() {
                return true;
            }
            if let Some(c) = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether it answers PING (and is done loading its files).
    pub fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    /// Runs one command (RESP over a fresh connection); the first line of the reply.
    pub fn command(&self, args: &[&str]) -> String {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis-server");
        let _ = s.set_read_timeout(Some(WAIT));
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("write to redis-server");
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).expect("redis-server reply");
        line.trim_end().to_string()
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis gets no chance to write anything more.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory (after [`RedisServer::kill`]): it
    /// reloads its append-only file.
    pub fn restart(&self) {
        self.kill();
        let deadline = std::time::Instant::now() + WAIT;
        while !self.spawn() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not restart on port {}", self.port);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test server's setup: its [`Config`] (it derefs to it, so limits are set as fields), its
/// data directory and its engine.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The server's configuration.
    pub config: Config,
    /// The data directory (used by sled).
    pub data: PathBuf,
    /// The engine.
    pub engine: EngineKind,
    /// The engine's retention settings (default: keep everything).
    pub retention: ivy_server::engine::Retention,
    /// The engine's wall clock (default: the system's).
    pub wall: Option<ivy_server::engine::WallClock>,
    /// The Redis server of [`EngineKind::Redis`] (started by [`config`]).
    pub redis: Option<Arc<RedisServer>>,
}

impl Setup {
    /// On sled whatever the switch says: for tests about stored files and restarts.
    pub fn sled(mut self) -> Setup {
        self.engine = EngineKind::Sled;
        self
    }

    /// A builder of the server.
    pub fn builder(&self) -> ivy_server::IvyBuilder {
        let b = ivy_server::Ivy::builder(self.config.clone());
        let wall = self.wall.clone().unwrap_or_default();
        match self.engine {
            EngineKind::Sled => b.engine(ivy_server::engine::SledEngine::new(&self.data).retention(self.retention).wall_clock(wall)),
            EngineKind::Memory => b.engine(ivy_server::engine::MemoryEngine::new().retention(self.retention).wall_clock(wall)),
            EngineKind::Redis => {
                let redis = self.redis.clone().unwrap_or_else(|| RedisServer::for_dir(&self.data));
                b.engine(ivy_server::engine::RedisEngine::new(redis.url()).retention(self.retention).wall_clock(wall))
            }
        }
    }
}

impl Deref for Setup {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

impl DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

/// A setup for tests: default limits, data in `dir`, the engine of [`EngineKind::from_env`].
pub fn config(dir: &Path) -> Setup {
    let engine = EngineKind::from_env();
    Setup {
        config: Config::default(),
        data: dir.to_path_buf(),
        engine,
        retention: ivy_server::engine::Retention::default(),
        wall: None,
        redis: (engine == EngineKind::Redis).then(|| RedisServer::for_dir(dir)),
    }
}

impl TestServer {
    /// Starts a server with `setup` on 127.0.0.1, port 0.
    pub async fn start(mut setup: Setup) -> TestServer {
        if setup.engine == EngineKind::Redis && setup.redis.is_none() {
            setup.redis = Some(RedisServer::for_dir(&setup.data));
        }
        let redis = if setup.engine == EngineKind::Redis { setup.redis.clone() } else { None };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ivy_server::run(setup.builder(), listener, async move {
            let _ = rx.await;
        }));
        TestServer { addr, stop: Some(tx), task: Some(task), redis }
    }

    /// Starts a server with default limits on `dir` (the switch's engine).
    pub async fn start_in(dir: &Path) -> TestServer {
        TestServer::start(config(dir)).await
    }

    /// Starts a server with default limits on a sled store in `dir`.
    pub async fn start_sled_in(dir: &Path) -> TestServer {
        TestServer::start(config(dir).sled()).await
    }

    /// The WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Graceful shutdown; waits until the store is flushed and closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task).await.expect("shutdown in time").expect("join").expect("run");
        }
    }
}

/// The `ivy-server` binary, built next to the test executables (`cargo test --workspace`
/// builds it; `cargo build -p ivy-server` does too).
pub fn server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("IVY_SERVER_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(format!("ivy-server{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} not found: run `cargo build -p ivy-server` first", bin.display());
    bin
}

/// The server binary running as a child process.
#[derive(Debug)]
pub struct ServerProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// The Redis server it runs on (`IVY_TEST_ENGINE=redis`), kept while it runs.
    pub redis: Option<Arc<RedisServer>>,
}

impl ServerProcess {
    /// Starts `ivy-server --listen 127.0.0.1:0 --data DIR` plus `extra` flags (and `--memory`
    /// when the switch says so), and waits for its "listening" line.
    pub async fn start(dir: &Path, extra: &[&str]) -> ServerProcess {
        let (engine, redis) = EngineKind::from_env().flags(dir);
        let flags: Vec<&str> = engine.iter().map(String::as_str).chain(extra.iter().copied()).collect();
        let mut server = ServerProcess::start_bin(&server_bin(), dir, &flags, &[]).await;
        server.redis = redis;
        server
    }

    /// Starts `ivy-server` on a sled store in `dir`, whatever the switch says.
    pub async fn start_sled(dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_bin(&server_bin(), dir, extra, &[]).await
    }

    /// Starts the server binary `bin` (`ivy-server` or a test build of it such as
    /// `ivy-test-server`) like [`ServerProcess::start`], with extra environment variables.
    pub async fn start_bin(bin: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        ServerProcess::start_command(tokio::process::Command::new(bin), dir, extra, env).await
    }

    /// Starts the `ivy-server` binary on a sled store in `dir` through `wrapper` (a program and
    /// its arguments that run the command after them, such as `nsenter --target PID --mount`),
    /// like [`ServerProcess::start_sled`]. The wrapper must exec the server, so that the
    /// process is the server (signals reach it).
    pub async fn start_wrapped(wrapper: &[String], dir: &Path, extra: &[&str]) -> ServerProcess {
        let (program, args) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).arg(server_bin());
        ServerProcess::start_command(cmd, dir, extra, &[]).await
    }

    async fn start_command(mut cmd: tokio::process::Command, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let mut child = cmd
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn ivy-server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("server started in time").expect("read").expect("a line");
        let addr =
            line.rsplit("://").next().and_then(|a| a.trim().parse().ok()).unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ServerProcess { addr, child, redis: None }
    }

    /// The WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The HTTP base URL (`http://127.0.0.1:PORT`).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The resident memory of the process in bytes (Linux `/proc`; `None` elsewhere).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    }

    /// SIGKILL: no chance to flush anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// Waits for the process to exit by itself (after a signal sent some other way).
    pub async fn wait(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("exit in time").expect("wait")
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid");
        let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("kill -TERM");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("exit in time").expect("wait")
    }
}

/// The WebSocket stream of a [`Client`].
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A plain WebSocket client speaking raw protocol lines.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    /// The subprotocol the server selected.
    pub protocol: Option<String>,
}

/// What arrived instead of a text line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// A text line.
    Line(String),
    /// A close frame with this code and reason.
    Close(u16, String),
    /// The connection ended without a close frame.
    Ended,
    /// Nothing within the wait.
    Timeout,
}

impl Client {
    /// Connects to `url` offering the `ivy1` subprotocol ([`ivy_client_core::SUBPROTOCOL`]).
    pub async fn connect(url: &str) -> Client {
        Client::connect_with(url, Some(ivy_client_core::SUBPROTOCOL)).await
    }

    /// Connects offering `protocol` (or none).
    pub async fn connect_with(url: &str, protocol: Option<&str>) -> Client {
        let mut req = url.into_client_request().expect("request");
        if let Some(p) = protocol {
            req.headers_mut().insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
        }
        let (ws, resp) =
            tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await.expect("connect in time").expect("connect");
        let protocol = resp.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap_or_default().to_string());
        Client { ws, protocol }
    }

    /// Wraps an open WebSocket (for example one made with `tokio_tungstenite::connect_async`).
    pub fn from_stream(ws: Ws) -> Client {
        Client { ws, protocol: None }
    }

    /// Sends one command as a text message.
    pub async fn send(&mut self, line: &str) {
        self.ws.send(Message::text(line)).await.expect("send");
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// The next text line, close or end, or `Timeout` after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Got {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Err(_) => return Got::Timeout,
                Ok(None) => return Got::Ended,
                Ok(Some(Ok(Message::Text(t)))) => return Got::Line(t.to_string()),
                Ok(Some(Ok(Message::Close(Some(f))))) => return Got::Close(u16::from(f.code), f.reason.to_string()),
                Ok(Some(Ok(Message::Close(None)))) => return Got::Close(u16::from(CloseCode::Status), String::new()),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) => return Got::Ended,
            }
        }
    }

    /// The next text line; panics on anything else.
    pub async fn recv(&mut self) -> String {
        match self.next_within(WAIT).await {
            Got::Line(l) => l,
            other => panic!("expected a line, got {other:?}"),
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.next_within(wait).await {
            Got::Timeout => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    /// Sends an acked command and returns its reply line.
    pub async fn request(&mut self, line: &str) -> String {
        self.send(line).await;
        self.recv().await
    }

    /// Subscribes with an ack and returns the position timestamp.
    pub async fn subscribe(&mut self, path: &str) -> String {
        let reply = self.request(&format!("#sub#+{path}")).await;
        reply.strip_prefix("#sub#@").unwrap_or_else(|| panic!("subscribe reply {reply:?}")).to_string()
    }

    /// Sends with an ack and returns the event timestamp.
    pub async fn publish(&mut self, path: &str, data: &str) -> String {
        let reply = self.request(&format!("#pub#:{path}:{data}")).await;
        reply.strip_prefix("#pub#@").unwrap_or_else(|| panic!("send reply {reply:?}")).to_string()
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// A raw HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body bytes (chunked transfer decoded).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

/// `GET target` with extra headers, over a fresh connection.
pub async fn http_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_http_get(addr, target, headers).await.unwrap_or_else(|e| panic!("GET {target}: {e}"))
}

/// [`http_get`] that reports failures (connection refused or reset, a truncated response, no
/// answer within [`WAIT`]) instead of panicking: for tests where the server may be killed.
pub async fn try_http_get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    try_http_request(addr, "GET", target, headers).await
}

/// A request with any method and no body (`DELETE`, `HEAD`, ...), over a fresh connection.
pub async fn http_request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_http_request(addr, method, target, headers).await.unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

/// A request with a body (`Content-Length`; `Connection: close`), over a fresh connection.
/// A write error is ignored (a refused body may be left unread: the server can close before
/// it is all written), and so is a reset after the response.
pub async fn http_send(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("{method} {target}: connect: {e}"));
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let _ = s.write_all(&bytes).await;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw)).await.unwrap_or_else(|_| panic!("{method} {target}: no response in time")).ok();
    parse_http(&raw).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

async fn try_http_request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .map_err(|_| "no response in time".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let r = parse_http(&raw)?;
    if let Some(len) = r.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if r.body.len() < len {
            return Err(format!("truncated body: {} of {len} bytes", r.body.len()));
        }
    }
    Ok(r)
}

fn parse_http(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("response ends before its headers")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).ok_or("no status code")?;
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        let truncated = || "truncated chunked body".to_string();
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").ok_or_else(truncated)?;
            let line = std::str::from_utf8(&rest[..nl]).map_err(|_| "chunk size is not ASCII")?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("0").trim(), 16).map_err(|_| "bad chunk size")?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or_else(truncated)?);
            rest = rest.get(size + 2..).ok_or_else(truncated)?;
        }
        body = out;
    }
    Ok(HttpResponse { status, headers, body })
}

/// A raw WebSocket handshake on `/ws` with extra headers: the status and headers of the reply.
pub async fn raw_handshake(addr: SocketAddr, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>) {
    let (r, _) = raw_ws_open(addr, headers).await.unwrap_or_else(|e| panic!("handshake: {e}"));
    (r.status, r.headers)
}

/// A raw WebSocket handshake on `/ws` that keeps the TCP stream, for tests that then misbehave
/// on the socket (stay silent, never read). Returns the response (for a refusal, with its
/// `Content-Length` body; for `101`, the body holds any bytes that followed the headers) and
/// the stream positioned after them.
pub async fn raw_ws_open(addr: SocketAddr, headers: &[(&str, &str)]) -> Result<(HttpResponse, TcpStream), String> {
    raw_ws_open_at(addr, "/ws", headers).await
}

/// [`raw_ws_open`] on `target` (for example `/ws?token=...`).
pub async fn raw_ws_open_at(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Result<(HttpResponse, TcpStream), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_http(&raw[..end + 4])?;
                let want = head.header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
                if head.status == 101 || raw.len() >= end + 4 + want {
                    return Ok::<(), String>(());
                }
            }
            let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed during the handshake".into());
            }
            raw.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.map_err(|_| "no handshake reply in time".to_string())??;
    Ok((parse_http(&raw)?, s))
}

/// The body of `GET /log<path>[?query]` as text; panics unless 200.
pub async fn log_text(addr: SocketAddr, target: &str) -> String {
    let r = http_get(addr, target, &[]).await;
    assert_eq!(r.status, 200, "GET {target}: {}", String::from_utf8_lossy(&r.body));
    r.text()
}

/// A TCP proxy on 127.0.0.1 that injects faults between clients and a server: it can cut
/// every open connection, stall forwarding, and follow a server restarted on another port.
#[derive(Debug, Clone)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
    cuts: tokio::sync::watch::Sender<u64>,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Stops forwarding the server's bytes only: requests get through, replies wait.
    replies_held: tokio::sync::watch::Sender<bool>,
    /// Connections cut so far.
    pub cut_count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = FaultProxy {
            addr: listener.local_addr().expect("addr"),
            upstream: std::sync::Arc::new(std::sync::Mutex::new(upstream)),
            cuts: tokio::sync::watch::channel(0).0,
            stalled: tokio::sync::watch::channel(false).0,
            replies_held: tokio::sync::watch::channel(false).0,
            cut_count: Default::default(),
        };
        let p = proxy.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let p = p.clone();
                tokio::spawn(async move { p.serve(client).await });
            }
        });
        proxy
    }

    /// The base URL clients use.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Sends new connections to `addr` (a restarted server).
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().expect("lock") = addr;
    }

    /// Drops every open connection (both sides see the TCP connection end).
    pub fn cut_all(&self) {
        self.cuts.send_modify(|g| *g += 1);
    }

    /// Stops (or resumes) forwarding bytes, without closing anything.
    pub fn stall(&self, on: bool) {
        self.stalled.send_replace(on);
    }

    /// Stops (or resumes) forwarding what the server sends, while the clients' bytes still
    /// reach it: the server executes commands whose replies are held (lost at the next cut).
    pub fn hold_replies(&self, on: bool) {
        self.replies_held.send_replace(on);
    }

    /// Random cuts and stalls for `duration`, from a seeded generator; returns the seed.
    pub fn chaos(&self, seed: u64, duration: Duration) -> JoinHandle<()> {
        let p = self.clone();
        tokio::spawn(async move {
            let mut rng = seed | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let end = tokio::time::Instant::now() + duration;
            while tokio::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(30 + next(250))).await;
                if next(4) == 0 {
                    p.stall(true);
                    tokio::time::sleep(Duration::from_millis(100 + next(900))).await;
                    p.stall(false);
                } else {
                    p.cut_all();
                }
            }
            p.stall(false);
        })
    }

    async fn serve(&self, client: TcpStream) {
        let mut cuts = self.cuts.subscribe();
        let generation = *cuts.borrow_and_update();
        let upstream = *self.upstream.lock().expect("lock");
        let Ok(server) = TcpStream::connect(upstream).await else { return };
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let a = pipe(cr, sw, vec![self.stalled.subscribe()]);
        let b = pipe(sr, cw, vec![self.stalled.subscribe(), self.replies_held.subscribe()]);
        tokio::select! {
            _ = async { tokio::join!(a, b) } => {}
            _ = cuts.wait_for(|g| *g != generation) => {
                self.cut_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// Waits until no gate is closed (true); false when a gate's sender is gone.
async fn gates_open(gates: &mut [tokio::sync::watch::Receiver<bool>]) -> bool {
    loop {
        for g in gates.iter_mut() {
            if g.wait_for(|s| !*s).await.is_err() {
                return false;
            }
        }
        if gates.iter().all(|g| !*g.borrow()) {
            return true;
        }
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: Vec<tokio::sync::watch::Receiver<bool>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !gates_open(&mut stalled).await {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if !gates_open(&mut stalled).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The `ivy` command-line client, built next to the test executables.
pub fn ivy_bin() -> PathBuf {
    let bin = server_bin().with_file_name(format!("ivy{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} not found: run `cargo build -p ivy-client-native` first", bin.display());
    bin
}

/// splitmix64: a small, seeded, reproducible generator for test campaigns (print the seed).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    /// One of `from`, uniformly.
    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.range(0, from.len() as u64) as usize]
    }
}
