//! Off-CPU time: how long target threads spend switched out, where, in which state, and who woke
//! them.
//!
//! - `on_sched_switch` (BTF tracepoint `sched_switch`, called with the raw arguments, no record
//!   copied as classic tracepoints do): when a target thread (`prev`, still `current`) leaves the
//!   CPU, store the time, its stacks and its state in `OFFCPU_START`; when a thread (`next`) comes
//!   back, look its start up by tid, and add the wait to the active `OFFCPU_*` aggregate keyed by
//!   (thread, stacks, state, waker). No event goes to userspace.
//! - `on_sched_waking` (BTF tracepoint `sched_waking`, run by the waker): if the wakee is a
//!   waiting target thread, record the waker's pid, comm and stacks in its start entry (first
//!   waker wins).
//!
//! Kernel structures: only `task_struct.pid`, at the offset userspace reads from the kernel's
//! BTF and passes in `TASK_PID_OFFSET` (no CO-RE relocations in Rust eBPF).

use aya_ebpf::{
    Global,
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map},
    maps::{LruHashMap, PerCpuHashMap, StackTrace},
    programs::{BtfTracePointContext, tracing::StackIdContext as _},
};
use profiler_common::{
    NO_STACK, OffCpuKey, OffCpuStart, OffCpuValue, TASK_COMM_LEN, maps as m, stat, task_state,
};

use crate::{EEXIST, ENOMEM, bump, current_ids, is_target, offcpu_paused, use_buffer_b};

/// Set by the loader from the kernel's BTF.
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: Global<u32> = Global::new(0);
/// Set by the loader: `--off-cpu-min`.
#[unsafe(no_mangle)]
static OFFCPU_MIN_NS: Global<u64> = Global::new(1_000);

#[map]
static OFFCPU_A: PerCpuHashMap<OffCpuKey, OffCpuValue> =
    PerCpuHashMap::with_max_entries(m::OFFCPU_MAX_ENTRIES, 0);
#[map]
static OFFCPU_B: PerCpuHashMap<OffCpuKey, OffCpuValue> =
    PerCpuHashMap::with_max_entries(m::OFFCPU_MAX_ENTRIES, 0);
#[map]
static OFFCPU_STACKS: StackTrace = StackTrace::with_max_entries(m::OFFCPU_STACKS_MAX_ENTRIES, 0);
#[map]
static OFFCPU_START: LruHashMap<u32, OffCpuStart> =
    LruHashMap::with_max_entries(m::OFFCPU_START_MAX_ENTRIES, 0);

#[btf_tracepoint(function = "sched_switch")]
pub fn on_sched_switch(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
    //          unsigned int prev_state)
    let preempt: u64 = ctx.arg(0);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    if offcpu_paused() {
        // The stack map is being cleared: a wait ending now may hold ids about to vanish.
        if let Some(tid) = task_pid(next)
            && OFFCPU_START.remove(tid).is_ok()
        {
            bump(stat::OFFCPU_DISCARDED);
        }
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    switch_out(&ctx, preempt & 1 != 0, prev_state as u32, now);
    if let Some(tid) = task_pid(next) {
        switch_in(tid, now);
    }
    0
}

#[btf_tracepoint(function = "sched_waking")]
pub fn on_sched_waking(ctx: BtfTracePointContext) -> u32 {
    // TP_PROTO(struct task_struct *p)
    let wakee: *const u8 = ctx.arg(0);
    if offcpu_paused() {
        return 0;
    }
    if let Some(tid) = task_pid(wakee) {
        record_waker(&ctx, tid);
    }
    0
}

/// `task->pid` (the thread id), or `None` for the idle task or a failed read.
#[inline(always)]
fn task_pid(task: *const u8) -> Option<u32> {
    let offset = TASK_PID_OFFSET.load() as usize;
    // SAFETY: a probe read: a bad address makes the helper fail, never fault.
    match unsafe { bpf_probe_read_kernel(task.wrapping_add(offset).cast::<i32>()) } {
        Ok(0) => None,
        Ok(tid) => Some(tid as u32),
        Err(_) => {
            bump(stat::OFFCPU_READ_ERRORS);
            None
        }
    }
}

#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, preempt: bool, prev_state: u32, now: u64) {
    // Keyed by the host's thread id: the switch-in finds it from the task struct.
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid == 0 {
        return;
    }
    let Some((pid, _)) = current_ids().filter(|&(pid, _)| is_target(pid)) else {
        return;
    };
    // Preempted: still runnable, waiting for a CPU. A task may be preempted right after setting
    // its sleep state, before it calls schedule(): it is runnable all the same.
    let state = if preempt {
        task_state::RUNNING
    } else {
        prev_state
    };
    if state & task_state::DEAD != 0 {
        // Its last switch: it never comes back, so nothing would ever remove the entry.
        return;
    }
    let start = OffCpuStart {
        start_ns: now,
        pid,
        state,
        user_stack_id: stack_id(ctx, u64::from(BPF_F_USER_STACK)),
        kernel_stack_id: stack_id(ctx, 0),
        waker_pid: 0,
        waker_user_stack_id: NO_STACK,
        waker_kernel_stack_id: NO_STACK,
        pad: 0,
        comm: bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]),
        waker_comm: [0; TASK_COMM_LEN],
    };
    match OFFCPU_START.insert(tid, start, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(stat::OFFCPU_STARTS),
        Err(err) if -err == EEXIST => {
            bump(stat::OFFCPU_REPLACED);

            let _ = OFFCPU_START.insert(tid, start, 0);
        }
        Err(_) => {}
    }
}

#[inline(always)]
fn switch_in(tid: u32, now: u64) {
    let Some(start) = OFFCPU_START.get_ptr(tid) else {
        return;
    };
    // SAFETY: a live entry; copied out before it is removed.
    let start = unsafe { *start };
    let _ = OFFCPU_START.remove(tid);
    bump(stat::OFFCPU_ENDS);
    let waited = now.saturating_sub(start.start_ns);
    if waited < OFFCPU_MIN_NS.load() {
        bump(stat::OFFCPU_SHORT);
        return;
    }
    let key = OffCpuKey {
        pid: start.pid,
        tid,
        state: start.state,
        user_stack_id: start.user_stack_id,
        kernel_stack_id: start.kernel_stack_id,
        waker_pid: start.waker_pid,
        waker_user_stack_id: start.waker_user_stack_id,
        waker_kernel_stack_id: start.waker_kernel_stack_id,
        comm: start.comm,
        waker_comm: start.waker_comm,
    };
    let waits = if use_buffer_b() { &OFFCPU_B } else { &OFFCPU_A };
    if let Some(value) = waits.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a live entry; nothing else writes it while we run.
        unsafe {
            (*value).total_ns += waited;
            (*value).count += 1;
        }
        bump(stat::OFFCPU_RECORDED);
        return;
    }
    let value = OffCpuValue {
        total_ns: waited,
        count: 1,
    };
    if waits.insert(&key, &value, u64::from(BPF_NOEXIST)).is_ok() {
        bump(stat::OFFCPU_RECORDED);
    } else {
        bump(stat::OFFCPU_DROPPED_FULL);
    }
}

#[inline(always)]
fn record_waker(ctx: &BtfTracePointContext, wakee_tid: u32) {
    let Some(start) = OFFCPU_START.get_ptr_mut(wakee_tid) else {
        return;
    };
    if bpf_get_current_pid_tgid() as u32 == 0 {
        return;
    }
    // A waker outside the recorded pid namespace has no pid we could name.
    let Some((waker_pid, _)) = current_ids() else {
        return;
    };
    // SAFETY: a live entry of this map; a concurrent waker on another CPU may write the same
    // fields, and either one is a true waker.
    unsafe {
        if (*start).waker_pid != 0 {
            return;
        }
        (*start).waker_pid = waker_pid;
        (*start).waker_user_stack_id = stack_id(ctx, u64::from(BPF_F_USER_STACK));
        (*start).waker_kernel_stack_id = stack_id(ctx, 0);
        (*start).waker_comm = bpf_get_current_comm().unwrap_or([0; TASK_COMM_LEN]);
    }
    bump(stat::OFFCPU_WAKERS);
}

#[inline(always)]
fn stack_id(ctx: &BtfTracePointContext, flags: u64) -> i32 {
    match ctx.get_stackid(&OFFCPU_STACKS, flags) {
        Ok(id) => id as i32,
        Err(err) => {
            match -err {
                ENOMEM => bump(stat::OFFCPU_STACK_MAP_FULL),
                EEXIST => bump(stat::OFFCPU_STACK_COLLISION),
                // -EFAULT: no user stack (kernel threads): not a loss.
                _ => {}
            }
            NO_STACK
        }
    }
}
