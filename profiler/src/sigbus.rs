//! Surviving a memory-mapped file that shrinks while the symbolizer reads it.
//!
//! blazesym maps each file it parses (`mmap(MAP_SHARED)`) and reads it lazily, across batches.
//! When the file is truncated meanwhile, the kernel unmaps the pages past the new end of file
//! and the next read of one raises `SIGBUS` (`BUS_ADRERR`), which kills the process by default.
//! Files that anyone but root could change are never mapped: the symbolizer hands blazesym a
//! sealed private copy (see `symbolize.rs`). Root's own files are mapped directly, and a package
//! upgrade that truncates one must not kill the profiler either.
//!
//! While a thread runs inside [`guarded`], a `SIGBUS` with `BUS_ADRERR` on that thread is
//! answered by mapping an anonymous zero page over the faulting page (`MAP_FIXED`), and the
//! read is restarted: the parser sees zeros where the file's bytes were, as if the file had been
//! rewritten (which parsers of mapped files must survive anyway), and [`faults`] counts it so
//! that the caller throws that file's results away. Every other `SIGBUS` (another thread, another
//! code) goes to the handler that was there before (Rust's runtime handler, or the default
//! action: the process dies as it would have without us).
//!
//! The handler only reads a thread-local flag and calls `mmap`, both async-signal-safe.

use std::cell::Cell;
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};

/// `si_code` of a `SIGBUS` for an access to a nonexistent physical address (here: a page past
/// the end of a mapped file). Linux `include/uapi/asm-generic/siginfo.h`.
const BUS_ADRERR: i32 = 2;

thread_local! {
    /// Whether this thread is inside [`guarded`].
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Faults answered with a zero page since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);

static INSTALL: Once = Once::new();

/// The disposition found before ours, for the faults that are not ours.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// Faults answered with a zero page so far (all threads).
#[must_use]
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// Runs `f` with truncated mapped files answered by zero pages on this thread (see the module
/// documentation). Installs the handler on first use.
pub fn guarded<R>(f: impl FnOnce() -> R) -> R {
    install();
    let _reset = Reset(GUARDED.with(|g| g.replace(true)));
    f()
}

/// Puts the thread's guard flag back as it was (also when `f` panics).
struct Reset(bool);

impl Drop for Reset {
    fn drop(&mut self) {
        GUARDED.with(|g| g.set(self.0));
    }
}

fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a zeroed struct filled in; the previous action is stored before
        // ours can run (the store happens-before any SIGBUS we could handle, as the handler is
        // only effective once sigaction returns, on this thread, before `guarded` runs `f`).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&raw mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &raw const action, &raw mut previous) == 0 {
                PREVIOUS = Some(previous);
            } else {
                tracing::warn!(
                    "cannot install the SIGBUS handler ({}); a file truncated while it is symbolized would stop cprof",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

extern "C" fn on_sigbus(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == BUS_ADRERR && GUARDED.with(Cell::get) {
        // SAFETY: sysconf and mmap are async-signal-safe system calls; the page replaced lies in
        // a read-only file mapping of the symbolizer (the only mappings read while guarded) whose
        // file no longer has it.
        let mapped = unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE) as usize;
            libc::mmap(
                (addr & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    // Not ours: whoever was there before decides.
    // SAFETY: PREVIOUS was written once before this handler was installed; calling the previous
    // SA_SIGINFO handler with our arguments, or restoring a plain disposition and returning so
    // that the fault repeats under it, is what chaining signal handlers means.
    unsafe {
        let previous = PREVIOUS;
        match previous {
            Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
                if p.sa_flags & libc::SA_SIGINFO != 0 {
                    let handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void) =
                        std::mem::transmute(p.sa_sigaction);
                    handler(signal, info, context);
                } else {
                    let handler: extern "C" fn(i32) = std::mem::transmute(p.sa_sigaction);
                    handler(signal);
                }
            }
            Some(p) => {
                libc::sigaction(libc::SIGBUS, &raw const p, std::ptr::null_mut());
            }
            None => {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &raw const default, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;

    #[test]
    fn a_mapped_file_truncated_under_a_guarded_read_reads_zeros() {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let path = std::env::temp_dir().join(format!("cprof-sigbus-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(&vec![0xab; 2 * page]).unwrap();
        // SAFETY: a fresh read-only shared mapping of our own file.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let bytes = base.cast::<u8>();
        // SAFETY: in bounds of the mapping.
        let read = |i: usize| unsafe { std::ptr::read_volatile(bytes.add(i)) };
        assert_eq!(read(page + 1), 0xab);
        file.set_len(page as u64).unwrap();
        let before = faults();
        let (first, second) = guarded(|| (read(1), read(page + 1)));
        assert_eq!(first, 0xab, "the page still in the file is untouched");
        assert_eq!(
            second, 0,
            "the page cut off reads as zeros instead of killing us"
        );
        assert_eq!(faults(), before + 1);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(base, 2 * page) };
        std::fs::remove_file(&path).unwrap();
    }
}
