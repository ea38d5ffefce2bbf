//! `cprof record`: check privileges and output, attach the probes of the requested events, drain
//! them periodically until the duration ends, a signal arrives or every target exits, then write
//! the pprof files and print a summary.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use profiler_common::stat;
use tokio::signal::unix::{SignalKind, signal};

use crate::bpf::ProbeStats;
use crate::config::RecordConfig;
use crate::output::{self, OutputDir};
use crate::pprof::{self, Profile, ProfileExt as _};
use crate::procfs;
use crate::session::{Profiles, Session, TCP_RING_INTERVAL, check_privileges};
use crate::symbols::Symbols;
use crate::syscalls::SyscallRow;
use crate::tcp::RemoteStats;
use crate::top::{TopFunction, TopStack, top_functions, top_stacks};

/// What a recording produced, for the summary and for callers.
#[derive(Debug)]
pub struct RecordReport {
    pub files: Vec<PathBuf>,
    pub stats: ProbeStats,
    pub unsymbolized: u64,
    /// Files the symbolizer refused, by reason.
    pub files_refused: crate::symbolize::RefusalCounts,
    pub elapsed: Duration,
    pub stop_reason: &'static str,
    pub cpu: Option<CpuSummary>,
    pub offcpu: Option<OffCpuSummary>,
    pub syscall: Option<SyscallSummary>,
    pub tcp: Option<TcpSummary>,
}

#[derive(Debug)]
pub struct TcpSummary {
    pub events: usize,
    pub remotes: Vec<(String, RemoteStats)>,
}

#[derive(Debug)]
pub struct SyscallSummary {
    pub rows: Vec<SyscallRow>,
    /// bcc-style log2 histograms of the top rows.
    pub histograms: Vec<(String, String)>,
}

#[derive(Debug)]
pub struct CpuSummary {
    pub samples: u64,
    pub top: Vec<TopFunction>,
}

#[derive(Debug)]
pub struct OffCpuSummary {
    pub total_ns: u64,
    pub waits: u64,
    /// Threads whose wait start was evicted from the bounded start map before they came back.
    pub evicted: u64,
    pub top: Vec<TopStack>,
}

pub async fn record(config: &RecordConfig) -> anyhow::Result<RecordReport> {
    check_privileges()?;
    let out = output::prepare_dir(&config.output_dir)?;
    let mut rec = Session::start(config, false)?;

    // Handlers first: from the line saying it records, a signal ends the recording cleanly.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let started_wall = SystemTime::now();
    let started = Instant::now();
    eprintln!(
        "cprof: recording {}; Ctrl-C to stop early",
        describe(config)
    );
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut drain_tick = tokio::time::interval(config.drain_interval);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    drain_tick.tick().await;
    // The TCP ring is emptied more often than the aggregates: a burst of connects can fill it
    // within a second.
    let mut ring_tick = tokio::time::interval(TCP_RING_INTERVAL);
    ring_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let stop_reason = loop {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = until_deadline => break "duration reached",
            _ = sigint.recv() => break "interrupted (SIGINT)",
            _ = sigterm.recv() => break "terminated (SIGTERM)",
            _ = ring_tick.tick(), if config.events.tcp => rec.read_tcp_ring(),
            _ = drain_tick.tick() => {
                rec.drain(|_, _| {}).await?;
                if let Some(pids) = &config.pids
                    && !pids.iter().any(|&pid| procfs::process_alive(pid))
                {
                    break "every target process exited";
                }
            }
        }
    };
    let elapsed = started.elapsed();
    // Detach first, then drain both buffers: the one written until now, and the other one (a
    // program may have written to it during the last grace period). Nothing is counted after.
    rec.probes.stop()?;
    rec.drain(|_, _| {}).await?;
    rec.drain(|_, _| {}).await?;
    let stats = rec.probes.stats()?;
    let still_waiting = rec.probes.offcpu_waiting();
    eprintln!("cprof: stopped: {stop_reason}; writing the profiles");
    let outcome = Outcome {
        started_wall,
        elapsed,
        stop_reason,
        stats,
        still_waiting,
    };
    write_profiles(config, &out, &rec.symbols, &rec.profiles, &outcome, "")
}

/// How a recording (or a window) ended: what the files and the summary report.
pub(crate) struct Outcome {
    pub started_wall: SystemTime,
    pub elapsed: Duration,
    pub stop_reason: &'static str,
    /// Counters over the span the files cover.
    pub stats: ProbeStats,
    /// Off-CPU threads still switched out at the end.
    pub still_waiting: u64,
}

/// The kernel does not say when an LRU map evicts: what started and neither ended, nor was
/// replaced, nor was dropped by a stack map reset, nor is still there, was evicted.
fn evicted_starts(stats: &ProbeStats, still_waiting: u64) -> u64 {
    stats.get(stat::OFFCPU_STARTS).saturating_sub(
        stats.get(stat::OFFCPU_ENDS)
            + stats.get(stat::OFFCPU_REPLACED)
            + stats.get(stat::OFFCPU_DISCARDED)
            + still_waiting,
    )
}

/// Writes every requested signal's files into `out`, each name with `suffix` before its
/// extension (`cpu{suffix}.pb.gz`).
pub(crate) fn write_profiles(
    config: &RecordConfig,
    out: &OutputDir,
    symbols: &Symbols,
    rec: &Profiles,
    outcome: &Outcome,
    suffix: &str,
) -> anyhow::Result<RecordReport> {
    let &Outcome {
        started_wall,
        elapsed,
        stop_reason,
        stats,
        still_waiting,
    } = outcome;
    let evicted = evicted_starts(&stats, still_waiting);
    let unsymbolized = symbols.stats.unsymbolized;
    let mut comments = comments(config, &stats, unsymbolized, evicted, still_waiting);
    comments.push(format!(
        "processes whose memory maps could not be read (gone, or closed to us: frames unsymbolized): {}",
        symbols.stats.processes_unreadable
    ));
    comments.push(format!(
        "files refused for symbolization (frames unsymbolized): {} ({})",
        symbols.stats.files_refused.total(),
        symbols.stats.files_refused.describe_all()
    ));
    let time = |mut p: Profile| {
        p.time_nanos = started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        p.duration_nanos = elapsed.as_nanos() as i64;
        p
    };
    let mut files = Vec::new();
    let write = |files: &mut Vec<PathBuf>, name: &str, profile: &Profile| -> anyhow::Result<()> {
        files.push(out.write_atomic(&with_suffix(name, suffix), &pprof::encode_gzip(profile))?);
        Ok(())
    };
    let mut cpu = None;
    if config.events.cpu {
        let profile = time(rec.oncpu.to_pprof(symbols, config.period_ns(), &comments));
        write(&mut files, "cpu.pb.gz", &profile)?;
        cpu = Some(CpuSummary {
            samples: rec.oncpu.total_samples(),
            top: top_functions(&profile, 0, config.top),
        });
    }
    let mut offcpu = None;
    if config.events.offcpu {
        let profile = time(rec.offcpu.to_offcpu_pprof(symbols, &comments));
        write(&mut files, "offcpu.pb.gz", &profile)?;
        write(
            &mut files,
            "offwake.pb.gz",
            &time(rec.offcpu.to_offwake_pprof(symbols, &comments)),
        )?;
        let (total_ns, waits) = rec.offcpu.totals();
        let label = |s: &pprof::proto::Sample| {
            format!(
                "{} {}",
                profile.label_str(s, "comm").unwrap_or("?"),
                profile.label_str(s, "state").unwrap_or("?")
            )
        };
        offcpu = Some(OffCpuSummary {
            total_ns,
            waits,
            evicted,
            top: top_stacks(&profile, 1, 0, config.top, label),
        });
    }
    let syscall = if config.events.syscall {
        let profile = time(rec.syscalls.to_pprof(symbols, &comments));
        Some(write_syscalls(
            config, out, symbols, rec, &stats, elapsed, &profile, suffix, &mut files,
        )?)
    } else {
        None
    };
    let tcp = if config.events.tcp {
        let profile = time(rec.tcp.to_pprof(symbols, &comments));
        Some(write_tcp(
            config, out, rec, &stats, &profile, suffix, &mut files,
        )?)
    } else {
        None
    };
    Ok(RecordReport {
        files,
        stats,
        unsymbolized,
        files_refused: symbols.stats.files_refused,
        elapsed,
        stop_reason,
        cpu,
        offcpu,
        syscall,
        tcp,
    })
}

fn describe(config: &RecordConfig) -> String {
    let mut whats = Vec::new();
    if config.events.cpu {
        whats.push("on-CPU stacks");
    }
    if config.events.offcpu {
        whats.push("off-CPU waits");
    }
    if config.events.syscall {
        whats.push("syscall latency");
    }
    if config.events.tcp {
        whats.push("TCP events");
    }
    let what = whats.join(", ");
    let whom = config.pids.as_ref().map_or_else(
        || "every process".to_owned(),
        |p| {
            let pids: Vec<_> = p.iter().map(u32::to_string).collect();
            format!("pid {}", pids.join(", "))
        },
    );
    let rate = if config.events.cpu {
        format!(" at {} Hz", config.frequency_hz)
    } else {
        String::new()
    };
    let until = config
        .duration
        .map_or_else(|| "until Ctrl-C".to_owned(), |d| format!("for {d:.1?}"));
    format!("{what} of {whom}{rate} {until}")
}

fn comments(
    config: &RecordConfig,
    stats: &ProbeStats,
    unsymbolized: u64,
    evicted: u64,
    still_waiting: u64,
) -> Vec<String> {
    let mut lines = vec![format!("cprof {}", env!("CARGO_PKG_VERSION"))];
    if config.events.cpu {
        lines.push(format!(
            "frequency: {} Hz per CPU (cpu-clock)",
            config.frequency_hz
        ));
        lines.push(format!(
            "samples: seen {}, recorded {}, lost {} (count map full), filtered {}, idle {}",
            stats.get(stat::SAMPLES_SEEN),
            stats.get(stat::SAMPLES_RECORDED),
            stats.lost_samples(),
            stats.get(stat::SAMPLES_FILTERED),
            stats.get(stat::SAMPLES_IDLE),
        ));
        lines.push(format!(
            "stacks lost: user {} map full, {} collisions; kernel {} map full, {} collisions",
            stats.get(stat::USER_STACK_MAP_FULL),
            stats.get(stat::USER_STACK_COLLISION),
            stats.get(stat::KERNEL_STACK_MAP_FULL),
            stats.get(stat::KERNEL_STACK_COLLISION),
        ));
    }
    if config.events.offcpu {
        lines.push(format!(
            "off-CPU waits: started {}, ended {}, recorded {}, shorter than {:?} {}, lost {} (map full), evicted {} (start map full), still waiting {}",
            stats.get(stat::OFFCPU_STARTS),
            stats.get(stat::OFFCPU_ENDS),
            stats.get(stat::OFFCPU_RECORDED),
            config.off_cpu_min,
            stats.get(stat::OFFCPU_SHORT),
            stats.get(stat::OFFCPU_DROPPED_FULL),
            evicted,
            still_waiting,
        ));
        lines.push(format!(
            "off-CPU stacks lost: {} map full, {} collisions; stack map resets {} (waits dropped {}); wakers recorded {}; starts replaced (switch-in missed) {}; task reads failed {}",
            stats.get(stat::OFFCPU_STACK_MAP_FULL),
            stats.get(stat::OFFCPU_STACK_COLLISION),
            stats.get(stat::OFFCPU_STACK_RESETS),
            stats.get(stat::OFFCPU_DISCARDED),
            stats.get(stat::OFFCPU_WAKERS),
            stats.get(stat::OFFCPU_REPLACED),
            stats.get(stat::OFFCPU_READ_ERRORS),
        ));
    }
    if config.events.syscall {
        lines.push(format!(
            "syscalls: entered {}, recorded {}, lost {} (histogram map full), errnos lost {}, slow (>= {:?}) {}, slow stacks lost {}",
            stats.get(stat::SYSCALL_ENTERS),
            stats.get(stat::SYSCALL_RECORDED),
            stats.get(stat::SYSCALL_DROPPED_FULL),
            stats.get(stat::SYSCALL_ERRNO_DROPPED),
            config.syscall_slow,
            stats.get(stat::SYSCALL_SLOW),
            stats.get(stat::SYSCALL_SLOW_DROPPED),
        ));
    }
    if config.events.tcp {
        lines.push(format!(
            "TCP events: sent {}, lost {} (ring buffer full); sockets not tracked {} (map full)",
            stats.get(stat::TCP_EVENTS_SENT),
            stats.get(stat::TCP_EVENTS_LOST),
            stats.get(stat::TCP_SOCKS_FULL),
        ));
    }
    lines.push(format!("unsymbolized addresses: {unsymbolized}"));
    lines
}

/// The end-of-recording summary, as printed on stdout.
#[must_use]
pub fn summary(report: &RecordReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Recorded for {:.1?} ({}).",
        report.elapsed, report.stop_reason
    );
    if let Some(cpu) = &report.cpu {
        cpu_summary(&mut out, cpu, &report.stats);
    }
    if let Some(off) = &report.offcpu {
        offcpu_summary(&mut out, off, &report.stats);
    }
    if let Some(sys) = &report.syscall {
        syscall_summary(&mut out, sys, &report.stats);
    }
    if let Some(tcp) = &report.tcp {
        tcp_summary(&mut out, tcp, &report.stats);
    }
    let _ = writeln!(out, "\nUnsymbolized addresses: {}", report.unsymbolized);
    let _ = writeln!(
        out,
        "Files refused for symbolization: {}",
        report.files_refused.describe_nonzero()
    );
    for file in &report.files {
        let _ = writeln!(out, "Profile: {}", file.display());
    }
    if let Some(first) = report
        .files
        .iter()
        .find(|f| f.extension().is_some_and(|e| e == "gz"))
    {
        let _ = writeln!(out, "Open with: go tool pprof -http=: {}", first.display());
    }
    out
}

fn cpu_summary(out: &mut String, cpu: &CpuSummary, s: &ProbeStats) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\nOn-CPU: {} samples. Lost samples: {} (count map full); lost stacks: {}",
        cpu.samples,
        s.lost_samples(),
        s.lost_stacks(),
    );
    let _ = writeln!(
        out,
        "(ticks seen: {} = {} recorded + {} lost + {} other processes + {} idle; stacks lost: user {} map full, {} collisions, kernel {} map full, {} collisions)",
        s.get(stat::SAMPLES_SEEN),
        s.get(stat::SAMPLES_RECORDED),
        s.lost_samples(),
        s.get(stat::SAMPLES_FILTERED),
        s.get(stat::SAMPLES_IDLE),
        s.get(stat::USER_STACK_MAP_FULL),
        s.get(stat::USER_STACK_COLLISION),
        s.get(stat::KERNEL_STACK_MAP_FULL),
        s.get(stat::KERNEL_STACK_COLLISION),
    );
    if cpu.samples > 0 {
        let _ = writeln!(
            out,
            "{:>8} {:>7} {:>8} {:>7}  function",
            "self", "self%", "total", "total%"
        );
        let pct = |n: u64| 100.0 * n as f64 / cpu.samples as f64;
        for t in &cpu.top {
            let _ = writeln!(
                out,
                "{:>8} {:>6.1}% {:>8} {:>6.1}%  {}",
                t.self_samples,
                pct(t.self_samples),
                t.total_samples,
                pct(t.total_samples),
                t.name
            );
        }
    }
}

fn offcpu_summary(out: &mut String, off: &OffCpuSummary, s: &ProbeStats) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\nOff-CPU: {:.3} s waited in {} waits. Lost waits: {} (map full), {} (start map full), {} (stack map resets); lost stacks: {}",
        off.total_ns as f64 / 1e9,
        off.waits,
        s.get(stat::OFFCPU_DROPPED_FULL),
        off.evicted,
        s.get(stat::OFFCPU_DISCARDED),
        s.get(stat::OFFCPU_STACK_MAP_FULL) + s.get(stat::OFFCPU_STACK_COLLISION),
    );
    if off.waits > 0 {
        let _ = writeln!(
            out,
            "{:>10} {:>6} {:>8}  {:<20} user stack (leaf first)",
            "waited", "%", "waits", "thread state"
        );
        for t in &off.top {
            let mut frames = t.frames.clone();
            if frames.len() > 90 {
                frames.truncate(frames.floor_char_boundary(87));
                frames.push_str("...");
            }
            let _ = writeln!(
                out,
                "{:>8.1}ms {:>5.1}% {:>8}  {:<20} {}",
                t.value as f64 / 1e6,
                100.0 * t.value as f64 / off.total_ns.max(1) as f64,
                t.count,
                t.label,
                frames
            );
        }
    }
}

fn tcp_summary(out: &mut String, tcp: &TcpSummary, s: &ProbeStats) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\nTCP: {} events. Lost: {} (ring buffer full); sockets not tracked: {}",
        tcp.events,
        s.get(stat::TCP_EVENTS_LOST),
        s.get(stat::TCP_SOCKS_FULL),
    );
    if tcp.remotes.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "{:<40} {:>8} {:>7} {:>10} {:>10} {:>8} {:>7} {:>12} {:>12}",
        "remote", "connects", "failed", "p50", "p99", "retrans", "resets", "sent", "received"
    );
    for (remote, r) in &tcp.remotes {
        let _ = writeln!(
            out,
            "{:<40} {:>8} {:>7} {:>8.1}us {:>8.1}us {:>8} {:>7} {:>12} {:>12}",
            remote,
            r.connects,
            r.failed,
            r.latency(0.5) as f64 / 1e3,
            r.latency(0.99) as f64 / 1e3,
            r.retransmits,
            r.resets,
            r.bytes_sent,
            r.bytes_received
        );
    }
}

fn syscall_summary(out: &mut String, sys: &SyscallSummary, s: &ProbeStats) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "\nSyscalls by total time. Lost: {} (histogram map full), {} slow stacks",
        s.get(stat::SYSCALL_DROPPED_FULL),
        s.get(stat::SYSCALL_SLOW_DROPPED),
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:<16} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>11}",
        "syscall", "pid", "comm", "count", "errors", "p50", "p90", "p99", "max", "total"
    );
    let t = |ns: u64| {
        if ns >= 1_000_000 {
            format!("{:.2}ms", ns as f64 / 1e6)
        } else {
            format!("{:.1}us", ns as f64 / 1e3)
        }
    };
    for r in &sys.rows {
        let _ = writeln!(
            out,
            "{:<18} {:>8} {:<16} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>11}",
            r.syscall,
            r.pid,
            r.comm,
            r.count,
            r.errors,
            t(r.p50_ns),
            t(r.p90_ns),
            t(r.p99_ns),
            t(r.max_ns),
            t(r.total_ns)
        );
    }
    for (title, histogram) in &sys.histograms {
        let _ = write!(out, "\n{title}:\n{histogram}");
    }
}

/// Writes `syscall-latency.json` and `syscall.pb.gz` (`profile`); returns the summary's part.
#[expect(
    clippy::too_many_arguments,
    reason = "the pieces of one write_profiles call, passed down"
)]
fn write_syscalls(
    config: &RecordConfig,
    out: &OutputDir,
    symbols: &Symbols,
    rec: &Profiles,
    stats: &ProbeStats,
    elapsed: Duration,
    profile: &Profile,
    suffix: &str,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<SyscallSummary> {
    let dropped = serde_json::json!({
        "histogram_map_full": stats.get(stat::SYSCALL_DROPPED_FULL),
        "errno_map_full": stats.get(stat::SYSCALL_ERRNO_DROPPED),
        "slow_stacks_lost": stats.get(stat::SYSCALL_SLOW_DROPPED),
    });
    let json = rec
        .syscalls
        .to_json(symbols, elapsed.as_nanos() as u64, &dropped);
    files.push(out.write_atomic(
        &with_suffix("syscall-latency.json", suffix),
        json.as_bytes(),
    )?);
    files.push(out.write_atomic(
        &with_suffix("syscall.pb.gz", suffix),
        &pprof::encode_gzip(profile),
    )?);
    let rows = rec.syscalls.rows(symbols);
    let histograms = rows
        .iter()
        .take(3)
        .map(|r| {
            (
                format!("{} (pid {} {})", r.syscall, r.pid, r.comm),
                rec.syscalls.log2_histogram(r.pid, r.nr),
            )
        })
        .collect();
    Ok(SyscallSummary {
        rows: rows.into_iter().take(config.top).collect(),
        histograms,
    })
}

/// Writes `tcp-events.jsonl`, `tcp-latency.json` and `tcp.pb.gz` (`profile`).
fn write_tcp(
    config: &RecordConfig,
    out: &OutputDir,
    rec: &Profiles,
    stats: &ProbeStats,
    profile: &Profile,
    suffix: &str,
    files: &mut Vec<PathBuf>,
) -> anyhow::Result<TcpSummary> {
    let dropped = serde_json::json!({
        "ring_buffer_full": stats.get(stat::TCP_EVENTS_LOST),
        "socket_map_full": stats.get(stat::TCP_SOCKS_FULL),
    });
    for (name, bytes) in [
        ("tcp-events.jsonl", rec.tcp.to_jsonl().into_bytes()),
        (
            "tcp-latency.json",
            rec.tcp.to_latency_json(&dropped).into_bytes(),
        ),
        ("tcp.pb.gz", pprof::encode_gzip(profile)),
    ] {
        files.push(out.write_atomic(&with_suffix(name, suffix), &bytes)?);
    }
    Ok(TcpSummary {
        events: rec.tcp.len(),
        remotes: rec.tcp.by_remote().into_iter().take(config.top).collect(),
    })
}

/// `cpu.pb.gz` with suffix `-20261122T101500Z`: `cpu-20261122T101500Z.pb.gz`.
fn with_suffix(name: &str, suffix: &str) -> String {
    let (stem, ext) = name.split_once('.').unwrap_or((name, ""));
    if ext.is_empty() {
        format!("{stem}{suffix}")
    } else {
        format!("{stem}{suffix}.{ext}")
    }
}
