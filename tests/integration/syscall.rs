//! Syscall latency against a workload whose syscalls are known.

use std::time::Duration;

use cprof::pprof::ProfileExt as _;

use crate::util::{self, PausedWorkload, Recording};

fn find<'a>(doc: &'a serde_json::Value, pid: u32, syscall: &str) -> &'a serde_json::Value {
    doc["syscalls"]
        .as_array()
        .expect("a syscalls array")
        .iter()
        .find(|e| e["pid"] == pid && e["syscall"] == syscall)
        .unwrap_or_else(|| panic!("no {syscall} for pid {pid} in {doc:#}"))
}

/// N nanosleeps of 5 ms, M reads of 4 KiB from /dev/zero, K opens of a missing path: exact
/// counts, percentiles in range, bytes, errnos, and the stack that made the slow ones.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one recording, every property of its output"
)]
fn counts_latencies_bytes_errnos_and_slow_stacks() {
    util::require_root();
    let (n, m, k) = (100u64, 2000u64, 50u64);
    let mut w = PausedWorkload::start(
        "syscalls",
        &[&n.to_string(), &m.to_string(), &k.to_string()],
    );
    let pid = w.pid();
    let dir = util::out_dir("syscalls");
    let rec = Recording::start(&["--pid", &pid.to_string(), "--event", "syscall"], &dir);
    w.go();
    let out = w.finish();
    assert_eq!(util::measured(&out, "nanosleeps"), n);
    let summary = rec.wait(Duration::from_secs(15));

    let text = std::fs::read_to_string(dir.join("syscall-latency.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let sleep = find(&doc, pid, "nanosleep");
    let read = find(&doc, pid, "read");
    let open = find(&doc, pid, "open");
    let ms = |v: &serde_json::Value| v.as_u64().unwrap() as f64 / 1e6;
    eprintln!(
        "syscalls: nanosleep count {} p50 {:.3} ms p99 {:.3} ms; read count {} p50 {:.1} us bytes {}; open count {} errors {}",
        sleep["count"],
        ms(&sleep["p50_ns"]),
        ms(&sleep["p99_ns"]),
        read["count"],
        ms(&read["p50_ns"]) * 1e3,
        read["bytes"],
        open["count"],
        open["errors"]
    );
    assert_eq!(sleep["count"], n, "nanosleep count is exact");
    assert_eq!(read["count"], m, "read count is exact");
    assert_eq!(open["count"], k, "open count is exact");
    let p50 = ms(&sleep["p50_ns"]);
    assert!(
        (5.0..=5.6).contains(&p50),
        "nanosleep p50 {p50} ms, expected 5.0 to 5.6"
    );
    assert!(
        ms(&read["p50_ns"]) < 0.050,
        "read p50 {} ms, expected under 50 us",
        ms(&read["p50_ns"])
    );
    assert_eq!(read["bytes"], 4096 * m, "bytes read");
    assert!(sleep["bytes"].is_null(), "nanosleep moves no bytes");
    assert_eq!(open["errors"]["ENOENT"], k, "every open failed with ENOENT");
    for e in [sleep, read, open] {
        let buckets: u64 = e["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(
            buckets,
            e["count"].as_u64().unwrap(),
            "histogram holds every call: {e}"
        );
        assert!(
            e["p50_ns"].as_u64() <= e["p90_ns"].as_u64()
                && e["p90_ns"].as_u64() <= e["p99_ns"].as_u64()
        );
        assert!(e["p99_ns"].as_u64() <= e["max_ns"].as_u64());
        let total = e["total_ns"].as_u64().unwrap();
        assert!(total >= e["count"].as_u64().unwrap() * e["p50_ns"].as_u64().unwrap() / 2);
    }
    let total_sleep = ms(&sleep["total_ns"]);
    assert!(
        (500.0..560.0).contains(&total_sleep),
        "100 x 5 ms asleep: {total_sleep} ms"
    );

    // The slow ones (>= 1 ms by default): nanosleep, from sleep_5ms.
    let p = util::read_named_profile(&dir, "syscall.pb.gz");
    let types: Vec<_> = p
        .sample_type
        .iter()
        .map(|t| (p.str(t.r#type), p.str(t.unit)))
        .collect();
    assert_eq!(types, [("calls", "count"), ("latency", "nanoseconds")]);
    let slow_sleeps: i64 = p
        .sample
        .iter()
        .filter(|s| p.label_str(s, "syscall") == Some("nanosleep"))
        .map(|s| s.value[0])
        .sum();
    assert_eq!(slow_sleeps, n as i64, "every 5 ms nanosleep is slow");
    let from_sleep_5ms: i64 = p
        .sample
        .iter()
        .filter(|s| {
            p.label_str(s, "syscall") == Some("nanosleep") && util::on_stack(&p, s, "sleep_5ms")
        })
        .map(|s| s.value[0])
        .sum();
    assert_eq!(
        from_sleep_5ms, n as i64,
        "attributed to sleep_5ms, the function that slept"
    );
    assert!(
        p.sample
            .iter()
            .all(|s| p.label_str(s, "syscall") != Some("read")),
        "fast reads leave no stacks"
    );
    // The summary: a table and a bcc-style histogram.
    assert!(
        summary.contains("nanosleep") && summary.contains("usecs : count"),
        "{summary}"
    );
    assert!(
        summary.contains("4096 -> 8191"),
        "5 ms falls in 4096 -> 8191 usecs:\n{summary}"
    );
}
