//! `ivy-bench`: benchmarks ivy-server against nats-server and an ideal broadcast server over
//! real WebSockets on loopback. Progress goes to stderr; the figures go to a JSON file
//! (`--out`), and optionally to PNG plots (`--plots`) and the table of `docs/BENCHMARKS.md`
//! (`--doc`). See `docs/BENCHMARKS.md` and `scripts/bench.sh`.

mod client;
mod report;
mod scenarios;
mod servers;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::{Value, json};

use crate::scenarios::Common;
use crate::servers::{Kind, Launch};

#[derive(Debug, Parser)]
#[command(name = "ivy-bench", about = "Benchmarks ivy-server against nats-server and an ideal broadcast server")]
struct Args {
    /// Scenarios to run, comma-separated: fanout, durable, latency, backfill, storage, idle,
    /// churn, presence, wasm (or all; storage and presence are not in the default list).
    #[arg(long, default_value = "fanout,durable,latency,backfill,idle")]
    scenarios: String,
    /// Servers for fan-out, latency and idle: ivy, ivy-async, nats, ideal (ivy only for durable and backfill).
    #[arg(long, default_value = "ivy,nats,ideal")]
    servers: String,
    /// Result file (JSON).
    #[arg(long, default_value = "results.json")]
    out: PathBuf,
    /// Fan-out: subscriber counts, comma-separated (for example 1000,10000).
    #[arg(long, default_value = "1000")]
    subscribers: String,
    /// Fan-out: deliveries per subscriber count (events published = this / subscribers, at
    /// least 100), so that every size runs long enough for CPU times to be meaningful.
    #[arg(long, default_value_t = 5_000_000)]
    fanout_deliveries: usize,
    /// Fan-out: events published per subscriber count (overrides --fanout-deliveries).
    #[arg(long)]
    fanout_events: Option<usize>,
    /// Fan-out: most events in flight (published, not yet delivered to every subscriber).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Event payload size in bytes (at least 20: the send time).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Durable publish: concurrent sender counts.
    #[arg(long, default_value = "1,16,256")]
    senders: String,
    /// Durable publish: seconds per sender count.
    #[arg(long, default_value_t = 5.0)]
    durable_secs: f64,
    /// Latency: subscribers.
    #[arg(long, default_value_t = 1000)]
    latency_subscribers: usize,
    /// Latency: events per second.
    #[arg(long, default_value_t = 200.0)]
    latency_rate: f64,
    /// Latency: seconds.
    #[arg(long, default_value_t = 5.0)]
    latency_secs: f64,
    /// Churn: subscribers of the big channel whose subscriptions churn.
    #[arg(long, default_value_t = 5000)]
    churn_subscribers: usize,
    /// Churn: events per second on the big channel.
    #[arg(long, default_value_t = 10.0)]
    churn_big_rate: f64,
    /// Churn: connections subscribing and unsubscribing.
    #[arg(long, default_value_t = 4)]
    churners: usize,
    /// Churn: subscribe and unsubscribe commands per second, in all (0: as fast as answered).
    #[arg(long, default_value_t = 0.0)]
    churn_rate: f64,
    /// Churn: events per second on the unrelated channel whose latency is measured.
    #[arg(long, default_value_t = 200.0)]
    churn_quiet_rate: f64,
    /// Churn: seconds of each phase (without, then with churn).
    #[arg(long, default_value_t = 5.0)]
    churn_secs: f64,
    /// Backfill: events stored, then read back.
    #[arg(long, default_value_t = 100_000)]
    backfill_events: usize,
    /// Backfill: page limits to read with, comma-separated (1000 is the client core's default).
    #[arg(long, default_value = "1000,10000")]
    backfill_limits: String,
    /// Storage: path depths, comma-separated.
    #[arg(long, default_value = "1,4,16")]
    storage_depths: String,
    /// Storage: event sizes in bytes, comma-separated (small and 60 KB by default).
    #[arg(long, default_value = "100,61440")]
    storage_sizes: String,
    /// Storage: events stored per depth and size, as bytes in all (at least 100 events, at
    /// most 20,000).
    #[arg(long, default_value_t = 20_000_000)]
    storage_bytes: usize,
    /// Storage: reads of each log per depth and size (the median is reported).
    #[arg(long, default_value_t = 7)]
    storage_read_passes: usize,
    /// Presence: room sizes (members joining one room at once), comma-separated.
    #[arg(long, default_value = "10,1000,10000")]
    presence_rooms: String,
    /// Idle: connections held open.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Connections per loopback source address (each scenario uses fresh addresses in 127.0.0.0/8).
    #[arg(long, default_value_t = 20_000)]
    per_address: usize,
    /// Client worker threads (the servers get the same machine: report ratios).
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// The ivy-server binary (default: next to this executable).
    #[arg(long)]
    ivy_server: Option<PathBuf>,
    /// Use an already running ivy-server at this address (no CPU or memory figures).
    #[arg(long)]
    ivy_addr: Option<std::net::SocketAddr>,
    /// The nats-server binary.
    #[arg(long, default_value = "nats-server")]
    nats_server: String,
    /// Where servers keep their data (a fresh temp dir per run inside it).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The repository root (for the wasm build).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Write PNG plots into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Replace the generated section of this markdown file with the results.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The command line to show in the markdown (default: this one).
    #[arg(long)]
    command: Option<String>,
    /// Do not run: render `--plots` and `--doc` from this existing result file.
    #[arg(long)]
    render: Option<PathBuf>,
}

/// The file descriptor limit wanted for the tool and the servers (more than the 50,000 idle
/// connections of the issue).
const NOFILE: u64 = 200_000;

/// The hard RLIMIT_NOFILE of this process: without CAP_SYS_RESOURCE, the most any soft limit
/// (ours, the servers') can be raised to.
fn hard_nofile() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let hard = line.split_whitespace().nth(4)?;
    if hard == "unlimited" { Some(u64::MAX) } else { hard.parse().ok() }
}

fn list<T: std::str::FromStr>(s: &str) -> Vec<T> {
    s.split(',').filter_map(|x| x.trim().parse().ok()).collect()
}

fn main() {
    let args = Args::parse();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.client_threads.max(1)).enable_all().build().expect("tokio runtime");
    let code = rt.block_on(run(args));
    std::process::exit(code);
}

async fn run(args: Args) -> i32 {
    let results = match &args.render {
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("ivy-bench: {}: {e}", path.display());
                return 2;
            }
        },
        None => match bench(&args).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("ivy-bench: {e}");
                return 1;
            }
        },
    };
    if let Some(dir) = &args.plots {
        if let Err(e) = report::plots(&results, dir) {
            eprintln!("ivy-bench: plots: {e}");
            return 1;
        }
    }
    if let Some(doc) = &args.doc {
        let plots = args.plots.as_deref();
        if let Err(e) = report::update_doc(&results, doc, plots) {
            eprintln!("ivy-bench: {}: {e}", doc.display());
            return 1;
        }
    }
    0
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: Option<u64> =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": model,
        "mem_gib": mem_kib.map(|k| (k as f64 / 1048576.0 * 10.0).round() / 10.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "nats_server_version": std::process::Command::new("nats-server").arg("--version").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
    })
}

/// Raises RLIMIT_NOFILE of this process to `NOFILE`, or else to its hard limit; returns the
/// limit in force (also given to the servers).
fn raise_nofile() -> u64 {
    // Through prlimit(1): the workspace forbids unsafe code, and setrlimit needs it.
    let pid = std::process::id().to_string();
    let set = |n: u64| {
        std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}:{n}")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if set(NOFILE) {
        return NOFILE;
    }
    let hard = hard_nofile().unwrap_or(1024).min(NOFILE);
    let _ = set(hard);
    eprintln!(
        "[ivy-bench] RLIMIT_NOFILE: cannot raise the hard limit to {NOFILE} (no CAP_SYS_RESOURCE); using {hard} for the tool and the servers"
    );
    hard
}

async fn bench(args: &Args) -> Result<Value, String> {
    let nofile = raise_nofile();
    let dir = servers::exe_dir();
    let launch = Launch {
        ivy_server: args.ivy_server.clone().unwrap_or_else(|| dir.join("ivy-server")),
        ideal: dir.join("ideal-broadcast"),
        nats_server: args.nats_server.clone(),
        ivy_addr: args.ivy_addr,
        nofile,
        data_dir: args.data_dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    let common = Common { launch, payload: args.payload.max(20), per_address: args.per_address, base: Instant::now() };
    let all = args.scenarios == "all";
    let want = |s: &str| all || args.scenarios.split(',').any(|x| x.trim() == s);
    let kinds: Vec<Kind> = args.servers.split(',').filter_map(|s| Kind::parse(s.trim())).collect();
    if kinds.is_empty() {
        return Err(format!("no known server in --servers {}", args.servers));
    }
    let ivy_kinds: Vec<Kind> = kinds.iter().copied().filter(|k| k.is_ivy()).collect();
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let command = args.command.clone().unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    let mut out = json!({
        "tool": "ivy-bench", "started_unix": started, "command": command, "machine": machine(),
        "load_before": loadavg(),
        "settings": { "nofile": nofile, "payload_bytes": common.payload, "client_threads": args.client_threads, "servers": args.servers },
    });
    let write = |out: &Value| -> Result<(), String> {
        let text = serde_json::to_string_pretty(out).map_err(|e| e.to_string())?;
        std::fs::write(&args.out, text).map_err(|e| format!("{}: {e}", args.out.display()))
    };
    if want("fanout") {
        let mut rows = Vec::new();
        for subs in list::<usize>(&args.subscribers) {
            for &k in &kinds {
                let events = args.fanout_events.unwrap_or((args.fanout_deliveries / subs.max(1)).max(100));
                rows.push(scenarios::fanout(k, &common, subs, events, args.window).await.unwrap_or_else(|e| err_row(k, e)));
            }
        }
        out["fanout"] = Value::Array(rows);
        write(&out)?;
    }
    if want("latency") {
        let mut rows = Vec::new();
        for &k in &kinds {
            rows.push(
                scenarios::latency(k, &common, args.latency_subscribers, args.latency_rate, args.latency_secs)
                    .await
                    .unwrap_or_else(|e| err_row(k, e)),
            );
        }
        out["latency"] = Value::Array(rows);
        write(&out)?;
    }
    if want("durable") {
        let mut rows = Vec::new();
        for &k in &ivy_kinds {
            for n in list::<usize>(&args.senders) {
                rows.push(scenarios::durable(k, &common, n, args.durable_secs).await.unwrap_or_else(|e| err_row(k, e)));
            }
        }
        out["durable"] = Value::Array(rows);
        write(&out)?;
    }
    if want("backfill") {
        let mut rows = Vec::new();
        for &k in ivy_kinds.iter().take(1) {
            let limits = list::<usize>(&args.backfill_limits);
            rows.push(scenarios::backfill(k, &common, args.backfill_events, 1000, &limits).await.unwrap_or_else(|e| err_row(k, e)));
        }
        out["backfill"] = Value::Array(rows);
        write(&out)?;
    }
    if want("storage") {
        let mut rows = Vec::new();
        for &k in ivy_kinds.iter().take(1) {
            for size in list::<usize>(&args.storage_sizes) {
                for depth in list::<usize>(&args.storage_depths) {
                    let events = (args.storage_bytes / size.max(1)).clamp(100, 20_000);
                    rows.push(
                        scenarios::storage(k, &common, depth, size, events, args.storage_read_passes)
                            .await
                            .unwrap_or_else(|e| err_row(k, e)),
                    );
                }
            }
        }
        out["storage"] = Value::Array(rows);
        write(&out)?;
    }
    if want("idle") {
        let mut rows = Vec::new();
        // Each connection takes one descriptor in the server and one here.
        let n = args.idle_connections.min(nofile.saturating_sub(500) as usize);
        if n < args.idle_connections {
            eprintln!("[ivy-bench] idle: {} connections capped to {n} by RLIMIT_NOFILE {nofile}", args.idle_connections);
        }
        out["idle_capped_by_nofile"] = json!(n < args.idle_connections);
        for &k in &kinds {
            rows.push(scenarios::idle(k, &common, n).await.unwrap_or_else(|e| err_row(k, e)));
        }
        out["idle"] = Value::Array(rows);
        write(&out)?;
    }
    if want("churn") {
        let mut rows = Vec::new();
        for &k in &ivy_kinds {
            rows.push(
                scenarios::churn(
                    k,
                    &common,
                    args.churn_subscribers,
                    args.churn_big_rate,
                    args.churners,
                    args.churn_rate,
                    args.churn_quiet_rate,
                    args.churn_secs,
                )
                .await
                .unwrap_or_else(|e| err_row(k, e)),
            );
        }
        out["churn"] = Value::Array(rows);
        write(&out)?;
    }
    // Not in `all`: it opens up to 10,000 connections per room size, twice.
    if args.scenarios.split(',').any(|x| x.trim() == "presence") {
        let mut rows = Vec::new();
        for &k in ivy_kinds.iter().take(1) {
            for members in list::<usize>(&args.presence_rooms) {
                for watch in [true, false] {
                    rows.push(scenarios::presence(k, &common, members, watch).await.unwrap_or_else(|e| err_row(k, e)));
                }
            }
        }
        out["presence"] = Value::Array(rows);
        write(&out)?;
    }
    if want("wasm") {
        out["wasm"] = scenarios::wasm(&args.repo);
    }
    out["load_after"] = json!(loadavg());
    write(&out)?;
    eprintln!("[ivy-bench] results in {}", args.out.display());
    Ok(out)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn err_row(k: Kind, e: String) -> Value {
    eprintln!("[ivy-bench] {}: FAILED: {e}", k.name());
    json!({ "server": k.name(), "error": e })
}
