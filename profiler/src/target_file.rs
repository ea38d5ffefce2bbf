//! Opening the files a target process maps, for symbolization, without ever reaching a file
//! outside the target's root or another file than the one it mapped.
//!
//! A path from `/proc/<pid>/maps` means something only inside the target's mount namespace and
//! root. Opening `/proc/<pid>/root/<path>` is not enough: an absolute symlink (or `..`) met on
//! the way resolves against *our* root, so a container could point cprof at any host file. So:
//!
//! 1. the target's root directory is held open (`O_PATH` on `/proc/<pid>/root`, taken when the
//!    process is first seen, so that it outlives the process); processes sharing our mount
//!    namespace and root use our `/`;
//! 2. the path is resolved with `openat2(root, path, O_PATH, RESOLVE_BENEATH |
//!    RESOLVE_NO_MAGICLINKS)` (Linux 5.6+): an absolute symlink, a `..` above the root or a
//!    `/proc` magic link fails with `EXDEV`/`ELOOP` instead of leaving the root. Paths in
//!    `maps` are canonical (no symlinks), so a legitimate file never trips this;
//! 3. `O_PATH` opens nothing (no FIFO blocks, no device sees an `open`): the descriptor is
//!    checked with `fstat` to be the very inode that was mapped (device and inode from the
//!    `maps` line) and a regular file, and only then reopened for reading through
//!    `/proc/self/fd/<n>`;
//! 4. a mapping whose file was deleted (`(deleted)` in `maps`) is opened through
//!    `/proc/<pid>/map_files/<start>-<end>` (needs `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`)
//!    or, for the executable, `/proc/<pid>/exe`: the kernel's own reference to the mapped
//!    file, checked the same way. This works while the process lives.
//!
//! Overlayfs before Linux 6.x showed the lower file's device in `maps`; an overlayfs file
//! whose inode number matches is accepted there despite the device mismatch.

use std::fs::File;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::sync::Arc;

use crate::symbolize::Refusal;

/// `statfs.f_type` of overlayfs (Linux `include/uapi/linux/magic.h`).
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;

/// Where a process's paths resolve.
#[derive(Clone, Debug, Default)]
pub enum Root {
    /// Our own mount namespace and root directory.
    #[default]
    Ours,
    /// Its root directory, held open (`O_PATH`).
    Theirs(Arc<OwnedFd>),
}

/// A mapped file as both the symbolizer thread and the symbol caches key it: device and inode
/// from the `maps` line, and its path in the process (without ` (deleted)`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u64,
    pub inode: u64,
    pub path: String,
}

impl FileKey {
    #[must_use]
    pub fn of_spec(spec: &FileSpec) -> Self {
        Self {
            dev: spec.dev,
            inode: spec.inode,
            path: spec.path.clone(),
        }
    }

    #[must_use]
    pub fn of_mapping(entry: &crate::procfs::MapEntry) -> Self {
        Self {
            dev: entry.dev,
            inode: entry.inode,
            path: entry.file_path().to_owned(),
        }
    }
}

/// One mapped file as a process sees it, with what is needed to open it safely.
#[derive(Clone, Debug)]
pub struct FileSpec {
    pub root: Root,
    /// The path in the process's mount namespace, without ` (deleted)`.
    pub path: String,
    /// Device (as `stat` reports it) and inode from the `maps` line.
    pub dev: u64,
    pub inode: u64,
    /// The process and the mapping, for `map_files` when the file was deleted.
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub deleted: bool,
    /// `/proc/<pid>` or, when the main thread has exited, `/proc/<pid>/task/<tid>`.
    pub proc_dir: PathBuf,
}

/// An open file that is the one mapped.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    pub meta: std::fs::Metadata,
}

/// Opens `spec`'s file (see the module documentation). `Err(Refusal)` names why not.
pub fn open(spec: &FileSpec) -> Result<Opened, Refusal> {
    let file = if spec.deleted {
        open_deleted(spec)?
    } else {
        let path = resolve_beneath(&spec.root, &spec.path)?;
        check_identity(spec, &path)?;
        reopen(&path)?
    };
    check_identity(spec, &file)?;
    let meta = file.metadata().map_err(|_| Refusal::Missing)?;
    if !meta.is_file() {
        return Err(Refusal::InodeChanged);
    }
    Ok(Opened { file, meta })
}

fn open_deleted(spec: &FileSpec) -> Result<File, Refusal> {
    let map_file = PathBuf::from(format!(
        "/proc/{}/map_files/{:x}-{:x}",
        spec.pid, spec.start, spec.end
    ));
    for candidate in [map_file, spec.proc_dir.join("exe")] {
        if let Ok(file) = File::open(&candidate)
            && check_identity(spec, &file).is_ok()
        {
            return Ok(file);
        }
    }
    Err(Refusal::Missing)
}

/// `openat2(root, path, O_PATH | O_CLOEXEC, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
fn resolve_beneath(root: &Root, path: &str) -> Result<File, Refusal> {
    let our_root;
    let dirfd = match root {
        Root::Ours => {
            our_root = File::open("/").map_err(|_| Refusal::Missing)?;
            our_root.as_raw_fd()
        }
        Root::Theirs(fd) => fd.as_raw_fd(),
    };
    let relative = path.trim_start_matches('/');
    let Ok(c_path) = std::ffi::CString::new(if relative.is_empty() { "." } else { relative })
    else {
        return Err(Refusal::Missing);
    };
    // SAFETY: open_how is plain data; zeroed then filled.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the path and the struct of the given size; the fd it returns is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            c_path.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EXDEV | libc::ELOOP) => Refusal::OutsideRoot,
            _ => Refusal::Missing,
        });
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Reopens an `O_PATH` descriptor for reading, through its `/proc/self/fd` entry.
fn reopen(path: &File) -> Result<File, Refusal> {
    File::open(format!("/proc/self/fd/{}", path.as_raw_fd())).map_err(|_| Refusal::Missing)
}

/// Whether `file` is the inode of the `maps` line.
fn check_identity(spec: &FileSpec, file: &File) -> Result<(), Refusal> {
    let meta = file.metadata().map_err(|_| Refusal::Missing)?;
    if meta.ino() == spec.inode && (meta.dev() == spec.dev || on_overlayfs(file)) {
        Ok(())
    } else {
        Err(Refusal::InodeChanged)
    }
}

fn on_overlayfs(file: &File) -> bool {
    // SAFETY: fstatfs fills the zeroed struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and struct.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut fs) };
    rc == 0 && fs.f_type == OVERLAYFS_SUPER_MAGIC
}

/// Opens `/proc/<pid>/root` (from `proc_dir`) as an `O_PATH` directory.
pub fn open_root(proc_dir: &std::path::Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(proc_dir.join("root"))?;
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_of(path: &std::path::Path, root: Root, shown: &str) -> FileSpec {
        let meta = std::fs::metadata(path).unwrap();
        FileSpec {
            root,
            path: shown.to_owned(),
            dev: meta.dev(),
            inode: meta.ino(),
            pid: std::process::id(),
            start: 0,
            end: 0,
            deleted: false,
            proc_dir: PathBuf::from("/proc/self"),
        }
    }

    #[test]
    fn opens_a_file_through_a_root_and_refuses_escapes_and_swaps() {
        let dir = std::env::temp_dir().join(format!("cprof-target-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("app")).unwrap();
        std::fs::write(dir.join("app/bin"), b"\x7fELF").unwrap();
        std::fs::write(dir.join("other"), b"other").unwrap();
        let root = || Root::Theirs(Arc::new(File::open(&dir).unwrap().into()));

        let spec = spec_of(&dir.join("app/bin"), root(), "/app/bin");
        let opened = open(&spec).expect("the mapped file itself");
        assert_eq!(opened.meta.len(), 4);

        // The same inode reached through a relative symlink that stays inside is fine; an
        // absolute one, or `..` above the root, is refused without following it.
        std::os::unix::fs::symlink("app/bin", dir.join("inside")).unwrap();
        assert!(
            open(&FileSpec {
                path: "/inside".into(),
                ..spec.clone()
            })
            .is_ok()
        );
        std::os::unix::fs::symlink("/etc/passwd", dir.join("app/escape")).unwrap();
        let escape = FileSpec {
            path: "/app/escape".into(),
            ..spec.clone()
        };
        assert_eq!(open(&escape).unwrap_err(), Refusal::OutsideRoot);
        let dotdot = FileSpec {
            path: "/../../etc/passwd".into(),
            ..spec.clone()
        };
        assert_eq!(open(&dotdot).unwrap_err(), Refusal::OutsideRoot);

        // Another file at the mapped path: refused, not read.
        let swapped = FileSpec {
            path: "/other".into(),
            ..spec.clone()
        };
        assert_eq!(open(&swapped).unwrap_err(), Refusal::InodeChanged);
        let gone = FileSpec {
            path: "/nothing".into(),
            ..spec
        };
        assert_eq!(open(&gone).unwrap_err(), Refusal::Missing);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn our_root_opens_host_paths() {
        let exe = std::env::current_exe().unwrap();
        let spec = spec_of(&exe, Root::Ours, exe.to_str().unwrap());
        assert!(open(&spec).is_ok());
    }
}
