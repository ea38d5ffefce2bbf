//! Writing output files so that a crash never leaves a truncated file under a final name: write
//! a temporary file in the same directory (exclusive create, mode 0600), sync it, rename it.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// An output problem, with the path it concerns.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}: {source}")]
pub struct OutputError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Creates `dir` (mode 0700 when new) and proves it writable, before any recording starts.
pub fn prepare_dir(dir: &Path) -> Result<(), OutputError> {
    let err = |what| {
        let path = dir.to_owned();
        move |source| OutputError { what, path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err("cannot create output directory"))?;
    let probe = dir.join(format!(".cprof-write-test-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
        .map_err(err("cannot write to output directory"))?;
    std::fs::remove_file(&probe).map_err(err("cannot write to output directory"))?;
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let file_name = path
        .file_name()
        .map_or_else(Default::default, |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| OutputError { what, path, source }
    };
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    if let Err(source) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err("cannot write", &tmp)(source));
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        err("cannot rename into place", path)(source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("cprof-out-test-{}", std::process::id()));
        prepare_dir(&dir).unwrap();
        let path = dir.join("cpu.pb.gz");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("cpu.pb.gz")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_in_the_way_is_a_clear_error() {
        let file = std::env::temp_dir().join(format!("cprof-out-file-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let msg = prepare_dir(&file).unwrap_err().to_string();
        assert!(msg.starts_with("cannot create output directory"), "{msg}");
        std::fs::remove_file(&file).unwrap();
    }
}
