//! What a recording has collected so far: drained samples merged by thread and stack, the memory
//! maps of every process seen (read when first seen, so exited processes still symbolize), and the
//! symbols of every address (resolved at each drain, while files are still there).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use crate::bpf::RawSample;
use crate::pprof::{FrameLine, LabelValue, MappingInfo, PprofBuilder, Profile};
use crate::procfs::{self, ProcessInfo};
use crate::symbolize::{Batch, Frames, SymbolizerThread};

/// Merge key of a sample: one thread, one pair of stacks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct StackKey {
    pid: u32,
    tid: u32,
    comm: String,
    user: Option<Vec<u64>>,
    kernel: Option<Vec<u64>>,
}

/// Counts of what could not be resolved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolStats {
    /// Distinct addresses that got no symbol.
    pub unsymbolized: u64,
    /// Processes that were gone before their memory maps could be read.
    pub processes_unreadable: u64,
}

/// Where a user address lives: the file and the offset in it, as symbolization wants it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileAddr {
    path: PathBuf,
    offset: u64,
}

#[derive(Default)]
pub struct Collected {
    samples: HashMap<StackKey, u64>,
    /// `None`: the process was gone before we could read it.
    processes: HashMap<u32, Option<ProcessInfo>>,
    user_symbols: HashMap<FileAddr, Frames>,
    kernel_symbols: HashMap<u64, Frames>,
    pub symbol_stats: SymbolStats,
    build_ids: HashMap<PathBuf, String>,
}

/// Address used to look a frame up: return addresses point after the call, so all but the frame
/// that was interrupted are looked up one byte earlier, inside the call instruction.
fn lookup_addr(address: u64, precise: bool) -> u64 {
    if precise {
        address
    } else {
        address.saturating_sub(1)
    }
}

impl Collected {
    /// Reads `pid`'s maps now, if not already known (used for targets at start).
    pub fn remember_process(&mut self, pid: u32) {
        if self.processes.contains_key(&pid) {
            return;
        }
        let info = ProcessInfo::read(pid).ok();
        if info.is_none() {
            self.symbol_stats.processes_unreadable += 1;
        }
        self.processes.insert(pid, info);
    }

    /// Merges drained samples and symbolizes every address not seen before.
    pub async fn add(&mut self, raw: Vec<RawSample>, symbolizer: &SymbolizerThread) {
        let mut new_user: HashMap<PathBuf, HashSet<u64>> = HashMap::new();
        let mut new_kernel: HashSet<u64> = HashSet::new();
        for sample in raw {
            self.remember_process(sample.pid);
            if let Some(kernel) = &sample.kernel {
                for (i, &addr) in kernel.iter().enumerate() {
                    let addr = lookup_addr(addr, i == 0);
                    if !self.kernel_symbols.contains_key(&addr) {
                        new_kernel.insert(addr);
                    }
                }
            }
            if let (Some(user), Some(Some(info))) = (&sample.user, self.processes.get(&sample.pid))
            {
                for (i, &addr) in user.iter().enumerate() {
                    let precise = i == 0 && sample.kernel.is_none();
                    if let Some(fa) = file_addr(info, lookup_addr(addr, precise))
                        && !self.user_symbols.contains_key(&fa)
                    {
                        new_user.entry(fa.path).or_default().insert(fa.offset);
                    }
                }
            }
            let key = StackKey {
                pid: sample.pid,
                tid: sample.tid,
                comm: sample.comm,
                user: sample.user,
                kernel: sample.kernel,
            };
            *self.samples.entry(key).or_default() += sample.count;
        }
        if new_user.is_empty() && new_kernel.is_empty() {
            return;
        }
        let batch = Batch {
            files: new_user
                .into_iter()
                .map(|(path, offsets)| (path, offsets.into_iter().collect()))
                .collect(),
            kernel: new_kernel.into_iter().collect(),
        };
        let (batch, resolved) = symbolizer.symbolize(batch).await;
        for ((path, offsets), frames) in batch.files.into_iter().zip(resolved.files) {
            for (offset, frames) in offsets.into_iter().zip(frames) {
                self.symbol_stats.unsymbolized += u64::from(frames.is_empty());
                let path = path.clone();
                self.user_symbols.insert(FileAddr { path, offset }, frames);
            }
        }
        for (addr, frames) in batch.kernel.into_iter().zip(resolved.kernel) {
            self.symbol_stats.unsymbolized += u64::from(frames.is_empty());
            self.kernel_symbols.insert(addr, frames);
        }
    }

    /// Total samples collected.
    #[must_use]
    pub fn total_samples(&self) -> u64 {
        self.samples.values().sum()
    }

    /// Builds the pprof: sample types `samples/count` and `cpu/nanoseconds`, labels pid, tid,
    /// comm (thread) and process.
    pub fn to_pprof(&mut self, period_ns: u64, comments: &[String]) -> PprofBuilder {
        let mut b = PprofBuilder::new(
            &[("samples", "count"), ("cpu", "nanoseconds")],
            ("cpu", "nanoseconds"),
            period_ns as i64,
        );
        for comment in comments {
            b.add_comment(comment);
        }
        let mut kernel_mapping = None;
        let mut mappings: HashMap<(u32, u64), u64> = HashMap::new();
        let mut keys: Vec<_> = self.samples.iter().map(|(k, c)| (k.clone(), *c)).collect();
        keys.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.pid.cmp(&b.0.pid)));
        for (key, count) in keys {
            let mut locations = Vec::new();
            if let Some(kernel) = &key.kernel {
                let mapping = *kernel_mapping.get_or_insert_with(|| {
                    b.add_mapping(&MappingInfo {
                        memory_start: 0xffff_8000_0000_0000,
                        memory_limit: u64::MAX,
                        file_offset: 0,
                        path: "[kernel]".into(),
                        build_id: procfs::kernel_build_id().unwrap_or_default(),
                        symbolized: true,
                    })
                });
                for (i, &addr) in kernel.iter().enumerate() {
                    let frames = self
                        .kernel_symbols
                        .get(&lookup_addr(addr, i == 0))
                        .map_or(&[][..], Vec::as_slice);
                    locations.push(b.location(mapping, addr, frames));
                }
            }
            let info = self.processes.get(&key.pid).and_then(Option::as_ref);
            if let Some(user) = &key.user {
                for (i, &addr) in user.iter().enumerate() {
                    let precise = i == 0 && key.kernel.is_none();
                    let (mapping, frames) = match info
                        .and_then(|info| info.mapping_of(addr).map(|entry| (info, entry)))
                    {
                        Some((info, entry)) => {
                            let id = *mappings.entry((key.pid, entry.start)).or_insert_with(|| {
                                let host = info.host_path(entry);
                                let build_id = self
                                    .build_ids
                                    .entry(host.clone())
                                    .or_insert_with(|| procfs::build_id(&host).unwrap_or_default())
                                    .clone();
                                b.add_mapping(&MappingInfo {
                                    memory_start: entry.start,
                                    memory_limit: entry.end,
                                    file_offset: entry.offset,
                                    path: entry.path.clone(),
                                    build_id,
                                    symbolized: entry.is_file(),
                                })
                            });
                            let frames = file_addr(info, lookup_addr(addr, precise))
                                .and_then(|fa| self.user_symbols.get(&fa))
                                .map_or(&[][..], Vec::as_slice);
                            (id, frames)
                        }
                        None => (0, &[][..]),
                    };
                    locations.push(b.location(mapping, addr, frames));
                }
            }
            if locations.is_empty() {
                locations.push(b.pseudo_location("[stack not captured]"));
            }
            let process = info.map_or(key.comm.as_str(), |i| i.name.as_str());
            b.add_sample(
                locations,
                vec![count as i64, (count * period_ns) as i64],
                &[
                    ("pid", LabelValue::Num(i64::from(key.pid))),
                    ("tid", LabelValue::Num(i64::from(key.tid))),
                    ("comm", LabelValue::Str(&key.comm)),
                    ("process", LabelValue::Str(process)),
                ],
            );
        }
        b
    }
}

/// The file and file offset of `addr` in `info`'s executable mappings.
fn file_addr(info: &ProcessInfo, addr: u64) -> Option<FileAddr> {
    let entry = info.mapping_of(addr)?;
    if !entry.is_file() || entry.is_deleted() {
        return None;
    }
    Some(FileAddr {
        path: info.host_path(entry),
        offset: addr - entry.start + entry.offset,
    })
}

/// Functions ranked by samples in which they are the leaf (self) and anywhere on the stack
/// (total), as `go tool pprof -top` ranks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopFunction {
    pub name: String,
    pub self_samples: u64,
    pub total_samples: u64,
}

/// The `n` functions with the most self samples in `profile`'s first sample type.
#[must_use]
pub fn top_functions(profile: &Profile, n: usize) -> Vec<TopFunction> {
    use crate::pprof::ProfileExt as _;
    let mut by_name: HashMap<String, (u64, u64)> = HashMap::new();
    for sample in &profile.sample {
        let count = sample.value.first().copied().unwrap_or(0) as u64;
        let names = profile.stack_names(sample);
        let label = |name: &str| {
            if name.is_empty() {
                "[unknown]".to_owned()
            } else {
                name.to_owned()
            }
        };
        if let Some(leaf) = names.first() {
            by_name.entry(label(leaf)).or_default().0 += count;
        }
        let unique: HashSet<&str> = names.iter().copied().collect();
        for name in unique {
            by_name.entry(label(name)).or_default().1 += count;
        }
    }
    let mut top: Vec<_> = by_name
        .into_iter()
        .map(|(name, (self_samples, total_samples))| TopFunction {
            name,
            self_samples,
            total_samples,
        })
        .collect();
    top.sort_by(|a, b| {
        (b.self_samples, b.total_samples, &a.name).cmp(&(a.self_samples, a.total_samples, &b.name))
    });
    top.truncate(n);
    top
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
    use crate::pprof::FrameLine;

    #[test]
    fn top_ranks_by_self_then_total() {
        let mut b = PprofBuilder::new(&[("samples", "count")], ("cpu", "nanoseconds"), 1);
        let leaf_a = b.location(0, 1, &[FrameLine::named("a")]);
        let leaf_b = b.location(0, 2, &[FrameLine::named("b")]);
        let main = b.location(0, 3, &[FrameLine::named("main")]);
        b.add_sample(vec![leaf_a, main], vec![70], &[]);
        b.add_sample(vec![leaf_b, main], vec![30], &[]);
        let top = top_functions(&b.finish(), 10);
        let names: Vec<_> = top
            .iter()
            .map(|t| (t.name.as_str(), t.self_samples, t.total_samples))
            .collect();
        assert_eq!(names, [("a", 70, 70), ("b", 30, 30), ("main", 0, 100)]);
    }

    #[test]
    fn return_addresses_are_looked_up_inside_the_call() {
        assert_eq!(lookup_addr(0x1000, true), 0x1000);
        assert_eq!(lookup_addr(0x1000, false), 0xfff);
    }
}
