//! Syscall aggregates as drained from the maps ([`RawSyscall::from_stats`], errno counts, slow
//! stacks) merged over several drains ([`SyscallProfile`]) into `syscall-latency.json`,
//! `syscall.pb.gz`, the summary rows and bcc-style histograms. Whatever the counters hold:
//! percentiles are ordered and never above the maximum, the JSON is valid with one entry per
//! row, and the pprof's totals are the slow calls'.
#![no_main]

use cprof::bpf::{RawErrno, RawSlow, RawSyscall};
use cprof::symbols::Symbols;
use cprof::syscalls::SyscallProfile;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use profiler_common::{SyscallKey, SyscallStats, histogram};

#[derive(Arbitrary, Debug)]
struct Histogram {
    pid: u8,
    nr: u16,
    count: u64,
    total_ns: u64,
    max_ns: u64,
    bytes: u64,
    errors: u64,
    comm: [u8; 16],
    /// (bucket, calls): buckets past the last are folded into range.
    buckets: Vec<(u16, u32)>,
}

#[derive(Arbitrary, Debug)]
struct Drain {
    histograms: Vec<Histogram>,
    /// (pid, nr, errno, count)
    errnos: Vec<(u8, u16, u16, u64)>,
    /// (pid, tid, nr, total_ns, count, has a stack)
    slow: Vec<(u8, u8, u16, u64, u64, bool)>,
}

fn stats(h: &Histogram) -> SyscallStats {
    let mut buckets = [0u32; histogram::BUCKETS];
    for &(i, n) in &h.buckets {
        buckets[usize::from(i) % histogram::BUCKETS] = n;
    }
    SyscallStats {
        count: h.count,
        total_ns: h.total_ns,
        max_ns: h.max_ns,
        bytes: h.bytes,
        errors: h.errors,
        comm: h.comm,
        buckets,
    }
}

fuzz_target!(|drains: Vec<Drain>| {
    let mut profile = SyscallProfile::default();
    let mut slow_calls = 0u128;
    for drain in &drains {
        let syscalls = drain
            .histograms
            .iter()
            .map(|h| {
                let key = SyscallKey { pid: h.pid.into(), nr: h.nr.into() };
                let raw = RawSyscall::from_stats(&key, &stats(h));
                assert!(raw.buckets.windows(2).all(|w| w[0].0 < w[1].0), "ascending buckets");
                assert!(raw.buckets.iter().all(|&(i, n)| (i as usize) < histogram::BUCKETS && n > 0));
                raw
            })
            .collect();
        let errnos: Vec<RawErrno> = drain
            .errnos
            .iter()
            .map(|&(pid, nr, errno, count)| RawErrno { pid: pid.into(), nr: nr.into(), errno: errno.into(), count })
            .collect();
        let slow = drain
            .slow
            .iter()
            .map(|&(pid, tid, nr, total_ns, count, stack)| {
                slow_calls += u128::from(count);
                RawSlow {
                    pid: pid.into(),
                    tid: tid.into(),
                    nr: nr.into(),
                    comm: "fuzz".into(),
                    user: stack.then(|| vec![0x40_1000, u64::from(tid)]),
                    total_ns,
                    count,
                }
            })
            .collect();
        profile.add(syscalls, &errnos, slow);
    }

    let symbols = Symbols::default();
    let rows = profile.rows(&symbols);
    for r in &rows {
        assert!(r.count > 0);
        assert!(
            r.p50_ns <= r.p90_ns && r.p90_ns <= r.p99_ns && r.p99_ns <= r.max_ns,
            "{} {} {} {}",
            r.p50_ns,
            r.p90_ns,
            r.p99_ns,
            r.max_ns
        );
        let text = profile.log2_histogram(r.pid, r.nr);
        assert!(text.lines().all(|l| l.len() < 200), "{text}");
    }
    assert!(rows.windows(2).all(|w| w[0].total_ns >= w[1].total_ns), "longest first");

    let json: serde_json::Value =
        serde_json::from_str(&profile.to_json(&symbols, 1, &serde_json::json!({}))).expect("valid JSON");
    assert_eq!(json["syscalls"].as_array().map(Vec::len), Some(rows.len()));

    let pprof = profile.to_pprof(&symbols, &[]);
    let calls: i128 = pprof.sample.iter().map(|s| i128::from(s.value[0])).sum();
    if slow_calls <= i64::MAX as u128 {
        assert_eq!(calls, slow_calls as i128, "the slow calls, each once");
    }
});
