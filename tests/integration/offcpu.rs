//! Off-CPU recording against workloads whose waits are known.

use std::time::Duration;

use cprof::pprof::ProfileExt as _;

use crate::util::{self, PausedWorkload, Recording};

fn pct(part: i64, total: i64) -> f64 {
    100.0 * part as f64 / total as f64
}

/// A thread sleeps 6 ms in `sleep_long` and 2 ms in `sleep_short`, in turn: 75% / 25% of its
/// off-CPU time, and its total off-CPU time is the blocked time it measured itself.
#[test]
fn attributes_waits_75_25_and_totals_match() {
    util::require_root();
    let mut w = PausedWorkload::start("offcpu", &["sleeps", "3"]);
    let dir = util::out_dir("offcpu-sleeps");
    let rec = Recording::start(
        &["--pid", &w.pid().to_string(), "--event", "cpu,offcpu"],
        &dir,
    );
    w.go();
    let blocked_ns = util::measured(&w.finish(), "blocked_ns") as i64;
    let summary = rec.wait(Duration::from_secs(15));

    let p = util::read_named_profile(&dir, "offcpu.pb.gz");
    let types: Vec<_> = p
        .sample_type
        .iter()
        .map(|t| (p.str(t.r#type), p.str(t.unit)))
        .collect();
    assert_eq!(types, [("waits", "count"), ("wait", "nanoseconds")]);
    let sleeper = |s: &cprof::pprof::proto::Sample| p.label_str(s, "comm") == Some("sleeper");
    let ns = |keep: &dyn Fn(&cprof::pprof::proto::Sample) -> bool| -> i64 {
        p.sample
            .iter()
            .filter(|s| keep(s))
            .map(|s| s.value[1])
            .sum()
    };
    let total = ns(&|s| sleeper(s));
    let long = ns(&|s| sleeper(s) && util::on_stack(&p, s, "sleep_long"));
    let short = ns(&|s| sleeper(s) && util::on_stack(&p, s, "sleep_short"));
    let (pl, ps) = (pct(long, long + short), pct(short, long + short));
    let ratio = total as f64 / blocked_ns as f64;
    eprintln!(
        "offcpu sleeps: sleep_long {pl:.1}% sleep_short {ps:.1}% (expected 75/25); sleeper off-CPU {:.3} s vs measured blocked {:.3} s (x{ratio:.3})",
        total as f64 / 1e9,
        blocked_ns as f64 / 1e9
    );
    assert!(
        (pl - 75.0).abs() <= 5.0,
        "sleep_long: expected 75% +-5, got {pl:.1}%"
    );
    assert!(
        (ps - 25.0).abs() <= 5.0,
        "sleep_short: expected 25% +-5, got {ps:.1}%"
    );
    assert!(
        (ratio - 1.0).abs() <= 0.10,
        "off-CPU total x{ratio:.3} of the blocked time"
    );
    for s in p.sample.iter().filter(|s| sleeper(s)) {
        assert!(p.label_str(s, "state").is_some() && p.label_num(s, "pid").is_some());
        assert_eq!(p.label_str(s, "process"), Some("offcpu"));
    }
    let sleeping = ns(&|s| sleeper(s) && p.label_str(s, "state") == Some("S"));
    assert!(
        pct(sleeping, total) > 95.0,
        "nanosleep waits are S: {sleeping} of {total}"
    );
    // Both events in one run.
    assert!(dir.join("cpu.pb.gz").exists() && dir.join("offwake.pb.gz").exists());
    assert!(
        summary.contains("Off-CPU:") && summary.contains("sleep_long"),
        "{summary}"
    );
}

/// A pipe ping-pong: the reader's waits carry the writer's stack as waker.
#[test]
fn waits_carry_the_wakers_stack() {
    util::require_root();
    let mut w = PausedWorkload::start("offcpu", &["pingpong", "2"]);
    let dir = util::out_dir("offcpu-pingpong");
    let rec = Recording::start(&["--pid", &w.pid().to_string(), "--event", "offcpu"], &dir);
    w.go();
    let round_trips = util::measured(&w.finish(), "round_trips");
    rec.wait(Duration::from_secs(15));
    let p = util::read_named_profile(&dir, "offwake.pb.gz");
    let in_pong_wait = |s: &cprof::pprof::proto::Sample| {
        p.label_str(s, "comm") == Some("ponger") && util::on_stack(&p, s, "pong_wait")
    };
    let all: i64 = p
        .sample
        .iter()
        .filter(|s| in_pong_wait(s))
        .map(|s| s.value[1])
        .sum();
    let by_pinger: i64 = p
        .sample
        .iter()
        .filter(|s| in_pong_wait(s))
        .filter(|s| {
            let names = p.stack_names(s);
            let sep = names.iter().position(|n| *n == "--- woken by pinger ---");
            let send = names.iter().position(|n| *n == "ping_send");
            let wait = names.iter().position(|n| *n == "pong_wait");
            // Leaf first: the waker's frames (upside down), the separator, the waiter's frames.
            matches!((send, sep, wait), (Some(a), Some(b), Some(c)) if a < b && b < c)
        })
        .map(|s| s.value[1])
        .sum();
    let waits: i64 = p
        .sample
        .iter()
        .filter(|s| in_pong_wait(s))
        .map(|s| s.value[0])
        .sum();
    eprintln!(
        "pingpong: {round_trips} round trips; ponger waited {waits} times in pong_wait, {:.1}% of that time woken by pinger in ping_send",
        pct(by_pinger, all)
    );
    assert!(
        waits as u64 > round_trips / 2,
        "{waits} waits for {round_trips} round trips"
    );
    assert!(
        pct(by_pinger, all) > 90.0,
        "woken by pinger/ping_send: {by_pinger} of {all} ns"
    );
    let s = p
        .sample
        .iter()
        .find(|s| in_pong_wait(s) && p.label_str(s, "waker_comm").is_some())
        .unwrap();
    assert_eq!(p.label_str(s, "waker_comm"), Some("pinger"));
    assert_eq!(p.label_num(s, "waker_pid"), Some(i64::from(w_pid(&p, s))));
}

fn w_pid(p: &cprof::pprof::Profile, s: &cprof::pprof::proto::Sample) -> u32 {
    p.label_num(s, "pid").unwrap() as u32
}

/// More busy threads than CPUs: they wait runnable, in state R.
#[test]
fn saturated_cpus_show_runnable_waits() {
    util::require_root();
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let mut w = PausedWorkload::start("offcpu", &["saturate", "2"]);
    let dir = util::out_dir("offcpu-saturate");
    let rec = Recording::start(&["--pid", &w.pid().to_string(), "--event", "offcpu"], &dir);
    w.go();
    w.finish();
    rec.wait(Duration::from_secs(15));
    let p = util::read_named_profile(&dir, "offcpu.pb.gz");
    let runnable: i64 = p
        .sample
        .iter()
        .filter(|s| {
            p.label_str(s, "comm") == Some("spinner") && p.label_str(s, "state") == Some("R")
        })
        .map(|s| s.value[1])
        .sum();
    // 4 spinners share the CPUs for 2 s: together they wait about (4 - cpus) x 2 s.
    let expected = (4.0 - cpus).max(0.0) * 2.0;
    let got = runnable as f64 / 1e9;
    eprintln!("saturate: spinners waited runnable {got:.2} s (expected about {expected:.2} s)");
    assert!(
        got > expected * 0.5 && got < expected * 1.5 + 0.5,
        "R wait {got:.2} s, expected ~{expected:.2} s"
    );
}

/// Threads and processes that live for a moment do not leave entries behind, and a small start
/// map is bounded, with what it evicted counted.
#[test]
fn short_lived_threads_do_not_grow_maps() {
    util::require_root();
    for (threads_flag, label) in [(None, "default"), (Some("64"), "tiny")] {
        let mut w = PausedWorkload::start("offcpu", &["churn", "2"]);
        let dir = util::out_dir(&format!("offcpu-churn-{label}"));
        let mut args = vec!["--event", "offcpu", "--duration", "4"];
        if let Some(n) = threads_flag {
            args.extend(["--off-cpu-threads", n]);
        }
        let rec = Recording::start(&args, &dir);
        w.go();
        let out = w.finish();
        let (threads, processes) = (
            util::measured(&out, "threads"),
            util::measured(&out, "processes"),
        );
        let summary = rec.wait(Duration::from_secs(20));
        let p = util::read_named_profile(&dir, "offcpu.pb.gz");
        let line = util::comment(&p, "off-CPU waits:");
        let started = util::number_after(line, "started ");
        let ended = util::number_after(line, "ended ");
        let evicted = util::number_after(line, "evicted ");
        let waiting = util::number_after(line, "still waiting ");
        let replaced =
            util::number_after(util::comment(&p, "off-CPU stacks"), "(switch-in missed) ");
        eprintln!(
            "churn ({label}): {threads} threads, {processes} processes; {line}; replaced {replaced}"
        );
        assert!(threads > 100 && processes > 100, "the churn ran: {out}");
        assert!(
            ended > threads && started >= ended,
            "every short thread's wait ended: {line}"
        );
        if let Some(n) = threads_flag {
            let n: u64 = n.parse().unwrap();
            assert!(waiting <= n, "the start map holds at most {n}: {line}");
            // 100 threads sleep at once: a 64-entry map must evict, and say so.
            assert!(evicted > 0, "evictions are counted: {line}");
            assert!(
                summary.contains(&format!("{evicted} (start map full)")),
                "the summary reports the {evicted} evicted waits:\n{summary}"
            );
        } else {
            // Thousands of threads exited; what is left waiting is the host's own sleepers,
            // not them.
            assert!(waiting < threads / 2, "exited threads left entries: {line}");
            assert_eq!(evicted, 0, "nothing evicted from a map of 32768: {line}");
        }
    }
}

/// 65536 waits, each from a user stack of its own (as on a host where processes come and go):
/// the off-CPU stack map, never cleared otherwise, is reset once a quarter full, so new stacks
/// keep being captured instead of all colliding once it is full. Without resets at most 16384
/// of them (the map's size) could be kept: a quarter of the waits.
#[test]
fn a_filling_stack_map_is_reset_and_stacks_keep_coming() {
    util::require_root();
    let mut w = PausedWorkload::start("manywaits", &["16", "1"]);
    let dir = util::out_dir("offcpu-manywaits");
    let pid = w.pid().to_string();
    let rec = Recording::start(&["--pid", &pid, "--event", "offcpu"], &dir);
    w.go();
    let waits = util::measured(&w.finish(), "waits");
    let summary = rec.wait(Duration::from_secs(30));
    let p = util::read_named_profile(&dir, "offcpu.pb.gz");
    let line = util::comment(&p, "off-CPU stacks lost:");
    let collisions = util::number_after(line, "full, ");
    let resets = util::number_after(line, "stack map resets ");
    let dropped = util::number_after(line, "(waits dropped ");
    let recorded = util::number_after(util::comment(&p, "off-CPU waits:"), "recorded ");
    // The frame of wait_here itself is skipped by the frame-pointer walk (libc's nanosleep keeps
    // no frame pointer): its callers, left and right, are on the captured stacks.
    let with_stack = util::samples_where(&p, |s| {
        util::on_stack(&p, s, "left") || util::on_stack(&p, s, "right")
    });
    let total: i64 = p.sample.iter().map(|s| s.value[0]).sum();
    eprintln!(
        "stack map resets: {waits} waits, {recorded} recorded, {resets} resets dropping {dropped} \
         pending waits, {collisions} stacks (user and wakers') lost to collisions; waits with their user stack {with_stack} of {total}"
    );
    assert_eq!(waits, 65_536);
    assert!(
        resets >= 2,
        "65536 distinct stacks fill a 16384 map: {line}"
    );
    assert!(
        dropped <= 2 * resets,
        "one thread: at most its own pending wait per reset"
    );
    // A 1 us sleep whose timer fires before the thread is switched out is no wait at all.
    assert!(recorded + dropped >= waits * 9 / 10, "{summary}");
    assert!(
        with_stack * 10 > total * 3,
        "more than the quarter a never-cleared map could keep: {with_stack} of {total}: {line}"
    );
}
