//! Plain data shared by the cprof eBPF programs (`profiler-ebpf`) and the userspace agent
//! (`profiler`): map keys and values, map names and sizes, and the indices of the per-CPU
//! statistics array.
//!
//! Every type is `#[repr(C)]`, `Copy`, has explicit padding and a size asserted at compile time, so
//! both sides agree on the layout byte for byte.
#![no_std]

/// Length of a task's `comm` as the kernel stores it (including the NUL).
pub const TASK_COMM_LEN: usize = 16;

/// Deepest stack the kernel's stack-trace maps keep (`PERF_MAX_STACK_DEPTH`).
pub const MAX_STACK_DEPTH: usize = 127;

/// Stack id stored in a [`SampleKey`] when the stack could not be captured.
pub const NO_STACK: i32 = -1;

/// Names of the maps in the on-CPU program's object, shared so userspace finds them.
pub mod maps {
    /// Sample counts, buffer A: [`super::SampleKey`] -> `u64`.
    pub const COUNTS_A: &str = "COUNTS_A";
    /// Sample counts, buffer B.
    pub const COUNTS_B: &str = "COUNTS_B";
    /// Stack traces referenced by `COUNTS_A`.
    pub const STACKS_A: &str = "STACKS_A";
    /// Stack traces referenced by `COUNTS_B`.
    pub const STACKS_B: &str = "STACKS_B";
    /// Which buffer the programs write to: one `u32`, 0 for A, 1 for B.
    pub const ACTIVE_BUFFER: &str = "ACTIVE_BUFFER";
    /// Processes (tgids) to sample when `FILTER_PIDS` is set: `u32` -> `u8`.
    pub const TARGET_PIDS: &str = "TARGET_PIDS";
    /// Per-CPU counters, indexed by [`super::stat`].
    pub const STATS: &str = "STATS";

    /// Default number of distinct (pid, tid, comm, stacks) keys per buffer.
    pub const COUNTS_MAX_ENTRIES: u32 = 16_384;
    /// Default number of distinct stacks per buffer (user and kernel stacks share it).
    pub const STACKS_MAX_ENTRIES: u32 = 16_384;
    /// Most processes `--pid` may name.
    pub const TARGET_PIDS_MAX_ENTRIES: u32 = 1_024;
}

/// Names of the read-only globals the loader sets (`EbpfLoader::override_global`).
pub mod globals {
    /// `u32`: 1 when only the processes in `TARGET_PIDS` are sampled.
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
}

/// Indices into the per-CPU `STATS` array. Every way a sample can end is counted, so that
/// `SAMPLES_SEEN == IDLE + FILTERED + RECORDED + DROPPED_COUNTS_FULL` holds.
pub mod stat {
    /// `perf_event` samples the program ran for.
    pub const SAMPLES_SEEN: u32 = 0;
    /// Samples of the idle task (pid 0), not recorded.
    pub const SAMPLES_IDLE: u32 = 1;
    /// Samples of processes outside the pid filter.
    pub const SAMPLES_FILTERED: u32 = 2;
    /// Samples added to the counts map.
    pub const SAMPLES_RECORDED: u32 = 3;
    /// Samples lost because the counts map was full.
    pub const DROPPED_COUNTS_FULL: u32 = 4;
    /// User stacks not captured: stack map full (`-ENOMEM`).
    pub const USER_STACK_MAP_FULL: u32 = 5;
    /// User stacks not captured: hash bucket taken by another stack (`-EEXIST`).
    pub const USER_STACK_COLLISION: u32 = 6;
    /// User stacks not captured for another reason (`-EFAULT` for kernel threads included).
    pub const USER_STACK_OTHER: u32 = 7;
    /// Kernel stacks not captured: stack map full (`-ENOMEM`).
    pub const KERNEL_STACK_MAP_FULL: u32 = 8;
    /// Kernel stacks not captured: hash bucket taken by another stack (`-EEXIST`).
    pub const KERNEL_STACK_COLLISION: u32 = 9;
    /// Kernel stacks not captured for another reason.
    pub const KERNEL_STACK_OTHER: u32 = 10;
    /// Number of counters.
    pub const COUNT: u32 = 11;
}

/// Key of the in-kernel on-CPU aggregate: one entry per distinct thread and pair of stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Id in the active `STACKS_*` map, or [`NO_STACK`].
    pub user_stack_id: i32,
    /// Id in the active `STACKS_*` map, or [`NO_STACK`].
    pub kernel_stack_id: i32,
    /// The thread's name, NUL padded.
    pub comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(size_of::<SampleKey>() == 32);

#[cfg(feature = "user")]
// SAFETY: `SampleKey` is `repr(C)`, has no padding and every bit pattern is valid.
unsafe impl aya::Pod for SampleKey {}
