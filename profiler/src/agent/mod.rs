//! `cprof agent`: profile continuously in windows. Each window's files are written atomically into
//! the output directory, named by signal and window start; retention deletes the oldest; the
//! Prometheus endpoint serves latency histograms and the agent's health; a pusher sends each
//! window to a profiling backend.
//!
//! - [`config`]: flags over a TOML file over defaults.
//! - [`targets`]: the cgroups recorded under `--cgroup`.
//! - [`retention`]: deleting old windows.
//! - [`metrics`]: the Prometheus endpoint.

pub mod config;
pub mod metrics;
pub mod retention;
pub mod targets;

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use self::config::AgentConfig;
use self::metrics::{Health, Metrics};
use self::retention::Retention;
use crate::bpf::ProbeStats;
use crate::output::OutputDir;
use crate::pprof;
use crate::push::{PreparedPusher, PushJob, Pusher, Series, SpoolCaps};
use crate::record::{Outcome, RecordReport, write_profiles};
use crate::session::{Session, TCP_RING_INTERVAL, check_privileges};
use crate::{civil, output, procfs};

/// Parsed files the symbolizer keeps before it starts afresh (at a window's end).
const SYMBOLIZER_MAX_FILES: usize = 256;

/// The window being collected.
struct Window {
    started_wall: SystemTime,
    started: Instant,
    /// Probe counters when it started.
    stats_before: ProbeStats,
}

struct Agent<'c> {
    config: &'c AgentConfig,
    out: OutputDir,
    session: Session,
    metrics: Metrics,
    window: Window,
    pusher: Option<Pusher>,
    /// Unix second of the last window's stamp: stamps are unique (a short last window, or one
    /// cut short by a slow drain, can start within the second of the one before).
    last_stamp: Option<u64>,
}

/// How long a stopping agent waits for an in-flight push (the rest stays in the spool).
const PUSH_SHUTDOWN: Duration = Duration::from_secs(2);

/// The time a window is named after: its start, moved to the second after the previous window's
/// when it falls within it, so that no window's files replace another's.
fn unique_stamp_time(started: SystemTime, last: &mut Option<u64>) -> SystemTime {
    let secs = started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let secs = last.map_or(secs, |last| secs.max(last + 1));
    *last = Some(secs);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Runs until SIGTERM/SIGINT (or, with `--pid`, until every target exited); writes the current
/// window before returning.
pub async fn run(config: &AgentConfig) -> anyhow::Result<()> {
    check_privileges()?;
    // Everything that can fail on a bad setting comes before the probes are attached; the
    // threads (metrics, push) start after the capabilities are dropped (see `privilege`).
    let out = output::prepare_dir(&config.record.output_dir)?;
    let metrics = Metrics::default();
    let listener = config.metrics_addr.map(metrics::bind).transpose()?;
    let pusher = match &config.push {
        Some(settings) => Some(Pusher::prepare(
            settings,
            &out.join("spool"),
            SpoolCaps {
                max_bytes: config.retain_bytes,
                max_age: config.retain_age,
            },
        )?),
        None => None,
    };
    let cgroup_filter = !config.cgroups.is_empty();
    let pid_namespace = if config.own_pid_namespace {
        Some(crate::session::own_pid_namespace()?)
    } else {
        None
    };
    let mut session = Session::start_in(&config.record, cgroup_filter, pid_namespace)?;
    if let Some(listener) = listener {
        listener.serve(metrics.clone())?;
    }
    let pusher = pusher.map(PreparedPusher::start).transpose()?;
    if cgroup_filter {
        refresh_cgroups(&mut session, config)?;
    }
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    eprintln!("cprof: agent {}", describe(config));

    let mut agent = Agent {
        config,
        out,
        session,
        metrics,
        window: Window {
            started_wall: SystemTime::now(),
            started: Instant::now(),
            stats_before: ProbeStats::default(),
        },
        pusher,
        last_stamp: None,
    };
    let start = tokio::time::Instant::now();
    let mut drain_tick = tokio::time::interval_at(
        start + config.record.drain_interval,
        config.record.drain_interval,
    );
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut window_tick = tokio::time::interval_at(start + config.interval, config.interval);
    window_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ring_tick = tokio::time::interval(TCP_RING_INTERVAL);
    ring_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let stop_reason = loop {
        tokio::select! {
            _ = sigint.recv() => break "interrupted (SIGINT)",
            _ = sigterm.recv() => break "terminated (SIGTERM)",
            _ = ring_tick.tick(), if config.record.events.tcp => agent.session.read_tcp_ring(),
            _ = window_tick.tick() => {
                agent.drain().await?;
                agent.end_window("window complete")?;
            }
            _ = drain_tick.tick() => {
                agent.drain().await?;
                if cgroup_filter {
                    refresh_cgroups(&mut agent.session, config)?;
                }
                if let Some(pids) = &config.record.pids
                    && !pids.iter().any(|&pid| procfs::process_alive(pid))
                {
                    break "every target process exited";
                }
            }
        }
    };
    // As in `record`: detach, then drain both buffers, so the last window is complete.
    agent.session.probes.stop()?;
    agent.drain().await?;
    agent.drain().await?;
    agent.end_window(stop_reason)?;
    if let Some(pusher) = agent.pusher.take() {
        pusher.shutdown(PUSH_SHUTDOWN);
    }
    eprintln!("cprof: agent stopped: {stop_reason}");
    Ok(())
}

impl Agent<'_> {
    async fn drain(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let metrics = &self.metrics;
        self.session.drain(|d, s| metrics.observe(d, s)).await?;
        self.update_health()?;
        tracing::debug!("drain took {:?}", started.elapsed());
        Ok(())
    }

    fn update_health(&self) -> anyhow::Result<()> {
        let symbols = &self.session.symbols;
        self.metrics.set_health(Health {
            probe: self.session.probes.stats()?,
            unsymbolized: symbols.stats.unsymbolized,
            processes_unreadable: symbols.stats.processes_unreadable,
            files_refused: symbols.stats.files_refused,
            programs: self.session.probes.program_stats(),
            symbol_cache: symbols.cache_sizes(),
            push: self.pusher.as_ref().map(Pusher::stats).unwrap_or_default(),
        });
        Ok(())
    }

    /// Writes the window's files, starts the next window, applies retention.
    fn end_window(&mut self, reason: &'static str) -> anyhow::Result<()> {
        let started = Instant::now();
        let stats = self.session.probes.stats()?;
        let profiles = self.session.take_profiles();
        let window = std::mem::replace(
            &mut self.window,
            Window {
                started_wall: SystemTime::now(),
                started: Instant::now(),
                stats_before: stats,
            },
        );
        let stamp = civil::utc_stamp(unique_stamp_time(window.started_wall, &mut self.last_stamp));
        let outcome = Outcome {
            started_wall: window.started_wall,
            elapsed: window.started.elapsed(),
            stop_reason: reason,
            stats: stats.since(&window.stats_before),
            still_waiting: self.session.probes.offcpu_waiting(),
        };
        let written = write_profiles(
            &self.config.record,
            &self.out,
            &self.session.symbols,
            &profiles,
            &outcome,
            &format!("-{stamp}"),
        );
        drop(profiles);
        // Hand what the window's files took back to the system: glibc keeps freed memory in its
        // arenas, and a busy window's files can take hundreds of MB to build.
        // SAFETY: malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };
        match &written {
            Ok(report) => {
                self.metrics.window_written(true);
                eprintln!("cprof: window {stamp}: {}", window_line(report));
                if let Some(pusher) = &self.pusher {
                    self.push(pusher, report, &stamp);
                }
            }
            Err(e) => {
                // A full disk must not stop the profiling: the next window tries again.
                self.metrics.window_written(false);
                eprintln!("cprof: window {stamp}: not written: {e:#}");
            }
        }
        self.session.symbols.forget_exited();
        self.session.symbolizer.trim(SYMBOLIZER_MAX_FILES);
        self.metrics.forget_exited();
        let retention = Retention {
            max_age: self.config.retain_age,
            max_bytes: self.config.retain_bytes,
        };
        match retention::enforce(&self.out.fd_path(), retention, SystemTime::now()) {
            Ok(pass) if pass.deleted_files > 0 => tracing::info!(
                "retention: deleted {} files ({} bytes), keeping {} bytes",
                pass.deleted_files,
                pass.deleted_bytes,
                pass.kept_bytes
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("retention: {e}"),
        }
        tracing::debug!("window end took {:?}", started.elapsed());
        self.update_health()
    }
}

impl Agent<'_> {
    /// Hands each pprof of a written window to the pusher: one request per signal, one series per
    /// service (`--service-name`, or each process's name).
    fn push(&self, pusher: &Pusher, report: &RecordReport, stamp: &str) {
        for path in &report.files {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(signal) = name.strip_suffix(&format!("-{stamp}.pb.gz")) else {
                continue;
            };
            let job = std::fs::read(self.out.fd_path().join(name))
                .map_err(anyhow::Error::from)
                .and_then(|bytes| {
                    push_job(signal, stamp, &bytes, self.config.service_name.as_deref())
                })
                .and_then(|job| pusher.submit(job));
            if let Err(e) = job {
                tracing::warn!("push of {name}: {e:#}");
            }
        }
    }
}

/// Pyroscope's `__name__` for each of our signals.
fn profile_name(signal: &str) -> String {
    match signal {
        "cpu" => "process_cpu".to_owned(),
        "offcpu" => "off_cpu".to_owned(),
        "offwake" => "off_wake".to_owned(),
        other => other.to_owned(),
    }
}

/// The push request of one window's pprof of `signal`.
fn push_job(
    signal: &str,
    stamp: &str,
    pprof_gz: &[u8],
    service_name: Option<&str>,
) -> anyhow::Result<PushJob> {
    let labels = |service: &str| {
        vec![
            ("__name__".to_owned(), profile_name(signal)),
            ("service_name".to_owned(), service.to_owned()),
            ("cprof_signal".to_owned(), signal.to_owned()),
        ]
    };
    let series = if let Some(service) = service_name {
        vec![Series {
            labels: labels(service),
            pprof_gz: pprof_gz.to_vec(),
        }]
    } else {
        let profile = pprof::decode(pprof_gz).context("decoding the window's pprof")?;
        pprof::split_by_label(&profile, "process")
            .into_iter()
            .map(|(process, part)| Series {
                labels: labels(if process.is_empty() {
                    "unknown"
                } else {
                    &process
                }),
                pprof_gz: pprof::encode_gzip(&part),
            })
            .collect()
    };
    Ok(PushJob {
        name: format!("{signal}-{stamp}"),
        series,
    })
}

/// One line about a written window.
fn window_line(report: &RecordReport) -> String {
    let mut parts = vec![format!("{} files", report.files.len())];
    if let Some(cpu) = &report.cpu {
        parts.push(format!(
            "{} samples (lost {})",
            cpu.samples,
            report.stats.lost_samples()
        ));
    }
    if let Some(off) = &report.offcpu {
        parts.push(format!("{} waits", off.waits));
    }
    if let Some(sys) = &report.syscall {
        parts.push(format!(
            "{} syscalls",
            sys.rows.iter().map(|r| r.count).sum::<u64>()
        ));
    }
    if let Some(tcp) = &report.tcp {
        parts.push(format!("{} TCP events", tcp.events));
    }
    parts.join(", ")
}

fn refresh_cgroups(session: &mut Session, config: &AgentConfig) -> anyhow::Result<()> {
    let ids = targets::cgroup_ids(&config.cgroups);
    let full = session.probes.set_cgroups(&ids)?;
    if full > 0 {
        tracing::warn!("{full} cgroups not recorded: the target cgroup map is full");
    }
    Ok(())
}

fn describe(config: &AgentConfig) -> String {
    let r = &config.record;
    let events = r.events.names();
    let whom = match (&r.pids, config.cgroups.is_empty()) {
        (Some(pids), _) => format!("pid {pids:?}"),
        (None, false) => format!(
            "cgroups {}",
            config
                .cgroups
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (None, true) if config.own_pid_namespace => "every process of our pid namespace".to_owned(),
        (None, true) => "every process".to_owned(),
    };
    let metrics = config.metrics_addr.map_or_else(
        || "metrics off".to_owned(),
        |a| format!("metrics on http://{a}/metrics"),
    );
    format!(
        "recording {} of {whom}; windows of {:?} into {}; {metrics}",
        events.join(","),
        config.interval,
        r.output_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_stamps_never_repeat() {
        let at = |s: u64, ms: u64| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms)
        };
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let mut last = None;
        assert_eq!(secs(unique_stamp_time(at(100, 200), &mut last)), 100);
        // A window starting within the same second is named after the next one.
        assert_eq!(secs(unique_stamp_time(at(100, 900), &mut last)), 101);
        assert_eq!(secs(unique_stamp_time(at(101, 100), &mut last)), 102);
        // Once time has moved past, stamps follow it again.
        assert_eq!(secs(unique_stamp_time(at(160, 0), &mut last)), 160);
    }
}
