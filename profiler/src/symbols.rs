//! The symbols of a recording: the memory maps of every process seen (read when first seen, so
//! exited processes still symbolize), the frames of every address (resolved in batches by the
//! symbolizer thread, while files are still there), and turning stacks into pprof locations.

use std::collections::{HashMap, HashSet};

use crate::pprof::{FastMap, FrameLine, LabelValue, MappingInfo, PprofBuilder};
use crate::procfs::{self, MapEntry, ProcessInfo, Roots};
use crate::symbolize::{Batch, Frames, RefusalCounts, SymbolizerThread};
use crate::target_file::{FileKey, FileSpec};

/// Counts of what could not be resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    /// Distinct addresses that got no symbol.
    pub unsymbolized: u64,
    /// Processes whose memory maps could not be read: gone, or closed to us (permissions).
    pub processes_unreadable: u64,
    /// Files the symbolizer refused, by reason.
    pub files_refused: RefusalCounts,
    /// Known pids found running another process (pid reused, or `exec`): their maps were read
    /// again.
    pub processes_replaced: u64,
}

/// Where a user address lives: the file and the offset in it, as symbolization wants it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileAddr {
    file: FileKey,
    offset: u64,
}

/// A stack as the programs captured it: user and kernel frames, leaf first.
#[derive(Clone, Copy, Debug)]
pub struct Stack<'a> {
    pub pid: u32,
    pub user: Option<&'a [u64]>,
    pub kernel: Option<&'a [u64]>,
}

#[derive(Default)]
pub struct Symbols {
    /// `None`: the process was gone before we could read it.
    processes: HashMap<u32, Option<ProcessInfo>>,
    user: HashMap<FileAddr, Frames>,
    kernel: HashMap<u64, Frames>,
    /// GNU build ids of the files symbolized, as the symbolizer read them.
    build_ids: HashMap<FileKey, String>,
    /// Root directories of processes with their own, held open.
    roots: Roots,
    /// Processes found exited by the last [`Symbols::forget_exited`].
    exited: HashSet<u32>,
    pub stats: SymbolStats,
}

/// Kernel addresses kept symbolized before the cache is started afresh.
const KERNEL_CACHE_MAX: usize = 200_000;

/// Address used to look a frame up: return addresses point after the call, so all but the frame
/// that was interrupted are looked up one byte earlier, inside the call instruction.
fn lookup_addr(address: u64, precise: bool) -> u64 {
    if precise {
        address
    } else {
        address.saturating_sub(1)
    }
}

/// The user frame at index `i` is the interrupted instruction only when the stack has no kernel
/// part (otherwise it is the return address of the syscall).
fn user_precise(i: usize, stack: &Stack<'_>) -> bool {
    i == 0 && stack.kernel.is_none()
}

impl Symbols {
    /// Reads `pid`'s maps now, if not already known.
    pub fn remember_process(&mut self, pid: u32) {
        if self.processes.contains_key(&pid) {
            return;
        }
        let info = ProcessInfo::read_with(pid, &mut self.roots).ok();
        if info.is_none() {
            self.stats.processes_unreadable += 1;
        }
        self.processes.insert(pid, info);
    }

    /// As [`Symbols::remember_process`], and reads a known pid again when another process now
    /// runs under it (the pid was reused, or the process called `exec`): its new samples are
    /// symbolized with its own maps. Samples merged earlier under that pid in the same window
    /// are written with the new maps too (they carry only the pid).
    fn refresh_process(&mut self, pid: u32) {
        let Some(Some(known)) = self.processes.get(&pid) else {
            self.remember_process(pid);
            return;
        };
        let Some(now) = procfs::identity(pid) else {
            return;
        };
        if known.identity.same_process(&now) {
            return;
        }
        if let Ok(info) = ProcessInfo::read_with(pid, &mut self.roots) {
            tracing::debug!(
                pid,
                "another process runs under a known pid: maps read again"
            );
            self.stats.processes_replaced += 1;
            self.exited.remove(&pid);
            self.processes.insert(pid, Some(info));
        }
    }

    /// The name of process `pid`, if it was read.
    #[must_use]
    pub fn process_name(&self, pid: u32) -> Option<&str> {
        self.processes
            .get(&pid)
            .and_then(Option::as_ref)
            .map(|p| p.name.as_str())
    }

    fn kernel_frames(&self, addr: u64, precise: bool) -> &[FrameLine] {
        self.kernel
            .get(&lookup_addr(addr, precise))
            .map_or(&[][..], Vec::as_slice)
    }

    /// The cgroup and container of process `pid`, if it was read.
    #[must_use]
    pub fn container(&self, pid: u32) -> Option<&crate::container::ContainerIdentity> {
        self.processes
            .get(&pid)
            .and_then(Option::as_ref)
            .and_then(|p| p.container.as_ref())
    }

    /// Forgets processes found exited at the previous call (their last samples have been
    /// drained since), with the symbols of files only they mapped. The agent calls it after
    /// each window, so its memory stays flat while processes come and go.
    pub fn forget_exited(&mut self) {
        let dead_before = std::mem::take(&mut self.exited);
        self.processes.retain(|pid, _| !dead_before.contains(pid));
        self.exited = self
            .processes
            .keys()
            .copied()
            .filter(|&pid| !procfs::process_alive(pid))
            .collect();
        let in_use: HashSet<FileKey> = self
            .processes
            .values()
            .flatten()
            .flat_map(|p| {
                p.mappings
                    .iter()
                    .filter(|m| m.is_file())
                    .map(FileKey::of_mapping)
            })
            .collect();
        self.user.retain(|fa, _| in_use.contains(&fa.file));
        self.build_ids.retain(|file, _| in_use.contains(file));
        // Kernel addresses do not die with processes; only a runaway variety is cut.
        if self.kernel.len() > KERNEL_CACHE_MAX {
            self.kernel.clear();
        }
    }

    /// Processes known, and symbolized user addresses cached (for metrics).
    #[must_use]
    pub fn cache_sizes(&self) -> (usize, usize, usize) {
        (self.processes.len(), self.user.len(), self.kernel.len())
    }

    /// Whether a kernel stack was captured in interrupt or softirq context.
    #[must_use]
    pub fn in_interrupt(&self, kernel: &[u64]) -> bool {
        kernel.iter().enumerate().any(|(i, &addr)| {
            self.kernel_frames(addr, i == 0)
                .iter()
                .any(|f| is_interrupt_frame(&f.function))
        })
    }

    /// Symbolizes every address of `stacks` not seen before.
    pub async fn resolve<'a>(
        &mut self,
        stacks: impl IntoIterator<Item = Stack<'a>>,
        symbolizer: &SymbolizerThread,
    ) {
        let stacks: Vec<Stack<'a>> = stacks.into_iter().collect();
        let pids: HashSet<u32> = stacks.iter().map(|s| s.pid).collect();
        for pid in pids {
            self.refresh_process(pid);
        }
        let mut new_user: HashMap<FileKey, (FileSpec, HashSet<u64>)> = HashMap::new();
        let mut new_kernel: HashSet<u64> = HashSet::new();
        for stack in &stacks {
            for (i, &addr) in stack.kernel.unwrap_or_default().iter().enumerate() {
                let addr = lookup_addr(addr, i == 0);
                if !self.kernel.contains_key(&addr) {
                    new_kernel.insert(addr);
                }
            }
            let Some(Some(info)) = self.processes.get(&stack.pid) else {
                continue;
            };
            for (i, &addr) in stack.user.unwrap_or_default().iter().enumerate() {
                let addr = lookup_addr(addr, user_precise(i, stack));
                if let Some(fa) = file_addr(info, addr)
                    && !self.user.contains_key(&fa)
                    && let Some(entry) = info.mapping_of(addr)
                    && let Some(spec) = info.file_spec(entry)
                {
                    new_user
                        .entry(fa.file)
                        .or_insert_with(|| (spec, HashSet::new()))
                        .1
                        .insert(fa.offset);
                }
            }
        }
        if new_user.is_empty() && new_kernel.is_empty() {
            return;
        }
        let batch = Batch {
            files: new_user
                .into_values()
                .map(|(spec, offsets)| (spec, offsets.into_iter().collect()))
                .collect(),
            kernel: new_kernel.into_iter().collect(),
        };
        let (batch, resolved) = symbolizer.symbolize(batch).await;
        for ((spec, offsets), answer) in batch.files.into_iter().zip(resolved.files) {
            let file = FileKey {
                dev: spec.dev,
                inode: spec.inode,
                path: spec.path,
            };
            if let Some(id) = answer.build_id {
                self.build_ids.insert(file.clone(), id);
            }
            for (offset, frames) in offsets.into_iter().zip(answer.frames) {
                self.stats.unsymbolized += u64::from(frames.is_empty());
                let file = file.clone();
                self.user.insert(FileAddr { file, offset }, frames);
            }
        }
        // Counts since the symbolizer started (a dead symbolizer answers zeros: keep ours).
        if resolved.refused.total() >= self.stats.files_refused.total() {
            self.stats.files_refused = resolved.refused;
        }
        for (addr, frames) in batch.kernel.into_iter().zip(resolved.kernel) {
            self.stats.unsymbolized += u64::from(frames.is_empty());
            self.kernel.insert(addr, frames);
        }
    }
}

/// Frames of the BPF machinery that captured a stack from a tracepoint.
fn is_tracing_frame(function: &str) -> bool {
    function.starts_with("bpf_prog_")
        || function.starts_with("bpf_trace_run")
        || function.starts_with("__bpf_trace_")
}

/// Kernel functions that show a stack was taken in interrupt or softirq context, where the
/// current task is whoever happened to be running.
fn is_interrupt_frame(function: &str) -> bool {
    function.starts_with("asm_sysvec_")
        || function.starts_with("asm_common_interrupt")
        || function.starts_with("asm_exc_")
        || function == "handle_softirqs"
        || function == "__do_softirq"
        || function == "irq_exit_rcu"
        || function == "__irq_exit_rcu"
}

/// The file and file offset of `addr` in `info`'s executable mappings. A file deleted since it
/// was mapped is still a file (opened through `/proc/<pid>/map_files` while the process lives).
fn file_addr(info: &ProcessInfo, addr: u64) -> Option<FileAddr> {
    let entry = info.mapping_of(addr)?;
    if !entry.is_file() {
        return None;
    }
    Some(FileAddr {
        file: FileKey::of_mapping(entry),
        offset: addr - entry.start + entry.offset,
    })
}

/// Writes stacks into one pprof, adding each mapping once.
pub struct StackWriter<'s> {
    pub builder: PprofBuilder,
    symbols: &'s Symbols,
    kernel_mapping: Option<u64>,
    mappings: HashMap<(u32, u64), u64>,
    /// Location ids of the user addresses written so far, by (pid, address). The builder keys
    /// locations by (mapping, address) and keeps the frames given first, and an address's mapping
    /// is fixed for a process, so a repeated address gets the same id: this only skips looking
    /// its mapping and frames up again (hashing a file path per frame, which dominated the time
    /// to write a profile; see `benches/pprof_encode.rs`).
    user_locations: FastMap<(u32, u64), u64>,
}

impl<'s> StackWriter<'s> {
    /// Adds a sample of process `pid` with `labels`, plus its container's: `cgroup`,
    /// `container_id` and `pod_uid` where known.
    pub fn add_sample(
        &mut self,
        pid: u32,
        locations: Vec<u64>,
        values: Vec<i64>,
        labels: &[(&str, LabelValue<'_>)],
    ) {
        let Some(c) = self.symbols.container(pid) else {
            self.builder.add_sample(locations, values, labels);
            return;
        };
        let mut all = labels.to_vec();
        all.push(("cgroup", LabelValue::Str(&c.cgroup)));
        if let Some(id) = &c.container_id {
            all.push(("container_id", LabelValue::Str(id)));
        }
        if let Some(uid) = &c.pod_uid {
            all.push(("pod_uid", LabelValue::Str(uid)));
        }
        self.builder.add_sample(locations, values, &all);
    }

    #[must_use]
    pub fn new(builder: PprofBuilder, symbols: &'s Symbols) -> Self {
        Self {
            builder,
            symbols,
            kernel_mapping: None,
            mappings: HashMap::new(),
            user_locations: FastMap::default(),
        }
    }

    /// Location ids of `stack`, leaf first: kernel frames, then user frames. A stack with no
    /// frames at all gets the placeholder `[stack not captured]`. The frames of the BPF program
    /// that captured a kernel stack (`bpf_prog_*`, `bpf_trace_run*`) are left out.
    pub fn locations(&mut self, stack: &Stack<'_>) -> Vec<u64> {
        // User frames first, so that the first mapping of a profile is a program, not the kernel
        // (`go tool pprof` names a profile after its first mapping).
        let user = self.user_locations(stack);
        if stack.kernel.is_none() && !user.is_empty() {
            return user;
        }
        let mut locations =
            Vec::with_capacity(stack.kernel.map_or(0, <[u64]>::len) + user.len() + 1);
        if let Some(kernel) = stack.kernel {
            let mapping = self.kernel_mapping();
            let mut tracing_frames = true;
            for (i, &addr) in kernel.iter().enumerate() {
                let frames = self.symbols.kernel_frames(addr, i == 0);
                if tracing_frames
                    && frames
                        .first()
                        .is_some_and(|f| is_tracing_frame(&f.function))
                {
                    continue;
                }
                tracing_frames = false;
                locations.push(self.builder.location(mapping, addr, frames));
            }
        }
        locations.extend(user);
        if locations.is_empty() {
            locations.push(self.builder.pseudo_location("[stack not captured]"));
        }
        locations
    }

    fn user_locations(&mut self, stack: &Stack<'_>) -> Vec<u64> {
        let mut locations = Vec::with_capacity(stack.user.map_or(0, <[u64]>::len));
        let info = self
            .symbols
            .processes
            .get(&stack.pid)
            .and_then(Option::as_ref);
        for (i, &addr) in stack.user.unwrap_or_default().iter().enumerate() {
            if let Some(&id) = self.user_locations.get(&(stack.pid, addr)) {
                locations.push(id);
                continue;
            }
            let found = info.and_then(|info| info.mapping_of(addr).map(|entry| (info, entry)));
            let (mapping, frames) = match found {
                Some((info, entry)) => {
                    let mapping = self.user_mapping(stack.pid, entry);
                    let frames = file_addr(info, lookup_addr(addr, user_precise(i, stack)))
                        .and_then(|fa| self.symbols.user.get(&fa))
                        .map_or(&[][..], Vec::as_slice);
                    (mapping, frames)
                }
                None => (0, &[][..]),
            };
            let id = self.builder.location(mapping, addr, frames);
            self.user_locations.insert((stack.pid, addr), id);
            locations.push(id);
        }
        locations
    }

    fn kernel_mapping(&mut self) -> u64 {
        if let Some(id) = self.kernel_mapping {
            return id;
        }
        let id = self.builder.add_mapping(&MappingInfo {
            memory_start: 0xffff_8000_0000_0000,
            memory_limit: u64::MAX,
            file_offset: 0,
            path: "[kernel]".into(),
            build_id: procfs::kernel_build_id().unwrap_or_default(),
            symbolized: true,
        });
        self.kernel_mapping = Some(id);
        id
    }

    fn user_mapping(&mut self, pid: u32, entry: &MapEntry) -> u64 {
        if let Some(&id) = self.mappings.get(&(pid, entry.start)) {
            return id;
        }
        // Read by the symbolizer from the file it vetted: nothing is opened here.
        let build_id = self
            .symbols
            .build_ids
            .get(&FileKey::of_mapping(entry))
            .cloned()
            .unwrap_or_default();
        let id = self.builder.add_mapping(&MappingInfo {
            memory_start: entry.start,
            memory_limit: entry.end,
            file_offset: entry.offset,
            path: entry.path.clone(),
            build_id,
            symbolized: entry.is_file(),
        });
        self.mappings.insert((pid, entry.start), id);
        id
    }
}

impl FrameLine {
    /// A frame that names a function without source information.
    #[must_use]
    pub fn named(function: &str) -> Self {
        Self {
            function: function.to_owned(),
            file: None,
            line: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pprof::ProfileExt as _;

    #[test]
    fn return_addresses_are_looked_up_inside_the_call() {
        assert_eq!(lookup_addr(0x1000, true), 0x1000);
        assert_eq!(lookup_addr(0x1000, false), 0xfff);
        let user = [1u64, 2];
        let in_kernel = Stack {
            pid: 1,
            user: Some(&user),
            kernel: Some(&user),
        };
        let in_user = Stack {
            kernel: None,
            ..in_kernel
        };
        assert!(
            !user_precise(0, &in_kernel),
            "a syscall's user frame is a return address"
        );
        assert!(user_precise(0, &in_user));
        assert!(!user_precise(1, &in_user));
    }

    #[test]
    fn a_repeated_user_address_is_one_location_with_its_first_frames() {
        let path = "/nonexistent/app";
        let mut symbols = Symbols::default();
        symbols.processes.insert(
            7,
            Some(ProcessInfo {
                pid: 7,
                name: "app".into(),
                mappings: vec![procfs::MapEntry {
                    start: 0x1000,
                    end: 0x2000,
                    offset: 0,
                    executable: true,
                    dev: 1,
                    inode: 2,
                    path: path.into(),
                }],
                ..ProcessInfo::default()
            }),
        );
        let mut frames = |offset: u64, name: &str| {
            let fa = FileAddr {
                file: FileKey {
                    dev: 1,
                    inode: 2,
                    path: path.into(),
                },
                offset,
            };
            symbols.user.insert(fa, vec![FrameLine::named(name)]);
        };
        // 0x1100 as the interrupted instruction, 0x10ff as a return address minus one.
        frames(0x100, "precise");
        frames(0xff, "return");
        frames(0x200, "caller");
        let symbols = symbols;
        let mut w = StackWriter::new(
            PprofBuilder::new(&[("samples", "count")], ("", ""), 1),
            &symbols,
        );
        let first = w.locations(&Stack {
            pid: 7,
            user: Some(&[0x1100, 0x1200]),
            kernel: None,
        });
        let second = w.locations(&Stack {
            pid: 7,
            user: Some(&[0x1200, 0x1100, 0x5000]),
            kernel: None,
        });
        assert_eq!(
            first[..],
            [second[1], second[0]],
            "same addresses, same locations"
        );
        let p = w.builder.finish();
        assert_eq!(
            p.location.len(),
            3,
            "0x1100, 0x1200 and the unmapped 0x5000"
        );
        let name = |id: u64| {
            let line = &p.location[id as usize - 1].line;
            line.first()
                .map_or("", |l| p.str(p.function[l.function_id as usize - 1].name))
        };
        assert_eq!(name(first[0]), "precise", "the frames given first stay");
        assert_eq!(name(second[2]), "");
        assert_eq!(p.location[second[2] as usize - 1].mapping_id, 0);
    }
}
