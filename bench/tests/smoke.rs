//! Keeps the benchmark tool from rotting: a tiny run of every scenario but wasm, against an
//! in-process ivy-server and the ideal broadcast server. Asserts only that everything arrived,
//! never a timing.

use std::process::Command;

use serde_json::Value;

#[test]
fn tiny_run_delivers_everything() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let ivy = ivy_server::Ivy::builder(ivy_server::Config::default()).engine(ivy_server::engine::SledEngine::new(dir.path().join("data")));
    rt.spawn(ivy_server::run(ivy, listener, std::future::pending()));

    let out = dir.path().join("results.json");
    let plots = dir.path().join("plots");
    let doc = dir.path().join("BENCH.md");
    let status = Command::new(env!("CARGO_BIN_EXE_ivy-bench"))
        .args(["--scenarios", "fanout,latency,durable,backfill,storage,idle,churn", "--servers", "ivy,ideal"])
        .args(["--ivy-addr", &addr.to_string()])
        .args(["--subscribers", "10", "--fanout-events", "20", "--senders", "1,4", "--durable-secs", "0.3"])
        .args(["--latency-subscribers", "5", "--latency-rate", "100", "--latency-secs", "0.3"])
        .args(["--backfill-events", "300", "--backfill-limits", "100", "--idle-connections", "20"])
        .args(["--churn-subscribers", "10", "--churners", "2", "--churn-secs", "0.3"])
        .args(["--churn-quiet-rate", "100", "--churn-big-rate", "10"])
        .args(["--storage-depths", "3", "--storage-sizes", "100", "--storage-bytes", "1", "--storage-read-passes", "1"])
        .arg("--out")
        .arg(&out)
        .arg("--doc")
        .arg(&doc)
        .arg("--plots")
        .arg(&plots)
        .status()
        .unwrap();
    assert!(status.success());
    let r: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for row in r["fanout"].as_array().unwrap() {
        assert_eq!(row["delivered"], 200, "{row}");
    }
    for row in r["latency"].as_array().unwrap() {
        assert_eq!(row["delivered"], row["expected"], "{row}");
    }
    for row in r["durable"].as_array().unwrap() {
        assert!(row["acked"].as_u64().unwrap() > 0, "{row}");
    }
    assert_eq!(r["backfill"][0]["reads"][0]["events"], 300);
    // The storage scenario's logs hold what it stored (the shared server's root has more).
    let storage = &r["storage"][0];
    assert!(storage.get("error").is_none() && storage["events"] == 100, "{storage}");
    for row in r["idle"].as_array().unwrap() {
        assert_eq!(row["open"], 20, "{row}");
    }
    for row in r["churn"].as_array().unwrap() {
        let (calm, churn) = (row["calm"]["samples"].as_u64().unwrap(), row["churn"]["samples"].as_u64().unwrap());
        assert!(calm > 0 && churn > 0 && calm + churn == 60, "every event of the quiet channel delivered: {row}");
        assert!(row["churn"]["executed"].as_u64().unwrap() > 0, "{row}");
    }
    let md = std::fs::read_to_string(&doc).unwrap();
    assert!(md.contains("### Fan-out"), "{md}");
}
