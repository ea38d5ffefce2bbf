//! Output directories and files.
//!
//! An [`OutputDir`] is opened once, before recording starts, and every file is then created
//! relative to that open directory (`openat`/`renameat`), so that renaming or replacing a
//! directory of its path later cannot redirect what we write. The directory must be ours: not a
//! symlink, owned by our effective uid, not writable by group or others, and not directly in a
//! directory everyone may write to (`/tmp`, `/var/tmp`, `/dev/shm`). When missing it is created
//! with mode 0700.
//!
//! Files are written so that a crash never leaves a truncated file under a final name: a
//! temporary `.<name>.tmp-<pid>` in the same directory (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600),
//! written, synced, renamed over the final name (which replaces a symlink there instead of
//! following it). A temporary file left by a killed cprof (`kill -9`)
//! is removed by the next cprof that opens the directory, once no process has that pid.

use std::ffi::{CStr, CString};
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// An output problem, with the path it concerns. The cause is part of the message (not a
/// `source`), so that a chain of errors printed on one line says it once.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {cause}")]
pub struct OutputError {
    what: &'static str,
    path: PathBuf,
    cause: std::io::Error,
}

impl OutputError {
    fn new(what: &'static str, path: &Path, cause: std::io::Error) -> Self {
        Self {
            what,
            path: path.to_owned(),
            cause,
        }
    }

    fn refused(path: &Path, why: String) -> Self {
        Self::new(
            "refusing the output directory",
            path,
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, why),
        )
    }
}

/// An open output directory.
#[derive(Debug)]
pub struct OutputDir {
    fd: OwnedFd,
    /// The path it was opened by, for messages and reports.
    path: PathBuf,
}

/// Creates `dir` when missing (mode 0700), checks that it is ours and writable, removes stale
/// temporary files, and opens it: before any recording starts.
pub fn prepare_dir(dir: &Path) -> Result<OutputDir, OutputError> {
    OutputDir::open(dir)
}

impl OutputDir {
    /// See [`prepare_dir`].
    pub fn open(dir: &Path) -> Result<Self, OutputError> {
        refuse_shared_parent(dir)?;
        if std::fs::symlink_metadata(dir).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| OutputError::new("cannot create output directory", dir, e))?;
        }
        let fd = open_dir(dir)?;
        let meta = fstat(&fd).map_err(|e| OutputError::new("cannot stat", dir, e))?;
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if meta.st_uid != euid {
            return Err(OutputError::refused(
                dir,
                format!(
                    "it belongs to uid {}, not to us (uid {euid}): use a directory of our own",
                    meta.st_uid
                ),
            ));
        }
        if meta.st_mode & 0o022 != 0 {
            return Err(OutputError::refused(
                dir,
                format!(
                    "it is writable by {} (mode {:o}): chmod go-w it, or use another",
                    if meta.st_mode & 0o002 != 0 {
                        "everyone"
                    } else {
                        "its group"
                    },
                    meta.st_mode & 0o7777
                ),
            ));
        }
        let out = Self {
            fd,
            path: dir.to_owned(),
        };
        out.probe_writable()
            .map_err(|e| OutputError::new("cannot write to output directory", dir, e))?;
        out.remove_stale_temps();
        Ok(out)
    }

    /// The path the directory was opened by.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` in this directory, as a path (for reports; reads and writes go through the
    /// directory's descriptor).
    #[must_use]
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A path that reaches this very directory whatever happens to its path since it was opened:
    /// `/proc/self/fd/<fd>`.
    #[must_use]
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Writes `bytes` to `name` atomically; returns the file's path.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, OutputError> {
        let final_path = self.path.join(name);
        let tmp_name = format!(".{name}.tmp-{}", std::process::id());
        let tmp_path = self.path.join(&tmp_name);
        let tmp_c = c_name(&tmp_name);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::from(self.openat(
                &tmp_c,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            )?);
            file.write_all(bytes)?;
            file.sync_all()
        };
        if let Err(source) = write() {
            // EEXIST: something already has our temporary name; it is not ours to remove.
            if source.kind() != std::io::ErrorKind::AlreadyExists {
                self.unlink(&tmp_c);
            }
            return Err(OutputError::new("cannot write", &tmp_path, source));
        }
        let name_c = c_name(name);
        // SAFETY: both names are NUL-terminated and relative to our open directory.
        let rc = unsafe {
            libc::renameat(
                self.fd.as_raw_fd(),
                tmp_c.as_ptr(),
                self.fd.as_raw_fd(),
                name_c.as_ptr(),
            )
        };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            self.unlink(&tmp_c);
            return Err(OutputError::new(
                "cannot rename into place",
                &final_path,
                source,
            ));
        }
        // The directory is not synced: after a power loss the rename may be lost (no file), never
        // half done, and a sync per file would slow every window down.
        Ok(final_path)
    }

    fn openat(&self, name: &CStr, flags: libc::c_int) -> std::io::Result<OwnedFd> {
        // SAFETY: the name is NUL-terminated; the mode argument is read for O_CREAT.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            // SAFETY: openat just returned this descriptor to us.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
    }

    fn unlink(&self, name: &CStr) {
        // SAFETY: the name is NUL-terminated and relative to our open directory.
        unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) };
    }

    /// Proves we may create files here: an unnamed `O_TMPFILE` (never visible, nothing to clean
    /// up), or where the filesystem lacks it a named probe removed at once.
    fn probe_writable(&self) -> std::io::Result<()> {
        match self.openat(c".", libc::O_TMPFILE | libc::O_WRONLY) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
                let probe = c_name(&format!(".cprof-write-test.tmp-{}", std::process::id()));
                self.openat(
                    &probe,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                )?;
                self.unlink(&probe);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Removes `.<name>.tmp-<pid>` files whose writer is gone (killed while writing).
    fn remove_stale_temps(&self) {
        let Ok(entries) = std::fs::read_dir(self.fd_path()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = temp_file_pid(&name.to_string_lossy()) else {
                continue;
            };
            if pid != std::process::id() && !crate::procfs::process_exists(pid) {
                tracing::info!(
                    file = %self.path.join(&name).display(),
                    "removing a temporary file left by a cprof that was killed"
                );
                self.unlink(&c_name(&name.to_string_lossy()));
            }
        }
    }
}

/// The pid in a temporary file name `.<name>.tmp-<pid>`.
fn temp_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Refuses a directory whose nearest existing ancestor anyone may write to (`/tmp/x`): others
/// could have created it, or could create what we are about to.
fn refuse_shared_parent(dir: &Path) -> Result<(), OutputError> {
    let absolute = if dir.is_absolute() {
        dir.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| OutputError::new("cannot resolve", dir, e))?
            .join(dir)
    };
    // The nearest ancestor that exists: the directory's parent, or the one we create below.
    let Some(ancestor) = absolute.ancestors().skip(1).find(|a| a.exists()) else {
        return Ok(());
    };
    let meta =
        std::fs::metadata(ancestor).map_err(|e| OutputError::new("cannot stat", ancestor, e))?;
    if meta.mode() & 0o002 != 0 {
        return Err(OutputError::refused(
            dir,
            format!(
                "{} is writable by everyone: use a directory of our own",
                ancestor.display()
            ),
        ));
    }
    Ok(())
}

fn open_dir(dir: &Path) -> Result<OwnedFd, OutputError> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        OutputError::new(
            "cannot open output directory",
            dir,
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        )
    })?;
    // SAFETY: the path is NUL-terminated.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd >= 0 {
        // SAFETY: open just returned this descriptor to us.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let err = std::io::Error::last_os_error();
    let is_symlink = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    // O_DIRECTORY|O_NOFOLLOW on a symlink fails with ENOTDIR (or ELOOP).
    Err(match err.raw_os_error() {
        Some(libc::ELOOP | libc::ENOTDIR) if is_symlink => {
            OutputError::refused(dir, "it is a symlink".to_owned())
        }
        Some(libc::ENOTDIR) => OutputError::new("cannot create output directory", dir, err),
        _ => OutputError::new("cannot open output directory", dir, err),
    })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat fills the struct we pass.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: initialised by the successful call.
    Ok(unsafe { st.assume_init() })
}

fn c_name(name: &str) -> CString {
    // Our file names never hold NUL; a name read from the directory cannot either.
    CString::new(name).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private scratch directory under the target directory (not /tmp: refused).
    fn scratch(name: &str) -> PathBuf {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .join(format!(
                "target/tmp/output-test-{name}-{}",
                std::process::id()
            ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_atomically_and_leaves_no_temp() {
        let dir = scratch("atomic");
        let out = prepare_dir(&dir).unwrap();
        assert_eq!(
            std::fs::metadata(&dir).unwrap().mode() & 0o777,
            0o700,
            "created 0700"
        );
        let path = out.write_atomic("cpu.pb.gz", b"one").unwrap();
        assert_eq!(path, dir.join("cpu.pb.gz"));
        out.write_atomic("cpu.pb.gz", b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(names(&dir), ["cpu.pb.gz"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_in_the_way_is_a_clear_error() {
        let parent = scratch("file");
        std::fs::create_dir_all(&parent).unwrap();
        let file = parent.join("f");
        std::fs::write(&file, b"").unwrap();
        let msg = prepare_dir(&file).unwrap_err().to_string();
        assert!(msg.starts_with("cannot create output directory"), "{msg}");
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn refuses_directories_that_are_not_safely_ours() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = scratch("refuse");
        std::fs::create_dir_all(&base).unwrap();
        let shared = base.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let msg = prepare_dir(&shared.join("prof")).unwrap_err().to_string();
        assert!(msg.contains("is writable by everyone"), "{msg}");
        assert!(!shared.join("prof").exists(), "nothing created there");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o775)).unwrap();
        let msg = prepare_dir(&shared).unwrap_err().to_string();
        assert!(msg.contains("writable by its group (mode 775)"), "{msg}");
        let link = base.join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        let msg = prepare_dir(&link).unwrap_err().to_string();
        assert!(msg.ends_with("it is a symlink"), "{msg}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_symlink_at_the_final_name_is_replaced_not_followed() {
        let dir = scratch("symlink");
        let out = prepare_dir(&dir).unwrap();
        let victim = scratch("symlink-victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("cpu.pb.gz")).unwrap();
        out.write_atomic("cpu.pb.gz", b"profile").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let meta = std::fs::symlink_metadata(dir.join("cpu.pb.gz")).unwrap();
        assert!(meta.is_file(), "a regular file replaced the symlink");
        // At the temporary name: exclusive create refuses it, and it is left alone.
        let tmp = dir.join(format!(".offcpu.pb.gz.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let msg = out
            .write_atomic("offcpu.pb.gz", b"x")
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("cannot write") && msg.contains("exists"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!dir.join("offcpu.pb.gz").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&victim).unwrap();
    }

    #[test]
    fn stale_temporary_files_of_dead_writers_are_removed() {
        let dir = scratch("stale");
        std::fs::create_dir_all(&dir).unwrap();
        // A pid above any pid_max: never a live process.
        std::fs::write(dir.join(".cpu.pb.gz.tmp-4194305"), b"partial").unwrap();
        let live = format!(".cpu.pb.gz.tmp-{}", std::process::id());
        std::fs::write(dir.join(&live), b"ours").unwrap();
        std::fs::write(dir.join(".keep.tmp-x"), b"").unwrap();
        prepare_dir(&dir).unwrap();
        assert_eq!(names(&dir), [live.as_str(), ".keep.tmp-x"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn temp_names() {
        assert_eq!(temp_file_pid(".cpu.pb.gz.tmp-123"), Some(123));
        assert_eq!(temp_file_pid("cpu.pb.gz.tmp-123"), None);
        assert_eq!(temp_file_pid(".cpu.pb.gz"), None);
    }
}
