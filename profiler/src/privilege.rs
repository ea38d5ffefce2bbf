//! Checking, before anything is loaded, that we hold the capabilities recording needs, so that a
//! missing one is named in one line instead of surfacing as an `EPERM` halfway through attaching.
//!
//! | capability | why |
//! | --- | --- |
//! | CAP_BPF | create maps, load programs (Linux 5.8+; CAP_SYS_ADMIN before) |
//! | CAP_PERFMON | open system-wide perf events, use `bpf_get_stackid` (CAP_SYS_ADMIN before 5.8) |
//! | CAP_SYS_PTRACE | read `/proc/<pid>/maps` of processes of other users, to symbolize them |
//! | CAP_SYSLOG | read real addresses from `/proc/kallsyms` for kernel symbols (`kptr_restrict`) |

/// A capability cprof checks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
}

pub const CAP_SYS_PTRACE: Capability = Capability {
    name: "CAP_SYS_PTRACE",
    bit: 19,
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
};
pub const CAP_SYSLOG: Capability = Capability {
    name: "CAP_SYSLOG",
    bit: 34,
};
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
};

/// What `cprof record` needs: loading and attaching fails without these.
pub const RECORD_REQUIRED: [Capability; 2] = [CAP_BPF, CAP_PERFMON];
/// What `cprof record` needs for complete results: without them some frames stay unsymbolized.
pub const RECORD_WANTED: [Capability; 2] = [CAP_SYS_PTRACE, CAP_SYSLOG];

/// The effective capability set of this process, from `/proc/self/status`.
pub fn effective() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(parse_cap_eff(&status).unwrap_or(0))
}

/// The `CapEff:` mask of a `/proc/<pid>/status` text.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tcprof\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
    }

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
        assert_eq!(missing(admin, &RECORD_WANTED).len(), 2);
    }
}
