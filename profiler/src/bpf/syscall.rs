//! The syscall probes: `sys_enter` / `sys_exit` BTF tracepoints; latency histograms, errno counts
//! and slow-syscall stacks in double-buffered maps.

use aya::Ebpf;
use aya::maps::{Array, HashMap, MapData, PerCpuHashMap};
use profiler_common::{ErrnoKey, OffCpuValue, SlowKey, SyscallKey, SyscallStats, maps as m};

use super::{BpfError, comm_string, take_map};

const PROGRAMS: [(&str, &str); 2] = [("on_sys_enter", "sys_enter"), ("on_sys_exit", "sys_exit")];

/// One drained histogram: a process's calls of one syscall.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSyscall {
    pub pid: u32,
    pub nr: u32,
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub bytes: u64,
    pub errors: u64,
    /// The thread that made the first call in this drain's buffer.
    pub comm: String,
    /// The non-empty buckets of `histogram::BUCKETS`: (bucket, count), ascending.
    pub buckets: Vec<(u32, u64)>,
}

impl RawSyscall {
    /// One entry of a histogram map, its dense buckets made sparse.
    #[must_use]
    pub fn from_stats(key: &SyscallKey, s: &SyscallStats) -> Self {
        Self {
            pid: key.pid,
            nr: key.nr,
            count: s.count,
            total_ns: s.total_ns,
            max_ns: s.max_ns,
            bytes: s.bytes,
            errors: s.errors,
            comm: comm_string(&s.comm),
            buckets: s
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &c)| (i as u32, u64::from(c)))
                .collect(),
        }
    }
}

/// One drained errno count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawErrno {
    pub pid: u32,
    pub nr: u32,
    pub errno: u32,
    pub count: u64,
}

/// One drained slow-syscall stack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSlow {
    pub pid: u32,
    pub tid: u32,
    pub nr: u32,
    pub comm: String,
    pub user: Option<Vec<u64>>,
    pub total_ns: u64,
    pub count: u64,
}

pub(super) struct Syscalls {
    histograms: [HashMap<MapData, SyscallKey, SyscallStats>; 2],
    errnos: [HashMap<MapData, ErrnoKey, u64>; 2],
    slow: [PerCpuHashMap<MapData, SlowKey, OffCpuValue>; 2],
}

impl Syscalls {
    pub(super) fn attach(ebpf: &mut Ebpf, byte_syscalls: &[u32]) -> Result<Self, BpfError> {
        let mut bytes: Array<MapData, u32> = take_map(ebpf, m::BYTE_SYSCALLS)?;
        for &nr in byte_syscalls {
            bytes.set(nr, 1, 0).map_err(|source| BpfError::Map {
                name: m::BYTE_SYSCALLS,
                source,
            })?;
        }
        let syscalls = Self {
            histograms: [
                take_map(ebpf, m::SYSCALLS_A)?,
                take_map(ebpf, m::SYSCALLS_B)?,
            ],
            errnos: [take_map(ebpf, m::ERRNOS_A)?, take_map(ebpf, m::ERRNOS_B)?],
            slow: [take_map(ebpf, m::SLOW_A)?, take_map(ebpf, m::SLOW_B)?],
        };
        super::attach_btf_tracepoints(ebpf, &PROGRAMS)?;
        Ok(syscalls)
    }

    /// Reads and clears buffer `idle` into `out`.
    pub(super) fn drain(
        &mut self,
        idle: usize,
        stacks: &mut super::StackReader<'_>,
        out: &mut super::Drained,
    ) -> Result<(), BpfError> {
        let ab = |a, b| if idle == 0 { a } else { b };
        let map_err = |name| move |source| BpfError::Map { name, source };

        let mut keys = Vec::new();
        let mut histograms = Vec::new();
        for entry in &self.histograms[idle] {
            let (key, s) = entry.map_err(map_err(ab(m::SYSCALLS_A, m::SYSCALLS_B)))?;
            keys.push(key);
            histograms.push(RawSyscall::from_stats(&key, &s));
        }
        for key in &keys {
            let _ = self.histograms[idle].remove(key);
        }

        let mut errno_keys = Vec::new();
        let mut errnos = Vec::new();
        for entry in &self.errnos[idle] {
            let (key, count) = entry.map_err(map_err(ab(m::ERRNOS_A, m::ERRNOS_B)))?;
            errno_keys.push(key);
            errnos.push(RawErrno {
                pid: key.pid,
                nr: key.nr,
                errno: key.errno,
                count,
            });
        }
        for key in &errno_keys {
            let _ = self.errnos[idle].remove(key);
        }

        let mut slow_keys = Vec::new();
        let mut slow = Vec::new();
        for entry in &self.slow[idle] {
            let (key, per_cpu) = entry.map_err(map_err(ab(m::SLOW_A, m::SLOW_B)))?;
            slow_keys.push(key);
            slow.push(RawSlow {
                pid: key.pid,
                tid: key.tid,
                nr: key.nr,
                comm: comm_string(&key.comm),
                user: stacks.get(key.user_stack_id),
                total_ns: per_cpu.iter().map(|v| v.total_ns).sum(),
                count: per_cpu.iter().map(|v| v.count).sum(),
            });
        }
        for key in &slow_keys {
            let _ = self.slow[idle].remove(key);
        }
        out.syscalls = histograms;
        out.errnos = errnos;
        out.slow = slow;
        Ok(())
    }
}
