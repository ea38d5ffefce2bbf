//! The on-disk spool: one file per push request, the exact request body, named
//! `<seq>-<job name>.push` where `seq` grows with every request (and continues after a restart),
//! so that the oldest request is the one with the smallest `seq`.
//!
//! Files are written atomically (exclusive-create temp file, mode 0600, `O_NOFOLLOW`, fsync,
//! rename, fsync of the directory), so a crash leaves either a whole request or none. A lock file
//! (`flock`) keeps two pushers from sharing a directory. Caps: total bytes and age; the oldest
//! files go first.
//!
//! The request being sent may be evicted while it is in flight: its file is deleted at once and
//! the sender learns it from [`Spool::finish`], so that it counts it as dropped only if the
//! attempt fails.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};

use super::SpoolCaps;

const SUFFIX: &str = ".push";
const TEMP_PREFIX: &str = ".cprof-spool-tmp-";
const LOCK_FILE: &str = ".lock";
/// How long [`lock`] waits for a lock held by someone else.
const LOCK_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(2)
};

/// One spooled request.
#[derive(Clone, Debug)]
struct Entry {
    file_name: String,
    len: u64,
    created: SystemTime,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    seq: u64,
    evicted: bool,
}

/// A request taken for sending.
#[derive(Debug)]
pub struct Taken {
    pub seq: u64,
    /// The job name, for logs.
    pub name: String,
    pub body: Vec<u8>,
}

/// The spool directory and its index.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    caps: SpoolCaps,
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
    next_seq: u64,
    in_flight: Option<InFlight>,
    /// Requests evicted by the caps so far, the one in flight excepted.
    evicted: u64,
    /// Holds the `flock` for as long as the spool lives.
    _lock: File,
}

impl Spool {
    /// Creates `dir` (mode 0700) or opens it, refusing a symlink, takes its lock, and indexes
    /// the requests a previous run left there (applying the caps to them).
    pub fn open(dir: &Path, caps: SpoolCaps) -> anyhow::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create push spool directory {}", dir.display()))?;
        let meta = std::fs::symlink_metadata(dir)
            .with_context(|| format!("push spool directory {}", dir.display()))?;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            bail!(
                "push spool directory {} is not a directory (symlinks are refused)",
                dir.display()
            );
        }
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(
                dir = %dir.display(),
                mode = format_args!("{:o}", meta.mode() & 0o777),
                "the push spool directory is open to other users; profiles stored there are readable by them"
            );
        }
        let lock = lock(dir)?;
        let mut spool = Self {
            dir: dir.to_owned(),
            caps,
            entries: BTreeMap::new(),
            bytes: 0,
            next_seq: 1,
            in_flight: None,
            evicted: 0,
            _lock: lock,
        };
        spool.load()?;
        spool.enforce_caps(0, SystemTime::now());
        Ok(spool)
    }

    fn load(&mut self) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read push spool {}", self.dir.display()))?;
        for dirent in entries {
            let dirent =
                dirent.with_context(|| format!("cannot read push spool {}", self.dir.display()))?;
            let file_name = dirent.file_name().to_string_lossy().into_owned();
            if file_name.starts_with(TEMP_PREFIX) {
                // A write that a crash interrupted: never renamed, never counted.
                let _ = std::fs::remove_file(dirent.path());
                continue;
            }
            let Some(seq) = parse_file_name(&file_name) else {
                if file_name != LOCK_FILE {
                    tracing::debug!(file = %dirent.path().display(), "not a spooled push request; ignored");
                }
                continue;
            };
            let meta = dirent
                .metadata()
                .with_context(|| format!("cannot stat {}", dirent.path().display()))?;
            if !meta.file_type().is_file() {
                tracing::warn!(file = %dirent.path().display(), "not a regular file; ignored");
                continue;
            }
            let created = meta.modified().unwrap_or_else(|_| SystemTime::now());
            self.bytes += meta.len();
            self.next_seq = self.next_seq.max(seq + 1);
            self.entries.insert(
                seq,
                Entry {
                    file_name,
                    len: meta.len(),
                    created,
                },
            );
        }
        if !self.entries.is_empty() {
            tracing::info!(
                requests = self.entries.len(),
                bytes = self.bytes,
                dir = %self.dir.display(),
                "push requests left by a previous run will be sent first"
            );
        }
        Ok(())
    }

    /// Requests waiting, the one in flight included unless it was evicted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the requests waiting.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Requests evicted by the caps so far. One evicted while in flight is not among them: the
    /// sender counts it, as delivered or dropped (see [`Spool::finish`]).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Stores a request, first evicting the oldest ones (by age, then to make room). A request
    /// larger than the byte cap is refused and nothing is evicted for it.
    pub fn add(&mut self, name: &str, body: &[u8]) -> anyhow::Result<()> {
        let len = body.len() as u64;
        if len > self.caps.max_bytes {
            bail!(
                "push request {name} is {len} bytes, more than the whole spool cap of {} bytes",
                self.caps.max_bytes
            );
        }
        self.enforce_caps(len, SystemTime::now());
        let seq = self.next_seq;
        let file_name = format!("{seq:010}-{name}{SUFFIX}");
        self.write_atomic(&file_name, body)?;
        self.next_seq += 1;
        self.bytes += len;
        self.entries.insert(
            seq,
            Entry {
                file_name,
                len,
                created: SystemTime::now(),
            },
        );
        Ok(())
    }

    /// Evicts requests older than the age cap.
    pub fn expire(&mut self, now: SystemTime) {
        self.enforce_caps(0, now);
    }

    /// Evicts, oldest first, what is older than the age cap and what leaves no room for
    /// `incoming` more bytes.
    fn enforce_caps(&mut self, incoming: u64, now: SystemTime) {
        while let Some((&seq, entry)) = self.entries.first_key_value() {
            let age = now.duration_since(entry.created).unwrap_or(Duration::ZERO);
            let too_old = age > self.caps.max_age;
            let too_big = self.bytes.saturating_add(incoming) > self.caps.max_bytes;
            if !too_old && !too_big {
                break;
            }
            tracing::warn!(
                request = entry.file_name,
                bytes = entry.len,
                reason = if too_old { "max age" } else { "max bytes" },
                "push spool full: dropping its oldest request"
            );
            self.remove(seq);
            match &mut self.in_flight {
                Some(f) if f.seq == seq => f.evicted = true,
                _ => self.evicted += 1,
            }
        }
    }

    /// The oldest request, marked in flight. A file that cannot be read is removed from the
    /// index and returned as an error (the caller counts it as dropped).
    pub fn take_oldest(&mut self) -> Option<anyhow::Result<Taken>> {
        let (&seq, entry) = self.entries.first_key_value()?;
        let path = self.dir.join(&entry.file_name);
        let name = job_name(&entry.file_name).to_owned();
        match read_regular(&path) {
            Ok(body) => {
                self.in_flight = Some(InFlight {
                    seq,
                    evicted: false,
                });
                Some(Ok(Taken { seq, name, body }))
            }
            Err(err) => {
                self.remove(seq);
                Some(Err(err.context(format!("cannot read {}", path.display()))))
            }
        }
    }

    /// Ends the attempt on `seq`; true when the request was evicted meanwhile (its file is
    /// already gone).
    pub fn finish(&mut self, seq: u64) -> bool {
        match self.in_flight.take() {
            Some(f) if f.seq == seq => f.evicted,
            other => {
                self.in_flight = other;
                false
            }
        }
    }

    /// Deletes a request (delivered, refused or evicted).
    pub fn remove(&mut self, seq: u64) {
        if let Some(entry) = self.entries.remove(&seq) {
            self.bytes -= entry.len;
            let path = self.dir.join(&entry.file_name);
            if let Err(err) = std::fs::remove_file(&path)
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(file = %path.display(), %err, "cannot delete a spooled push request");
            }
        }
    }

    fn write_atomic(&self, file_name: &str, body: &[u8]) -> anyhow::Result<()> {
        let tmp = self
            .dir
            .join(format!("{TEMP_PREFIX}{}-{file_name}", std::process::id()));
        let path = self.dir.join(file_name);
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(body)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            // Make the rename itself durable.
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|err| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::Error::new(err).context(format!("cannot write {}", path.display()))
        })
    }
}

/// Takes an exclusive `flock` on `<dir>/.lock`, held while the file stays open.
fn lock(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // A lock is released when the last descriptor of its open file is closed, and a child that
    // this process forks holds a copy until it execs: a lock we just released may still be held
    // for a moment. So wait a little before concluding that another process owns the spool.
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(anyhow::Error::new(err).context(format!("cannot lock {}", path.display())));
        }
        if Instant::now() >= deadline {
            bail!(
                "push spool {} is in use by another cprof process",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a regular file without following a symlink.
fn read_regular(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        bail!("not a regular file");
    }
    let mut body = Vec::new();
    file.read_to_end(&mut body)?;
    Ok(body)
}

/// The sequence number of a spool file name (`<seq>-<job name>.push`), or `None` for a file
/// that is not one. We never write `u64::MAX`: the spool goes on at the number after the
/// largest it finds.
#[must_use]
pub fn parse_file_name(file_name: &str) -> Option<u64> {
    let stem = file_name.strip_suffix(SUFFIX)?;
    let (seq, name) = stem.split_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || !valid_job_name(name) {
        return None;
    }
    seq.parse().ok().filter(|&seq| seq < u64::MAX)
}

fn job_name(file_name: &str) -> &str {
    let stem = file_name.strip_suffix(SUFFIX).unwrap_or(file_name);
    stem.split_once('-').map_or(stem, |(_, name)| name)
}

/// Job names become file names: ASCII letters, digits, `.`, `_` and `-`, not starting with a
/// dot, at most 200 bytes.
#[must_use]
pub fn valid_job_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("cprof-spool-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn caps(max_bytes: u64) -> SpoolCaps {
        SpoolCaps {
            max_bytes,
            max_age: Duration::from_hours(1),
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(SUFFIX))
            .collect();
        names.sort();
        names
    }

    fn take_name(spool: &mut Spool) -> String {
        let taken = spool.take_oldest().unwrap().unwrap();
        spool.finish(taken.seq);
        spool.remove(taken.seq);
        taken.name
    }

    #[test]
    fn evicts_oldest_to_stay_under_max_bytes() {
        let dir = test_dir("bytes");
        let mut spool = Spool::open(&dir, caps(250)).unwrap();
        for i in 0..5 {
            spool.add(&format!("cpu-{i}"), &[i; 100]).unwrap();
        }
        let evicted = spool.evicted();
        assert_eq!(
            evicted, 3,
            "five requests of 100 bytes under a 250-byte cap"
        );
        assert_eq!((spool.len(), spool.bytes()), (2, 200));
        assert_eq!(
            files(&dir),
            ["0000000004-cpu-3.push", "0000000005-cpu-4.push"]
        );
        let taken = spool.take_oldest().unwrap().unwrap();
        assert_eq!((taken.name.as_str(), taken.body), ("cpu-3", vec![3; 100]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_request_larger_than_the_cap_without_evicting() {
        let dir = test_dir("oversized");
        let mut spool = Spool::open(&dir, caps(150)).unwrap();
        spool.add("cpu-0", &[0; 100]).unwrap();
        let err = spool.add("cpu-1", &[1; 151]).unwrap_err().to_string();
        assert!(err.contains("more than the whole spool cap"), "{err}");
        assert_eq!(files(&dir), ["0000000001-cpu-0.push"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expires_by_age() {
        let dir = test_dir("age");
        let mut spool = Spool::open(
            &dir,
            SpoolCaps {
                max_bytes: u64::MAX,
                max_age: Duration::from_mins(1),
            },
        )
        .unwrap();
        spool.add("cpu-0", b"a").unwrap();
        spool.add("cpu-1", b"b").unwrap();
        spool.expire(SystemTime::now());
        assert_eq!((spool.len(), spool.evicted()), (2, 0));
        spool.expire(SystemTime::now() + Duration::from_secs(61));
        assert_eq!((spool.len(), spool.evicted()), (0, 2));
        assert!(files(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn in_flight_eviction_is_reported_to_the_sender_not_counted() {
        let dir = test_dir("inflight");
        let mut spool = Spool::open(&dir, caps(200)).unwrap();
        spool.add("cpu-0", &[0; 100]).unwrap();
        spool.add("cpu-1", &[1; 100]).unwrap();
        let taken = spool.take_oldest().unwrap().unwrap();
        assert_eq!(taken.name, "cpu-0");
        spool.add("cpu-2", &[2; 100]).unwrap();
        assert_eq!(
            spool.evicted(),
            0,
            "cpu-0 was in flight: the sender counts it"
        );
        assert_eq!(
            files(&dir),
            ["0000000002-cpu-1.push", "0000000003-cpu-2.push"]
        );
        assert!(
            spool.finish(taken.seq),
            "the sender learns cpu-0 was evicted"
        );
        assert_eq!(take_name(&mut spool), "cpu-1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopening_keeps_order_continues_sequence_and_cleans_temp_files() {
        let dir = test_dir("reopen");
        {
            let mut spool = Spool::open(&dir, caps(u64::MAX)).unwrap();
            for i in 0..12 {
                spool.add(&format!("cpu-{i}"), b"x").unwrap();
            }
            for _ in 0..10 {
                take_name(&mut spool);
            }
        }
        std::fs::write(
            dir.join(format!("{TEMP_PREFIX}1-0000000099-cpu-x.push")),
            b"t",
        )
        .unwrap();
        std::fs::write(dir.join("unrelated.txt"), b"u").unwrap();
        let mut spool = Spool::open(&dir, caps(u64::MAX)).unwrap();
        assert_eq!(spool.len(), 2);
        spool.add("cpu-12", b"x").unwrap();
        assert_eq!(
            files(&dir),
            [
                "0000000011-cpu-10.push",
                "0000000012-cpu-11.push",
                "0000000013-cpu-12.push"
            ]
        );
        assert_eq!(take_name(&mut spool), "cpu-10");
        assert_eq!(take_name(&mut spool), "cpu-11");
        assert_eq!(take_name(&mut spool), "cpu-12");
        assert!(
            !dir.join(format!("{TEMP_PREFIX}1-0000000099-cpu-x.push"))
                .exists()
        );
        assert!(dir.join("unrelated.txt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopening_applies_the_caps() {
        let dir = test_dir("reopen-caps");
        {
            let mut spool = Spool::open(&dir, caps(u64::MAX)).unwrap();
            for i in 0..4 {
                spool.add(&format!("cpu-{i}"), &[0; 10]).unwrap();
            }
        }
        let spool = Spool::open(&dir, caps(25)).unwrap();
        assert_eq!((spool.evicted(), spool.len()), (2, 2));
        assert_eq!(
            files(&dir),
            ["0000000003-cpu-2.push", "0000000004-cpu-3.push"]
        );
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modes_lock_and_symlinks() {
        let dir = test_dir("modes");
        let mut spool = Spool::open(&dir, caps(u64::MAX)).unwrap();
        spool.add("cpu-0", b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("0000000001-cpu-0.push")), 0o600);

        let err = Spool::open(&dir, caps(u64::MAX)).unwrap_err().to_string();
        assert!(err.contains("in use by another cprof"), "{err}");
        drop(spool);
        Spool::open(&dir, caps(u64::MAX)).expect("the lock is released with the spool");

        let link = test_dir("modes-link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = Spool::open(&link, caps(u64::MAX)).unwrap_err().to_string();
        assert!(err.contains("symlinks are refused"), "{err}");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names() {
        assert_eq!(parse_file_name("0000000007-cpu-2026.push"), Some(7));
        assert_eq!(parse_file_name("7-cpu.push"), Some(7));
        assert_eq!(parse_file_name("x-cpu.push"), None);
        assert_eq!(parse_file_name("0000000007-.push"), None);
        assert_eq!(parse_file_name("0000000007-cpu.push.tmp"), None);
        assert_eq!(job_name("0000000007-cpu-2026.push"), "cpu-2026");
        // Loading it overflowed the next sequence number (fuzz target file_names).
        assert_eq!(parse_file_name("18446744073709551615-cpu.push"), None);
        assert_eq!(
            parse_file_name("18446744073709551614-cpu.push"),
            Some(u64::MAX - 1)
        );
        assert!(valid_job_name("cpu-20261122T101500Z"));
        assert!(!valid_job_name("../etc"));
        assert!(!valid_job_name("a/b"));
        assert!(!valid_job_name(".hidden"));
        assert!(!valid_job_name(""));
    }
}
