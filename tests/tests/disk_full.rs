//! A full disk (issue 12, finding 4), on a real file system that really fills: a small tmpfs
//! mounted in a mount namespace of its own, so nothing outside the test sees it and it
//! disappears with the test. As root that takes `unshare --mount`; otherwise an unprivileged
//! user namespace (`unshare --user --map-root-user --mount`). When neither works the test
//! fails and says why: it never skips.
//!
//! The server runs inside the namespace (`nsenter`); the test reaches the tmpfs from outside
//! through `/proc/PID/root` of the process holding the namespace, and fills it with a file of
//! its own, as another program on the same disk would.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ivy_tests::{Client, ServerProcess, log_text};

/// The tmpfs's size: room for sled's files and a few hundred small events.
const SIZE: &str = "24m";

/// A tmpfs mounted at a temporary directory inside a mount namespace held by a child process.
struct Tmpfs {
    holder: Child,
    /// The mount point, as seen inside the namespace.
    mnt: PathBuf,
    /// Whether the namespace is in a user namespace of its own (not root).
    user_ns: bool,
    _dir: tempfile::TempDir,
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|u| u.split_whitespace().nth(1)).is_some_and(|euid| euid == "0")
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes (`mount -o size=` syntax), or panics with every way tried.
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("ivy-tmpfs-").tempdir().expect("temp dir");
        let mnt = dir.path().to_path_buf();
        let mut ways: Vec<(bool, Vec<&str>)> = Vec::new();
        if is_root() {
            ways.push((false, vec!["--mount", "--propagation", "private"]));
        }
        ways.push((true, vec!["--user", "--map-root-user", "--mount", "--propagation", "private"]));
        let mut failures = Vec::new();
        for (user_ns, flags) in ways {
            let script = format!("mount -t tmpfs -o size={size} ivy-test \"$0\" && echo mounted && exec cat");
            let spawned = Command::new("unshare")
                .args(&flags)
                .args(["sh", "-c", &script])
                .arg(&mnt)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            let mut holder = match spawned {
                Ok(child) => child,
                Err(e) => {
                    failures.push(format!("unshare {}: {e}", flags.join(" ")));
                    continue;
                }
            };
            let mut first = String::new();
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().expect("stdout")), &mut first);
            if first.trim() == "mounted" {
                return Tmpfs { holder, mnt, user_ns, _dir: dir };
            }
            let _ = holder.kill();
            let out = holder.wait_with_output().expect("wait");
            failures.push(format!("unshare {}: {}", flags.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
        }
        panic!(
            "this test needs a small tmpfs and found no way to mount one: {}. Run it as root, or allow unprivileged user namespaces (kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)",
            failures.join("; ")
        );
    }

    /// `rel` inside the tmpfs, as the test (outside the namespace) reaches it.
    fn outside(&self, rel: &str) -> PathBuf {
        let inside = self.mnt.strip_prefix("/").expect("absolute");
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(inside).join(rel)
    }

    /// `rel` inside the tmpfs, as the server sees it.
    fn inside(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The command prefix that runs a program in the namespace.
    fn wrapper(&self) -> Vec<String> {
        let mut w = vec!["nsenter".to_string(), "--target".into(), self.holder.id().to_string(), "--mount".into()];
        if self.user_ns {
            w.extend(["--user".into(), "--preserve-credentials".into()]);
        }
        w
    }

    /// Fills the file system with the file `fill` until it has no space left; returns the
    /// bytes written.
    fn fill(&self) -> u64 {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.outside("fill")).expect("open the filler");
        let mut written = 0u64;
        for chunk in [1 << 16, 4096, 1] {
            let buf = vec![0xa5u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling the tmpfs: {e}"),
                }
            }
        }
        written
    }

    /// Removes the filler.
    fn free(&self) {
        std::fs::remove_file(self.outside("fill")).expect("remove the filler");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// What became of one send.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    /// Acked: its line as the log holds it.
    Acked(String),
    /// Refused with this code (`storage` may still have stored it; `store-full` never did).
    Refused(String, String),
}

/// Sends `data` on `path` with an ack key and returns what became of it.
async fn send(c: &mut Client, key: &str, path: &str, data: &str) -> Sent {
    let reply = c.request(&format!("#{key}#:{path}:{data}")).await;
    if let Some(ts) = reply.strip_prefix(&format!("#{key}#@")) {
        return Sent::Acked(format!("@{ts}:{path}:{data}"));
    }
    let err = reply.strip_prefix(&format!("#{key}#!")).unwrap_or_else(|| panic!("not a reply to {key}: {reply:?}"));
    let (code, message) = err.split_once(' ').unwrap_or((err, ""));
    assert!(matches!(code, "storage" | "store-full"), "a full disk is refused with storage or store-full: {reply:?}");
    assert!(!message.contains("Os {") && !message.contains("code: 28"), "no internal error text reaches the client: {reply:?}");
    Sent::Refused(code.to_string(), message.to_string())
}

/// Every event of the log of `/d`, in order.
async fn logged(server: &ServerProcess) -> Vec<String> {
    log_text(server.addr, "/log/d").await.lines().map(str::to_string).collect()
}

/// The log holds every acked event, in order, and nothing refused with `store-full`.
fn check_log(log: &[String], history: &[(String, Sent)]) {
    let acked: Vec<&String> = history.iter().filter_map(|(_, s)| if let Sent::Acked(l) = s { Some(l) } else { None }).collect();
    let in_log: Vec<&String> = log.iter().filter(|l| acked.contains(l)).collect();
    assert_eq!(in_log, acked, "every acked event is in the log, in order");
    for line in log {
        if acked.contains(&line) {
            continue;
        }
        let data = line.rsplit(':').next().unwrap_or_default();
        let refused = history.iter().find(|(d, _)| d == data).map(|(_, s)| s);
        assert!(
            matches!(refused, Some(Sent::Refused(code, _)) if code == "storage"),
            "only a send refused with `storage` may be in the log unacked: {line} ({refused:?})"
        );
    }
}

/// Sends until one is refused (at most `limit` sends); returns the refusal.
async fn send_until_refused(c: &mut Client, history: &mut Vec<(String, Sent)>, tag: &str, limit: usize) -> Sent {
    for i in 0..limit {
        let data = format!("{tag}-{i}-{}", "x".repeat(2000));
        let sent = send(c, &format!("{tag}{i}"), "/d", &data).await;
        history.push((data, sent.clone()));
        if matches!(sent, Sent::Refused(..)) {
            return sent;
        }
    }
    panic!("{limit} sends were all stored on a full disk");
}

/// Sends until one is acked, waiting a little between tries, at most `tries`; every refusal
/// before it must be `store-full` (the server knows the disk is full) once the first write
/// failure has been reported.
async fn send_until_acked(c: &mut Client, history: &mut Vec<(String, Sent)>, tag: &str, tries: usize) {
    for i in 0..tries {
        let data = format!("{tag}-{i}");
        let sent = send(c, &format!("{tag}{i}"), "/d", &data).await;
        history.push((data, sent.clone()));
        match sent {
            Sent::Acked(_) => return,
            Sent::Refused(code, message) => {
                assert_eq!(code, "store-full", "after space is freed, sends are refused only while the store waits for it: {message}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("space was freed, yet {tries} sends over {} s were all refused", tries / 10);
}

/// While full, a send is refused with `store-full` and a message that says the disk is full;
/// the connection and the log stay usable.
async fn check_refused_while_full(c: &mut Client, history: &mut Vec<(String, Sent)>, tag: &str) {
    for i in 0..3 {
        let data = format!("{tag}-{i}");
        let sent = send(c, &format!("{tag}{i}"), "/d", &data).await;
        history.push((data, sent.clone()));
        match sent {
            Sent::Refused(code, message) if code == "store-full" => {
                assert!(message.contains("disk is full"), "{message}");
                return;
            }
            Sent::Refused(..) => {}
            Sent::Acked(line) => panic!("stored on a full disk: {line}"),
        }
    }
    panic!("while the disk is full, sends are refused with store-full: {:?}", &history[history.len() - 3..]);
}

/// The whole story on a small tmpfs: sends refused with a clear code while the disk is full,
/// accepted again once space is freed without a restart, SIGTERM on a full disk exits within
/// its bound, the store opens after a restart while still full, and no acked event is lost. A
/// bystander subscriber keeps being served and receives exactly the acked events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_and_the_server_recovers_once_space_is_freed() {
    let fs = Tmpfs::mount(SIZE);
    let data = fs.inside("data");
    // No free-space reserve: the disk really fills under the store (with the default reserve
    // sends are refused before that, which tests/hostile.rs covers).
    let flags = ["--min-free-space", "0", "--flush-timeout", "2"];
    let server = ServerProcess::start_wrapped(&fs.wrapper(), &data, &flags).await;
    let mut history: Vec<(String, Sent)> = Vec::new();
    let mut c = Client::connect(&server.ws_url()).await;
    let mut bystander = Client::connect(&server.ws_url()).await;
    bystander.subscribe("/d").await;
    for i in 0..5 {
        let data = format!("room-{i}");
        let sent = send(&mut c, &format!("r{i}"), "/d", &data).await;
        assert!(matches!(sent, Sent::Acked(_)), "{sent:?}");
        history.push((data, sent));
    }

    // Full: the first failing send is refused (`storage`: its write failed), the next ones
    // with store-full.
    assert!(fs.fill() > 0);
    send_until_refused(&mut c, &mut history, "a", 500).await;
    check_refused_while_full(&mut c, &mut history, "b").await;
    assert!(c.request("#t#@").await.starts_with("#t#@"), "the connection stays usable");
    check_log(&logged(&server).await, &history);

    // Space freed: accepted again, same process, same connections.
    fs.free();
    send_until_acked(&mut c, &mut history, "c", 100).await;
    check_log(&logged(&server).await, &history);
    // The bystander got exactly the acked events, in order, and nothing refused.
    let acked: Vec<String> = history.iter().filter_map(|(_, s)| if let Sent::Acked(l) = s { Some(l.clone()) } else { None }).collect();
    for want in &acked {
        assert_eq!(&bystander.recv().await, want);
    }

    // Full again, then SIGTERM: the process exits within its bound (5 s for the connections,
    // --flush-timeout for the store), and the store opens again while the disk is still full.
    fs.fill();
    send_until_refused(&mut c, &mut history, "d", 500).await;
    let status = server.terminate().await;
    assert!(status.code().is_some(), "exited, not killed: {status:?}");
    let server = ServerProcess::start_wrapped(&fs.wrapper(), &data, &flags).await;
    check_log(&logged(&server).await, &history);
    let mut c = Client::connect(&server.ws_url()).await;
    send_until_refused(&mut c, &mut history, "e", 500).await;
    check_refused_while_full(&mut c, &mut history, "f").await;

    // Freed again: accepted, and every acked event of the whole story is in the log.
    fs.free();
    send_until_acked(&mut c, &mut history, "g", 100).await;
    check_log(&logged(&server).await, &history);
    assert!(server.terminate().await.success());
}
