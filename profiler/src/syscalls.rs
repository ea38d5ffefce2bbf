//! The syscall profile: latency histograms per (process, syscall) merged across drains, written
//! as `syscall-latency.json`; slow syscalls' stacks written as `syscall.pb.gz`; tables for the
//! summary (a bcc-style log2 histogram among them).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use profiler_common::histogram;
use serde_json::json;

use crate::bpf::{RawErrno, RawSlow, RawSyscall};
use crate::pprof::{LabelValue, PprofBuilder, Profile};
use crate::symbols::{Stack, StackWriter, Symbols};
use crate::syscall_names::{BYTE_SYSCALLS, errno_name, syscall_name};

#[derive(Clone, Debug, Default)]
struct Histogram {
    count: u64,
    total_ns: u64,
    max_ns: u64,
    bytes: u64,
    errors: u64,
    /// Kernel's name of the first caller, for processes gone before their name was read.
    comm: String,
    /// Non-empty (bucket, count) pairs, ascending.
    buckets: Vec<(u32, u64)>,
    errnos: BTreeMap<u32, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SlowKey {
    pid: u32,
    tid: u32,
    nr: u32,
    comm: String,
    user: Option<Vec<u64>>,
}

/// One row of the summary / JSON: a process's calls of one syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyscallRow {
    pub pid: u32,
    pub nr: u32,
    pub comm: String,
    pub syscall: String,
    pub count: u64,
    pub total_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
    pub errors: u64,
}

#[derive(Default)]
pub struct SyscallProfile {
    histograms: HashMap<(u32, u32), Histogram>,
    slow: HashMap<SlowKey, (u64, u64)>,
}

/// The value at quantile `q` (0..=1): the middle of the bucket holding that rank, never above
/// the largest value seen.
#[must_use]
pub fn percentile(buckets: &[(u32, u64)], count: u64, max_ns: u64, q: f64) -> u64 {
    if count == 0 {
        return 0;
    }
    let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
    if rank == count {
        // The largest value is known exactly.
        return max_ns;
    }
    let mut seen = 0;
    for &(i, n) in buckets {
        seen = u64::saturating_add(seen, n);
        if seen >= rank {
            let (low, high) = histogram::bounds(i as usize);
            let high = high.min(max_ns.max(low));
            return (low + (high - low) / 2).min(max_ns);
        }
    }
    max_ns
}

/// The non-empty buckets of a histogram as `[{"le_ns", "count"}]`, ascending.
#[must_use]
pub fn buckets_json(buckets: &[(u32, u64)]) -> Vec<serde_json::Value> {
    buckets
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|&(i, n)| json!({"le_ns": histogram::bounds(i as usize).1, "count": n}))
        .collect()
}

/// Adds sparse histogram `add` (non-empty (bucket, count) pairs, ascending) into `total` (the
/// same form). Sparse, because a process's syscall rarely spans more than a few of the 592
/// buckets, and an agent holds thousands of them.
pub fn merge_buckets(total: &mut Vec<(u32, u64)>, add: &[(u32, u64)]) {
    if total.is_empty() {
        total.extend_from_slice(add);
        return;
    }
    let mut merged = Vec::with_capacity(total.len() + add.len());
    let (mut a, mut b) = (total.iter().peekable(), add.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(&&(i, n)), Some(&&(j, m))) if i == j => {
                a.next();
                b.next();
                (i, n.saturating_add(m))
            }
            (Some(&&x), Some(&&y)) if x.0 < y.0 => {
                a.next();
                x
            }
            (_, Some(&&y)) => {
                b.next();
                y
            }
            (Some(&&x), None) => {
                a.next();
                x
            }
            (None, None) => break,
        };
        merged.push(next);
    }
    *total = merged;
}

/// A dense histogram (one count per bucket) as sparse pairs.
#[must_use]
pub fn sparse(dense: &[u64]) -> Vec<(u32, u64)> {
    dense
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, &n)| (i as u32, n))
        .collect()
}

impl SyscallProfile {
    pub fn add(&mut self, syscalls: Vec<RawSyscall>, errnos: &[RawErrno], slow: Vec<RawSlow>) {
        for s in syscalls {
            let h = self.histograms.entry((s.pid, s.nr)).or_default();
            if h.comm.is_empty() {
                h.comm = s.comm;
            }
            // Saturating: a long recording of many threads blocked in one syscall can sum more
            // than 2^64 ns (584 years) of it.
            h.count = h.count.saturating_add(s.count);
            h.total_ns = h.total_ns.saturating_add(s.total_ns);
            h.max_ns = h.max_ns.max(s.max_ns);
            h.bytes = h.bytes.saturating_add(s.bytes);
            h.errors = h.errors.saturating_add(s.errors);
            merge_buckets(&mut h.buckets, &s.buckets);
        }
        for e in errnos {
            let h = self.histograms.entry((e.pid, e.nr)).or_default();
            let n = h.errnos.entry(e.errno).or_default();
            *n = n.saturating_add(e.count);
        }
        for s in slow {
            let key = SlowKey {
                pid: s.pid,
                tid: s.tid,
                nr: s.nr,
                comm: s.comm,
                user: s.user,
            };
            let v = self.slow.entry(key).or_default();
            v.0 = v.0.saturating_add(s.total_ns);
            v.1 = v.1.saturating_add(s.count);
        }
    }

    /// Processes seen, so their names can be read while they live.
    pub fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        self.histograms.keys().map(|&(pid, _)| pid)
    }

    /// User stacks of slow syscalls, for symbolization.
    pub fn stacks(&self) -> impl Iterator<Item = Stack<'_>> {
        self.slow.keys().map(|k| Stack {
            pid: k.pid,
            user: k.user.as_deref(),
            kernel: None,
        })
    }

    /// Rows sorted by total time, longest first.
    #[must_use]
    pub fn rows(&self, symbols: &Symbols) -> Vec<SyscallRow> {
        let mut rows: Vec<_> = self
            .histograms
            .iter()
            .filter(|(_, h)| h.count > 0)
            .map(|(&(pid, nr), h)| SyscallRow {
                pid,
                nr,
                comm: symbols
                    .process_name(pid)
                    .unwrap_or(if h.comm.is_empty() { "?" } else { &h.comm })
                    .to_owned(),
                syscall: syscall_name(nr).into_owned(),
                count: h.count,
                total_ns: h.total_ns,
                p50_ns: percentile(&h.buckets, h.count, h.max_ns, 0.50),
                p90_ns: percentile(&h.buckets, h.count, h.max_ns, 0.90),
                p99_ns: percentile(&h.buckets, h.count, h.max_ns, 0.99),
                max_ns: h.max_ns,
                errors: h.errors,
            })
            .collect();
        rows.sort_by(|a, b| {
            b.total_ns
                .cmp(&a.total_ns)
                .then_with(|| (a.pid, &a.syscall).cmp(&(b.pid, &b.syscall)))
        });
        rows
    }

    /// `syscall-latency.json` (schema in the README).
    #[must_use]
    pub fn to_json(
        &self,
        symbols: &Symbols,
        duration_ns: u64,
        dropped: &serde_json::Value,
    ) -> String {
        // Written row by row, one row a line: a host-wide window can hold hundreds of thousands
        // of (process, syscall) rows, too many to build as one JSON tree first.
        let mut out = format!(
            "{{\n  \"version\": 1,\n  \"duration_ns\": {duration_ns},\n  \"dropped\": {dropped},\n  \"syscalls\": ["
        );
        for (i, row) in self.rows(symbols).into_iter().enumerate() {
            let h = &self.histograms[&(row.pid, row.nr)];
            let errors: BTreeMap<String, u64> = h
                .errnos
                .iter()
                .map(|(&e, &n)| (errno_name(e).into_owned(), n))
                .collect();
            let bytes = BYTE_SYSCALLS
                .contains(&row.syscall.as_str())
                .then_some(h.bytes);
            let entry = json!({
                "pid": row.pid,
                "comm": row.comm,
                "syscall": row.syscall,
                "count": row.count,
                "errors": errors,
                "bytes": bytes,
                "total_ns": row.total_ns,
                "p50_ns": row.p50_ns,
                "p90_ns": row.p90_ns,
                "p99_ns": row.p99_ns,
                "max_ns": row.max_ns,
                "buckets": buckets_json(&h.buckets),
            });
            out.push_str(if i == 0 { "\n    " } else { ",\n    " });
            out.push_str(&entry.to_string());
        }
        out.push_str("\n  ]\n}\n");
        out
    }

    /// `syscall.pb.gz`: stacks of slow syscalls, a `syscall:<name>` frame as the leaf.
    #[must_use]
    pub fn to_pprof(&self, symbols: &Symbols, comments: &[String]) -> Profile {
        let mut b = PprofBuilder::new(
            &[("calls", "count"), ("latency", "nanoseconds")],
            ("latency", "nanoseconds"),
            1,
        );
        for comment in comments {
            b.add_comment(comment);
        }
        let mut w = StackWriter::new(b, symbols);
        let mut slow: Vec<_> = self.slow.iter().collect();
        slow.sort_by(|a, b| {
            b.1.0
                .cmp(&a.1.0)
                .then_with(|| (a.0.pid, a.0.tid).cmp(&(b.0.pid, b.0.tid)))
        });
        for (key, &(ns, count)) in slow {
            let name = syscall_name(key.nr);
            let mut locations = vec![w.builder.pseudo_location(&format!("syscall:{name}"))];
            if key.user.is_some() {
                locations.extend(w.locations(&Stack {
                    pid: key.pid,
                    user: key.user.as_deref(),
                    kernel: None,
                }));
            }
            let process = symbols.process_name(key.pid).unwrap_or(&key.comm);
            w.add_sample(
                key.pid,
                locations,
                vec![count as i64, ns as i64],
                &[
                    ("pid", LabelValue::Num(i64::from(key.pid))),
                    ("tid", LabelValue::Num(i64::from(key.tid))),
                    ("comm", LabelValue::Str(&key.comm)),
                    ("process", LabelValue::Str(process)),
                    ("syscall", LabelValue::Str(&name)),
                ],
            );
        }
        w.builder.finish()
    }

    /// A bcc-style log2 histogram (`usecs : count distribution`) of one row.
    #[must_use]
    pub fn log2_histogram(&self, pid: u32, nr: u32) -> String {
        let Some(h) = self.histograms.get(&(pid, nr)) else {
            return String::new();
        };
        // Fold the fine buckets into bcc's power-of-two microsecond slots by their lower bound:
        // slot k holds [2^(k-1), 2^k - 1], slot 1 holds 0 and 1.
        let mut log2: BTreeMap<u32, u64> = BTreeMap::new();
        for &(i, n) in &h.buckets {
            let us = histogram::bounds(i as usize).0 / 1000;
            let slot = if us == 0 { 1 } else { us.ilog2() + 1 };
            let count = log2.entry(slot).or_default();
            *count = count.saturating_add(n);
        }
        let (Some(&last), Some(&peak)) = (log2.keys().last(), log2.values().max()) else {
            return String::new();
        };
        let mut out = format!("{:>24} : count    distribution\n", "usecs");
        for slot in 1..=last {
            let n = log2.get(&slot).copied().unwrap_or(0);
            let (low, high) = if slot == 1 {
                (0, 1)
            } else {
                (1u64 << (slot - 1), (1u64 << slot) - 1)
            };
            let stars = (u128::from(n) * 40).div_ceil(u128::from(peak.max(1))) as usize;
            let _ = writeln!(
                out,
                "{low:>10} -> {high:<10} : {n:<8} |{:<40}|",
                "*".repeat(stars)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(count: u64, values: &[u64]) -> RawSyscall {
        let mut dense = vec![0; histogram::BUCKETS];
        for &v in values {
            dense[histogram::index(v)] += 1;
        }
        let buckets = sparse(&dense);
        RawSyscall {
            pid: 1,
            nr: 0,
            count,
            total_ns: values.iter().sum(),
            max_ns: values.iter().copied().max().unwrap_or(0),
            bytes: 4096 * count,
            errors: 0,
            comm: "app".into(),
            buckets,
        }
    }

    #[test]
    fn sparse_buckets_merge_in_order() {
        let mut total = vec![(1, 1), (5, 2)];
        merge_buckets(&mut total, &[(0, 3), (5, 1), (9, 4)]);
        assert_eq!(total, [(0, 3), (1, 1), (5, 3), (9, 4)]);
        merge_buckets(&mut total, &[]);
        assert_eq!(total.len(), 4);
        assert_eq!(sparse(&[0, 2, 0, 1]), [(1, 2), (3, 1)]);
    }

    #[test]
    fn percentiles_within_a_bucket_width() {
        let values: Vec<u64> = (1..=1000).map(|i| i * 10_000).collect(); // 10 us .. 10 ms
        let r = raw(1000, &values);
        let p = |q| percentile(&r.buckets, r.count, r.max_ns, q);
        for (q, exact) in [(0.5, 5_000_000.0), (0.9, 9_000_000.0), (0.99, 9_900_000.0)] {
            let got = p(q) as f64;
            assert!((got - exact).abs() / exact < 0.05, "p{q}: {got} vs {exact}");
        }
        assert_eq!(p(1.0), 10_000_000);
        assert_eq!(percentile(&r.buckets, 0, 0, 0.5), 0);
    }

    #[test]
    fn sums_saturate_found_by_fuzzing() {
        // Two drains whose sums overflow u64 panicked (fuzz target syscall_stats).
        let mut big = raw(u64::MAX - 1, &[5_000]);
        (big.total_ns, big.max_ns, big.bytes) = (u64::MAX, u64::MAX, u64::MAX);
        big.buckets = vec![(3, u64::MAX), (591, 2)];
        let mut p = SyscallProfile::default();
        p.add(vec![big.clone()], &[], vec![]);
        p.add(vec![big], &[], vec![]);
        let rows = p.rows(&Symbols::default());
        assert_eq!((rows[0].count, rows[0].total_ns), (u64::MAX, u64::MAX));
        assert!(rows[0].p50_ns <= rows[0].p99_ns && rows[0].p99_ns <= rows[0].max_ns);
        assert!(
            p.log2_histogram(1, 0)
                .contains("|****************************************|")
        );
    }

    #[test]
    fn merges_drains_and_renders() {
        let mut p = SyscallProfile::default();
        p.add(vec![raw(2, &[5_080_000, 5_090_000])], &[], Vec::new());
        p.add(
            vec![raw(1, &[5_100_000])],
            &[RawErrno {
                pid: 1,
                nr: 0,
                errno: 2,
                count: 3,
            }],
            Vec::new(),
        );
        let symbols = Symbols::default();
        let rows = p.rows(&symbols);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].count, 3);
        assert!(
            (5_000_000..5_600_000).contains(&rows[0].p50_ns),
            "{}",
            rows[0].p50_ns
        );
        let doc: serde_json::Value =
            serde_json::from_str(&p.to_json(&symbols, 1, &json!({}))).unwrap();
        let entry = &doc["syscalls"][0];
        assert_eq!(entry["count"], 3);
        assert_eq!(entry["errors"]["ENOENT"], 3);
        assert_eq!(entry["bytes"], 4096 * 3, "read moves bytes");
        let bucket_total: u64 = entry["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["count"].as_u64().unwrap())
            .sum();
        assert_eq!(bucket_total, 3);
        let text = p.log2_histogram(1, rows[0].nr);
        assert!(
            text.contains("usecs") && text.contains("4096 -> 8191"),
            "{text}"
        );
    }
}
