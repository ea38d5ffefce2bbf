//! What cprof reads of other processes from `/proc`: memory maps (to symbolize and to describe
//! mappings in the pprof), names, and whether the process shares our mount namespace.
//! Environment variables and command lines are never read.
//!
//! Needs `CAP_SYS_PTRACE` (or the same uid) to read another user's `/proc/<pid>/maps`.
//!
//! A process whose main thread has exited (`pthread_exit` in `main`) while others run has an
//! empty `/proc/<pid>/maps` and no `/proc/<pid>/root` (the kernel reads them through the main
//! thread, whose memory and file system references are gone): they are read through a live
//! thread's `/proc/<pid>/task/<tid>/` instead.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::target_file::{FileSpec, Root};

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub executable: bool,
    /// Device (encoded as `stat`'s `st_dev`) and inode of the mapped file; 0 for anonymous
    /// memory.
    pub dev: u64,
    pub inode: u64,
    /// The path field: a file (`/usr/lib/...`), a pseudo name (`[vdso]`) or empty.
    pub path: String,
}

impl MapEntry {
    /// Whether the entry maps a file on disk (not `[heap]`, `[vdso]`, anonymous memory).
    #[must_use]
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }

    /// Whether the file was deleted after it was mapped.
    #[must_use]
    pub fn is_deleted(&self) -> bool {
        self.path.ends_with(" (deleted)")
    }

    /// The file's path without the ` (deleted)` mark.
    #[must_use]
    pub fn file_path(&self) -> &str {
        self.path.strip_suffix(" (deleted)").unwrap_or(&self.path)
    }
}

/// Parses the text of `/proc/<pid>/maps`. Lines that do not parse are skipped, and so are
/// lines whose range ends before it starts.
#[must_use]
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    // 7f2c4000-7f2c6000 r-xp 00002000 08:01 1234        /usr/lib/x86_64-linux-gnu/libc.so.6
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    let (start, end) = (
        u64::from_str_radix(start, 16).ok()?,
        u64::from_str_radix(end, 16).ok()?,
    );
    if start > end {
        return None;
    }
    Some(MapEntry {
        start,
        end,
        offset: u64::from_str_radix(offset, 16).ok()?,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        dev: libc::makedev(
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode: inode.parse().ok()?,
        path: path.to_owned(),
    })
}

/// What cprof keeps of a process, read once when it is first seen so that it can still be
/// symbolized after it exits.
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The process's name (its main thread's `comm`).
    pub name: String,
    /// Executable mappings, sorted by address.
    pub mappings: Vec<MapEntry>,
    /// Where its paths resolve: our root, or its own (held open).
    pub root: Root,
    /// `/proc/<pid>`, or `/proc/<pid>/task/<tid>` of a live thread when the main thread exited.
    pub proc_dir: PathBuf,
    /// Tells this process from a later one given the same pid (see [`identity`]).
    pub identity: Identity,
    /// Its cgroup and container, when `/proc/<pid>/cgroup` could be read.
    pub container: Option<crate::container::ContainerIdentity>,
}

/// What tells a process from a later one with the same pid, or from itself after an `exec`:
/// its start time (clock ticks after boot, field 22 of `/proc/<pid>/stat`) and its executable's
/// device and inode (0 when unreadable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub start_ticks: u64,
    pub exe: (u64, u64),
}

impl Identity {
    /// Whether `other` is the same process: same start time, and the same executable when
    /// both could be read (a process whose main thread exited has no readable `exe`).
    #[must_use]
    pub fn same_process(&self, other: &Identity) -> bool {
        self.start_ticks == other.start_ticks
            && (self.exe == other.exe || self.exe == (0, 0) || other.exe == (0, 0))
    }
}

/// The [`Identity`] of the process now running as `pid`, if there is one.
#[must_use]
pub fn identity(pid: u32) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt as _;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised comm (which may contain ") "): state is field 3, so the
    // start time (field 22) is the 20th after it.
    let (_, rest) = stat.rsplit_once(") ")?;
    let start_ticks = rest.split(' ').nth(19)?.parse().ok()?;
    let exe = std::fs::metadata(format!("/proc/{pid}/exe")).map_or((0, 0), |m| (m.dev(), m.ino()));
    Some(Identity { start_ticks, exe })
}

/// Identifies a mount namespace (device and inode of `/proc/<pid>/ns/mnt`).
pub type RootId = (u64, u64);

/// Root directories held open, shared by the processes of the same mount namespace.
///
/// The paths in `/proc/<pid>/maps` are written from *our* root when the file is reachable from
/// it (the target shares our mount namespace: even a `chroot`ed target's paths are host paths),
/// and from the root of the target's mount namespace otherwise: for a container (which
/// `pivot_root`s into its image) that is the process's root, `/proc/<pid>/root`. A process that
/// `chroot`s inside a mount namespace of its own has paths that `/proc/<pid>/root` does not
/// resolve: its files are counted missing.
#[derive(Debug, Default)]
pub struct Roots(std::collections::HashMap<RootId, std::sync::Weak<std::os::fd::OwnedFd>>);

impl Roots {
    /// The root the maps paths of the process at `proc_dir` are relative to.
    fn of(&mut self, proc_dir: &Path) -> std::io::Result<Root> {
        use std::os::unix::fs::MetadataExt as _;
        let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino()));
        let theirs = id(&proc_dir.join("ns/mnt"))?;
        if id(Path::new("/proc/self/ns/mnt")).is_ok_and(|ours| ours == theirs) {
            return Ok(Root::Ours);
        }
        if let Some(fd) = self.0.get(&theirs).and_then(std::sync::Weak::upgrade) {
            return Ok(Root::Theirs(fd));
        }
        let fd = Arc::new(crate::target_file::open_root(proc_dir)?);
        self.0.retain(|_, weak| weak.strong_count() > 0);
        self.0.insert(theirs, Arc::downgrade(&fd));
        Ok(Root::Theirs(fd))
    }
}

impl ProcessInfo {
    /// Reads a live process. Fails when it is gone or its maps cannot be read.
    pub fn read(pid: u32) -> std::io::Result<Self> {
        Self::read_with(pid, &mut Roots::default())
    }

    /// As [`ProcessInfo::read`], sharing open root directories through `roots`.
    pub fn read_with(pid: u32, roots: &mut Roots) -> std::io::Result<Self> {
        let identity = identity(pid).unwrap_or_default();
        let (proc_dir, maps) = live_maps(pid)?;
        let name = read_comm(pid).unwrap_or_default();
        let mut mappings: Vec<_> = parse_maps(&maps)
            .into_iter()
            .filter(|m| m.executable)
            .collect();
        mappings.sort_by_key(|m| m.start);
        let root = roots.of(&proc_dir)?;
        Ok(Self {
            pid,
            name,
            mappings,
            root,
            proc_dir,
            identity,
            container: crate::container::ContainerIdentity::read(pid).ok(),
        })
    }

    /// The executable mapping that contains `address`.
    #[must_use]
    pub fn mapping_of(&self, address: u64) -> Option<&MapEntry> {
        let i = self.mappings.partition_point(|m| m.start <= address);
        self.mappings[..i].last().filter(|m| address < m.end)
    }

    /// How to open the file of `mapping`, if it maps a file.
    #[must_use]
    pub fn file_spec(&self, mapping: &MapEntry) -> Option<FileSpec> {
        mapping.is_file().then(|| FileSpec {
            root: self.root.clone(),
            path: mapping.file_path().to_owned(),
            dev: mapping.dev,
            inode: mapping.inode,
            pid: self.pid,
            start: mapping.start,
            end: mapping.end,
            deleted: mapping.is_deleted(),
            proc_dir: self.proc_dir.clone(),
        })
    }
}

/// The maps of `pid`, from `/proc/<pid>` or, when the main thread has exited, from a live
/// thread's directory; with the directory they came from.
fn live_maps(pid: u32) -> std::io::Result<(PathBuf, String)> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let maps = std::fs::read_to_string(proc.join("maps"))?;
    if !maps.is_empty() {
        return Ok((proc, maps));
    }
    for task in std::fs::read_dir(proc.join("task"))?.flatten() {
        let dir = task.path();
        if let Ok(maps) = std::fs::read_to_string(dir.join("maps"))
            && !maps.is_empty()
        {
            return Ok((dir, maps));
        }
    }
    Ok((proc, maps))
}

/// The thread or process name in `/proc/<pid>/comm`.
pub fn read_comm(pid: u32) -> std::io::Result<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))?;
    Ok(comm.trim_end_matches('\n').to_owned())
}

/// Whether a process exists (it may be a zombie).
#[must_use]
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether a process is running: it exists and is not a zombie waiting to be reaped. A process
/// whose main thread exited while other threads run is running.
#[must_use]
pub fn process_alive(pid: u32) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    match task_running(&proc.join("stat")) {
        Some(true) => true,
        None => false,
        Some(false) => std::fs::read_dir(proc.join("task")).is_ok_and(|tasks| {
            tasks
                .flatten()
                .any(|t| task_running(&t.path().join("stat")) == Some(true))
        }),
    }
}

/// Whether the task of this `stat` file runs (is not a zombie); `None` when it is gone.
fn task_running(stat: &Path) -> Option<bool> {
    let stat = std::fs::read_to_string(stat).ok()?;
    Some(!matches!(parse_stat_state(&stat), Some('Z' | 'X') | None))
}

/// The state letter of a `/proc/<pid>/stat` line (`R`, `S`, `Z`, ...). It follows the
/// parenthesised comm, which may itself contain `) `: the last `) ` ends it.
#[must_use]
pub fn parse_stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The running kernel's GNU build id, from `/sys/kernel/notes`.
#[must_use]
pub fn kernel_build_id() -> Option<String> {
    let notes = std::fs::read("/sys/kernel/notes").ok()?;
    parse_build_id_note(&notes)
}

/// Finds the `NT_GNU_BUILD_ID` note in a sequence of ELF notes (native endian, 4-byte aligned),
/// as lowercase hex. Malformed notes end the search.
#[must_use]
pub fn parse_build_id_note(mut notes: &[u8]) -> Option<String> {
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8]| -> Option<u32> { Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?)) };
    let align = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = word(notes)? as usize;
        let descsz = word(&notes[4..])? as usize;
        let kind = word(&notes[8..])?;
        let name_end = 12usize.checked_add(align(namesz))?;
        let desc_end = name_end.checked_add(align(descsz))?;
        let name = notes.get(12..12 + namesz)?;
        let desc = notes.get(name_end..name_end + descsz)?;
        if kind == NT_GNU_BUILD_ID && name == b"GNU\0" {
            return Some(hex(desc));
        }
        notes = notes.get(desc_end..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a01000 r--p 00000000 fe:01 393232                     /usr/bin/demo
55d0c8a01000-55d0c8a02000 r-xp 00001000 fe:01 393232                     /usr/bin/demo
55d0c9b3e000-55d0c9b5f000 rw-p 00000000 00:00 0                          [heap]
7f1c2a428000-7f1c2a5bd000 r-xp 00028000 fe:01 1837                       /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2a600000-7f1c2a601000 r-xp 00000000 fe:01 99                         /tmp/gone (deleted)
7ffd5a1f6000-7ffd5a1f8000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";

    #[test]
    fn parses_maps_lines() {
        let maps = parse_maps(MAPS);
        assert_eq!(maps.len(), 6, "the garbage line is skipped");
        assert_eq!(
            maps[1],
            MapEntry {
                start: 0x55d0_c8a0_1000,
                end: 0x55d0_c8a0_2000,
                offset: 0x1000,
                executable: true,
                dev: libc::makedev(0xfe, 0x01),
                inode: 393_232,
                path: "/usr/bin/demo".into()
            }
        );
        assert!(!maps[0].executable);
        assert_eq!(maps[2].path, "[heap]");
        assert!(!maps[2].is_file());
        assert!(maps[4].is_deleted());
        assert_eq!(maps[4].file_path(), "/tmp/gone");
        assert_eq!(maps[2].inode, 0);
        assert_eq!(maps[5].path, "[vdso]");
    }

    #[test]
    fn maps_found_by_fuzzing() {
        // Was returned as a mapping that ends before it starts (fuzz target proc_maps).
        let text =
            "7fcec5d4d000-7fcebccd3000 r--p 00000000 fe:01 1 /usr/lib/locale/C.utf8/LC_TELEPHONE\n";
        assert_eq!(parse_maps(text), []);
    }

    #[test]
    fn finds_the_mapping_of_an_address() {
        let info = ProcessInfo {
            mappings: parse_maps(MAPS)
                .into_iter()
                .filter(|m| m.executable)
                .collect(),
            ..Default::default()
        };
        assert_eq!(
            info.mapping_of(0x55d0_c8a0_1800).unwrap().path,
            "/usr/bin/demo"
        );
        assert!(
            info.mapping_of(0x55d0_c8a0_2000).is_none(),
            "end is exclusive"
        );
        assert!(info.mapping_of(0x10).is_none());
        assert_eq!(info.mapping_of(0x7f1c_2a42_8000).unwrap().offset, 0x28000);
    }

    #[test]
    fn reads_ourselves() {
        use std::os::unix::fs::MetadataExt as _;
        let me = ProcessInfo::read(std::process::id()).unwrap();
        assert!(matches!(me.root, Root::Ours), "we share our own root");
        let exe = std::env::current_exe().unwrap();
        let main_addr = parses_maps_lines as fn() as usize as u64;
        let m = me.mapping_of(main_addr).expect("our code is mapped");
        assert_eq!(Path::new(&m.path), exe);
        let meta = std::fs::metadata(&exe).unwrap();
        assert_eq!((m.dev, m.inode), (meta.dev(), meta.ino()));
        assert_eq!(Some(me.identity), identity(std::process::id()));
        assert!(me.identity.start_ticks > 0);
    }

    #[test]
    fn liveness() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        while process_alive(pid) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(process_exists(pid), "a zombie still exists until reaped");
        child.wait().unwrap();
        assert!(!process_alive(pid));
    }

    #[test]
    fn build_id_note() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_ne_bytes());
        note.extend_from_slice(&3u32.to_ne_bytes());
        note.extend_from_slice(&3u32.to_ne_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(&[0xab, 0xcd, 0xef, 0]);
        assert_eq!(parse_build_id_note(&note).as_deref(), Some("abcdef"));
        assert_eq!(parse_build_id_note(&note[..10]), None);
    }
}
