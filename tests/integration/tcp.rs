//! TCP events against workloads whose connections are known.

use std::time::Duration;

use cprof::pprof::ProfileExt as _;

use crate::util::{self, PausedWorkload, Recording};

fn events(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("tcp-events.jsonl"))
        .expect("tcp-events.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn of_type<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// N connects to a listener and M to a closed port, on loopback.
#[test]
fn loopback_connects_closes_and_refusals() {
    util::require_root();
    let (n, bytes, m) = (20u64, 10_000u64, 5u64);
    let mut w = PausedWorkload::start(
        "tcp",
        &[
            "loopback",
            &n.to_string(),
            &bytes.to_string(),
            &m.to_string(),
        ],
    );
    let pid = w.pid();
    let dir = util::out_dir("tcp-loopback");
    let rec = Recording::start(&["--pid", &pid.to_string(), "--event", "tcp"], &dir);
    w.go();
    let out = w.finish();
    let (port, closed) = (
        util::measured(&out, "port"),
        util::measured(&out, "closed_port"),
    );
    assert_eq!(
        util::measured(&out, "refused"),
        m,
        "every connect to the closed port was refused"
    );
    let summary = rec.wait(Duration::from_secs(15));

    let all = events(&dir);
    for e in &all {
        assert_eq!(e["pid"], pid, "only the target's connections: {e}");
        assert_eq!(e["comm"], "tcp");
    }
    let connects: Vec<_> = of_type(&all, "connect")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(connects.len() as u64, n, "one connect event per connection");
    assert!(
        connects
            .iter()
            .all(|e| e["latency_ns"].as_u64().unwrap() > 0 && e["daddr"] == "127.0.0.1")
    );
    let client_closes: Vec<_> = of_type(&all, "close")
        .into_iter()
        .filter(|e| e["dport"] == port)
        .collect();
    assert_eq!(
        client_closes.len() as u64,
        n,
        "one close per client connection"
    );
    for c in &client_closes {
        assert!(c["lifetime_ns"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(c["bytes_sent"], bytes, "the bytes the workload sent: {c}");
    }
    let accepts: Vec<_> = of_type(&all, "accept")
        .into_iter()
        .filter(|e| e["sport"] == port)
        .collect();
    assert_eq!(
        accepts.len() as u64,
        n,
        "the server's accepts, attributed to the listener's process"
    );
    let server_closes: Vec<_> = of_type(&all, "close")
        .into_iter()
        .filter(|e| e["sport"] == port)
        .collect();
    assert_eq!(server_closes.len() as u64, n);
    assert!(
        server_closes.iter().all(|c| c["bytes_received"] == bytes),
        "the server received every byte"
    );
    let failed: Vec<_> = of_type(&all, "connect_failed")
        .into_iter()
        .filter(|e| e["dport"] == closed)
        .collect();
    assert_eq!(failed.len() as u64, m, "refused connects");
    let resets = of_type(&all, "reset_received")
        .into_iter()
        .filter(|e| e["dport"] == closed)
        .count();
    assert_eq!(resets as u64, m, "each refusal is a reset received");
    eprintln!(
        "tcp loopback: {} connects (p50 {} ns), {} client closes of {bytes} bytes, {} accepts, {} failed, {resets} resets",
        connects.len(),
        {
            let mut l: Vec<u64> = connects
                .iter()
                .map(|e| e["latency_ns"].as_u64().unwrap())
                .collect();
            l.sort_unstable();
            l[l.len() / 2]
        },
        client_closes.len(),
        accepts.len(),
        failed.len()
    );

    // Latency per remote, and the stacks that connected.
    let latency: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tcp-latency.json")).unwrap())
            .unwrap();
    let remote = format!("127.0.0.1:{port}");
    let row = latency["remotes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["remote"] == remote.as_str())
        .unwrap();
    assert_eq!(row["connects"], n);
    let p = util::read_named_profile(&dir, "tcp.pb.gz");
    let from_open: i64 = p
        .sample
        .iter()
        .filter(|s| {
            p.label_str(s, "remote") == Some(remote.as_str())
                && util::on_stack(&p, s, "open_connection")
        })
        .map(|s| s.value[0])
        .sum();
    assert_eq!(
        from_open, n as i64,
        "connects attributed to open_connection"
    );
    assert!(summary.contains(&remote), "{summary}");
}

/// A loop of thousands of connects per second: every event arrives, or the loss is counted.
#[test]
fn connect_bursts_lose_nothing_silently() {
    util::require_root();
    let mut w = PausedWorkload::start("tcp", &["burst", "2"]);
    let dir = util::out_dir("tcp-burst");
    let rec = Recording::start(&["--pid", &w.pid().to_string(), "--event", "tcp"], &dir);
    w.go();
    let connects = util::measured(&w.finish(), "connects");
    rec.wait(Duration::from_secs(15));
    let all = events(&dir);
    let seen = of_type(&all, "connect").len() as u64;
    let p = util::read_named_profile(&dir, "tcp.pb.gz");
    let line = util::comment(&p, "TCP events:");
    let lost = util::number_after(line, "lost ");
    eprintln!("tcp burst: {connects} connects in 2 s, {seen} connect events, {lost} events lost");
    assert!(connects > 1000, "a burst: {connects}");
    if lost == 0 {
        assert_eq!(
            seen, connects,
            "no loss reported, so every connect is there"
        );
    } else {
        assert!(
            seen + lost >= connects,
            "{seen} seen + {lost} lost < {connects}"
        );
    }
}
