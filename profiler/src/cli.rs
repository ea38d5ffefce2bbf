//! Command-line flags, parsed into plain values; [`crate::config`] validates them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// cprof: a low-overhead eBPF profiler for Linux.
///
/// Samples what processes run on the CPU, with user and kernel stacks, and writes gzipped pprof
/// that `go tool pprof`, speedscope and profiling backends open.
#[derive(Debug, Parser)]
#[command(name = "cprof", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::doc_markdown,
    reason = "doc comments are the --help text: URLs and names stay plain"
)]
pub enum Command {
    /// Record on-CPU stacks of some processes (or all) and write DIR/cpu.pb.gz.
    ///
    /// Needs `CAP_BPF` and `CAP_PERFMON` (root has them); `CAP_SYS_PTRACE` to symbolize other users'
    /// processes, `CAP_DAC_READ_SEARCH` for binaries their permissions hide, `CAP_SYSLOG` for
    /// kernel symbols. Once attached, cprof drops all but the last three (and sets no_new_privs).
    ///
    /// Examples:
    ///
    ///   sudo cprof record --pid 1234 --duration 30
    ///
    ///   sudo cprof record --frequency 999 --output ./prof   (every process, until Ctrl-C)
    ///
    ///   go tool pprof -top ./prof/cpu.pb.gz
    #[command(verbatim_doc_comment)]
    Record(RecordArgs),

    /// Profile continuously: one set of files per window, Prometheus metrics, optional push.
    ///
    /// Runs until SIGTERM or SIGINT (the current window is written first). Every window writes
    /// its files into the output directory, named by signal and window start in UTC
    /// (cpu-20261122T101500Z.pb.gz, syscall-latency-20261122T101500Z.json, ...); the oldest are
    /// deleted past --retain-age or --retain-size. Samples carry the process's cgroup and
    /// container id as pprof labels, so one agent per host profiles every container.
    ///
    /// Every flag can also be set in a TOML file (--config), under the flag's name without the
    /// dashes (interval = "60s", event = "cpu,offcpu", pid = [1234], retain-size = "1GiB");
    /// flags given on the command line win.
    ///
    /// Examples:
    ///
    ///   sudo cprof agent                                  (every process, 60 s windows)
    ///
    ///   sudo cprof agent --cgroup /sys/fs/cgroup/kubepods.slice --event cpu,offcpu
    ///
    ///   sudo cprof agent --push-pyroscope http://pyroscope:4040 --service-name checkout
    ///
    ///   curl -s 127.0.0.1:9464/metrics
    #[command(verbatim_doc_comment)]
    Agent(Box<AgentArgs>),
}

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Process to profile (repeat for several). Default: every process on the host, each sample
    /// labelled with its pid and comm.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// How long to record: seconds, or a number with a unit (500ms, 30s, 5m, 1h). Default: until
    /// Ctrl-C (SIGINT) or SIGTERM; either one also ends a timed recording early, and what was
    /// collected is written.
    #[arg(long, short = 'd', value_name = "DURATION")]
    pub duration: Option<String>,

    /// What to record, a comma list of: cpu, offcpu, syscall, tcp, all.
    #[arg(
        long = "event",
        short = 'e',
        value_name = "LIST",
        default_value = "cpu"
    )]
    pub events: String,

    /// Samples per second on each CPU (cpu-clock software event, 1 to 10000).
    #[arg(long, short = 'F', value_name = "HZ", default_value_t = 99)]
    pub frequency: u64,

    /// Directory for the output files, created 0700 if missing. Default: ./cprof-<UTC timestamp>.
    /// Refused when it is a symlink, not ours, writable by group or others, or directly in a
    /// directory everyone may write to (/tmp).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: Option<PathBuf>,

    /// How often userspace drains the kernel's aggregates, for example 1s.
    #[arg(long, value_name = "DURATION", default_value = "1s", hide = true)]
    pub drain_interval: String,

    /// Distinct stacks each in-kernel buffer holds (two buffers alternate). Raise it when the
    /// summary reports lost stacks.
    #[arg(long, value_name = "N", default_value_t = profiler_common::maps::STACKS_MAX_ENTRIES)]
    pub stack_map_size: u32,

    /// Distinct (thread, stack) pairs each in-kernel buffer holds. Raise it when the summary
    /// reports lost samples.
    #[arg(long, value_name = "N", default_value_t = profiler_common::maps::COUNTS_MAX_ENTRIES)]
    pub count_map_size: u32,

    /// Bytes of the TCP event ring buffer (a power of two, at least 4096). Raise it when the
    /// summary reports lost TCP events.
    #[arg(long, value_name = "BYTES", default_value_t = profiler_common::maps::TCP_EVENTS_BYTES, hide = true)]
    pub tcp_buffer_size: u32,

    /// Off-CPU waits shorter than this are not recorded (filtered in the kernel): 1us keeps
    /// every wait a user could act on and skips the sub-microsecond switches that cost more to
    /// record than they say.
    #[arg(long = "off-cpu-min", value_name = "DURATION", default_value = "1us")]
    pub off_cpu_min: String,

    /// Threads the kernel tracks while they are switched out (least recently used are evicted
    /// past it, and counted).
    #[arg(long = "off-cpu-threads", value_name = "N",
          default_value_t = profiler_common::maps::OFFCPU_START_MAX_ENTRIES)]
    pub off_cpu_threads: u32,

    /// Syscalls at least this slow have the stack that made them recorded (syscall.pb.gz):
    /// 1ms is slower than a fast disk read or a local round trip, the scale where a syscall is
    /// worth a look, and rare enough that capturing stacks costs nothing noticeable.
    #[arg(long = "syscall-slow", value_name = "DURATION", default_value = "1ms")]
    pub syscall_slow: String,

    /// How many functions the summary lists.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub top: usize,
}

/// Flags of `cprof agent`. Every value is optional here: the config file fills what the command
/// line leaves out, and built-in defaults the rest (see [`crate::agent::config`]).
#[derive(Debug, Default, Args)]
#[expect(
    clippy::doc_markdown,
    reason = "doc comments are the --help text: URLs and names stay plain"
)]
pub struct AgentArgs {
    /// TOML file with any of the flags below (keys are the flag names: interval, retain-age,
    /// push-pyroscope, ...). Flags on the command line override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the flags and config file, print the settings in effect and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Process to profile (repeat for several). With neither --pid nor --cgroup: every process.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// cgroup v2 directory whose processes (and those of every cgroup below it, including
    /// cgroups created later) are profiled; repeat for several. Absolute, or relative to the
    /// cgroup2 mount (kubepods.slice).
    #[arg(long = "cgroup", value_name = "PATH")]
    pub cgroups: Vec<PathBuf>,

    /// What to record, a comma list of: cpu, offcpu, syscall, tcp, all. [default: cpu]
    #[arg(long = "event", short = 'e', value_name = "LIST")]
    pub events: Option<String>,

    /// Whose pids: "host" records every task with host pids; "self" records only the tasks of
    /// the agent's own pid namespace, with the pids that namespace sees (a sidecar in a pod with
    /// shareProcessNamespace: the pod's processes, symbolized through the pod's /proc).
    /// [default: host]
    #[arg(long, value_name = "host|self")]
    pub pid_namespace: Option<String>,

    /// Length of a window: each one writes its own set of files. [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,

    /// Where windows are written (created 0700 if missing). [default: /var/lib/cprof]
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Delete window files older than this. [default: 24h]
    #[arg(long, value_name = "DURATION")]
    pub retain_age: Option<String>,

    /// Delete the oldest window files while all of them together exceed this (B, KiB, MiB,
    /// GiB; KB, MB, GB). The push spool has the same caps. [default: 1GiB]
    #[arg(long, value_name = "SIZE")]
    pub retain_size: Option<String>,

    /// On-CPU samples per second on each CPU (1 to 10000). [default: 99]
    #[arg(long, short = 'F', value_name = "HZ")]
    pub frequency: Option<u64>,

    /// Address of the Prometheus endpoint (GET /metrics), or "off". Loopback unless told
    /// otherwise. [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<String>,

    /// Grafana Pyroscope base URL (http://host:4040 or https://...): each window's profiles are
    /// pushed to its /push.v1.PusherService/Push API; kept in a spool while it is unreachable.
    #[arg(long, value_name = "URL")]
    pub push_pyroscope: Option<String>,

    /// File holding "user:password" for HTTP basic auth on the push.
    #[arg(long, value_name = "FILE")]
    pub push_basic_auth_file: Option<PathBuf>,

    /// File holding a bearer token for the push.
    #[arg(long, value_name = "FILE")]
    pub push_bearer_token_file: Option<PathBuf>,

    /// Tenant sent as X-Scope-OrgID on the push (multi-tenant Pyroscope).
    #[arg(long, value_name = "ID")]
    pub push_tenant: Option<String>,

    /// The service_name label of pushed profiles. [default: each process's command name]
    #[arg(long, value_name = "NAME")]
    pub service_name: Option<String>,

    /// Distinct stacks each in-kernel buffer holds. [default: 16384]
    #[arg(long, value_name = "N")]
    pub stack_map_size: Option<u32>,

    /// Distinct (thread, stack) pairs each in-kernel buffer holds. [default: 16384]
    #[arg(long, value_name = "N")]
    pub count_map_size: Option<u32>,

    /// Off-CPU waits shorter than this are not recorded. [default: 1us]
    #[arg(long = "off-cpu-min", value_name = "DURATION")]
    pub off_cpu_min: Option<String>,

    /// Threads the kernel tracks while they are switched out. [default: 32768]
    #[arg(long = "off-cpu-threads", value_name = "N")]
    pub off_cpu_threads: Option<u32>,

    /// Syscalls at least this slow have their stacks recorded. [default: 1ms]
    #[arg(long = "syscall-slow", value_name = "DURATION")]
    pub syscall_slow: Option<String>,

    /// How often the kernel's aggregates are drained within a window.
    #[arg(long, value_name = "DURATION", hide = true)]
    pub drain_interval: Option<String>,
}
