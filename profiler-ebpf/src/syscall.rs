//! Syscall latency: `on_sys_enter` / `on_sys_exit` (BTF tracepoints `sys_enter` / `sys_exit`,
//! every syscall) time each syscall of a target thread and add it to a histogram per (process,
//! syscall): exact count, total and max, bytes moved by read/write-family calls, failures per
//! errno. Syscalls at least `SYSCALL_SLOW_NS` long also record the user stack that made them,
//! weighted by latency. Nothing goes to userspace per syscall.
//!
//! The histograms are shared by all CPUs and updated with atomic adds (a per-CPU copy of a 2.4 KiB
//! histogram per CPU would cost more memory than the contention it saves).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use profiler_common::{
    ErrnoKey, OffCpuValue, SlowKey, SyscallKey, SyscallStart, SyscallStats, TASK_COMM_LEN,
    histogram, maps as m, stat,
};

use crate::oncpu::{STACKS_A, STACKS_B};
use crate::{bump, current_ids, is_target, use_buffer_b};

/// Set by the loader: `--syscall-slow`.
#[unsafe(no_mangle)]
static SYSCALL_SLOW_NS: Global<u64> = Global::new(1_000_000);

#[map]
static SYSCALLS_A: HashMap<SyscallKey, SyscallStats> =
    HashMap::with_max_entries(m::SYSCALLS_MAX_ENTRIES, 0);
#[map]
static SYSCALLS_B: HashMap<SyscallKey, SyscallStats> =
    HashMap::with_max_entries(m::SYSCALLS_MAX_ENTRIES, 0);
#[map]
static ERRNOS_A: HashMap<ErrnoKey, u64> = HashMap::with_max_entries(m::ERRNOS_MAX_ENTRIES, 0);
#[map]
static ERRNOS_B: HashMap<ErrnoKey, u64> = HashMap::with_max_entries(m::ERRNOS_MAX_ENTRIES, 0);
#[map]
static SLOW_A: PerCpuHashMap<SlowKey, OffCpuValue> =
    PerCpuHashMap::with_max_entries(m::SLOW_MAX_ENTRIES, 0);
#[map]
static SLOW_B: PerCpuHashMap<SlowKey, OffCpuValue> =
    PerCpuHashMap::with_max_entries(m::SLOW_MAX_ENTRIES, 0);
#[map]
static SYSCALL_START: LruHashMap<u32, SyscallStart> =
    LruHashMap::with_max_entries(m::SYSCALL_START_MAX_ENTRIES, 0);
#[map]
static BYTE_SYSCALLS: Array<u32> = Array::with_max_entries(m::MAX_SYSCALL_NR, 0);
#[map]
static SYSCALL_ZERO: Array<SyscallStats> = Array::with_max_entries(1, 0);

/// x86-64 numbers of the syscalls that do not return.
const NR_EXIT: i64 = 60;
const NR_EXIT_GROUP: i64 = 231;

#[btf_tracepoint(function = "sys_enter")]
pub fn on_sys_enter(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct pt_regs *regs, long id)
    // The start is keyed by the host's thread id: unique, whatever namespace records it.
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid == 0 || !current_ids().is_some_and(|(pid, _)| is_target(pid)) {
        return 0;
    }
    let nr: i64 = ctx.arg(1);
    // exit and exit_group never return: a start stored for them would stay behind, one per
    // thread that ever ended, until the LRU evicts it.
    if nr == NR_EXIT || nr == NR_EXIT_GROUP {
        return 0;
    }
    let start = SyscallStart {
        start_ns: unsafe { bpf_ktime_get_ns() },
        nr: nr as u32,
        pad: 0,
    };
    if SYSCALL_START.insert(tid, start, 0).is_ok() {
        bump(stat::SYSCALL_ENTERS);
    }
    0
}

#[btf_tracepoint(function = "sys_exit")]
pub fn on_sys_exit(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct pt_regs *regs, long ret)
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(start) = SYSCALL_START.get_ptr(tid) else {
        return 0;
    };
    // SAFETY: a live entry, copied before it is removed.
    let start = unsafe { *start };
    let _ = SYSCALL_START.remove(tid);
    let now = unsafe { bpf_ktime_get_ns() };
    let ret: i64 = ctx.arg(1);
    let Some((pid, ns_tid)) = current_ids() else {
        return 0;
    };
    record(
        &ctx,
        pid,
        ns_tid,
        start.nr,
        ret,
        now.saturating_sub(start.start_ns),
    );
    0
}

#[inline(always)]
fn add(dst: *mut u64, v: u64) {
    // SAFETY: `dst` points into a map value; BPF supports 64-bit atomic add there.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v) };
}

#[inline(always)]
fn record(ctx: &BtfTracePointContext, pid: u32, tid: u32, nr: u32, ret: i64, latency: u64) {
    let b = use_buffer_b();
    let key = SyscallKey { pid, nr };
    let histograms = if b { &SYSCALLS_B } else { &SYSCALLS_A };
    let mut stats = histograms.get_ptr_mut(&key);
    let fresh = stats.is_none();
    if fresh {
        let Some(zero) = SYSCALL_ZERO.get(0) else {
            return;
        };
        // Racing CPUs: NOEXIST lets the first insert win; everyone then updates it.
        let _ = histograms.insert(&key, zero, u64::from(BPF_NOEXIST));
        stats = histograms.get_ptr_mut(&key);
    }
    let Some(stats) = stats else {
        bump(stat::SYSCALL_DROPPED_FULL);
        return;
    };
    if fresh && let Ok(comm) = bpf_get_current_comm() {
        // SAFETY: a live map value; every writer writes the same process's name.
        unsafe { (*stats).comm = comm };
    }
    // SAFETY: a live map value; every field written with atomic adds, max with a plain store
    // (a lost race only loses a max that another CPU is writing at the same instant).
    unsafe {
        add(&raw mut (*stats).count, 1);
        add(&raw mut (*stats).total_ns, latency);
        if latency > (*stats).max_ns {
            (*stats).max_ns = latency;
        }
        let i = histogram::index(latency);
        if let Some(bucket) = (*stats).buckets.get_mut(i) {
            atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(bucket, 1);
        }
        if ret < 0 {
            add(&raw mut (*stats).errors, 1);
        } else if BYTE_SYSCALLS.get(nr).is_some_and(|&bytes| bytes != 0) {
            add(&raw mut (*stats).bytes, ret as u64);
        }
    }
    bump(stat::SYSCALL_RECORDED);
    if ret < 0 {
        count_errno(b, pid, nr, (-ret) as u32);
    }
    if latency >= SYSCALL_SLOW_NS.load() {
        record_slow(ctx, b, pid, tid, nr, latency);
    }
}

#[inline(always)]
fn count_errno(b: bool, pid: u32, nr: u32, errno: u32) {
    let errnos = if b { &ERRNOS_B } else { &ERRNOS_A };
    let key = ErrnoKey {
        pid,
        nr,
        errno,
        pad: 0,
    };
    if let Some(count) = errnos.get_ptr_mut(&key) {
        add(count, 1);
        return;
    }
    if errnos.insert(&key, &1, u64::from(BPF_NOEXIST)).is_err() {
        match errnos.get_ptr_mut(&key) {
            Some(count) => add(count, 1),
            None => bump(stat::SYSCALL_ERRNO_DROPPED),
        }
    }
}

#[inline(always)]
fn record_slow(ctx: &BtfTracePointContext, b: bool, pid: u32, tid: u32, nr: u32, latency: u64) {
    let stacks = if b { &STACKS_B } else { &STACKS_A };
    let Ok(user_stack_id) = ctx.get_stackid(stacks, u64::from(BPF_F_USER_STACK)) else {
        bump(stat::SYSCALL_SLOW_DROPPED);
        return;
    };
    let key = SlowKey {
        pid,
        tid,
        nr,
        user_stack_id: user_stack_id as i32,
        comm: bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]),
    };
    let slow = if b { &SLOW_B } else { &SLOW_A };
    if let Some(value) = slow.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a live entry.
        unsafe {
            (*value).total_ns += latency;
            (*value).count += 1;
        }
    } else {
        let value = OffCpuValue {
            total_ns: latency,
            count: 1,
        };
        if slow.insert(&key, &value, u64::from(BPF_NOEXIST)).is_err() {
            bump(stat::SYSCALL_SLOW_DROPPED);
            return;
        }
    }
    bump(stat::SYSCALL_SLOW);
}
