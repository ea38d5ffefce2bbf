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
    /// Control words for the programs, `u32`s: at index 0 which buffer they write to (0 for A,
    /// 1 for B); at [`OFFCPU_PAUSED`] nonzero while userspace resets `OFFCPU_STACKS`.
    pub const ACTIVE_BUFFER: &str = "ACTIVE_BUFFER";
    /// Index in `ACTIVE_BUFFER`: off-CPU programs stand still (no new waits, ending waits are
    /// discarded) while nonzero.
    pub const OFFCPU_PAUSED: u32 = 1;
    /// Processes (tgids) to record when `FILTER_PIDS` has [`super::filter::PIDS`]: `u32` -> `u8`.
    pub const TARGET_PIDS: &str = "TARGET_PIDS";
    /// cgroup v2 ids (the directories' inode numbers) whose processes are recorded when
    /// `FILTER_PIDS` has [`super::filter::CGROUPS`]: `u64` -> `u8`.
    pub const TARGET_CGROUPS: &str = "TARGET_CGROUPS";
    /// Per-CPU counters, indexed by [`super::stat`].
    pub const STATS: &str = "STATS";

    /// Off-CPU waits, buffer A: [`super::OffCpuKey`] -> [`super::OffCpuValue`].
    pub const OFFCPU_A: &str = "OFFCPU_A";
    /// Off-CPU waits, buffer B.
    pub const OFFCPU_B: &str = "OFFCPU_B";
    /// Stacks of blocked threads and their wakers. Not double-buffered: a wait can outlive a
    /// drain, so its stack ids must stay valid; ids are stable and userspace caches them.
    pub const OFFCPU_STACKS: &str = "OFFCPU_STACKS";
    /// Threads switched out and not yet back: tid -> [`super::OffCpuStart`] (LRU).
    pub const OFFCPU_START: &str = "OFFCPU_START";

    /// Syscall latency, buffer A: [`super::SyscallKey`] -> [`super::SyscallStats`].
    pub const SYSCALLS_A: &str = "SYSCALLS_A";
    /// Syscall latency, buffer B.
    pub const SYSCALLS_B: &str = "SYSCALLS_B";
    /// Failed syscalls, buffer A: [`super::ErrnoKey`] -> `u64`.
    pub const ERRNOS_A: &str = "ERRNOS_A";
    /// Failed syscalls, buffer B.
    pub const ERRNOS_B: &str = "ERRNOS_B";
    /// Slow syscalls, buffer A: [`super::SlowKey`] -> [`super::OffCpuValue`] (time, count);
    /// stacks in `STACKS_A`.
    pub const SLOW_A: &str = "SLOW_A";
    /// Slow syscalls, buffer B; stacks in `STACKS_B`.
    pub const SLOW_B: &str = "SLOW_B";
    /// Threads inside a syscall: tid -> [`super::SyscallStart`] (LRU).
    pub const SYSCALL_START: &str = "SYSCALL_START";
    /// Syscall numbers whose return value is a byte count: `u32` nr -> `u32` 1.
    pub const BYTE_SYSCALLS: &str = "BYTE_SYSCALLS";
    /// A zeroed [`super::SyscallStats`], the template for new entries (too large for the stack).
    pub const SYSCALL_ZERO: &str = "SYSCALL_ZERO";

    /// TCP events for userspace (ring buffer of [`super::TcpEvent`]).
    pub const TCP_EVENTS: &str = "TCP_EVENTS";
    /// Sockets opened by recorded processes: `u64` sock address -> [`super::TcpSock`].
    pub const TCP_SOCKS: &str = "TCP_SOCKS";
    /// Listening sockets' owners: `u32` (family << 16 | port) -> [`super::TcpSock`].
    pub const TCP_LISTENERS: &str = "TCP_LISTENERS";
    /// Stacks of the code that opened connections (ids stable, not cleared).
    pub const TCP_STACKS: &str = "TCP_STACKS";
    /// Default ring buffer size in bytes.
    pub const TCP_EVENTS_BYTES: u32 = 4 << 20;
    /// Default number of tracked sockets.
    pub const TCP_SOCKS_MAX_ENTRIES: u32 = 65_536;

    /// Default number of (pid, syscall) histograms per buffer.
    pub const SYSCALLS_MAX_ENTRIES: u32 = 4_096;
    /// Default number of (pid, syscall, errno) counters per buffer.
    pub const ERRNOS_MAX_ENTRIES: u32 = 4_096;
    /// Default number of distinct slow-syscall stacks per buffer.
    pub const SLOW_MAX_ENTRIES: u32 = 4_096;
    /// Threads tracked inside a syscall.
    pub const SYSCALL_START_MAX_ENTRIES: u32 = 32_768;
    /// Syscall numbers covered by `BYTE_SYSCALLS`.
    pub const MAX_SYSCALL_NR: u32 = 1_024;

    /// Default number of distinct (pid, tid, comm, stacks) keys per buffer.
    pub const COUNTS_MAX_ENTRIES: u32 = 16_384;
    /// Default number of distinct stacks per buffer (user and kernel stacks share it).
    pub const STACKS_MAX_ENTRIES: u32 = 16_384;
    /// Default number of distinct off-CPU keys per buffer.
    pub const OFFCPU_MAX_ENTRIES: u32 = 16_384;
    /// Default number of distinct off-CPU and waker stacks.
    pub const OFFCPU_STACKS_MAX_ENTRIES: u32 = 16_384;
    /// Default number of threads tracked while switched out.
    pub const OFFCPU_START_MAX_ENTRIES: u32 = 32_768;
    /// Most processes `--pid` may name.
    pub const TARGET_PIDS_MAX_ENTRIES: u32 = 1_024;
    /// Most cgroups (watched directories and every one below them) `--cgroup` may cover.
    pub const TARGET_CGROUPS_MAX_ENTRIES: u32 = 16_384;
}

/// Bits of the `FILTER_PIDS` global: which processes are recorded (none set: every process).
pub mod filter {
    /// The tgids in `TARGET_PIDS`.
    pub const PIDS: u32 = 1;
    /// The processes whose cgroup is in `TARGET_CGROUPS`.
    pub const CGROUPS: u32 = 2;
}

/// Names of the read-only globals the loader sets (`EbpfLoader::override_global`).
pub mod globals {
    /// `u32`: [`super::filter`] bits; 0 records every process.
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    /// `u32`: byte offset of `pid` in `struct task_struct`, read from the kernel's BTF.
    pub const TASK_PID_OFFSET: &str = "TASK_PID_OFFSET";
    /// `u64`: waits shorter than this many nanoseconds are not recorded.
    pub const OFFCPU_MIN_NS: &str = "OFFCPU_MIN_NS";
    /// `u64`: syscalls at least this slow have their stacks recorded.
    pub const SYSCALL_SLOW_NS: &str = "SYSCALL_SLOW_NS";
    /// `u64` device and `u64` inode of the pid namespace pids are reported in (inode 0: the
    /// host's); tasks outside it are not recorded.
    pub const PIDNS_DEV: &str = "PIDNS_DEV";
    pub const PIDNS_INO: &str = "PIDNS_INO";
    /// [`super::TcpOffsets`]: where socket fields are, read from the kernel's BTF.
    pub const TCP_OFFSETS: &str = "TCP_OFFSETS";
}

/// Indices into the per-CPU `STATS` array. Every way a sample can end is counted, so that
/// `SAMPLES_SEEN == IDLE + FILTERED + RECORDED + DROPPED_COUNTS_FULL` holds, and likewise
/// `OFFCPU_STARTS == OFFCPU_ENDS + OFFCPU_REPLACED + OFFCPU_DISCARDED + evicted + still waiting` and
/// `OFFCPU_ENDS == OFFCPU_RECORDED + OFFCPU_SHORT + OFFCPU_DROPPED_FULL`.
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
    /// Target threads switched out (a wait started and was stored).
    pub const OFFCPU_STARTS: u32 = 11;
    /// Waits that ended (the thread was switched back in and its start found).
    pub const OFFCPU_ENDS: u32 = 12;
    /// Waits added to the off-CPU aggregate.
    pub const OFFCPU_RECORDED: u32 = 13;
    /// Waits shorter than `--off-cpu-min`, not recorded.
    pub const OFFCPU_SHORT: u32 = 14;
    /// Waits lost because the off-CPU aggregate was full.
    pub const OFFCPU_DROPPED_FULL: u32 = 15;
    /// Off-CPU or waker stacks not captured: stack map full.
    pub const OFFCPU_STACK_MAP_FULL: u32 = 16;
    /// Off-CPU or waker stacks not captured: bucket taken by another stack.
    pub const OFFCPU_STACK_COLLISION: u32 = 17;
    /// Wakeups of a waiting target thread whose waker was recorded.
    pub const OFFCPU_WAKERS: u32 = 18;
    /// Reading `task_struct.pid` failed.
    pub const OFFCPU_READ_ERRORS: u32 = 19;
    /// A thread's wait start replaced an older one that never ended (its switch-in was missed).
    pub const OFFCPU_REPLACED: u32 = 20;
    /// Syscalls entered by target threads.
    pub const SYSCALL_ENTERS: u32 = 21;
    /// Syscalls that returned and were added to a histogram.
    pub const SYSCALL_RECORDED: u32 = 22;
    /// Syscalls lost because the histogram map was full.
    pub const SYSCALL_DROPPED_FULL: u32 = 23;
    /// Failed syscalls whose errno could not be counted (errno map full).
    pub const SYSCALL_ERRNO_DROPPED: u32 = 24;
    /// Slow syscalls whose stack was recorded.
    pub const SYSCALL_SLOW: u32 = 25;
    /// Slow syscalls lost: slow-stack map full or stack not captured.
    pub const SYSCALL_SLOW_DROPPED: u32 = 26;
    /// TCP events sent to userspace.
    pub const TCP_EVENTS_SENT: u32 = 27;
    /// TCP events lost: the ring buffer was full.
    pub const TCP_EVENTS_LOST: u32 = 28;
    /// Sockets not tracked: the socket map was full.
    pub const TCP_SOCKS_FULL: u32 = 29;
    /// Waits dropped by a reset of the off-CPU stack map: ended while it ran, or pending when
    /// it ran (those userspace adds when it reports the counters).
    pub const OFFCPU_DISCARDED: u32 = 30;
    /// Resets of the off-CPU stack map (counted by userspace, which runs them).
    pub const OFFCPU_STACK_RESETS: u32 = 31;
    /// Number of counters.
    pub const COUNT: u32 = 32;
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

/// Task states as cprof records them (the low bits of the kernel's `__state`, with preemption
/// folded into [`task_state::RUNNING`]).
pub mod task_state {
    /// Runnable: switched out involuntarily (preempted), waiting for a CPU.
    pub const RUNNING: u32 = 0;
    pub const INTERRUPTIBLE: u32 = 0x1;
    pub const UNINTERRUPTIBLE: u32 = 0x2;
    pub const STOPPED: u32 = 0x4;
    pub const TRACED: u32 = 0x8;
    pub const DEAD: u32 = 0x80;
    pub const NOLOAD: u32 = 0x400;
}

/// A target thread that was switched out: where, when, and (once known) who woke it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffCpuStart {
    /// `bpf_ktime_get_ns` at switch-out.
    pub start_ns: u64,
    pub pid: u32,
    /// A [`task_state`] value.
    pub state: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    /// 0 until a waker is recorded.
    pub waker_pid: u32,
    pub waker_user_stack_id: i32,
    pub waker_kernel_stack_id: i32,
    /// Explicit padding, always 0.
    pub pad: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub waker_comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(size_of::<OffCpuStart>() == 72);

/// Key of the in-kernel off-CPU aggregate: the waiting thread and its stacks, the state it
/// waited in, and its waker (`waker_pid` 0: none recorded).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OffCpuKey {
    pub pid: u32,
    pub tid: u32,
    pub state: u32,
    pub user_stack_id: i32,
    pub kernel_stack_id: i32,
    pub waker_pid: u32,
    pub waker_user_stack_id: i32,
    pub waker_kernel_stack_id: i32,
    pub comm: [u8; TASK_COMM_LEN],
    pub waker_comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(size_of::<OffCpuKey>() == 64);

/// Value of the off-CPU aggregate (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub total_ns: u64,
    pub count: u64,
}

const _: () = assert!(size_of::<OffCpuValue>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding, every bit pattern valid.
unsafe impl aya::Pod for OffCpuStart {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for OffCpuKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for OffCpuValue {}

/// Latency histogram layout shared by both sides: values below 16 ns have a bucket each; above,
/// each power of two `[2^k, 2^(k+1))` is split into 16 equal sub-buckets, so a bucket's width is
/// at most 1/16 of its lower bound (percentiles within about 3%). Values from 2^40 ns (18 min)
/// on share the last bucket.
pub mod histogram {
    /// Sub-buckets per power of two (a power of two itself).
    pub const SUB_BUCKETS: u64 = 16;
    /// log2 of [`SUB_BUCKETS`].
    pub const SUB_BITS: u32 = 4;
    /// Largest power of two with its own buckets.
    pub const MAX_LOG2: u32 = 39;
    /// Number of buckets.
    pub const BUCKETS: usize = ((MAX_LOG2 + 1 - SUB_BITS + 1) as usize) * SUB_BUCKETS as usize;

    /// `floor(log2(v))` for `v > 0`, without loops (the BPF verifier likes straight code).
    #[expect(
        clippy::inline_always,
        reason = "inlined into BPF programs: no calls there"
    )]
    #[inline(always)]
    #[must_use]
    pub const fn log2(mut v: u64) -> u32 {
        let mut k = 0;
        if v >= 1 << 32 {
            v >>= 32;
            k += 32;
        }
        if v >= 1 << 16 {
            v >>= 16;
            k += 16;
        }
        if v >= 1 << 8 {
            v >>= 8;
            k += 8;
        }
        if v >= 1 << 4 {
            v >>= 4;
            k += 4;
        }
        if v >= 1 << 2 {
            v >>= 2;
            k += 2;
        }
        if v >= 1 << 1 {
            k += 1;
        }
        k
    }

    /// The bucket of a value.
    #[expect(
        clippy::inline_always,
        reason = "inlined into BPF programs: no calls there"
    )]
    #[inline(always)]
    #[must_use]
    pub const fn index(v: u64) -> usize {
        if v < SUB_BUCKETS {
            return v as usize;
        }
        let mut k = log2(v);
        if k > MAX_LOG2 {
            return BUCKETS - 1;
        }
        if k < SUB_BITS {
            k = SUB_BITS;
        }
        let sub = (v >> (k - SUB_BITS)) & (SUB_BUCKETS - 1);
        ((k - SUB_BITS + 1) as usize) * SUB_BUCKETS as usize + sub as usize
    }

    /// The smallest and largest value of bucket `i`.
    #[must_use]
    pub const fn bounds(i: usize) -> (u64, u64) {
        let n = SUB_BUCKETS as usize;
        if i < n {
            return (i as u64, i as u64);
        }
        let k = (i / n) as u32 - 1 + SUB_BITS;
        let sub = (i % n) as u64;
        let width = 1u64 << (k - SUB_BITS);
        let low = (SUB_BUCKETS + sub) * width;
        if i == BUCKETS - 1 {
            return (low, u64::MAX);
        }
        (low, low + width - 1)
    }
}

/// Key of the syscall aggregates.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SyscallKey {
    pub pid: u32,
    pub nr: u32,
}

const _: () = assert!(size_of::<SyscallKey>() == 8);

/// Latency of one syscall in one process: exact count, total and max, and a histogram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallStats {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// Sum of non-negative return values of byte-moving syscalls.
    pub bytes: u64,
    pub errors: u64,
    /// The name of the thread that made the first call (set once, when the entry is created),
    /// so that processes that exit before a drain are still named.
    pub comm: [u8; TASK_COMM_LEN],
    pub buckets: [u32; histogram::BUCKETS],
}

const _: () = assert!(size_of::<SyscallStats>() == 56 + 4 * histogram::BUCKETS);

/// Key of the errno counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrnoKey {
    pub pid: u32,
    pub nr: u32,
    pub errno: u32,
    pub pad: u32,
}

const _: () = assert!(size_of::<ErrnoKey>() == 16);

/// Key of the slow-syscall stacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlowKey {
    pub pid: u32,
    pub tid: u32,
    pub nr: u32,
    pub user_stack_id: i32,
    pub comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(size_of::<SlowKey>() == 32);

/// A thread inside a syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallStart {
    pub start_ns: u64,
    pub nr: u32,
    pub pad: u32,
}

const _: () = assert!(size_of::<SyscallStart>() == 16);

#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding, every bit pattern valid.
unsafe impl aya::Pod for SyscallKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SyscallStats {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ErrnoKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SlowKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SyscallStart {}

#[cfg(test)]
mod tests {
    use super::histogram::{BUCKETS, bounds, index, log2};

    #[test]
    fn log2_matches_ilog2() {
        for v in [1u64, 2, 3, 4, 15, 16, 17, 1000, 1 << 40, u64::MAX] {
            assert_eq!(log2(v), v.ilog2(), "{v}");
        }
    }

    #[test]
    fn buckets_are_contiguous_and_narrow() {
        let mut expected_low = 0;
        for i in 0..BUCKETS {
            let (low, high) = bounds(i);
            assert_eq!(
                low,
                expected_low,
                "bucket {i} starts where {} ended",
                i.saturating_sub(1)
            );
            assert_eq!(index(low), i);
            if i + 1 < BUCKETS {
                assert_eq!(index(high), i);
                assert!(
                    (high - low) * 16 <= low.max(1),
                    "bucket {i} is at most 1/16 wide"
                );
                expected_low = high + 1;
            }
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(
            index(5_080_000),
            index(5_100_000),
            "5.08 and 5.10 ms share a bucket"
        );
    }
}

/// Byte offsets of the socket fields the TCP programs read, from `struct sock_common` (at the
/// start of `struct sock`) and `struct tcp_sock` (which starts with a `struct sock`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    pub daddr: u32,
    pub rcv_saddr: u32,
    pub dport: u32,
    pub num: u32,
    pub family: u32,
    pub v6_daddr: u32,
    pub v6_rcv_saddr: u32,
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub pad: u32,
}

/// TCP event kinds.
pub mod tcp_event {
    pub const CONNECT: u32 = 1;
    pub const CONNECT_FAILED: u32 = 2;
    pub const ACCEPT: u32 = 3;
    pub const CLOSE: u32 = 4;
    pub const RETRANSMIT: u32 = 5;
    pub const RESET_SENT: u32 = 6;
    pub const RESET_RECEIVED: u32 = 7;
}

/// Who owns a socket, recorded where the process context is known (connect, listen).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSock {
    /// When the connect started (active) or the connection was established (passive).
    pub start_ns: u64,
    /// When the connection was established, 0 before.
    pub established_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub user_stack_id: i32,
    /// 1: active open (connect), 2: passive open (accept), 3: listener.
    pub kind: u32,
    pub comm: [u8; TASK_COMM_LEN],
    /// The connection's addresses, kept from when it was established: the kernel clears the
    /// local port of a socket that is closing.
    pub family: u32,
    pub sport: u32,
    pub dport: u32,
    pub pad: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

const _: () = assert!(size_of::<TcpSock>() == 96);

/// One TCP event, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    pub time_ns: u64,
    pub latency_ns: u64,
    pub lifetime_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// A [`tcp_event`] value.
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub user_stack_id: i32,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u32,
    pub sport: u32,
    pub dport: u32,
    /// The TCP state before this event (for closes: how the connection ended).
    pub old_state: u32,
    /// 1: the connection was opened by `connect()`, 2: accepted.
    pub direction: u32,
    pub pad: u32,
    /// IPv4 in the first 4 bytes, network order.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub comm: [u8; TASK_COMM_LEN],
}

const _: () = assert!(size_of::<TcpEvent>() == 128);

#[cfg(feature = "user")]
// SAFETY: repr(C), no implicit padding, every bit pattern valid.
unsafe impl aya::Pod for TcpOffsets {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for TcpSock {}
