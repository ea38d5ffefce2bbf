//! Least privilege. `cprof` run as `nobody` (uid 65534) holding exactly the capabilities it
//! documents (`setpriv`), against workloads of another user (uid 65533) whose binary sits in a
//! `0700` directory: it records, symbolizes user and kernel frames and writes its files. Each
//! capability left out in turn: a required one is named in one line, nothing is attached or
//! written; a wanted one is named in a warning, and what it stands for is lost (and only that).
//!
//! Then, as root, what remains after attaching: no thread holds `CAP_BPF`, `CAP_PERFMON` or
//! `CAP_SYS_ADMIN`, every thread has `no_new_privs`, the network threads hold nothing; and the
//! results stay complete. Finally `strace` shows that targets' environment and command line are
//! never opened.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cprof::pprof::{Profile, ProfileExt as _};

use crate::agent::Agent;
use crate::util::{self, BpfObjects};

const CPROF_UID: u32 = 65_534;
const TARGET_UID: u32 = 65_533;
/// The capabilities cprof documents (README "Security", `cprof record --help`), as setpriv
/// names them.
const DOCUMENTED: [&str; 5] = ["bpf", "perfmon", "sys_ptrace", "dac_read_search", "syslog"];

/// A scratch tree readable by both users: a copy of cprof, the workload in `app/` (`0700`, owned
/// by the target user), and `out/` owned by nobody for cprof's output directories.
struct Stage {
    base: PathBuf,
    cprof: PathBuf,
    workload: PathBuf,
}

impl Stage {
    fn new(name: &str) -> Self {
        util::require_root();
        // Not under the repository: its parents may be closed to nobody (a CI home directory).
        let base = std::env::temp_dir().join(format!("cprof-privs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        chmod(&base, 0o755);
        let cprof = base.join("cprof");
        std::fs::copy(env!("CARGO_BIN_EXE_cprof"), &cprof).unwrap();
        chmod(&cprof, 0o755);
        let app = base.join("app");
        std::fs::create_dir(&app).unwrap();
        let workload = app.join("calltree");
        std::fs::copy(util::workload_binary("calltree"), &workload).unwrap();
        chown(&workload, TARGET_UID);
        chmod(&workload, 0o755);
        chown(&app, TARGET_UID);
        chmod(&app, 0o700);
        let out = base.join("out");
        std::fs::create_dir(&out).unwrap();
        chown(&out, CPROF_UID);
        chmod(&out, 0o755);
        Self {
            base,
            cprof,
            workload,
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.base.join("out").join(name)
    }

    /// The calltree workload as the target user: `args` `--kernel` reads /dev/zero.
    fn target(&self, args: &[&str]) -> Target {
        let child = Command::new("setpriv")
            .args(["--reuid=65533", "--regid=65533", "--clear-groups"])
            .arg(&self.workload)
            .args(args)
            .spawn()
            .expect("running setpriv (util-linux)");
        std::thread::sleep(Duration::from_millis(200));
        Target(child)
    }

    /// cprof as nobody with exactly `caps` (setpriv names) inherited and ambient.
    fn cprof_as_nobody(&self, caps: &[&str]) -> Command {
        let list: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(format!("--inh-caps={list}"))
            .arg(format!("--ambient-caps={list}"))
            .arg(&self.cprof);
        cmd
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// A workload run as the target user, killed on drop.
struct Target(Child);

impl Target {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
}

/// Samples of `pid` and of those, the ones with `function` on their stack.
fn samples_of(p: &Profile, pid: u32, function: &str) -> (i64, i64) {
    let of_pid = |s: &cprof::pprof::proto::Sample| p.label_num(s, "pid") == Some(i64::from(pid));
    (
        util::samples_where(p, of_pid),
        util::samples_where(p, |s| of_pid(s) && util::on_stack(p, s, function)),
    )
}

/// What one recording as nobody did.
struct Run {
    ok: bool,
    stderr: String,
    profile: Option<Profile>,
}

/// `cprof record` as nobody with `caps`, for 2 s: of the two targets, or of every process.
fn record_as_nobody(stage: &Stage, caps: &[&str], name: &str, pids: Option<(u32, u32)>) -> Run {
    let dir = stage.out(name);
    let mut cmd = stage.cprof_as_nobody(caps);
    cmd.args(["record", "--duration", "2", "-F", "499", "--output"])
        .arg(&dir);
    if let Some((user, kernel)) = pids {
        cmd.args(["--pid", &user.to_string(), "--pid", &kernel.to_string()]);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .expect("running setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let profile = dir.join("cpu.pb.gz").exists().then(|| {
        let meta = std::fs::metadata(dir.join("cpu.pb.gz")).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (CPROF_UID, 0o600),
            "{name}: written by nobody, mode 0600"
        );
        let dir_mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700, "{name}: output directory mode");
        util::assert_complete_files(&dir, name);
        util::read_profile(&dir)
    });
    Run {
        ok: out.status.success(),
        stderr,
        profile,
    }
}

/// The lines of `stderr` that are warnings.
fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("WARN")).collect()
}

fn without(cap: &str) -> Vec<&'static str> {
    DOCUMENTED.iter().copied().filter(|c| *c != cap).collect()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one stage, then each capability left out in turn, each with its own check"
)]
fn record_as_nobody_with_the_documented_capabilities() {
    let stage = Stage::new("record");
    let user = stage.target(&["600"]);
    let kernel = stage.target(&["--kernel", "600"]);
    let pids = Some((user.pid(), kernel.pid()));

    let run = record_as_nobody(&stage, &DOCUMENTED, "full", pids);
    assert!(run.ok, "the documented set suffices: {}", run.stderr);
    assert!(
        warnings(&run.stderr).is_empty(),
        "no warning: {}",
        run.stderr
    );
    let p = run.profile.expect("cpu.pb.gz written");
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "full set: user workload {in_work}/{total} samples in cpu_work; kernel workload {in_vfs_read}/{k_total} in vfs_read"
    );
    assert!(total > 50, "samples of the user workload: {total}");
    assert!(
        in_work * 100 > total * 90,
        "cpu_work (every sample of the worker) symbolized: {in_work} of {total}"
    );
    assert!(
        in_vfs_read * 100 > k_total * 80,
        "vfs_read symbolized: {in_vfs_read} of {k_total}"
    );

    // Required: one line naming it, nothing attached, nothing written.
    for cap in ["bpf", "perfmon"] {
        let before = BpfObjects::now();
        let name = format!("no-{cap}");
        let run = record_as_nobody(&stage, &without(cap), &name, pids);
        let expected = format!(
            "cprof: error: missing capabilities CAP_{}:",
            cap.to_uppercase()
        );
        assert!(!run.ok, "{name}: must fail");
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: one line: {}", run.stderr);
        assert!(lines[0].starts_with(&expected), "{name}: {:?}", lines[0]);
        assert!(!stage.out(&name).exists(), "{name}: no output directory");
        util::assert_bpf_released(&before, Duration::from_secs(3), &name);
        eprintln!("without CAP_{}: {:?}", cap.to_uppercase(), lines[0]);
    }

    // Wanted: a warning naming it, and exactly what it stands for is lost.
    let run = record_as_nobody(&stage, &without("dac_read_search"), "no-dac", pids);
    assert!(run.ok, "no-dac: {}", run.stderr);
    assert_warns(&run.stderr, "CAP_DAC_READ_SEARCH", "binaries");
    let p = run.profile.expect("no-dac: cpu.pb.gz");
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "without CAP_DAC_READ_SEARCH: cpu_work {in_work}/{total} (the 0700 binary is unreadable), vfs_read {in_vfs_read}/{k_total}"
    );
    assert!(
        total > 50 && in_work == 0,
        "the 0700 binary stays unsymbolized: {in_work} of {total}"
    );
    assert!(
        in_vfs_read * 100 > k_total * 80,
        "kernel frames still symbolized: {in_vfs_read} of {k_total}"
    );

    let run = record_as_nobody(&stage, &without("syslog"), "no-syslog", pids);
    assert!(run.ok, "no-syslog: {}", run.stderr);
    assert_warns(&run.stderr, "CAP_SYSLOG", "kernel frames");
    let p = run.profile.expect("no-syslog: cpu.pb.gz");
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "without CAP_SYSLOG: cpu_work {in_work}/{total}, vfs_read {in_vfs_read}/{k_total} (kallsyms shows no addresses)"
    );
    assert!(
        in_work * 100 > total * 90,
        "user frames still symbolized: {in_work} of {total}"
    );
    assert!(
        k_total > 50 && in_vfs_read == 0,
        "kernel frames unsymbolized: {in_vfs_read} of {k_total}"
    );

    // Without CAP_SYS_PTRACE the maps of processes first seen after attaching (every process,
    // when recording all of them) are closed to us once CAP_PERFMON is dropped.
    let run = record_as_nobody(&stage, &without("sys_ptrace"), "no-ptrace", None);
    assert!(run.ok, "no-ptrace: {}", run.stderr);
    assert_warns(&run.stderr, "CAP_SYS_PTRACE", "other users' processes");
    let p = run.profile.expect("no-ptrace: cpu.pb.gz");
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    let unreadable = util::number_after(
        util::comment(&p, "processes whose memory maps could not be read"),
        "unsymbolized): ",
    );
    eprintln!(
        "without CAP_SYS_PTRACE (every process): cpu_work {in_work}/{total}, vfs_read {in_vfs_read}/{k_total}, processes whose maps could not be read {unreadable}"
    );
    assert!(
        total > 50 && in_work == 0,
        "user frames of the other user's process unsymbolized"
    );
    assert!(
        unreadable >= 2,
        "both targets counted as unreadable: {unreadable}"
    );
    assert!(
        in_vfs_read * 100 > k_total * 80,
        "kernel frames still symbolized: {in_vfs_read} of {k_total}"
    );
}

fn assert_warns(stderr: &str, cap: &str, lost: &str) {
    let w = warnings(stderr);
    assert!(
        w.len() == 1 && w[0].contains(&format!("without {cap}: ")) && w[0].contains(lost),
        "expected one warning naming {cap} and what is lost ({lost}), got: {stderr}"
    );
}

#[test]
fn agent_as_nobody_with_the_documented_capabilities() {
    let stage = Stage::new("agent");
    let user = stage.target(&["600"]);
    let kernel = stage.target(&["--kernel", "600"]);
    let dir = stage.out("agent");
    let mut cmd = stage.cprof_as_nobody(&DOCUMENTED);
    cmd.args([
        "agent",
        "--interval",
        "1s",
        "--metrics-addr",
        "off",
        "-F",
        "499",
    ])
    .args([
        "--pid",
        &user.pid().to_string(),
        "--pid",
        &kernel.pid().to_string(),
    ])
    .arg("--output-dir")
    .arg(&dir);
    let mut agent = Agent::start_command(cmd);
    agent.wait_for_line("cprof: window", Duration::from_secs(10));
    agent.wait_for_line("cprof: window", Duration::from_secs(10));
    let (took, lines) = agent.stop(libc::SIGTERM);
    assert!(
        !lines.iter().any(|l| l.contains("WARN")),
        "no warning: {lines:?}"
    );
    let cpu: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("cpu-"))
        .collect();
    // The fullest window (the first and the last are cut short by the start and the stop).
    let (window, p) = cpu
        .iter()
        .map(|path| {
            (
                path,
                cprof::pprof::decode(&std::fs::read(path).unwrap()).unwrap(),
            )
        })
        .max_by_key(|(_, p)| util::samples_where(p, |_| true))
        .expect("windows written");
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "agent as nobody: {} windows; {}: cpu_work {in_work}/{total}, vfs_read {in_vfs_read}/{k_total}; stopped in {took:.2?}",
        cpu.len(),
        window.display()
    );
    assert_symbolized((total, in_work), (k_total, in_vfs_read));

    let before = BpfObjects::now();
    let out = stage
        .cprof_as_nobody(&without("bpf"))
        .args(["agent", "--metrics-addr", "off", "--output-dir"])
        .arg(stage.out("agent-no-bpf"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("cprof: error: missing capabilities CAP_BPF:"),
        "{stderr}"
    );
    assert!(!stage.out("agent-no-bpf").exists());
    util::assert_bpf_released(&before, Duration::from_secs(3), "agent without CAP_BPF");
}

/// One thread's capability state, from `/proc/<pid>/task/<tid>/status`.
#[derive(Debug)]
struct ThreadCaps {
    name: String,
    effective: u64,
    permitted: u64,
    no_new_privs: bool,
}

fn thread_caps(pid: u32) -> Vec<ThreadCaps> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"))
                .trim()
                .to_owned()
        };
        let hex = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        out.push(ThreadCaps {
            name: field("Name:"),
            effective: hex("CapEff:"),
            permitted: hex("CapPrm:"),
            no_new_privs: field("NoNewPrivs:") == "1",
        });
    }
    out
}

/// At least 90% of the user workload's samples under `cpu_work`, 80% of the kernel workload's
/// under `vfs_read`, and more than 50 samples of each: (samples, of them symbolized).
fn assert_symbolized((total, in_work): (i64, i64), (k_total, in_vfs_read): (i64, i64)) {
    assert!(
        in_work * 100 > total * 90 && total > 50,
        "user frames symbolized: {in_work} of {total}"
    );
    assert!(
        in_vfs_read * 100 > k_total * 80 && k_total > 50,
        "kernel frames symbolized: {in_vfs_read} of {k_total}"
    );
}

/// No thread of `pid` may hold what loading needs; network threads hold nothing.
fn assert_dropped(pid: u32, network_threads: &[&str]) -> Vec<ThreadCaps> {
    let gone = (1u64 << 39) | (1 << 38) | (1 << 21); // CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN
    // A new thread names itself once it runs: until then it shows the process's name.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut threads = thread_caps(pid);
    while !network_threads
        .iter()
        .all(|name| threads.iter().any(|t| t.name == *name))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
        threads = thread_caps(pid);
    }
    for t in &threads {
        assert!(
            (t.effective | t.permitted) & gone == 0 && t.no_new_privs,
            "thread {t:?} holds CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN or lacks no_new_privs (all: {threads:?})"
        );
    }
    for name in network_threads {
        let t = threads
            .iter()
            .find(|t| t.name == *name)
            .unwrap_or_else(|| panic!("no thread {name}: {threads:?}"));
        assert_eq!((t.effective, t.permitted), (0, 0), "{name} holds nothing");
    }
    threads
}

#[test]
fn record_drops_capabilities_once_attached_and_stays_complete() {
    let stage = Stage::new("drop-record");
    let dir = stage.out("root-record");
    let rec = util::Recording::start(&["--event", "all", "--duration", "4", "-F", "499"], &dir);
    // Started after the drop: their maps are read with what is left (CAP_SYS_PTRACE).
    let user = stage.target(&["600"]);
    let kernel = stage.target(&["--kernel", "600"]);
    let threads = assert_dropped(rec.pid(), &[]);
    eprintln!("record threads after attaching: {threads:?}");
    rec.wait(Duration::from_secs(30));
    let p = util::read_profile(&dir);
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "record after the drop: cpu_work {in_work}/{total}, vfs_read {in_vfs_read}/{k_total}"
    );
    assert_symbolized((total, in_work), (k_total, in_vfs_read));
}

#[test]
fn agent_drops_capabilities_once_attached_and_keeps_symbolizing() {
    let stage = Stage::new("drop-agent");
    let dir = stage.out("root-agent");
    let mut agent = Agent::start(&[
        "--interval",
        "1s",
        "-F",
        "499",
        "--metrics-addr",
        "127.0.0.1:0",
        "--push-pyroscope",
        "http://127.0.0.1:9",
        "--output-dir",
        dir.to_str().unwrap(),
    ]);
    let threads = assert_dropped(agent.pid(), &["cprof-metrics", "cprof-push"]);
    eprintln!("agent threads after attaching: {threads:?}");
    let user = stage.target(&["600"]);
    let kernel = stage.target(&["--kernel", "600"]);
    agent.skip_backlog();
    agent.wait_for_line("cprof: window", Duration::from_secs(10));
    agent.wait_for_line("cprof: window", Duration::from_secs(10));
    agent.wait_for_line("cprof: window", Duration::from_secs(10));
    assert_dropped(agent.pid(), &["cprof-metrics", "cprof-push"]);
    agent.stop(libc::SIGTERM);
    // The newest complete windows: the targets ran through them.
    let mut cpu: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("cpu-"))
        .collect();
    cpu.sort();
    let window = &cpu[cpu.len() - 2];
    let p = cprof::pprof::decode(&std::fs::read(window).unwrap()).unwrap();
    let (total, in_work) = samples_of(&p, user.pid(), "cpu_work");
    let (k_total, in_vfs_read) = samples_of(&p, kernel.pid(), "vfs_read");
    eprintln!(
        "agent window {} after the drop: cpu_work {in_work}/{total}, vfs_read {in_vfs_read}/{k_total}",
        window.display()
    );
    assert_symbolized((total, in_work), (k_total, in_vfs_read));
}

/// `strace` of a recording of every process: `/proc/<pid>/maps` of the target is opened (the
/// trace sees what cprof reads), its `environ`, `cmdline` and `mem` never.
#[test]
fn targets_environment_and_command_line_are_never_read() {
    let stage = Stage::new("strace");
    let user = stage.target(&["600"]);
    let dir = stage.out("strace");
    let trace = stage.base.join("trace.txt");
    let out = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_cprof"))
        .args(["record", "--event", "all", "--duration", "1", "--output"])
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .expect("running strace (Debian package strace; cargo xtask test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    let maps = format!("\"/proc/{}/maps\"", user.pid());
    assert!(text.contains(&maps), "the trace shows cprof reading {maps}");
    let opened_proc_files = text.lines().filter(|l| l.contains("\"/proc/")).count();
    let forbidden: Vec<&str> = text
        .lines()
        .filter(|l| {
            ["/environ\"", "/cmdline\"", "/mem\""]
                .iter()
                .any(|f| l.contains("\"/proc/") && l.contains(f))
        })
        .collect();
    eprintln!(
        "strace: {opened_proc_files} opens under /proc, {} of environ/cmdline/mem",
        forbidden.len()
    );
    assert!(forbidden.is_empty(), "opened: {forbidden:?}");
}
