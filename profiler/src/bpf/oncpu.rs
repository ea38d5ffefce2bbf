//! The on-CPU sampler: a cpu-clock perf event on every online CPU, counts of (thread, stacks) in
//! double-buffered per-CPU hash maps, stacks in the double-buffered stack maps `Probes` clears at
//! each drain.

use aya::Ebpf;
use aya::maps::{MapData, PerCpuHashMap};
use aya::programs::PerfEvent;
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use profiler_common::{SampleKey, maps as m};

use super::{BpfError, comm_string, take_map};

const PROGRAM: &str = "on_cpu_sample";

/// One drained aggregate: a thread, its stacks (leaf first) and how many samples hit them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    /// `None`: the stack could not be captured (see the stack counters).
    pub user: Option<Vec<u64>>,
    pub kernel: Option<Vec<u64>>,
    pub count: u64,
}

pub(super) struct OnCpu {
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
}

impl OnCpu {
    pub(super) fn attach(ebpf: &mut Ebpf, frequency_hz: u64) -> Result<Self, BpfError> {
        let on_cpu = Self {
            counts: [take_map(ebpf, m::COUNTS_A)?, take_map(ebpf, m::COUNTS_B)?],
        };
        let program_err = |source| BpfError::Program {
            name: PROGRAM,
            source,
        };
        let program: &mut PerfEvent = ebpf
            .program_mut(PROGRAM)
            .ok_or(BpfError::MissingProgram(PROGRAM))?
            .try_into()
            .map_err(program_err)?;
        program.load().map_err(program_err)?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, source)| BpfError::Cpus { path, source })?;
        // cpu-clock counts nanoseconds of CPU time: a fixed period samples every `period_ns` of
        // CPU, so each sample stands for exactly that much time. (The kernel turns a frequency
        // into this same fixed period for cpu-clock.)
        let period_ns = 1_000_000_000 / frequency_hz.max(1);
        for cpu in cpus {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period_ns),
                    false,
                )
                .map_err(|source| BpfError::Attach { cpu, source })?;
        }
        Ok(on_cpu)
    }

    /// Reads and clears buffer `idle`; stack ids resolve through `stacks` (the idle stack map).
    pub(super) fn drain(
        &mut self,
        idle: usize,
        stacks: &mut super::StackReader<'_>,
    ) -> Result<Vec<RawSample>, BpfError> {
        let counts_name = if idle == 0 { m::COUNTS_A } else { m::COUNTS_B };
        let mut entries = Vec::new();
        for entry in &self.counts[idle] {
            let (key, per_cpu) = entry.map_err(|source| BpfError::Map {
                name: counts_name,
                source,
            })?;
            entries.push((key, per_cpu.iter().sum::<u64>()));
        }
        let samples = entries
            .iter()
            .map(|(key, count)| RawSample {
                pid: key.pid,
                tid: key.tid,
                comm: comm_string(&key.comm),
                user: stacks.get(key.user_stack_id),
                kernel: stacks.get(key.kernel_stack_id),
                count: *count,
            })
            .collect();
        for (key, _) in &entries {
            // A key can only vanish if something else deleted it: nothing worth failing for.
            let _ = self.counts[idle].remove(key);
        }
        Ok(samples)
    }
}
