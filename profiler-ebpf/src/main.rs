//! cprof's kernel side. Every program aggregates in the kernel; userspace never sees single
//! events. It flips `ACTIVE_BUFFER` to point the programs at the other half of each
//! double-buffered aggregate, then drains and clears the idle half.
//!
//! - [`oncpu`]: `on_cpu_sample`, a cpu-clock perf_event on every CPU: counts of (thread, stacks).
//! - [`offcpu`]: `on_sched_switch` and `on_sched_waking` (BTF tracepoints): time threads spend
//!   switched out, by stack, state and waker.
//! - [`syscall`]: `on_sys_enter` and `on_sys_exit` (BTF tracepoints): latency histograms per
//!   process and syscall, errno counts, bytes, and the stacks of slow syscalls.
//! - [`tcp`]: TCP state changes, retransmits and resets (BTF tracepoints), as events through a
//!   ring buffer, attributed to the process and stack that opened the connection.
//!
//! Needs: Linux 5.8+ (CAP_BPF, CAP_PERFMON), BTF for the tracepoints; frame pointers in the
//! profiled code for complete user stacks.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "atomic adds on map values: the BPF target has no AtomicU64 RMW in core"
)]

mod offcpu;
mod oncpu;
mod syscall;
mod tcp;

use aya_ebpf::bindings::bpf_pidns_info;
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_ns_current_pid_tgid,
};
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use profiler_common::{filter, maps as m, stat};

/// Set by the loader: 0 records every process; otherwise a process is recorded when its tgid is
/// in `TARGET_PIDS` (bit `filter::PIDS`) or its cgroup in `TARGET_CGROUPS` (bit
/// `filter::CGROUPS`).
#[unsafe(no_mangle)]
static FILTER_PIDS: Global<u32> = Global::new(0);

/// Set by the loader: the device and inode of a pid namespace (`/proc/self/ns/pid` of the agent,
/// `--pid-namespace self`): pids are then reported as that namespace sees them, and tasks outside
/// it are not recorded. Inode 0: host pids, every task.
#[unsafe(no_mangle)]
static PIDNS_DEV: Global<u64> = Global::new(0);
#[unsafe(no_mangle)]
static PIDNS_INO: Global<u64> = Global::new(0);

#[map]
static ACTIVE_BUFFER: Array<u32> = Array::with_max_entries(2, 0);
#[map]
static TARGET_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(m::TARGET_PIDS_MAX_ENTRIES, 0);
#[map]
static TARGET_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(m::TARGET_CGROUPS_MAX_ENTRIES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

pub(crate) const EEXIST: i32 = 17;
pub(crate) const ENOMEM: i32 = 12;

/// Whether the current process, `pid` (its tgid), is recorded.
#[inline(always)]
pub(crate) fn is_target(pid: u32) -> bool {
    let mode = FILTER_PIDS.load();
    if mode == 0 {
        return true;
    }
    if mode & filter::PIDS != 0 && TARGET_PIDS.get_ptr(pid).is_some() {
        return true;
    }
    // SAFETY: the helper takes no argument and only reads the current task.
    mode & filter::CGROUPS != 0
        && TARGET_CGROUPS
            .get_ptr(unsafe { bpf_get_current_cgroup_id() })
            .is_some()
}

/// The current task's (process, thread) ids as recorded: in the loader's pid namespace when one
/// is set (`None` for a task outside it), else as the host sees them.
#[inline(always)]
pub(crate) fn current_ids() -> Option<(u32, u32)> {
    let ino = PIDNS_INO.load();
    if ino == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        return Some(((pid_tgid >> 32) as u32, pid_tgid as u32));
    }
    let mut info = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: the helper writes `size` bytes into `info`, a local of that size.
    let ret = unsafe {
        bpf_get_ns_current_pid_tgid(
            PIDNS_DEV.load(),
            ino,
            &raw mut info,
            size_of::<bpf_pidns_info>() as u32,
        )
    };
    (ret == 0).then_some((info.tgid, info.pid))
}

/// Whether the programs write to buffer B (else A).
#[inline(always)]
pub(crate) fn use_buffer_b() -> bool {
    ACTIVE_BUFFER.get(0).is_some_and(|active| *active != 0)
}

/// Whether userspace is resetting the off-CPU stack map.
#[inline(always)]
pub(crate) fn offcpu_paused() -> bool {
    ACTIVE_BUFFER
        .get(m::OFFCPU_PAUSED)
        .is_some_and(|paused| *paused != 0)
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub(crate) fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU value, this CPU is the only writer while the program runs.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
