//! `cprof record`: check privileges and output, attach the sampler, drain it periodically until
//! the duration ends, a signal arrives or every target exits, then write `cpu.pb.gz` and print a
//! summary.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use profiler_common::stat;
use tokio::signal::unix::{SignalKind, signal};

use crate::bpf::{OnCpuSampler, SamplerOptions, SamplerStats};
use crate::collect::{Collected, TopFunction, top_functions};
use crate::config::RecordConfig;
use crate::output;
use crate::pprof;
use crate::privilege;
use crate::procfs;
use crate::symbolize::SymbolizerThread;

/// What a recording produced, for the summary and for callers.
#[derive(Debug)]
pub struct RecordReport {
    pub cpu_profile: std::path::PathBuf,
    pub samples: u64,
    pub stats: SamplerStats,
    pub unsymbolized: u64,
    pub top: Vec<TopFunction>,
    pub elapsed: Duration,
    pub stop_reason: &'static str,
}

/// Time left for in-flight BPF programs to finish with a buffer after a flip.
const FLIP_GRACE: Duration = Duration::from_millis(5);

pub async fn record(config: &RecordConfig) -> anyhow::Result<RecordReport> {
    let eff = privilege::effective().context("reading our capabilities")?;
    let missing = privilege::missing(eff, &privilege::RECORD_REQUIRED);
    if !missing.is_empty() {
        bail!(
            "missing capabilities {}: run as root, or grant them (setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_syslog+ep cprof)",
            privilege::names(&missing)
        );
    }
    let weak = privilege::missing(eff, &privilege::RECORD_WANTED);
    if !weak.is_empty() {
        tracing::warn!(
            "without {} some frames may stay unsymbolized",
            privilege::names(&weak)
        );
    }
    output::prepare_dir(&config.output_dir)?;
    raise_memlock_limit();

    let symbolizer = SymbolizerThread::spawn().context("starting the symbolizer thread")?;
    let mut collected = Collected::default();
    for &pid in config.pids.iter().flatten() {
        collected.remember_process(pid);
    }
    let mut sampler = OnCpuSampler::start(&SamplerOptions {
        frequency_hz: config.frequency_hz,
        pids: config.pids.clone(),
        counts_max_entries: config.count_map_size,
        stacks_max_entries: config.stack_map_size,
    })
    .context("setting up the on-CPU sampler")?;

    let started_wall = SystemTime::now();
    let started = Instant::now();
    eprintln!(
        "cprof: recording on-CPU stacks of {} at {} Hz {}; Ctrl-C to stop early",
        config.pids.as_ref().map_or_else(
            || "every process".to_owned(),
            |p| format!(
                "pid {}",
                p.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            )
        ),
        config.frequency_hz,
        config
            .duration
            .map_or_else(|| "until Ctrl-C".to_owned(), |d| format!("for {d:.1?}")),
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = config.duration.map(|d| tokio::time::Instant::now() + d);
    let mut drain_tick = tokio::time::interval(config.drain_interval);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    drain_tick.tick().await;

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
            _ = drain_tick.tick() => {
                drain_once(&mut sampler, &mut collected, &symbolizer).await?;
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
    // sample may have landed in it during the last grace period). Nothing is counted after this.
    sampler.stop()?;
    drain_once(&mut sampler, &mut collected, &symbolizer).await?;
    drain_once(&mut sampler, &mut collected, &symbolizer).await?;
    let stats = sampler.stats()?;
    drop(sampler);
    eprintln!("cprof: stopped: {stop_reason}; writing the profile");

    let samples = collected.total_samples();
    let comments = comments(config, &stats, collected.symbol_stats.unsymbolized);
    let mut builder = collected.to_pprof(config.period_ns(), &comments);
    builder.set_time(
        started_wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        elapsed.as_nanos() as i64,
    );
    let profile = builder.finish();
    let cpu_profile = config.output_dir.join("cpu.pb.gz");
    output::write_atomic(&cpu_profile, &pprof::encode_gzip(&profile))?;
    Ok(RecordReport {
        cpu_profile,
        samples,
        stats,
        unsymbolized: collected.symbol_stats.unsymbolized,
        top: top_functions(&profile, config.top),
        elapsed,
        stop_reason,
    })
}

async fn drain_once(
    sampler: &mut OnCpuSampler,
    collected: &mut Collected,
    symbolizer: &SymbolizerThread,
) -> anyhow::Result<()> {
    sampler.flip()?;
    tokio::time::sleep(FLIP_GRACE).await;
    let raw = sampler.drain_idle()?;
    collected.add(raw, symbolizer).await;
    Ok(())
}

fn comments(config: &RecordConfig, stats: &SamplerStats, unsymbolized: u64) -> Vec<String> {
    vec![
        format!("cprof {} on-CPU profile", env!("CARGO_PKG_VERSION")),
        format!("frequency: {} Hz per CPU (cpu-clock)", config.frequency_hz),
        format!(
            "samples: seen {}, recorded {}, lost {} (count map full), filtered {}, idle {}",
            stats.get(stat::SAMPLES_SEEN),
            stats.get(stat::SAMPLES_RECORDED),
            stats.lost_samples(),
            stats.get(stat::SAMPLES_FILTERED),
            stats.get(stat::SAMPLES_IDLE),
        ),
        format!(
            "stacks lost: user {} map full, {} collisions; kernel {} map full, {} collisions",
            stats.get(stat::USER_STACK_MAP_FULL),
            stats.get(stat::USER_STACK_COLLISION),
            stats.get(stat::KERNEL_STACK_MAP_FULL),
            stats.get(stat::KERNEL_STACK_COLLISION),
        ),
        format!("unsymbolized addresses: {unsymbolized}"),
    ]
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; later ones to the memory cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on Linux 5.11+",
            std::io::Error::last_os_error()
        );
    }
}

/// The end-of-recording summary, as printed on stdout.
#[must_use]
pub fn summary(report: &RecordReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let s = &report.stats;
    let _ = writeln!(
        out,
        "Recorded {} samples in {:.1?} ({}).",
        report.samples, report.elapsed, report.stop_reason
    );
    let _ = writeln!(
        out,
        "Lost samples: {} (count map full); lost stacks: {}; unsymbolized addresses: {}",
        s.lost_samples(),
        s.lost_stacks(),
        report.unsymbolized
    );
    if report.samples > 0 {
        let _ = writeln!(
            out,
            "\n{:>8} {:>7} {:>8} {:>7}  function",
            "self", "self%", "total", "total%"
        );
        for t in &report.top {
            let pct = |n: u64| 100.0 * n as f64 / report.samples as f64;
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
    let _ = writeln!(out, "\nProfile: {}", report.cpu_profile.display());
    let _ = writeln!(
        out,
        "Open it with: go tool pprof -http=: {}",
        report.cpu_profile.display()
    );
    out
}
