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
pub enum Command {
    /// Record on-CPU stacks of some processes (or all) and write DIR/cpu.pb.gz.
    ///
    /// Needs `CAP_BPF` and `CAP_PERFMON` (root has them); `CAP_SYS_PTRACE` to symbolize other users'
    /// processes and `CAP_SYSLOG` for kernel symbols.
    ///
    /// Examples:
    ///
    ///   sudo cprof record --pid 1234 --duration 30
    ///
    ///   sudo cprof record --frequency 999 --output /tmp/prof   (every process, until Ctrl-C)
    ///
    ///   go tool pprof -top /tmp/prof/cpu.pb.gz
    #[command(verbatim_doc_comment)]
    Record(RecordArgs),
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

    /// Directory for the output files, created if missing. Default: ./cprof-<UTC timestamp>.
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
