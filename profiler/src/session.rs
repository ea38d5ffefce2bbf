//! A profiling session, shared by `cprof record` and `cprof agent`: the attached probes, the
//! symbolizer thread, the symbol caches, and the profiles merged from every drain since the last
//! [`Session::take_profiles`].

use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::bpf::{Drained, ProbeOptions, Probes, RawTcpEvent};
use crate::config::RecordConfig;
use crate::offcpu::OffCpuProfile;
use crate::oncpu::OnCpuProfile;
use crate::privilege;
use crate::symbolize::SymbolizerThread;
use crate::symbols::{Stack, Symbols};
use crate::syscall_names::{BYTE_SYSCALLS, syscall_number};
use crate::syscalls::SyscallProfile;
use crate::tcp::TcpProfile;

/// How often the TCP ring buffer is emptied.
pub const TCP_RING_INTERVAL: Duration = Duration::from_millis(100);

/// Time left for in-flight BPF programs to finish with a buffer after a flip.
const FLIP_GRACE: Duration = Duration::from_millis(5);

/// What one window (or a whole recording) collected.
#[derive(Default)]
pub struct Profiles {
    pub oncpu: OnCpuProfile,
    pub offcpu: OffCpuProfile,
    pub syscalls: SyscallProfile,
    pub tcp: TcpProfile,
}

pub struct Session {
    pub probes: Probes,
    pub symbolizer: SymbolizerThread,
    pub symbols: Symbols,
    pub profiles: Profiles,
    /// TCP events read from the ring between drains, symbolized at the next drain.
    pending_tcp: Vec<RawTcpEvent>,
}

impl Session {
    /// Loads and attaches the probes `config` asks for. `cgroup_filter`: record the cgroups
    /// later given to [`Probes::set_cgroups`] (besides `config.pids`).
    pub fn start(config: &RecordConfig, cgroup_filter: bool) -> anyhow::Result<Self> {
        Self::start_in(config, cgroup_filter, None)
    }

    /// As [`Session::start`], with pids seen from `pid_namespace` (see
    /// [`ProbeOptions::pid_namespace`]).
    pub fn start_in(
        config: &RecordConfig,
        cgroup_filter: bool,
        pid_namespace: Option<(u64, u64)>,
    ) -> anyhow::Result<Self> {
        raise_memlock_limit();
        raise_open_files_limit();
        let mut symbols = Symbols::default();
        for &pid in config.pids.iter().flatten() {
            symbols.remember_process(pid);
        }
        let probes = Probes::start(&ProbeOptions {
            events: config.events,
            frequency_hz: config.frequency_hz,
            pids: config.pids.clone(),
            cgroup_filter,
            pid_namespace,
            counts_max_entries: config.count_map_size,
            stacks_max_entries: config.stack_map_size,
            tcp_buffer_bytes: config.tcp_buffer_size,
            offcpu_min_ns: config.off_cpu_min.as_nanos() as u64,
            offcpu_threads_max_entries: config.off_cpu_threads,
            syscall_slow_ns: config.syscall_slow.as_nanos() as u64,
            byte_syscalls: BYTE_SYSCALLS
                .iter()
                .filter_map(|n| syscall_number(n))
                .collect(),
        })
        .context("setting up the eBPF probes")?;
        drop_privileges(&probes)?;
        let symbolizer = SymbolizerThread::spawn().context("starting the symbolizer thread")?;
        // Only the symbolizer thread reads /proc/kallsyms; this thread (and those it starts
        // later) does not need CAP_SYSLOG.
        privilege::drop_in_thread(!privilege::mask(&[privilege::CAP_SYSLOG]))
            .context("dropping CAP_SYSLOG in the main thread")?;
        Ok(Self {
            probes,
            symbolizer,
            symbols,
            profiles: Profiles::default(),
            pending_tcp: Vec::new(),
        })
    }

    /// Empties the TCP ring buffer into the next drain.
    pub fn read_tcp_ring(&mut self) {
        let events = self.probes.drain_tcp();
        self.pending_tcp.extend(events);
    }

    /// Flips the buffers, drains the idle ones, symbolizes what is new and merges it into the
    /// profiles. `observe` sees each drain's data (symbolized) before it is merged.
    pub async fn drain(&mut self, observe: impl FnOnce(&Drained, &Symbols)) -> anyhow::Result<()> {
        self.probes.flip()?;
        tokio::time::sleep(FLIP_GRACE).await;
        let mut d = self.probes.drain()?;
        let mut tcp = std::mem::take(&mut self.pending_tcp);
        tcp.append(&mut d.tcp);
        d.tcp = tcp;
        for s in &d.syscalls {
            self.symbols.remember_process(s.pid);
        }
        let sample_stacks = d.samples.iter().map(|s| Stack {
            pid: s.pid,
            user: s.user.as_deref(),
            kernel: s.kernel.as_deref(),
        });
        let wait_stacks = d.waits.iter().flat_map(|w| {
            let waiter = Stack {
                pid: w.pid,
                user: w.user.as_deref(),
                kernel: w.kernel.as_deref(),
            };
            let waker = w.waker.as_ref().map(|k| Stack {
                pid: k.pid,
                user: k.user.as_deref(),
                kernel: k.kernel.as_deref(),
            });
            std::iter::once(waiter).chain(waker)
        });
        let slow_stacks = d.slow.iter().map(|s| Stack {
            pid: s.pid,
            user: s.user.as_deref(),
            kernel: None,
        });
        let tcp_stacks = d.tcp.iter().map(|e| Stack {
            pid: e.event.pid,
            user: e.user.as_deref(),
            kernel: None,
        });
        self.symbols
            .resolve(
                sample_stacks
                    .chain(wait_stacks)
                    .chain(slow_stacks)
                    .chain(tcp_stacks),
                &self.symbolizer,
            )
            .await;
        observe(&d, &self.symbols);
        let p = &mut self.profiles;
        p.oncpu.add(d.samples);
        p.offcpu.add(d.waits);
        p.syscalls.add(d.syscalls, &d.errnos, d.slow);
        p.tcp.add(d.tcp);
        Ok(())
    }

    /// Hands over what was merged so far and starts afresh (the next window).
    pub fn take_profiles(&mut self) -> Profiles {
        std::mem::take(&mut self.profiles)
    }
}

/// Fails, naming them, when capabilities needed to load the programs are missing; warns, naming
/// each and what is lost, about those wanted for complete symbolization.
pub fn check_privileges() -> anyhow::Result<()> {
    let eff = privilege::effective().context("reading our capabilities")?;
    let missing = privilege::missing(eff, &privilege::RECORD_REQUIRED);
    if !missing.is_empty() {
        bail!(
            "missing capabilities {}: run as root, or grant them (setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search,cap_syslog+ep cprof)",
            privilege::names(&missing)
        );
    }
    for cap in privilege::missing(eff, &privilege::RECORD_WANTED) {
        if cap == privilege::CAP_SYSLOG && !privilege::kallsyms_needs_syslog() {
            continue;
        }
        tracing::warn!("without {}: {}", cap.name, cap.without);
    }
    Ok(())
}

/// Drops what later work does not need, once the probes are attached (see [`privilege`]).
fn drop_privileges(probes: &Probes) -> anyhow::Result<()> {
    let after = privilege::drop_after_attach(|| probes.maps_readable())
        .context("dropping capabilities after attaching")?;
    if after.bpf_kept_for_maps {
        tracing::info!("this kernel checks CAP_BPF for map reads (Linux before 6.5): kept");
    }
    tracing::info!(
        "attached; capabilities kept: {}; dropped: {}; no_new_privs set",
        privilege::names_in(after.kept),
        privilege::names_in(after.dropped),
    );
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; later ones to the memory cgroup.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on Linux 5.11+",
            std::io::Error::last_os_error()
        );
    }
}

/// The symbolizer holds two descriptors per parsed file (up to 1024 files): raise the soft limit
/// on open files to the hard one (commonly 1024 soft, 524288 hard), up to 65536.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or fill the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) != 0 {
            return;
        }
        let wanted = limit.rlim_max.min(65_536);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) != 0 {
                tracing::debug!(
                    "could not raise RLIMIT_NOFILE ({})",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Our own pid namespace as the kernel names it: (device number in the kernel's encoding, inode).
pub fn own_pid_namespace() -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata("/proc/self/ns/pid").context("reading /proc/self/ns/pid")?;
    let dev = meta.dev();
    // The kernel compares against its internal dev_t: major << 20 | minor.
    let (major, minor) = (u64::from(libc::major(dev)), u64::from(libc::minor(dev)));
    Ok(((major << 20) | minor, meta.ino()))
}
