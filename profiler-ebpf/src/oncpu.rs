//! On-CPU sampling: `on_cpu_sample` runs on every cpu-clock perf_event tick (one event per online
//! CPU, opened by userspace at the requested frequency). It captures the user and kernel stack
//! ids of the interrupted task and adds one to this CPU's count of (pid, tid, comm, stacks) in the
//! active buffer.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{map, perf_event},
    maps::{PerCpuHashMap, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext as _},
};
use profiler_common::{NO_STACK, SampleKey, TASK_COMM_LEN, maps as m, stat};

use crate::{EEXIST, ENOMEM, bump, current_ids, is_target, use_buffer_b};

#[map]
static COUNTS_A: PerCpuHashMap<SampleKey, u64> =
    PerCpuHashMap::with_max_entries(m::COUNTS_MAX_ENTRIES, 0);
#[map]
static COUNTS_B: PerCpuHashMap<SampleKey, u64> =
    PerCpuHashMap::with_max_entries(m::COUNTS_MAX_ENTRIES, 0);
/// Also holds the stacks of slow syscalls (the same buffer flips both).
#[map]
pub(crate) static STACKS_A: StackTrace = StackTrace::with_max_entries(m::STACKS_MAX_ENTRIES, 0);
#[map]
pub(crate) static STACKS_B: StackTrace = StackTrace::with_max_entries(m::STACKS_MAX_ENTRIES, 0);

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    try_on_cpu_sample(&ctx);
    0
}

#[inline(always)]
fn try_on_cpu_sample(ctx: &PerfEventContext) {
    bump(stat::SAMPLES_SEEN);
    if bpf_get_current_pid_tgid() as u32 == 0 {
        bump(stat::SAMPLES_IDLE);
        return;
    }
    let Some((pid, tid)) = current_ids() else {
        bump(stat::SAMPLES_FILTERED);
        return;
    };
    if !is_target(pid) {
        bump(stat::SAMPLES_FILTERED);
        return;
    }
    let comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    let (counts, stacks) = if use_buffer_b() {
        (&COUNTS_B, &STACKS_B)
    } else {
        (&COUNTS_A, &STACKS_A)
    };
    let user_stack_id = match ctx.get_stackid(stacks, u64::from(BPF_F_USER_STACK)) {
        Ok(id) => id as i32,
        Err(err) => {
            bump(match -err {
                ENOMEM => stat::USER_STACK_MAP_FULL,
                EEXIST => stat::USER_STACK_COLLISION,
                _ => stat::USER_STACK_OTHER,
            });
            NO_STACK
        }
    };
    // A tick that interrupted user code has no kernel stack: skip the helper (it would set up
    // a callchain only to find it empty, a tenth of the program's cost).
    let kernel_stack_id = if in_user_mode(ctx) {
        NO_STACK
    } else {
        kernel_stack_id(ctx, stacks)
    };
    let key = SampleKey {
        pid,
        tid,
        user_stack_id,
        kernel_stack_id,
        comm,
    };
    if add_one(counts, &key) {
        bump(stat::SAMPLES_RECORDED);
    } else {
        bump(stat::DROPPED_COUNTS_FULL);
    }
}

/// Whether the tick interrupted user code (x86-64: the privilege level in `cs`).
#[inline(always)]
fn in_user_mode(ctx: &PerfEventContext) -> bool {
    // SAFETY: `ctx.ctx` is the program's context; the verifier allows reading its `regs`.
    let cs = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ctx).regs.cs)) };
    cs & 3 == 3
}

/// The kernel stack's id, or [`NO_STACK`] with the reason counted.
#[inline(always)]
fn kernel_stack_id(ctx: &PerfEventContext, stacks: &StackTrace) -> i32 {
    match ctx.get_stackid(stacks, 0) {
        Ok(id) => id as i32,
        Err(err) => {
            bump(match -err {
                ENOMEM => stat::KERNEL_STACK_MAP_FULL,
                EEXIST => stat::KERNEL_STACK_COLLISION,
                _ => stat::KERNEL_STACK_OTHER,
            });
            NO_STACK
        }
    }
}

/// Adds one to this CPU's count of `key`, creating it; false when the map is full.
///
/// The counts are per-CPU so that no atomic is needed (the BPF target has no `AtomicU64` RMW in
/// `core`) and CPUs never contend on one value; userspace sums the CPUs when it drains.
#[inline(always)]
fn add_one(counts: &PerCpuHashMap<SampleKey, u64>, key: &SampleKey) -> bool {
    if let Some(count) = counts.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a live entry; nothing else writes it while we run.
        unsafe { *count += 1 };
        return true;
    }
    // A new entry starts at 1 on this CPU and 0 on the others.
    counts.insert(key, 1, u64::from(BPF_NOEXIST)).is_ok()
}
