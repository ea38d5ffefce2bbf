//! Capabilities: checking, before anything is loaded, that we hold what recording needs (so that a
//! missing one is named in one line instead of surfacing as an `EPERM` halfway through
//! attaching), and dropping, once the programs are attached, everything later work does not use.
//!
//! | capability | why | after attaching |
//! | --- | --- | --- |
//! | `CAP_BPF` | create maps, load programs (Linux 5.8+; `CAP_SYS_ADMIN` before) | dropped (kept only on kernels that check it for map reads: before 6.5 with `unprivileged_bpf_disabled`) |
//! | `CAP_PERFMON` | open system-wide perf events, load tracing programs, take stacks | dropped |
//! | `CAP_SYS_PTRACE` | read `/proc/<pid>/maps` and open `/proc/<pid>/root/...` of other users' processes and of containers, to symbolize them | kept (main and symbolizer threads) |
//! | `CAP_DAC_READ_SEARCH` | read binaries file permissions hide from us (a `0700` application directory) | kept (main and symbolizer threads) |
//! | `CAP_SYSLOG` | real addresses in `/proc/kallsyms` (`kernel.kptr_restrict`), for kernel symbols | kept by the symbolizer thread only |
//!
//! `CAP_PERFMON` alone also opens other users' `/proc/<pid>/maps` (the kernel accepts it for a
//! ptrace read), but it is dropped after attaching: from then on `CAP_SYS_PTRACE` is what reads
//! the maps of processes seen later.
//!
//! The drop ([`drop_after_attach`]) runs while the process has one thread, so that every thread
//! started later inherits the reduced sets (capabilities are per thread); it also sets
//! `no_new_privs`, clears the inheritable and ambient sets and, when we may, the bounding set.
//! Threads that only talk to the network (metrics, push) drop everything ([`drop_in_thread`]).

use std::io;

/// A capability cprof checks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
    /// What is lost without it, for the warning about a wanted capability.
    pub without: &'static str,
}

pub const CAP_DAC_READ_SEARCH: Capability = Capability {
    name: "CAP_DAC_READ_SEARCH",
    bit: 2,
    without: "binaries whose permissions shut us out (e.g. a 0700 application directory) stay unsymbolized",
};
pub const CAP_SETPCAP: Capability = Capability {
    name: "CAP_SETPCAP",
    bit: 8,
    without: "",
};
pub const CAP_SYS_PTRACE: Capability = Capability {
    name: "CAP_SYS_PTRACE",
    bit: 19,
    without: "user frames of other users' processes and of containers stay unsymbolized",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
    without: "",
};
pub const CAP_SYSLOG: Capability = Capability {
    name: "CAP_SYSLOG",
    bit: 34,
    without: "kernel frames stay unsymbolized (/proc/kallsyms shows no addresses)",
};
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
    without: "",
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
    without: "",
};

/// What `cprof record` needs: loading and attaching fails without these.
pub const RECORD_REQUIRED: [Capability; 2] = [CAP_BPF, CAP_PERFMON];
/// What `cprof record` needs for complete results: without them some frames stay unsymbolized.
pub const RECORD_WANTED: [Capability; 3] = [CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYSLOG];
/// What is kept once the programs are attached (those of them we hold).
pub const KEPT_AFTER_ATTACH: [Capability; 3] = RECORD_WANTED;

/// A capability set as a bit mask.
#[must_use]
pub fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | (1 << c.bit))
}

/// Capability names by number (`include/uapi/linux/capability.h`).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The names of the capabilities in `set`, for messages ("none" when empty).
#[must_use]
pub fn names_in(set: u64) -> String {
    let present: Vec<String> = (0..64)
        .filter(|bit| set & (1 << bit) != 0)
        .map(|bit| {
            NAMES
                .get(bit)
                .map_or_else(|| format!("capability {bit}"), |n| (*n).to_owned())
        })
        .collect();
    if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    }
}

/// A capability operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{0} threads were started before capabilities were dropped (they would keep them): a cprof bug"
    )]
    Threads(usize),
    #[error("reading the BPF maps fails even with CAP_BPF kept: {0}")]
    MapsUnreadable(String),
}

fn syscall_error(call: &'static str) -> PrivilegeError {
    PrivilegeError::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

/// The three capability sets of the calling thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The calling thread's capability sets (`capget(2)`).
pub fn current() -> Result<CapSets, PrivilegeError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData structs (version 3) into the array we pass.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(syscall_error("capget"));
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// Sets the calling thread's capability sets (`capset(2)`); only lowering is allowed to us.
fn set(sets: CapSets) -> Result<(), PrivilegeError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |v: u64| (v as u32, (v >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let data = [
        CapData {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        CapData {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: capset reads the header and two CapData structs we pass.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(syscall_error("capset"))
    }
}

fn prctl(
    call: &'static str,
    option: libc::c_int,
    arg: libc::c_ulong,
) -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(syscall_error(call))
    }
}

fn set_no_new_privs() -> Result<(), PrivilegeError> {
    prctl("prctl(PR_SET_NO_NEW_PRIVS)", libc::PR_SET_NO_NEW_PRIVS, 1)
}

/// The effective capability set of this thread.
pub fn effective() -> io::Result<u64> {
    current()
        .map(|s| s.effective)
        .map_err(|e| io::Error::other(e.to_string()))
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text (the tests read other threads' sets so).
#[must_use]
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Which of `wanted` the effective set `eff` lacks. `CAP_SYS_ADMIN` stands in for `CAP_BPF` and
/// `CAP_PERFMON`, as the kernel accepts it for both.
#[must_use]
pub fn missing(eff: u64, wanted: &[Capability]) -> Vec<Capability> {
    let has = |cap: Capability| eff & (1 << cap.bit) != 0;
    wanted
        .iter()
        .copied()
        .filter(|&cap| {
            let admin_covers = cap == CAP_BPF || cap == CAP_PERFMON;
            !(has(cap) || admin_covers && has(CAP_SYS_ADMIN))
        })
        .collect()
}

/// Names for an error message: "`CAP_BPF`, `CAP_PERFMON`".
#[must_use]
pub fn names(caps: &[Capability]) -> String {
    caps.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// Whether reading `/proc/kallsyms` addresses takes `CAP_SYSLOG` on this machine: always with
/// `kernel.kptr_restrict` 1; with 0 only when `kernel.perf_event_paranoid` is 2 or more
/// (`kallsyms_show_value()`); with 2 nothing shows them.
#[must_use]
pub fn kallsyms_needs_syslog() -> bool {
    let read = |name: &str| -> Option<i64> {
        std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    !(read("kptr_restrict") == Some(0) && read("perf_event_paranoid").is_some_and(|p| p <= 1))
}

/// What [`drop_after_attach`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AfterDrop {
    /// The effective and permitted set from now on.
    pub kept: u64,
    /// What was permitted before and is not any more.
    pub dropped: u64,
    /// `CAP_BPF` (or `CAP_SYS_ADMIN`) had to stay: this kernel checks it for map reads.
    pub bpf_kept_for_maps: bool,
}

/// Once the programs are loaded and attached: keeps only those of [`KEPT_AFTER_ATTACH`] that we
/// hold, in the effective and permitted sets, clears the inheritable, ambient and (when we hold
/// `CAP_SETPCAP`) bounding sets, and sets `no_new_privs`.
///
/// `maps_readable` reads a BPF map through its file descriptor and answers false on `EPERM`:
/// Linux 6.5+ lets anyone holding the descriptor read it, older kernels with
/// `kernel.unprivileged_bpf_disabled` still want `CAP_BPF`, which is then kept.
///
/// Must run while the process has one thread: capabilities are per thread, and only threads
/// started afterwards inherit the reduced sets. Another thread is an error.
pub fn drop_after_attach(maps_readable: impl Fn() -> bool) -> Result<AfterDrop, PrivilegeError> {
    let threads = thread_count();
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let before = current()?;
    let mut kept = before.permitted & mask(&KEPT_AFTER_ATTACH);
    // Try the reduced effective set while the rest is still permitted, so it can come back.
    let try_with = |kept: u64| -> Result<bool, PrivilegeError> {
        set(CapSets {
            effective: kept,
            permitted: before.permitted,
            inheritable: 0,
        })?;
        Ok(maps_readable())
    };
    let mut bpf_kept_for_maps = false;
    if !try_with(kept)? {
        let bpf = [CAP_BPF, CAP_SYS_ADMIN]
            .into_iter()
            .map(|c| 1 << c.bit)
            .find(|b| before.permitted & b != 0)
            .unwrap_or(0);
        kept |= bpf;
        bpf_kept_for_maps = true;
        if !try_with(kept)? {
            set(before)?;
            return Err(PrivilegeError::MapsUnreadable(format!(
                "kept {}",
                names_in(kept)
            )));
        }
    }
    if before.effective & (1 << CAP_SETPCAP.bit) != 0 {
        // The bounding set limits what an exec could ever regain. Needs CAP_SETPCAP in the
        // effective set, which the try above removed: raise it back for the loop.
        set(CapSets {
            effective: kept | (1 << CAP_SETPCAP.bit),
            permitted: before.permitted,
            inheritable: 0,
        })?;
        for cap in 0..=last_cap() {
            if kept & (1 << cap) == 0 {
                prctl(
                    "prctl(PR_CAPBSET_DROP)",
                    libc::PR_CAPBSET_DROP,
                    libc::c_ulong::from(cap),
                )?;
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(syscall_error("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
    }
    set(CapSets {
        effective: kept,
        permitted: kept,
        inheritable: 0,
    })?;
    set_no_new_privs()?;
    Ok(AfterDrop {
        kept,
        dropped: before.permitted & !kept,
        bpf_kept_for_maps,
    })
}

/// Lowers the calling thread's effective and permitted sets to `keep` (what it holds of it),
/// clears its inheritable set and sets `no_new_privs`. Other threads are not touched.
pub fn drop_in_thread(keep: u64) -> Result<(), PrivilegeError> {
    let now = current()?;
    set(CapSets {
        effective: now.effective & keep,
        permitted: now.permitted & keep,
        inheritable: 0,
    })?;
    set_no_new_privs()
}

/// Threads of this process, from `/proc/self/task`.
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, Iterator::count)
}

/// The highest capability number of this kernel.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(0, &RECORD_REQUIRED), RECORD_REQUIRED.to_vec());
        assert_eq!(names(&missing(0, &RECORD_REQUIRED)), "CAP_BPF, CAP_PERFMON");
        let bpf_only = 1 << CAP_BPF.bit;
        assert_eq!(missing(bpf_only, &RECORD_REQUIRED), vec![CAP_PERFMON]);
        let admin = 1 << CAP_SYS_ADMIN.bit;
        assert!(
            missing(admin, &RECORD_REQUIRED).is_empty(),
            "SYS_ADMIN covers both"
        );
        assert_eq!(missing(admin, &RECORD_WANTED).len(), 3);
        assert_eq!(
            names_in(mask(&[CAP_BPF, CAP_SYSLOG])),
            "CAP_SYSLOG, CAP_BPF"
        );
        assert_eq!(names_in(1 << 24), "CAP_SYS_RESOURCE");
        for cap in [
            CAP_DAC_READ_SEARCH,
            CAP_SETPCAP,
            CAP_SYS_PTRACE,
            CAP_SYS_ADMIN,
            CAP_SYSLOG,
            CAP_PERFMON,
            CAP_BPF,
        ] {
            assert_eq!(NAMES[cap.bit as usize], cap.name);
        }
        assert_eq!(names_in(0), "none");
    }

    #[test]
    fn reads_our_sets() {
        let sets = current().unwrap();
        assert_eq!(
            sets.effective & !sets.permitted,
            0,
            "effective is within permitted"
        );
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .unwrap();
        assert_eq!(u64::from_str_radix(eff.trim(), 16).unwrap(), sets.effective);
    }

    #[test]
    fn a_thread_drops_its_own_capabilities_only() {
        let before = current().unwrap();
        let in_thread = std::thread::spawn(|| {
            drop_in_thread(0).unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            (current().unwrap(), status.contains("NoNewPrivs:\t1"))
        })
        .join()
        .unwrap();
        assert_eq!(in_thread.0, CapSets::default());
        assert!(in_thread.1, "no_new_privs set in the thread");
        assert_eq!(current().unwrap(), before, "the test thread keeps its own");
    }

    #[test]
    fn refuses_to_drop_with_other_threads_running() {
        // The test harness runs tests on threads of their own: there are always several.
        let err = drop_after_attach(|| true).unwrap_err();
        assert!(matches!(err, PrivilegeError::Threads(n) if n > 1), "{err}");
    }
}
