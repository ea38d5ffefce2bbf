//! Address symbolization with blazesym, on one thread that owns one `Symbolizer` for the whole
//! run (its caches hold parsed ELF and DWARF; blazesym's `Symbolizer` is not `Send`).
//!
//! User addresses arrive as (file, file offset) pairs, already normalized by the caller from the
//! process's memory maps read while it was alive. So a process that exits is still symbolized,
//! and a library shared by many processes is parsed once.
//!
//! Target files are hostile input. Before blazesym sees a file, this thread:
//! - opens it itself, inside the target's root, and checks that it is the very inode the target
//!   mapped ([`crate::target_file`]);
//! - hands blazesym a stable copy: root's own files (on our root, owned by root, not writable by
//!   group or others) as they are, through `/proc/self/fd/<n>` of our open descriptor, with
//!   [`crate::sigbus`] answering a truncation under the parser; any other file (a container's, a
//!   user's) as a private snapshot: a sealed `memfd` copy (no one can truncate or rewrite it, so
//!   what was vetted is what gets parsed), at most [`MAX_SNAPSHOT_BYTES`] per file and
//!   [`SNAPSHOT_BUDGET_BYTES`] in all (past that, every parsed file is forgotten);
//! - vets that copy ([`crate::elf_vet`]: not ELF, too big, malformed, decompression bombs);
//! - lets blazesym follow debug links (`.gnu_debuglink` and the like, looked up in host debug
//!   directories) only for root's own files: another root's file that has one gets its ELF
//!   symbols only.
//!
//! A file is refused (its addresses stay unsymbolized) when one of these fails, when parsing it
//! panicked, when it changed while it was read, or when symbolizing it took longer than
//! [`FILE_TIME_CAP`]; each refusal is counted once per file by [`Refusal`], and a refusal about
//! the file's content is remembered so that it is never parsed again.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blazesym::symbolize::{self, Symbolizer, source};
use tokio::sync::oneshot;

use crate::pprof::FrameLine;
use crate::target_file::{self, FileKey, FileSpec, Root};
use crate::{elf_vet, sigbus};

/// The frames of one address, innermost (inlined) function first; empty when unknown.
pub type Frames = Vec<FrameLine>;

/// Longest a file may take (opening, copying, vetting and symbolizing one batch of its
/// addresses) before it is refused for the rest of the run.
pub const FILE_TIME_CAP: Duration = Duration::from_secs(5);
/// Largest file copied into a private snapshot (files not owned by root, or from another root).
pub const MAX_SNAPSHOT_BYTES: u64 = 512 << 20;
/// Snapshot bytes held at once; past this, every parsed file is forgotten first.
pub const SNAPSHOT_BUDGET_BYTES: u64 = 1 << 30;
/// Files held open (with their parsed data) at once; past this, every parsed file is forgotten.
const MAX_OPEN_FILES: usize = 1024;
/// Refused files remembered; past this, the memory starts afresh (counts are kept).
const MAX_REMEMBERED_REFUSALS: usize = 100_000;

/// Why a file was not symbolized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Not an ELF file.
    NotElf,
    /// Over [`elf_vet::MAX_FILE_BYTES`] (or [`MAX_SNAPSHOT_BYTES`] when it must be copied).
    TooBig,
    /// Headers or sections outside the file, or the parser panicked.
    Malformed,
    /// A compressed section declares more than [`elf_vet::MAX_DECOMPRESSED_SECTION_BYTES`].
    DecompressionTooBig,
    /// Its path leaves the target's root (absolute symlink, `..`, a `/proc` magic link).
    OutsideRoot,
    /// The file at its path is not the inode the target mapped.
    InodeChanged,
    /// Gone: no file at its path, or a deleted file whose process exited.
    Missing,
    /// Symbolizing it took longer than [`FILE_TIME_CAP`].
    TooSlow,
    /// It shrank or changed while it was being read.
    Truncated,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::NotElf,
        Refusal::TooBig,
        Refusal::Malformed,
        Refusal::DecompressionTooBig,
        Refusal::OutsideRoot,
        Refusal::InodeChanged,
        Refusal::Missing,
        Refusal::TooSlow,
        Refusal::Truncated,
    ];

    /// The name used in metrics labels and pprof comments.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NotElf => "not_elf",
            Refusal::TooBig => "too_big",
            Refusal::Malformed => "malformed",
            Refusal::DecompressionTooBig => "decompression_too_big",
            Refusal::OutsideRoot => "outside_root",
            Refusal::InodeChanged => "inode_changed",
            Refusal::Missing => "missing",
            Refusal::TooSlow => "too_slow",
            Refusal::Truncated => "truncated",
        }
    }

    /// Whether the refusal is about the file's content (so the file is never tried again),
    /// rather than about where it was looked for.
    fn about_content(self) -> bool {
        !matches!(
            self,
            Refusal::OutsideRoot | Refusal::InodeChanged | Refusal::Missing
        )
    }
}

/// Files refused, by reason (each file counted once per reason).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefusalCounts([u64; Refusal::ALL.len()]);

impl RefusalCounts {
    #[must_use]
    pub fn get(&self, reason: Refusal) -> u64 {
        self.0[reason as usize]
    }

    #[must_use]
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Every reason with its count.
    pub fn iter(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL.iter().map(|&r| (r, self.get(r)))
    }

    /// `name=count` for every reason, space separated (pprof comments).
    #[must_use]
    pub fn describe_all(&self) -> String {
        self.iter()
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `N (reason n, ...)` with only the reasons that occurred (the summary).
    #[must_use]
    pub fn describe_nonzero(&self) -> String {
        let parts: Vec<String> = self
            .iter()
            .filter(|&(_, n)| n > 0)
            .map(|(r, n)| format!("{} {n}", r.name()))
            .collect();
        if parts.is_empty() {
            "0".to_owned()
        } else {
            format!("{} ({})", self.total(), parts.join(", "))
        }
    }

    fn add(&mut self, reason: Refusal) {
        self.0[reason as usize] += 1;
    }
}

/// One batch of work: file offsets per mapped file, and kernel addresses.
#[derive(Debug, Default)]
pub struct Batch {
    pub files: Vec<(FileSpec, Vec<u64>)>,
    pub kernel: Vec<u64>,
}

/// What became of one file of a [`Batch`].
#[derive(Debug, Default)]
pub struct FileAnswer {
    /// One `Frames` per offset, in input order (all empty when the file was refused).
    pub frames: Vec<Frames>,
    /// Its GNU build id, when it was read.
    pub build_id: Option<String>,
}

/// The answer to a [`Batch`]: one answer per input, in input order.
#[derive(Debug, Default)]
pub struct Resolved {
    pub files: Vec<FileAnswer>,
    pub kernel: Vec<Frames>,
    /// Files refused since the thread started.
    pub refused: RefusalCounts,
}

enum Request {
    Symbolize {
        batch: Batch,
        reply: oneshot::Sender<(Batch, Resolved)>,
    },
    /// Drop every parsed file if more than this many distinct files are held: a new symbolizer
    /// starts empty.
    Trim(usize),
}

fn new_symbolizer() -> Symbolizer {
    Symbolizer::builder()
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        // Files are only ever replaced behind our back by hostile targets: what we vetted is
        // what stays parsed (a change is noticed by `Parsed::changed` instead).
        .enable_auto_reload(false)
        .build()
}

/// Handle to the symbolizer thread. Dropping it stops the thread.
pub struct SymbolizerThread {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SymbolizerThread {
    /// Starts the thread and its symbolizer.
    pub fn spawn() -> std::io::Result<Self> {
        Self::spawn_with(FILE_TIME_CAP)
    }

    /// As [`SymbolizerThread::spawn`], with another per-file time cap.
    pub fn spawn_with(file_time_cap: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("cprof-symbolize".into())
            .spawn(move || {
                let mut state = State::new(file_time_cap);
                for request in rx {
                    match request {
                        Request::Symbolize { batch, reply } => {
                            let resolved = state.resolve(&batch);
                            let _ = reply.send((batch, resolved));
                        }
                        Request::Trim(max_files) if state.open.len() > max_files => {
                            tracing::debug!(
                                "symbolizer: forgetting {} parsed files",
                                state.open.len()
                            );
                            state.reset();
                        }
                        Request::Trim(_) => {}
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Symbolizes a batch and hands it back with the answer. Failures are per address (empty
    /// frames), never for the batch; a dead thread answers nothing for every address.
    pub async fn symbolize(&self, batch: Batch) -> (Batch, Resolved) {
        let (reply, answer) = oneshot::channel();
        let Some(tx) = &self.tx else {
            return (batch, Resolved::default());
        };
        if let Err(mpsc::SendError(Request::Symbolize { batch, .. })) =
            tx.send(Request::Symbolize { batch, reply })
        {
            return (batch, Resolved::default());
        }
        answer
            .await
            .unwrap_or_else(|_| (Batch::default(), Resolved::default()))
    }
}

impl SymbolizerThread {
    /// Forgets every parsed file once more than `max_files` distinct ones are held: the agent's
    /// memory stays flat as binaries come and go (containers' files are distinct files per
    /// container), while the usual handful of host binaries is parsed once.
    pub fn trim(&self, max_files: usize) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Trim(max_files));
        }
    }
}

impl Drop for SymbolizerThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A file blazesym may parse: the open descriptor it reaches through `/proc/self/fd/<n>`
/// (the target's file itself, or a sealed snapshot of it), held open as long as blazesym may
/// have it cached. blazesym keys its cache by the `stat` of that path (device, inode, size,
/// modification time), so a descriptor number used again for another file never serves the
/// old file's symbols.
struct Parsed {
    file: File,
    /// Size and modification time when it was vetted.
    stamp: (u64, i64, i64),
    snapshot_bytes: u64,
    /// Whether blazesym may read DWARF (and follow debug links).
    dwarf: bool,
    build_id: Option<String>,
}

impl Parsed {
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// Whether the file changed since it was vetted (never, for a sealed snapshot).
    fn changed(&self) -> bool {
        self.file
            .metadata()
            .map_or(true, |m| stamp(&m) != self.stamp)
    }
}

fn stamp(meta: &std::fs::Metadata) -> (u64, i64, i64) {
    (meta.len(), meta.mtime(), meta.mtime_nsec())
}

struct State {
    symbolizer: Symbolizer,
    open: HashMap<FileKey, Parsed>,
    snapshot_bytes: u64,
    /// Files refused for their content: never tried again.
    refused: HashMap<FileKey, Refusal>,
    /// (file, reason) already counted.
    counted: HashSet<(FileKey, Refusal)>,
    counts: RefusalCounts,
    file_time_cap: Duration,
}

impl State {
    fn new(file_time_cap: Duration) -> Self {
        Self {
            symbolizer: new_symbolizer(),
            open: HashMap::new(),
            snapshot_bytes: 0,
            refused: HashMap::new(),
            counted: HashSet::new(),
            counts: RefusalCounts::default(),
            file_time_cap,
        }
    }

    /// Forgets every parsed file (a new symbolizer starts empty) and closes them.
    fn reset(&mut self) {
        self.symbolizer = new_symbolizer();
        self.open.clear();
        self.snapshot_bytes = 0;
    }

    fn refuse(&mut self, key: &FileKey, reason: Refusal) {
        tracing::debug!(
            path = key.path,
            reason = reason.name(),
            "file refused for symbolization"
        );
        if self.counted.len() >= MAX_REMEMBERED_REFUSALS {
            self.counted.clear();
            self.refused.clear();
        }
        if self.counted.insert((key.clone(), reason)) {
            self.counts.add(reason);
        }
        if reason.about_content() {
            self.refused.insert(key.clone(), reason);
        }
    }

    fn resolve(&mut self, batch: &Batch) -> Resolved {
        let files = batch
            .files
            .iter()
            .map(|(spec, offsets)| self.resolve_file(spec, offsets))
            .collect();
        let kernel = if batch.kernel.is_empty() {
            Vec::new()
        } else {
            let src = source::Source::Kernel(source::Kernel::default());
            symbolize_all(
                &self.symbolizer,
                &src,
                symbolize::Input::AbsAddr(&batch.kernel),
            )
        };
        Resolved {
            files,
            kernel,
            refused: self.counts,
        }
    }

    fn resolve_file(&mut self, spec: &FileSpec, offsets: &[u64]) -> FileAnswer {
        let unknown = || FileAnswer {
            frames: vec![Vec::new(); offsets.len()],
            build_id: None,
        };
        let key = FileKey::of_spec(spec);
        if self.refused.contains_key(&key) {
            return unknown();
        }
        let started = Instant::now();
        if self.open.get(&key).is_some_and(Parsed::changed) {
            // Root's own file, rewritten or truncated since it was parsed: what blazesym holds
            // is stale and its mapping may fault; start afresh.
            self.refuse(&key, Refusal::Truncated);
            self.reset();
            return unknown();
        }
        if !self.open.contains_key(&key) {
            match self.prepare(spec) {
                Ok(parsed) => {
                    self.snapshot_bytes += parsed.snapshot_bytes;
                    self.open.insert(key.clone(), parsed);
                }
                Err(reason) => {
                    self.refuse(&key, reason);
                    return unknown();
                }
            }
        }
        let parsed = &self.open[&key];
        let path = parsed.path();
        let mut elf = source::Elf::new(&path);
        elf.debug_syms = parsed.dwarf;
        let src = source::Source::Elf(elf);
        let faults = sigbus::faults();
        let symbolizer = &self.symbolizer;
        let frames = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sigbus::guarded(|| {
                symbolize_all(symbolizer, &src, symbolize::Input::FileOffset(offsets))
            })
        }));
        let build_id = parsed.build_id.clone();
        let truncated = sigbus::faults() != faults || parsed.changed();
        let Ok(frames) = frames else {
            self.refuse(&key, Refusal::Malformed);
            self.reset();
            return unknown();
        };
        if truncated {
            self.refuse(&key, Refusal::Truncated);
            self.reset();
            return unknown();
        }
        if started.elapsed() > self.file_time_cap {
            // What this batch cost is paid; later batches do not pay it again.
            tracing::debug!(path = spec.path, took = ?started.elapsed(), "symbolization too slow");
            self.refuse(&key, Refusal::TooSlow);
        }
        FileAnswer { frames, build_id }
    }

    /// Opens, copies if needed, and vets `spec`'s file.
    fn prepare(&mut self, spec: &FileSpec) -> Result<Parsed, Refusal> {
        if self.open.len() >= MAX_OPEN_FILES {
            self.reset();
        }
        let opened = target_file::open(spec)?;
        let size = opened.meta.len();
        if size > elf_vet::MAX_FILE_BYTES {
            return Err(Refusal::TooBig);
        }
        let trusted = matches!(spec.root, Root::Ours)
            && opened.meta.uid() == 0
            && opened.meta.mode() & 0o022 == 0;
        let (file, snapshot_bytes) = if trusted {
            (opened.file, 0)
        } else {
            if size > MAX_SNAPSHOT_BYTES {
                return Err(Refusal::TooBig);
            }
            if self.snapshot_bytes + size > SNAPSHOT_BUDGET_BYTES {
                self.reset();
            }
            (snapshot(&opened.file, size)?, size)
        };
        let meta = file.metadata().map_err(|_| Refusal::Missing)?;
        let vetted = elf_vet::vet(&file, meta.len())?;
        Ok(Parsed {
            stamp: stamp(&meta),
            file,
            snapshot_bytes,
            dwarf: trusted || !vetted.links_to_debug_files,
            build_id: vetted.build_id,
        })
    }
}

/// A private, sealed copy of the first `size` bytes of `file`: nobody can shrink, grow or
/// rewrite it, so it never changes under the parser. Read with `read(2)` (or
/// `copy_file_range`), so a file truncated meanwhile gives a short copy, never a fault.
fn snapshot(file: &File, size: u64) -> Result<File, Refusal> {
    use std::io::{Read as _, Seek as _};
    use std::os::fd::FromRawFd as _;
    // SAFETY: memfd_create with a static name; the descriptor it returns is ours.
    let fd = unsafe {
        libc::memfd_create(
            c"cprof-snapshot".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        tracing::debug!("memfd_create: {}", std::io::Error::last_os_error());
        return Err(Refusal::Missing);
    }
    // SAFETY: a new descriptor nothing else owns.
    let mut copy = unsafe { File::from_raw_fd(fd) };
    let mut source = file;
    source
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|_| Refusal::Truncated)?;
    let copied =
        std::io::copy(&mut source.take(size), &mut copy).map_err(|_| Refusal::Truncated)?;
    if copied != size {
        return Err(Refusal::Truncated);
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our descriptor.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        tracing::debug!("sealing a snapshot: {}", std::io::Error::last_os_error());
        return Err(Refusal::Missing);
    }
    Ok(copy)
}

fn symbolize_all(
    symbolizer: &Symbolizer,
    src: &source::Source<'_>,
    input: symbolize::Input<&[u64]>,
) -> Vec<Frames> {
    let count = match input {
        symbolize::Input::AbsAddr(a)
        | symbolize::Input::VirtOffset(a)
        | symbolize::Input::FileOffset(a) => a.len(),
    };
    match symbolizer.symbolize(src, input) {
        Ok(results) => results.into_iter().map(|s| frames(&s)).collect(),
        Err(err) => {
            tracing::debug!(?src, %err, "symbolization failed");
            vec![Vec::new(); count]
        }
    }
}

/// blazesym reports the physical function first and each function's own line; pprof wants the
/// innermost function first.
fn frames(symbolized: &symbolize::Symbolized<'_>) -> Frames {
    let Some(sym) = symbolized.as_sym() else {
        return Vec::new();
    };
    let line_of = |info: Option<&symbolize::CodeInfo<'_>>| {
        info.map_or((None, 0), |info| {
            (
                Some(info.to_path().display().to_string()),
                info.line.unwrap_or(0),
            )
        })
    };
    let mut out = Vec::with_capacity(1 + sym.inlined.len());
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = line_of(inlined.code_info.as_ref());
        out.push(FrameLine {
            function: inlined.name.to_string(),
            file,
            line,
        });
    }
    let (file, line) = line_of(sym.code_info.as_deref());
    out.push(FrameLine {
        function: sym.name.to_string(),
        file,
        line,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::ProcessInfo;

    #[inline(never)]
    fn marker_function_for_symbolization() -> u64 {
        std::hint::black_box(42)
    }

    /// Our own `marker_function_for_symbolization`, as a file spec and offset.
    fn own_marker() -> (FileSpec, u64) {
        let info = ProcessInfo::read(std::process::id()).unwrap();
        let addr = marker_function_for_symbolization as fn() -> u64 as usize as u64;
        let entry = info.mapping_of(addr).expect("our code is mapped");
        (
            info.file_spec(entry).unwrap(),
            addr - entry.start + entry.offset,
        )
    }

    fn run(thread: &SymbolizerThread, spec: &FileSpec, offset: u64) -> Resolved {
        let batch = Batch {
            files: vec![(spec.clone(), vec![offset])],
            kernel: Vec::new(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(thread.symbolize(batch)).1
    }

    fn names(resolved: &Resolved) -> Vec<String> {
        resolved.files[0].frames[0]
            .iter()
            .map(|f| f.function.clone())
            .collect()
    }

    #[test]
    fn a_file_slower_than_the_cap_is_refused_after_its_first_batch() {
        let (spec, offset) = own_marker();
        let thread = SymbolizerThread::spawn_with(Duration::ZERO).unwrap();
        let first = run(&thread, &spec, offset);
        assert!(
            names(&first)
                .iter()
                .any(|n| n.ends_with("marker_function_for_symbolization")),
            "the first batch is answered: {:?}",
            names(&first)
        );
        assert!(first.files[0].build_id.is_some());
        assert_eq!(first.refused.get(Refusal::TooSlow), 1);
        let second = run(&thread, &spec, offset + 1);
        assert!(names(&second).is_empty(), "not parsed again");
        assert_eq!(second.refused.get(Refusal::TooSlow), 1, "counted once");
        assert_eq!(second.refused.total(), 1);
    }

    #[test]
    fn a_file_from_another_root_is_symbolized_from_a_snapshot() {
        let (mut spec, offset) = own_marker();
        let root = File::open("/").unwrap();
        spec.root = Root::Theirs(std::sync::Arc::new(root.into()));
        let thread = SymbolizerThread::spawn().unwrap();
        let resolved = run(&thread, &spec, offset);
        assert!(
            names(&resolved)
                .iter()
                .any(|n| n.ends_with("marker_function_for_symbolization")),
            "{:?}",
            names(&resolved)
        );
        assert_eq!(resolved.refused.total(), 0);
    }

    #[test]
    fn refusals_are_counted_once_per_file_and_reason() {
        let (mut spec, offset) = own_marker();
        spec.inode += 1;
        let thread = SymbolizerThread::spawn().unwrap();
        let first = run(&thread, &spec, offset);
        assert!(names(&first).is_empty());
        assert_eq!(first.refused.get(Refusal::InodeChanged), 1);
        let again = run(&thread, &spec, offset + 1);
        assert_eq!(again.refused.get(Refusal::InodeChanged), 1);
        assert_eq!(
            again.refused.describe_nonzero(),
            "1 (inode_changed 1)",
            "the summary's wording"
        );
    }
}
