//! Loading cprof's eBPF object, attaching the programs of the requested events, and draining the
//! aggregates they keep in the kernel.
//!
//! Draining never races the programs: aggregates are double-buffered. [`Probes::flip`] points the
//! programs at the other buffer; once in-flight programs have finished (the caller waits a few
//! milliseconds), the `drain_*` methods read and clear the idle one.
//!
//! Needs: Linux 5.8+, `CAP_BPF` and `CAP_PERFMON` (or `CAP_SYS_ADMIN`), BTF for off-CPU.

mod offcpu;
mod oncpu;
mod syscall;
mod tcp;

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, StackTraceMap};
use aya::programs::ProgramError;
use aya::{Ebpf, EbpfError, EbpfLoader};
use profiler_common::{globals, maps as m, stat};

pub use offcpu::{RawWait, Waker};
pub use oncpu::RawSample;
pub use syscall::{RawErrno, RawSlow, RawSyscall};
pub use tcp::{RawTcpEvent, decode_tcp_event};

/// The eBPF object built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/profiler"));

/// Why the probes could not be set up or read.
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
    #[error("program {name}: {source}")]
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
    #[error("reading kernel BTF (needed by off-CPU): {0}")]
    Btf(#[from] crate::btf::BtfError),
    #[error("kernel BTF for the tracepoints: {0}")]
    KernelBtf(#[from] aya::BtfError),
}

/// Which signals to record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one switch per event of --event"
)]
pub struct Events {
    pub cpu: bool,
    pub offcpu: bool,
    pub syscall: bool,
    pub tcp: bool,
}

impl Events {
    /// The names `--event` takes for the signals that are on, in a fixed order.
    #[must_use]
    pub fn names(&self) -> Vec<&'static str> {
        [
            (self.cpu, "cpu"),
            (self.offcpu, "offcpu"),
            (self.syscall, "syscall"),
            (self.tcp, "tcp"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }
}

/// How to set up the probes.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub events: Events,
    /// On-CPU samples per second per CPU.
    pub frequency_hz: u64,
    /// Processes to record; with `cgroups` also `None`, every process is recorded.
    pub pids: Option<Vec<u32>>,
    /// Record the processes of cgroups whose ids [`Probes::set_cgroups`] gives.
    pub cgroup_filter: bool,
    /// Report pids as this pid namespace (kernel device number, inode) sees them, and record
    /// only its tasks; `None`: host pids, every task.
    pub pid_namespace: Option<(u64, u64)>,
    /// On-CPU: distinct (thread, stacks) keys per buffer.
    pub counts_max_entries: u32,
    /// On-CPU: distinct stacks per buffer.
    pub stacks_max_entries: u32,
    /// TCP: bytes of the event ring buffer (a power of two, at least a page).
    pub tcp_buffer_bytes: u32,
    /// Off-CPU: waits shorter than this are not recorded.
    pub offcpu_min_ns: u64,
    /// Off-CPU: threads tracked while switched out (LRU).
    pub offcpu_threads_max_entries: u32,
    /// Syscalls: calls at least this slow have their stacks recorded.
    pub syscall_slow_ns: u64,
    /// Syscalls: numbers whose return value counts bytes.
    pub byte_syscalls: Vec<u32>,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            events: Events {
                cpu: true,
                ..Events::default()
            },
            frequency_hz: 99,
            pids: None,
            cgroup_filter: false,
            pid_namespace: None,
            counts_max_entries: m::COUNTS_MAX_ENTRIES,
            stacks_max_entries: m::STACKS_MAX_ENTRIES,
            tcp_buffer_bytes: m::TCP_EVENTS_BYTES,
            offcpu_min_ns: 1_000,
            offcpu_threads_max_entries: m::OFFCPU_START_MAX_ENTRIES,
            syscall_slow_ns: 1_000_000,
            byte_syscalls: Vec::new(),
        }
    }
}

/// Everything drained from the idle buffers.
#[derive(Debug, Default)]
pub struct Drained {
    pub samples: Vec<RawSample>,
    pub waits: Vec<RawWait>,
    pub syscalls: Vec<RawSyscall>,
    pub errnos: Vec<RawErrno>,
    pub slow: Vec<RawSlow>,
    pub tcp: Vec<RawTcpEvent>,
}

/// Stack traces read from a stack map, each id once. Keep one for a drain when the map is cleared
/// after it, or for the whole run when ids stay valid (maps never cleared).
#[derive(Default)]
pub(crate) struct StackCache {
    cache: std::collections::HashMap<i32, Option<Vec<u64>>>,
}

impl StackCache {
    /// The frames of stack `id` in `map`, leaf first; `None` for `NO_STACK` or a missing id.
    pub(crate) fn get(&mut self, map: &StackTraceMap<MapData>, id: i32) -> Option<Vec<u64>> {
        if id == profiler_common::NO_STACK {
            return None;
        }
        self.cache
            .entry(id)
            .or_insert_with(|| {
                map.get(&(id as u32), 0)
                    .ok()
                    .map(|trace| trace.frames().iter().map(|f| f.ip).collect())
            })
            .clone()
    }

    /// Stack ids read so far.
    pub(crate) fn len(&self) -> usize {
        self.cache.len()
    }

    pub(crate) fn clear(&mut self) {
        self.cache.clear();
    }
}

/// One drain's view of a double-buffered stack map.
pub(crate) struct StackReader<'m> {
    map: &'m StackTraceMap<MapData>,
    cache: StackCache,
}

impl StackReader<'_> {
    pub(crate) fn get(&mut self, id: i32) -> Option<Vec<u64>> {
        self.cache.get(self.map, id)
    }
}

/// Totals of the programs' per-CPU counters (see `profiler_common::stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeStats {
    pub counters: [u64; stat::COUNT as usize],
}

impl ProbeStats {
    /// What the counters rose by since `earlier`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = *self;
        for (now, before) in out.counters.iter_mut().zip(earlier.counters) {
            *now = now.saturating_sub(before);
        }
        out
    }

    #[must_use]
    pub fn get(&self, index: u32) -> u64 {
        self.counters[index as usize]
    }

    /// On-CPU samples that were lost: seen by the program but not recorded.
    #[must_use]
    pub fn lost_samples(&self) -> u64 {
        self.get(stat::DROPPED_COUNTS_FULL)
    }

    /// On-CPU stacks not captured because the stack map was full or a hash bucket was taken.
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

/// The loaded and attached probes. Dropping it detaches and unloads everything.
pub struct Probes {
    ebpf: Ebpf,
    active_buffer: Array<MapData, u32>,
    target_cgroups: HashMap<MapData, u64, u8>,
    stats: PerCpuArray<MapData, u64>,
    active: u32,
    /// Stacks of on-CPU samples and slow syscalls, double-buffered with their aggregates.
    stacks: [StackTraceMap<MapData>; 2],
    oncpu: Option<oncpu::OnCpu>,
    offcpu: Option<offcpu::OffCpu>,
    syscalls: Option<syscall::Syscalls>,
    tcp: Option<tcp::Tcp>,
}

impl Probes {
    /// Loads the programs of `options.events` and attaches them.
    pub fn start(options: &ProbeOptions) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        let mut ebpf = load(options)?;
        let Events {
            cpu,
            offcpu: off,
            syscall: sys,
            tcp: net,
        } = options.events;

        let mut targets: HashMap<MapData, u32, u8> = take_map(&mut ebpf, m::TARGET_PIDS)?;
        for &pid in options.pids.iter().flatten() {
            targets.insert(pid, 1, 0).map_err(|source| BpfError::Map {
                name: m::TARGET_PIDS,
                source,
            })?;
        }
        let target_cgroups = take_map(&mut ebpf, m::TARGET_CGROUPS)?;
        let active_buffer = take_map(&mut ebpf, m::ACTIVE_BUFFER)?;
        let stats = take_map(&mut ebpf, m::STATS)?;
        let stacks = [
            take_map(&mut ebpf, m::STACKS_A)?,
            take_map(&mut ebpf, m::STACKS_B)?,
        ];
        let oncpu = if cpu {
            Some(oncpu::OnCpu::attach(&mut ebpf, options.frequency_hz)?)
        } else {
            None
        };
        let offcpu = if off {
            Some(offcpu::OffCpu::attach(&mut ebpf)?)
        } else {
            None
        };
        let syscalls = if sys {
            Some(syscall::Syscalls::attach(
                &mut ebpf,
                &options.byte_syscalls,
            )?)
        } else {
            None
        };
        let tcp = if net {
            Some(tcp::Tcp::attach(&mut ebpf)?)
        } else {
            None
        };
        Ok(Self {
            ebpf,
            active_buffer,
            target_cgroups,
            stats,
            active: 0,
            stacks,
            oncpu,
            offcpu,
            syscalls,
            tcp,
        })
    }

    /// Makes the cgroups with these ids (and only those) the recorded ones, when the probes were
    /// started with `cgroup_filter`. Returns how many could not be added (map full).
    pub fn set_cgroups(&mut self, ids: &std::collections::HashSet<u64>) -> Result<u64, BpfError> {
        let err = |source| BpfError::Map {
            name: m::TARGET_CGROUPS,
            source,
        };
        let old: std::collections::HashSet<u64> =
            self.target_cgroups.keys().filter_map(Result::ok).collect();
        for id in &old {
            if !ids.contains(id) {
                self.target_cgroups.remove(id).map_err(err)?;
            }
        }
        let mut full = 0;
        for &id in ids {
            if !old.contains(&id) && self.target_cgroups.insert(id, 1, 0).is_err() {
                full += 1;
            }
        }
        Ok(full)
    }

    /// Points the programs at the other buffer. Wait for in-flight programs (a few ms is ample:
    /// they run for microseconds) before draining.
    pub fn flip(&mut self) -> Result<(), BpfError> {
        if let Some(offcpu) = &mut self.offcpu
            && offcpu.reset_due
        {
            // Pause the off-CPU programs first: the drain after this flip then holds every
            // wait that refers to the stacks about to be cleared.
            set_control(&mut self.active_buffer, m::OFFCPU_PAUSED, 1)?;
            offcpu.paused = true;
        }
        let next = 1 - self.active;
        set_control(&mut self.active_buffer, 0, next)?;
        self.active = next;
        Ok(())
    }

    /// Reads and clears every idle buffer.
    pub fn drain(&mut self) -> Result<Drained, BpfError> {
        let idle = (1 - self.active) as usize;
        let mut drained = Drained::default();
        let mut stacks = StackReader {
            map: &self.stacks[idle],
            cache: StackCache::default(),
        };
        if let Some(oncpu) = &mut self.oncpu {
            drained.samples = oncpu.drain(idle, &mut stacks)?;
        }
        if let Some(syscalls) = &mut self.syscalls {
            syscalls.drain(idle, &mut stacks, &mut drained)?;
        }
        if let Some(offcpu) = &mut self.offcpu {
            drained.waits = offcpu.drain(idle)?;
            if offcpu.paused {
                offcpu.reset();
                offcpu.paused = false;
                set_control(&mut self.active_buffer, m::OFFCPU_PAUSED, 0)?;
            }
        }
        if let Some(tcp) = &mut self.tcp {
            drained.tcp = tcp.drain();
        }
        let ids: Vec<u32> = self.stacks[idle]
            .stack_ids()
            .filter_map(Result::ok)
            .collect();
        for id in ids {
            let _ = self.stacks[idle].remove(&id);
        }
        Ok(drained)
    }

    /// Empties the TCP ring buffer only (cheap; call it often enough that the ring never fills).
    pub fn drain_tcp(&mut self) -> Vec<RawTcpEvent> {
        self.tcp.as_mut().map_or_else(Vec::new, tcp::Tcp::drain)
    }

    /// Threads switched out and not back yet (off-CPU).
    #[must_use]
    pub fn offcpu_waiting(&self) -> u64 {
        self.offcpu.as_ref().map_or(0, offcpu::OffCpu::waiting)
    }

    /// Whether the maps can be read with the capabilities this thread holds now: false only on
    /// `EPERM` (kernels before 6.5 with `kernel.unprivileged_bpf_disabled` want `CAP_BPF` for
    /// every `bpf(2)` command, even on a descriptor we hold).
    #[must_use]
    pub fn maps_readable(&self) -> bool {
        match self.active_buffer.get(&0, 0) {
            Err(MapError::SyscallError(e)) => e.io_error.raw_os_error() != Some(libc::EPERM),
            _ => true,
        }
    }

    /// Detaches every program. The maps stay readable, so that what was collected up to now can
    /// be drained completely and the counters agree with it exactly.
    pub fn stop(&mut self) -> Result<(), BpfError> {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        for name in names {
            if let Some(program) = self.ebpf.program_mut(&name) {
                // A program never loaded answers NotLoaded: nothing to detach.
                match program_unload(program) {
                    Ok(()) | Err(ProgramError::NotLoaded) => {}
                    Err(source) => {
                        return Err(BpfError::Program {
                            name: "unload",
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Run time and run count of each loaded program (zero unless the sysctl
    /// `kernel.bpf_stats_enabled` is 1).
    #[must_use]
    pub fn program_stats(&self) -> std::collections::BTreeMap<String, (std::time::Duration, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some((name.to_owned(), (info.run_time(), info.run_count())))
            })
            .collect()
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Result<ProbeStats, BpfError> {
        let mut stats = ProbeStats::default();
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
        if let Some(offcpu) = &self.offcpu {
            stats.counters[stat::OFFCPU_DISCARDED as usize] += offcpu.discarded;
            stats.counters[stat::OFFCPU_STACK_RESETS as usize] = offcpu.resets;
        }
        Ok(stats)
    }
}

/// Sets word `index` of the programs' control array (`ACTIVE_BUFFER`).
fn set_control(control: &mut Array<MapData, u32>, index: u32, value: u32) -> Result<(), BpfError> {
    control
        .set(index, value, 0)
        .map_err(|source| BpfError::Map {
            name: m::ACTIVE_BUFFER,
            source,
        })
}

/// Loads the object with the globals and map sizes `options` ask for.
fn load(options: &ProbeOptions) -> Result<Ebpf, BpfError> {
    let mut filter = 0;
    if options.pids.is_some() {
        filter |= profiler_common::filter::PIDS;
    }
    if options.cgroup_filter {
        filter |= profiler_common::filter::CGROUPS;
    }
    let btf = if options.events.offcpu || options.events.tcp {
        Some(crate::btf::Btf::kernel()?)
    } else {
        None
    };
    let task_pid_offset = match (&btf, options.events.offcpu) {
        (Some(btf), true) => btf.field_offset("task_struct", "pid")?,
        _ => 0,
    };
    let tcp_offsets = match (&btf, options.events.tcp) {
        (Some(btf), true) => tcp::offsets(btf)?,
        _ => profiler_common::TcpOffsets::default(),
    };
    let mut loader = EbpfLoader::new();
    loader
        .override_global(globals::FILTER_PIDS, &filter, true)
        .override_global(globals::TASK_PID_OFFSET, &task_pid_offset, true)
        .override_global(globals::OFFCPU_MIN_NS, &options.offcpu_min_ns, true)
        .override_global(globals::SYSCALL_SLOW_NS, &options.syscall_slow_ns, true)
        .override_global(globals::TCP_OFFSETS, &tcp_offsets, true);
    let (ns_dev, ns_ino) = options.pid_namespace.unwrap_or((0, 0));
    loader
        .override_global(globals::PIDNS_DEV, &ns_dev, true)
        .override_global(globals::PIDNS_INO, &ns_ino, true);
    // Maps of events not recorded shrink to one entry: they are created all the same.
    let size = |on: bool, n: u32| if on { n } else { 1 };
    let Events {
        cpu,
        offcpu: off,
        syscall: sys,
        tcp: net,
    } = options.events;
    for (name, n) in [
        (m::COUNTS_A, size(cpu, options.counts_max_entries)),
        (m::COUNTS_B, size(cpu, options.counts_max_entries)),
        (m::STACKS_A, size(cpu || sys, options.stacks_max_entries)),
        (m::STACKS_B, size(cpu || sys, options.stacks_max_entries)),
        (m::SYSCALLS_A, size(sys, m::SYSCALLS_MAX_ENTRIES)),
        (m::SYSCALLS_B, size(sys, m::SYSCALLS_MAX_ENTRIES)),
        (m::ERRNOS_A, size(sys, m::ERRNOS_MAX_ENTRIES)),
        (m::ERRNOS_B, size(sys, m::ERRNOS_MAX_ENTRIES)),
        (m::SLOW_A, size(sys, m::SLOW_MAX_ENTRIES)),
        (m::SLOW_B, size(sys, m::SLOW_MAX_ENTRIES)),
        (m::SYSCALL_START, size(sys, m::SYSCALL_START_MAX_ENTRIES)),
        (m::TCP_SOCKS, size(net, m::TCP_SOCKS_MAX_ENTRIES)),
        (m::TCP_STACKS, size(net, 4_096)),
        // A ring buffer is sized in bytes, a power of two pages at least.
        (
            m::TCP_EVENTS,
            if net { options.tcp_buffer_bytes } else { 4_096 },
        ),
        (m::OFFCPU_A, size(off, m::OFFCPU_MAX_ENTRIES)),
        (m::OFFCPU_B, size(off, m::OFFCPU_MAX_ENTRIES)),
        (m::OFFCPU_STACKS, size(off, m::OFFCPU_STACKS_MAX_ENTRIES)),
        (
            m::OFFCPU_START,
            size(off, options.offcpu_threads_max_entries),
        ),
    ] {
        loader.map_max_entries(name, n);
    }
    Ok(loader.load(OBJECT)?)
}

/// Loads and attaches BTF tracepoint programs: `(program, tracepoint)` pairs.
pub(crate) fn attach_btf_tracepoints(
    ebpf: &mut Ebpf,
    programs: &[(&'static str, &str)],
) -> Result<(), BpfError> {
    let btf = aya::Btf::from_sys_fs()?;
    for &(name, tracepoint) in programs {
        let program_err = |source| BpfError::Program { name, source };
        let program: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or(BpfError::MissingProgram(name))?
            .try_into()
            .map_err(program_err)?;
        program.load(tracepoint, &btf).map_err(program_err)?;
        program.attach().map_err(program_err)?;
    }
    Ok(())
}

fn program_unload(program: &mut aya::programs::Program) -> Result<(), ProgramError> {
    use aya::programs::Program;
    match program {
        Program::PerfEvent(p) => p.unload(),
        Program::BtfTracePoint(p) => p.unload(),
        _ => Ok(()),
    }
}

pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(map).map_err(|source| BpfError::Map { name, source })
}

/// A task name as the kernel stores it (a NUL-padded byte array) as text: up to the first NUL,
/// invalid UTF-8 replaced.
#[must_use]
pub fn comm_string(comm: &[u8]) -> String {
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
