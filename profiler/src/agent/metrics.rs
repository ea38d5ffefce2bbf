//! The agent's Prometheus endpoint: syscall and TCP connect latencies as classic histograms, and
//! the agent's own health, in the text exposition format (version 0.0.4) on `GET /metrics`.
//!
//! Histograms are cumulative from the agent's start, as Prometheus expects; the series of a
//! process disappear one window after it exits. Bucket bounds are powers of two in nanoseconds
//! (1.024 µs, 4.096 µs, ... 17.2 s), where the kernel's log-linear histograms have exact edges.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use profiler_common::{histogram, stat, tcp_event};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::bpf::{Drained, ProbeStats};
use crate::symbols::Symbols;
use crate::syscall_names::syscall_name;

/// `le` bounds: 2^k ns for these k.
const LE_LOG2: [u32; 13] = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34];

/// Most histogram series kept; more are dropped and counted.
const MAX_SERIES: usize = 20_000;

/// One histogram series: counts per `le` bound (not cumulative), count and sum.
#[derive(Clone, Debug, Default)]
struct Series {
    buckets: [u64; LE_LOG2.len()],
    count: u64,
    sum_ns: u64,
}

impl Series {
    fn observe_buckets(&mut self, kernel_buckets: &[(u32, u64)], count: u64, sum_ns: u64) {
        for &(i, n) in kernel_buckets {
            let (_, high) = histogram::bounds(i as usize);
            if let Some(slot) = LE_LOG2.iter().position(|&k| high < 1 << k) {
                self.buckets[slot] += n;
            }
        }
        self.count += count;
        self.sum_ns += sum_ns;
    }

    fn observe(&mut self, ns: u64) {
        if let Some(slot) = LE_LOG2.iter().position(|&k| ns < 1 << k) {
            self.buckets[slot] += 1;
        }
        self.count += 1;
        self.sum_ns += ns;
    }
}

#[derive(Debug, Default)]
struct State {
    /// (pid, comm, syscall) -> latency.
    syscalls: HashMap<(u32, String, String), Series>,
    /// remote -> connect latency.
    connects: HashMap<String, Series>,
    connect_failures: HashMap<String, u64>,
    series_dropped: u64,
    /// Processes found exited at the last `forget_exited`.
    exited: std::collections::HashSet<u32>,
    probe: ProbeStats,
    unsymbolized: u64,
    processes_unreadable: u64,
    files_refused: crate::symbolize::RefusalCounts,
    windows_written: u64,
    window_failures: u64,
    push: crate::push::PushStats,
    /// Program name -> (run time, runs).
    programs: BTreeMap<String, (Duration, u64)>,
    symbol_cache: (usize, usize, usize),
}

/// Shared between the agent loop (writer) and the HTTP server (reader).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Adds one drain's syscall histograms and TCP connects.
    pub fn observe(&self, drained: &Drained, symbols: &Symbols) {
        self.with(|s| {
            for raw in &drained.syscalls {
                let comm = symbols
                    .process_name(raw.pid)
                    .unwrap_or(if raw.comm.is_empty() { "?" } else { &raw.comm })
                    .to_owned();
                let key = (raw.pid, comm, syscall_name(raw.nr).into_owned());
                if !s.syscalls.contains_key(&key) && s.syscalls.len() >= MAX_SERIES {
                    s.series_dropped += 1;
                    continue;
                }
                s.syscalls.entry(key).or_default().observe_buckets(
                    &raw.buckets,
                    raw.count,
                    raw.total_ns,
                );
            }
            for e in &drained.tcp {
                let kind = e.event.kind;
                if kind != tcp_event::CONNECT && kind != tcp_event::CONNECT_FAILED {
                    continue;
                }
                let remote = crate::tcp::TcpProfile::remote(e).to_string();
                if kind == tcp_event::CONNECT_FAILED {
                    *s.connect_failures.entry(remote).or_default() += 1;
                    continue;
                }
                if !s.connects.contains_key(&remote) && s.connects.len() >= MAX_SERIES {
                    s.series_dropped += 1;
                    continue;
                }
                s.connects
                    .entry(remote)
                    .or_default()
                    .observe(e.event.latency_ns);
            }
        });
    }

    /// Drops the series of processes found exited at the previous call, so that a process's
    /// last counts stay scrapable for a whole window (call once per window).
    pub fn forget_exited(&self) {
        self.with(|s| {
            let dead_before = std::mem::take(&mut s.exited);
            s.syscalls
                .retain(|(pid, _, _), _| !dead_before.contains(pid));
            s.exited = s
                .syscalls
                .keys()
                .map(|(pid, _, _)| *pid)
                .filter(|&pid| !crate::procfs::process_alive(pid))
                .collect();
        });
    }

    /// Updates the agent's health figures.
    pub fn set_health(&self, health: Health) {
        self.with(|s| {
            s.probe = health.probe;
            s.unsymbolized = health.unsymbolized;
            s.processes_unreadable = health.processes_unreadable;
            s.files_refused = health.files_refused;
            s.programs = health.programs;
            s.symbol_cache = health.symbol_cache;
            s.push = health.push;
        });
    }

    pub fn window_written(&self, ok: bool) {
        self.with(|s| {
            if ok {
                s.windows_written += 1;
            } else {
                s.window_failures += 1;
            }
        });
    }

    /// The exposition text.
    #[must_use]
    pub fn render(&self) -> String {
        self.with(|s| render(s))
    }
}

/// Figures read from elsewhere at each drain.
#[derive(Debug, Default)]
pub struct Health {
    pub probe: ProbeStats,
    pub unsymbolized: u64,
    pub processes_unreadable: u64,
    pub files_refused: crate::symbolize::RefusalCounts,
    pub programs: BTreeMap<String, (Duration, u64)>,
    /// Processes, user addresses and kernel addresses in the symbol caches.
    pub symbol_cache: (usize, usize, usize),
    pub push: crate::push::PushStats,
}

/// A label value escaped for the exposition format.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn seconds(ns: u64) -> String {
    format!("{}", ns as f64 / 1e9)
}

fn histogram(out: &mut String, name: &str, labels: &str, series: &Series) {
    let mut cumulative = 0;
    for (k, n) in LE_LOG2.iter().zip(series.buckets) {
        cumulative += n;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"{}\"}} {cumulative}",
            seconds(1 << k)
        );
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{{labels},le=\"+Inf\"}} {}",
        series.count
    );
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", seconds(series.sum_ns));
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", series.count);
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render(s: &State) -> String {
    let mut out = String::new();
    let name = "cprof_syscall_latency_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time from syscall entry to exit, per process and syscall.",
    );
    let mut keys: Vec<_> = s.syscalls.keys().collect();
    keys.sort();
    for key in keys {
        let (pid, comm, syscall) = key;
        let labels = format!(
            "pid=\"{pid}\",comm=\"{}\",syscall=\"{}\"",
            esc(comm),
            esc(syscall)
        );
        histogram(&mut out, name, &labels, &s.syscalls[key]);
    }
    let name = "cprof_tcp_connect_latency_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time from connect() to the connection being established, per remote endpoint.",
    );
    let mut remotes: Vec<_> = s.connects.keys().collect();
    remotes.sort();
    for remote in remotes {
        let labels = format!("remote=\"{}\"", esc(remote));
        histogram(&mut out, name, &labels, &s.connects[remote]);
    }
    header(
        &mut out,
        "cprof_tcp_connect_failures_total",
        "counter",
        "Connections that failed before being established, per remote endpoint.",
    );
    let mut failed: Vec<_> = s.connect_failures.iter().collect();
    failed.sort();
    for (remote, n) in failed {
        let _ = writeln!(
            out,
            "cprof_tcp_connect_failures_total{{remote=\"{}\"}} {n}",
            esc(remote)
        );
    }
    health(&mut out, s);
    out
}

fn counter(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

#[expect(
    clippy::too_many_lines,
    reason = "one metric after another, each with its help text"
)]
fn health(out: &mut String, s: &State) {
    let p = &s.probe;
    counter(
        out,
        "cprof_samples_total",
        "On-CPU samples recorded.",
        p.get(stat::SAMPLES_RECORDED),
    );
    header(
        out,
        "cprof_lost_samples_total",
        "counter",
        "Samples, waits, syscalls and events seen by the probes but not recorded, by reason.",
    );
    for (reason, index) in [
        ("oncpu_count_map_full", stat::DROPPED_COUNTS_FULL),
        ("offcpu_map_full", stat::OFFCPU_DROPPED_FULL),
        ("syscall_map_full", stat::SYSCALL_DROPPED_FULL),
        ("syscall_errno_map_full", stat::SYSCALL_ERRNO_DROPPED),
        ("syscall_slow_stack_lost", stat::SYSCALL_SLOW_DROPPED),
        ("tcp_ring_buffer_full", stat::TCP_EVENTS_LOST),
        ("tcp_socket_map_full", stat::TCP_SOCKS_FULL),
        ("offcpu_stack_map_reset", stat::OFFCPU_DISCARDED),
    ] {
        let _ = writeln!(
            out,
            "cprof_lost_samples_total{{reason=\"{reason}\"}} {}",
            p.get(index)
        );
    }
    header(
        out,
        "cprof_lost_stacks_total",
        "counter",
        "Stacks not captured, by reason (the sample itself is kept without them).",
    );
    for (reason, index) in [
        ("user_stack_map_full", stat::USER_STACK_MAP_FULL),
        ("user_stack_collision", stat::USER_STACK_COLLISION),
        ("kernel_stack_map_full", stat::KERNEL_STACK_MAP_FULL),
        ("kernel_stack_collision", stat::KERNEL_STACK_COLLISION),
        ("offcpu_stack_map_full", stat::OFFCPU_STACK_MAP_FULL),
        ("offcpu_stack_collision", stat::OFFCPU_STACK_COLLISION),
    ] {
        let _ = writeln!(
            out,
            "cprof_lost_stacks_total{{reason=\"{reason}\"}} {}",
            p.get(index)
        );
    }
    header(
        out,
        "cprof_probe_events_total",
        "counter",
        "Every counter the eBPF programs keep (see profiler_common::stat).",
    );
    for (i, value) in p.counters.iter().enumerate() {
        let _ = writeln!(
            out,
            "cprof_probe_events_total{{counter=\"{}\"}} {value}",
            stat_name(i as u32)
        );
    }
    counter(
        out,
        "cprof_unsymbolized_addresses_total",
        "Distinct addresses that got no symbol.",
        s.unsymbolized,
    );
    counter(
        out,
        "cprof_processes_unreadable_total",
        "Processes whose memory maps could not be read: gone, or closed to us (their frames stay unsymbolized).",
        s.processes_unreadable,
    );
    header(
        out,
        "cprof_symbolization_files_refused_total",
        "counter",
        "Files the symbolizer refused to parse, by reason (their frames stay unsymbolized).",
    );
    for (reason, n) in s.files_refused.iter() {
        let _ = writeln!(
            out,
            "cprof_symbolization_files_refused_total{{reason=\"{}\"}} {n}",
            reason.name()
        );
    }
    counter(
        out,
        "cprof_windows_written_total",
        "Windows whose files were all written.",
        s.windows_written,
    );
    counter(
        out,
        "cprof_window_write_failures_total",
        "Windows whose files could not be written.",
        s.window_failures,
    );
    counter(
        out,
        "cprof_metrics_series_dropped_total",
        "Histogram observations dropped because the series limit was reached.",
        s.series_dropped,
    );
    counter(
        out,
        "cprof_push_requests_total",
        "Push requests the profiling backend accepted.",
        s.push.pushed,
    );
    counter(
        out,
        "cprof_push_failures_total",
        "Push attempts that failed (they are retried from the spool).",
        s.push.failed_attempts,
    );
    counter(
        out,
        "cprof_push_dropped_total",
        "Push requests given up: refused by the backend, or evicted from the full spool.",
        s.push.dropped,
    );
    gauge(
        out,
        "cprof_push_spool_bytes",
        "Bytes waiting in the push spool.",
        s.push.spool_bytes,
    );
    let (processes, user, kernel) = s.symbol_cache;
    header(
        out,
        "cprof_symbol_cache_entries",
        "gauge",
        "Entries in the symbol caches.",
    );
    let _ = writeln!(
        out,
        "cprof_symbol_cache_entries{{cache=\"processes\"}} {processes}"
    );
    let _ = writeln!(
        out,
        "cprof_symbol_cache_entries{{cache=\"user_addresses\"}} {user}"
    );
    let _ = writeln!(
        out,
        "cprof_symbol_cache_entries{{cache=\"kernel_addresses\"}} {kernel}"
    );
    let (cpu, rss) = own_usage();
    counter(
        out,
        "cprof_agent_cpu_seconds_total",
        "CPU time the agent used (user and system).",
        cpu,
    );
    gauge(
        out,
        "cprof_agent_resident_memory_bytes",
        "The agent's resident set size.",
        rss,
    );
    header(
        out,
        "cprof_bpf_program_run_seconds_total",
        "counter",
        "Time spent in each eBPF program (zero unless the sysctl kernel.bpf_stats_enabled is 1).",
    );
    for (name, (time, _)) in &s.programs {
        let _ = writeln!(
            out,
            "cprof_bpf_program_run_seconds_total{{program=\"{}\"}} {}",
            esc(name),
            time.as_secs_f64()
        );
    }
    header(
        out,
        "cprof_bpf_program_runs_total",
        "counter",
        "Runs of each eBPF program (zero unless the sysctl kernel.bpf_stats_enabled is 1).",
    );
    for (name, (_, runs)) in &s.programs {
        let _ = writeln!(
            out,
            "cprof_bpf_program_runs_total{{program=\"{}\"}} {runs}",
            esc(name)
        );
    }
}

fn stat_name(index: u32) -> &'static str {
    const NAMES: [&str; stat::COUNT as usize] = [
        "samples_seen",
        "samples_idle",
        "samples_filtered",
        "samples_recorded",
        "dropped_counts_full",
        "user_stack_map_full",
        "user_stack_collision",
        "user_stack_other",
        "kernel_stack_map_full",
        "kernel_stack_collision",
        "kernel_stack_other",
        "offcpu_starts",
        "offcpu_ends",
        "offcpu_recorded",
        "offcpu_short",
        "offcpu_dropped_full",
        "offcpu_stack_map_full",
        "offcpu_stack_collision",
        "offcpu_wakers",
        "offcpu_read_errors",
        "offcpu_replaced",
        "syscall_enters",
        "syscall_recorded",
        "syscall_dropped_full",
        "syscall_errno_dropped",
        "syscall_slow",
        "syscall_slow_dropped",
        "tcp_events_sent",
        "tcp_events_lost",
        "tcp_socks_full",
        "offcpu_discarded",
        "offcpu_stack_resets",
    ];
    NAMES.get(index as usize).copied().unwrap_or("unknown")
}

/// Our CPU seconds (user + system) and resident bytes.
fn own_usage() -> (f64, u64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass.
    let cpu = if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0 {
        // SAFETY: initialised by the successful call.
        let u = unsafe { usage.assume_init() };
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    } else {
        0.0
    };
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096);
    (cpu, rss)
}

/// Serves `GET /metrics` on `listener` for ever.
async fn serve(listener: tokio::net::TcpListener, metrics: Metrics) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), answer(&mut conn, &metrics)).await;
        });
    }
}

/// The endpoint's socket, bound but not served yet: [`bind`] before the probes are attached (a
/// taken port fails the start, with the address named), [`Listener::serve`] afterwards.
#[derive(Debug)]
pub struct Listener(std::net::TcpListener);

/// Binds the endpoint.
pub fn bind(addr: SocketAddr) -> anyhow::Result<Listener> {
    std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| Listener(l)))
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))
}

impl Listener {
    /// Serves `GET /metrics` from a thread of its own, so that scrapes are answered while a
    /// window is being written. The thread drops every capability first: it only talks to the
    /// network.
    pub fn serve(self, metrics: Metrics) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listener = self.0;
        std::thread::Builder::new()
            .name("cprof-metrics".into())
            .spawn(move || {
                if let Err(e) = crate::privilege::drop_in_thread(0) {
                    tracing::warn!("metrics thread: cannot drop capabilities ({e}); not serving");
                    return;
                }
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, metrics).await,
                        Err(e) => tracing::warn!("metrics endpoint: {e}"),
                    }
                });
            })?;
        Ok(())
    }
}

async fn answer(conn: &mut tokio::net::TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > 16 * 1024 {
            return respond(
                conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    match route(&request) {
        Route::Metrics { head } => {
            let body = if head {
                String::new()
            } else {
                metrics.render()
            };
            respond(
                conn,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        Route::Index => {
            respond(
                conn,
                "200 OK",
                "text/plain",
                "cprof agent: metrics at /metrics\n",
            )
            .await
        }
        Route::NotFound => respond(conn, "404 Not Found", "text/plain", "not found\n").await,
        Route::NotAllowed => {
            respond(conn, "405 Method Not Allowed", "text/plain", "GET only\n").await
        }
    }
}

/// What the metrics endpoint answers to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics` (`head`: `HEAD /metrics`, headers only).
    Metrics {
        head: bool,
    },
    /// `GET /`: a line pointing at `/metrics`.
    Index,
    NotFound,
    NotAllowed,
}

/// Routes a request by its request line (`GET /metrics?x HTTP/1.1`); the rest is not read.
#[must_use]
pub fn route(request: &[u8]) -> Route {
    let line = String::from_utf8_lossy(request);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Route::Metrics {
            head: method == "HEAD",
        },
        ("GET", "/") => Route::Index,
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::NotAllowed,
    }
}

async fn respond(
    conn: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_exact_at_powers_of_two() {
        let mut s = Series::default();
        let mut kernel = vec![0u64; histogram::BUCKETS];
        // 1023 ns and 1024 ns: below and at the first bound; 5 ms.
        kernel[histogram::index(1023)] += 1;
        kernel[histogram::index(1024)] += 2;
        kernel[histogram::index(5_000_000)] += 3;
        s.observe_buckets(
            &crate::syscalls::sparse(&kernel),
            6,
            1023 + 2048 + 15_000_000,
        );
        let mut out = String::new();
        histogram(&mut out, "h", "a=\"b\"", &s);
        assert!(
            out.contains("h_bucket{a=\"b\",le=\"0.000001024\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("h_bucket{a=\"b\",le=\"0.000004096\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("h_bucket{a=\"b\",le=\"0.004194304\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("h_bucket{a=\"b\",le=\"0.016777216\"} 6\n"),
            "{out}"
        );
        assert!(out.contains("h_bucket{a=\"b\",le=\"+Inf\"} 6\n"), "{out}");
        assert!(out.contains("h_count{a=\"b\"} 6\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
