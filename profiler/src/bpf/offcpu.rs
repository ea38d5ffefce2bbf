//! The off-CPU probes: `sched_switch` and `sched_waking` BTF tracepoints, waits aggregated in
//! double-buffered per-CPU hash maps keyed by (thread, stacks, state, waker).

use aya::Ebpf;
use aya::maps::{HashMap, MapData, PerCpuHashMap, StackTraceMap};
use profiler_common::{OffCpuKey, OffCpuStart, OffCpuValue, maps as m};

use super::{BpfError, comm_string, take_map};

const PROGRAMS: [(&str, &str); 2] = [
    ("on_sched_switch", "sched_switch"),
    ("on_sched_waking", "sched_waking"),
];

/// Who woke a waiting thread.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Waker {
    pub pid: u32,
    pub comm: String,
    pub user: Option<Vec<u64>>,
    pub kernel: Option<Vec<u64>>,
}

/// One drained off-CPU aggregate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawWait {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// A `profiler_common::task_state` value.
    pub state: u32,
    pub user: Option<Vec<u64>>,
    pub kernel: Option<Vec<u64>>,
    pub waker: Option<Waker>,
    pub total_ns: u64,
    pub count: u64,
}

pub(super) struct OffCpu {
    waits: [PerCpuHashMap<MapData, OffCpuKey, OffCpuValue>; 2],
    stacks: StackTraceMap<MapData>,
    // An LRU hash map; aya reads it through its HashMap type.
    starts: HashMap<MapData, u32, OffCpuStart>,
    /// Stack ids are never reused while the map is not cleared: read each one once.
    stack_cache: super::StackCache,
    /// The stack map is cleared at the next drain (it is getting full).
    pub(super) reset_due: bool,
    /// The programs are paused for that reset.
    pub(super) paused: bool,
    /// Pending waits dropped by resets.
    pub(super) discarded: u64,
    pub(super) resets: u64,
}

/// The stack map is reset once this many distinct stacks were read from it: it is never cleared
/// otherwise (a wait can outlive any drain), and a host where processes come and go fills it.
/// A quarter full keeps hash collisions (a new stack lost to a taken bucket) under one in four.
const RESET_AT_STACKS: usize = m::OFFCPU_STACKS_MAX_ENTRIES as usize / 4;

impl OffCpu {
    pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Self, BpfError> {
        let off_cpu = Self {
            waits: [take_map(ebpf, m::OFFCPU_A)?, take_map(ebpf, m::OFFCPU_B)?],
            stacks: take_map(ebpf, m::OFFCPU_STACKS)?,
            starts: take_map(ebpf, m::OFFCPU_START)?,
            stack_cache: super::StackCache::default(),
            reset_due: false,
            paused: false,
            discarded: 0,
            resets: 0,
        };
        super::attach_btf_tracepoints(ebpf, &PROGRAMS)?;
        Ok(off_cpu)
    }

    pub(super) fn waiting(&self) -> u64 {
        self.starts.keys().flatten().count() as u64
    }

    fn stack(&mut self, id: i32) -> Option<Vec<u64>> {
        self.stack_cache.get(&self.stacks, id)
    }

    /// Reads and clears buffer `idle`.
    pub(super) fn drain(&mut self, idle: usize) -> Result<Vec<RawWait>, BpfError> {
        let name = if idle == 0 { m::OFFCPU_A } else { m::OFFCPU_B };
        let mut entries = Vec::new();
        for entry in &self.waits[idle] {
            let (key, per_cpu) = entry.map_err(|source| BpfError::Map { name, source })?;
            let total = per_cpu
                .iter()
                .fold(OffCpuValue::default(), |acc, v| OffCpuValue {
                    total_ns: acc.total_ns + v.total_ns,
                    count: acc.count + v.count,
                });
            entries.push((key, total));
        }
        let mut waits = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            let waker = (key.waker_pid != 0).then(|| Waker {
                pid: key.waker_pid,
                comm: comm_string(&key.waker_comm),
                user: self.stack(key.waker_user_stack_id),
                kernel: self.stack(key.waker_kernel_stack_id),
            });
            waits.push(RawWait {
                pid: key.pid,
                tid: key.tid,
                comm: comm_string(&key.comm),
                state: key.state,
                user: self.stack(key.user_stack_id),
                kernel: self.stack(key.kernel_stack_id),
                waker,
                total_ns: value.total_ns,
                count: value.count,
            });
        }
        for (key, _) in &entries {
            let _ = self.waits[idle].remove(key);
        }
        self.reset_due = self.stack_cache.len() >= RESET_AT_STACKS;
        Ok(waits)
    }

    /// Clears the stack map, the waits still pending (their stack ids would dangle) and the
    /// cache of stacks read. The programs are paused and every recorded wait was drained.
    pub(super) fn reset(&mut self) {
        let pending: Vec<u32> = self.starts.keys().flatten().collect();
        let discarded = pending
            .iter()
            .filter(|tid| self.starts.remove(tid).is_ok())
            .count() as u64;
        let ids: Vec<u32> = self.stacks.stack_ids().flatten().collect();
        for id in &ids {
            let _ = self.stacks.remove(id);
        }
        tracing::info!(
            "off-CPU stack map reset: {} stacks cleared, {discarded} pending waits dropped",
            ids.len()
        );
        self.discarded += discarded;
        self.resets += 1;
        self.stack_cache.clear();
        self.reset_due = false;
    }
}
