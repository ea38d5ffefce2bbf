//! Loading the on-CPU sampler (`profiler-ebpf`), attaching it to a cpu-clock perf event on every
//! online CPU, and draining what it aggregated in the kernel.
//!
//! Draining never races the program: the counts and stacks are double-buffered. [`OnCpuSampler::flip`]
//! points the program at the other buffer; once in-flight samples have finished (the caller waits a
//! few milliseconds), [`OnCpuSampler::drain_idle`] reads and clears the idle one.
//!
//! Needs: Linux 5.8+, `CAP_BPF` and `CAP_PERFMON` (or `CAP_SYS_ADMIN`).

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, StackTraceMap};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{PerfEvent, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
use profiler_common::{NO_STACK, SampleKey, globals, maps as m, stat};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Why the sampler could not be set up or read.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("this cprof was built without its eBPF programs (AYA_BUILD_SKIP was set)")]
    NotBuilt,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("loading program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching the cpu-clock perf event on CPU {cpu}: {source}")]
    Attach {
        cpu: u32,
        #[source]
        source: ProgramError,
    },
    #[error("listing online CPUs ({path}): {source}")]
    Cpus {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// How to set up the sampler.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// Samples per second per CPU.
    pub frequency_hz: u64,
    /// Processes to sample; `None` samples every process.
    pub pids: Option<Vec<u32>>,
    /// Distinct (thread, stacks) keys per buffer.
    pub counts_max_entries: u32,
    /// Distinct stacks per buffer.
    pub stacks_max_entries: u32,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        Self {
            frequency_hz: 99,
            pids: None,
            counts_max_entries: m::COUNTS_MAX_ENTRIES,
            stacks_max_entries: m::STACKS_MAX_ENTRIES,
        }
    }
}

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

/// Totals of the program's per-CPU counters (see `profiler_common::stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SamplerStats {
    pub counters: [u64; stat::COUNT as usize],
}

impl SamplerStats {
    #[must_use]
    pub fn get(&self, index: u32) -> u64 {
        self.counters[index as usize]
    }

    /// Samples that were lost: counted by the kernel but not recorded.
    #[must_use]
    pub fn lost_samples(&self) -> u64 {
        self.get(stat::DROPPED_COUNTS_FULL)
    }

    /// Stacks not captured because the stack map was full or a hash bucket was taken.
    #[must_use]
    pub fn lost_stacks(&self) -> u64 {
        [
            stat::USER_STACK_MAP_FULL,
            stat::USER_STACK_COLLISION,
            stat::KERNEL_STACK_MAP_FULL,
            stat::KERNEL_STACK_COLLISION,
        ]
        .iter()
        .map(|&i| self.get(i))
        .sum()
    }
}

/// The loaded and attached on-CPU sampler. Dropping it detaches and unloads everything.
pub struct OnCpuSampler {
    ebpf: Ebpf,
    counts: [PerCpuHashMap<MapData, SampleKey, u64>; 2],
    stacks: [StackTraceMap<MapData>; 2],
    active_buffer: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    active: u32,
}

const PROGRAM: &str = "on_cpu_sample";

impl OnCpuSampler {
    /// Loads the programs with `options` and attaches them to every online CPU.
    pub fn start(options: &SamplerOptions) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        let filter = u32::from(options.pids.is_some());
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::FILTER_PIDS, &filter, true)
            .map_max_entries(m::COUNTS_A, options.counts_max_entries)
            .map_max_entries(m::COUNTS_B, options.counts_max_entries)
            .map_max_entries(m::STACKS_A, options.stacks_max_entries)
            .map_max_entries(m::STACKS_B, options.stacks_max_entries)
            .load(OBJECT)?;

        let mut targets: HashMap<MapData, u32, u8> = take_map(&mut ebpf, m::TARGET_PIDS)?;
        for &pid in options.pids.iter().flatten() {
            targets.insert(pid, 1, 0).map_err(|source| BpfError::Map {
                name: m::TARGET_PIDS,
                source,
            })?;
        }
        let mut sampler = Self {
            counts: [
                take_map(&mut ebpf, m::COUNTS_A)?,
                take_map(&mut ebpf, m::COUNTS_B)?,
            ],
            stacks: [
                take_map(&mut ebpf, m::STACKS_A)?,
                take_map(&mut ebpf, m::STACKS_B)?,
            ],
            active_buffer: take_map(&mut ebpf, m::ACTIVE_BUFFER)?,
            stats: take_map(&mut ebpf, m::STATS)?,
            active: 0,
            ebpf,
        };
        sampler.attach(options.frequency_hz)?;
        Ok(sampler)
    }

    fn program(&mut self) -> Result<&mut PerfEvent, BpfError> {
        self.ebpf
            .program_mut(PROGRAM)
            .ok_or(BpfError::MissingProgram(PROGRAM))?
            .try_into()
            .map_err(|source| BpfError::Program {
                name: PROGRAM,
                source,
            })
    }

    /// Detaches from every CPU. The maps stay readable, so that what was collected up to now can
    /// be drained completely and the counters agree with it exactly.
    pub fn stop(&mut self) -> Result<(), BpfError> {
        self.program()?
            .unload()
            .map_err(|source| BpfError::Program {
                name: PROGRAM,
                source,
            })
    }

    fn attach(&mut self, frequency_hz: u64) -> Result<(), BpfError> {
        let program = self.program()?;
        program.load().map_err(|source| BpfError::Program {
            name: PROGRAM,
            source,
        })?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, source)| BpfError::Cpus { path, source })?;
        // cpu-clock counts nanoseconds of CPU time: a fixed period samples every `period_ns` of
        // CPU, so each sample stands for exactly that much time.
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
        Ok(())
    }

    /// Points the program at the other buffer. Wait for in-flight samples (a few ms is ample:
    /// the program runs for microseconds in interrupt context) before [`Self::drain_idle`].
    pub fn flip(&mut self) -> Result<(), BpfError> {
        let next = 1 - self.active;
        self.active_buffer
            .set(0, next, 0)
            .map_err(|source| BpfError::Map {
                name: m::ACTIVE_BUFFER,
                source,
            })?;
        self.active = next;
        Ok(())
    }

    /// Reads and clears the buffer the program is not writing to.
    pub fn drain_idle(&mut self) -> Result<Vec<RawSample>, BpfError> {
        let idle = (1 - self.active) as usize;
        let counts_name = if idle == 0 { m::COUNTS_A } else { m::COUNTS_B };
        let map_err = |name| move |source| BpfError::Map { name, source };
        let mut entries = Vec::new();
        for entry in &self.counts[idle] {
            let (key, per_cpu) = entry.map_err(map_err(counts_name))?;
            entries.push((key, per_cpu.iter().sum::<u64>()));
        }
        let stacks = &self.stacks[idle];
        let mut stack_cache: std::collections::HashMap<i32, Option<Vec<u64>>> =
            std::collections::HashMap::new();
        let mut resolve = |id: i32| -> Option<Vec<u64>> {
            if id == NO_STACK {
                return None;
            }
            stack_cache
                .entry(id)
                .or_insert_with(|| {
                    stacks
                        .get(&(id as u32), 0)
                        .ok()
                        .map(|trace| trace.frames().iter().map(|f| f.ip).collect())
                })
                .clone()
        };
        let samples = entries
            .iter()
            .map(|(key, count)| RawSample {
                pid: key.pid,
                tid: key.tid,
                comm: comm_string(&key.comm),
                user: resolve(key.user_stack_id),
                kernel: resolve(key.kernel_stack_id),
                count: *count,
            })
            .collect();
        for (key, _) in &entries {
            // A key may vanish only if something else deleted it: not an error worth failing for.
            let _ = self.counts[idle].remove(key);
        }
        let ids: Vec<u32> = self.stacks[idle]
            .stack_ids()
            .filter_map(Result::ok)
            .collect();
        for id in ids {
            let _ = self.stacks[idle].remove(&id);
        }
        Ok(samples)
    }

    /// The program's counters, summed over CPUs.
    pub fn stats(&self) -> Result<SamplerStats, BpfError> {
        let mut stats = SamplerStats::default();
        for (i, total) in stats.counters.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(i as u32), 0)
                .map_err(|source| BpfError::Map {
                    name: m::STATS,
                    source,
                })?;
            *total = values.iter().sum();
        }
        Ok(stats)
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn comm_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn comm_stops_at_nul() {
        assert_eq!(super::comm_string(b"worker\0\0\0garbage"), "worker");
        assert_eq!(super::comm_string(b"sixteen-chars-xx"), "sixteen-chars-xx");
    }
}
