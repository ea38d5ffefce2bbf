//! `cprof agent`: windows written completely and atomically, retention, the Prometheus endpoint
//! (checked by `promtool`), SIGTERM, processes that start after the agent or exit, cgroups.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use cprof::pprof::{self, Profile, ProfileExt as _};

use crate::util::{
    PausedWorkload, Workload, cprof, kill, measured, on_stack, out_dir, require_root,
    samples_where, stderr_lines, workload_binary,
};

/// A `cprof agent` running in the background, started once it says it is recording.
pub struct Agent {
    child: Child,
    /// The agent's own pid, when `child` is a wrapper that runs it (unshare).
    inner_pid: Option<u32>,
    stderr: Receiver<String>,
    pub lines: Vec<String>,
}

impl Agent {
    pub fn start(args: &[&str]) -> Self {
        let mut cmd = cprof();
        cmd.arg("agent").args(args);
        Self::start_command(cmd)
    }

    /// Runs `cmd`, which runs `cprof agent` (directly, or as the only child of a wrapper).
    pub fn start_command(mut cmd: Command) -> Self {
        require_root();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running cprof agent");
        let rx = stderr_lines(&mut child);
        let mut agent = Self {
            child,
            inner_pid: None,
            stderr: rx,
            lines: Vec::new(),
        };
        agent.wait_for_line("cprof: agent recording", Duration::from_secs(30));
        let id = agent.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap_or_default();
        agent.inner_pid = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok());
        agent
    }

    /// Waits for a stderr line starting with `prefix`; returns it.
    pub fn wait_for_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.lines.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                    assert!(
                        !line.starts_with("cprof: error"),
                        "cprof agent failed: {line}"
                    );
                }
                Err(e) => panic!(
                    "no line {prefix:?} from cprof agent within {within:?} ({e}); got {:?}",
                    self.lines
                ),
            }
        }
    }

    /// The agent process (as the host sees it).
    pub fn pid(&self) -> u32 {
        self.inner_pid.unwrap_or_else(|| self.child.id())
    }

    /// Takes the lines printed so far, so that the next wait is for a new line.
    pub fn skip_backlog(&mut self) {
        while let Ok(line) = self.stderr.try_recv() {
            self.lines.push(line);
        }
    }

    /// Sends `signal` and waits for a successful exit; returns how long it took.
    pub fn stop(mut self, signal: i32) -> (Duration, Vec<String>) {
        let start = Instant::now();
        kill(self.pid(), signal);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "cprof agent did not exit within 10 s of signal {signal}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = start.elapsed();
        // The reader thread sees EOF once the process is gone.
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            self.lines.push(line);
        }
        assert!(
            status.success(),
            "cprof agent exited with {status}: {:?}",
            self.lines
        );
        (took, std::mem::take(&mut self.lines))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Window stamp -> file names, for the window files in `dir`.
fn windows(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            !name.starts_with('.'),
            "a temporary file was left behind: {name}"
        );
        if let Some(stamp) = cprof::agent::retention::window_stamp(&name) {
            out.entry(stamp.to_owned()).or_default().push(name);
        }
    }
    for names in out.values_mut() {
        names.sort();
    }
    out
}

fn decode(path: &Path) -> Profile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    pprof::decode(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display()))
}

#[test]
fn three_windows_of_two_seconds_are_complete() {
    let dir = out_dir("agent-windows");
    let d = dir.to_str().unwrap();
    let spinner = Workload::start("calltree", &["30"]);
    let mut agent = Agent::start(&[
        "--interval",
        "2s",
        "--event",
        "cpu,syscall",
        "-F",
        "199",
        "--output-dir",
        d,
        "--metrics-addr",
        "off",
    ]);
    for _ in 0..3 {
        agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    }
    let (_, lines) = agent.stop(libc::SIGTERM);
    let found = windows(&dir);
    assert!(found.len() >= 3, "windows: {found:?}\n{lines:?}");
    let expected = [
        "cpu-{}.pb.gz",
        "syscall-{}.pb.gz",
        "syscall-latency-{}.json",
    ];
    let mut starts = Vec::new();
    for (stamp, names) in found.iter().take(3) {
        let mut want: Vec<String> = expected.iter().map(|e| e.replace("{}", stamp)).collect();
        want.sort();
        assert_eq!(names, &want, "window {stamp}");
        let cpu = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
        let secs = cpu.duration_nanos as f64 / 1e9;
        assert!((1.8..2.4).contains(&secs), "window {stamp} lasted {secs} s");
        starts.push(cpu.time_nanos);
        let spun = samples_where(&cpu, |s| {
            cpu.label_num(s, "pid") == Some(i64::from(spinner.pid()))
        });
        // 199 Hz for 2 s of a busy thread: up to 398 samples, fewer when the CPUs are shared.
        assert!(
            (50..=420).contains(&spun),
            "window {stamp}: {spun} samples of the busy workload"
        );
        let json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("syscall-latency-{stamp}.json"))).unwrap(),
        )
        .unwrap();
        assert!(
            json["syscalls"].as_array().is_some_and(|a| !a.is_empty()),
            "{json}"
        );
    }
    for pair in starts.windows(2) {
        let gap = (pair[1] - pair[0]) as f64 / 1e9;
        assert!((1.9..2.2).contains(&gap), "windows start {gap} s apart");
    }
}

#[test]
fn retention_deletes_by_age_and_by_size() {
    let dir = out_dir("agent-retention-age");
    let d = dir.to_str().unwrap();
    let mut agent = Agent::start(&[
        "--interval",
        "1s",
        "--retain-age",
        "2500ms",
        "--output-dir",
        d,
        "--metrics-addr",
        "off",
    ]);
    let first = agent.wait_for_line("cprof: window ", Duration::from_secs(5));
    let first_stamp = first
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    for _ in 0..5 {
        agent.wait_for_line("cprof: window ", Duration::from_secs(5));
    }
    let found = windows(&dir);
    assert!(
        !found.contains_key(&first_stamp),
        "the first window ({first_stamp}) is older than 2.5 s and should be gone: {found:?}"
    );
    assert!(
        (2..=4).contains(&found.len()),
        "windows of the last 2.5 s, 1 s each: {found:?}"
    );
    agent.stop(libc::SIGTERM);

    // A cap below one window's size: every window but the newest goes.
    let dir = out_dir("agent-retention-size");
    let d = dir.to_str().unwrap();
    let _spinner = Workload::start("calltree", &["30"]);
    let mut agent = Agent::start(&[
        "--interval",
        "1s",
        "-F",
        "999",
        "--retain-size",
        "1000B",
        "--output-dir",
        d,
        "--metrics-addr",
        "off",
    ]);
    for _ in 0..4 {
        agent.wait_for_line("cprof: window ", Duration::from_secs(5));
    }
    let (_, lines) = agent.stop(libc::SIGTERM);
    let last = lines
        .iter()
        .rfind(|l| l.starts_with("cprof: window "))
        .unwrap();
    let last_stamp = last
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    let found = windows(&dir);
    let stamps: Vec<&String> = found.keys().collect();
    assert_eq!(
        stamps,
        [&last_stamp],
        "only the newest of 6 windows is kept"
    );
    let size = std::fs::metadata(dir.join(format!("cpu-{last_stamp}.pb.gz")))
        .unwrap()
        .len();
    assert!(size > 1000, "the window ({size} bytes) is over the cap");
}

/// `GET /metrics` from 127.0.0.1:`port`.
pub fn scrape(port: u16) -> String {
    let mut conn =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the sample line `series` (name and labels exactly as exposed).
fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
        .parse()
        .unwrap()
}

#[test]
#[expect(
    clippy::float_cmp,
    reason = "counts are exact integers in the exposition"
)]
fn metrics_count_the_syscall_workload_exactly_and_pass_promtool() {
    let port = 19_464;
    let dir = out_dir("agent-metrics");
    let agent = Agent::start(&[
        "--event",
        "syscall,tcp",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut workload = PausedWorkload::start("syscalls", &["20", "3000", "40"]);
    let pid = workload.pid();
    workload.go();
    let printed = workload.finish();
    // The next drain (every second) brings the counts in.
    std::thread::sleep(Duration::from_millis(2500));
    let body = scrape(port);
    let series = |syscall: &str| {
        format!(
            "cprof_syscall_latency_seconds_count{{pid=\"{pid}\",comm=\"syscalls\",syscall=\"{syscall}\"}}"
        )
    };
    // Two more reads than the workload's own: the dynamic loader reading libc's ELF header,
    // and stdin's "go" line (the agent sees the process from its first instruction).
    assert_eq!(
        metric(&body, &series("read")),
        (measured(&printed, "reads") + 2) as f64
    );
    assert_eq!(
        metric(&body, &series("nanosleep")),
        measured(&printed, "nanosleeps") as f64
    );
    assert_eq!(
        metric(&body, &series("open")),
        measured(&printed, "failed_opens") as f64
    );
    // 20 sleeps of 5 ms: all of them in the buckets from 4.2 ms up, none below.
    let bucket = |le: &str| {
        metric(
            &body,
            &format!(
                "cprof_syscall_latency_seconds_bucket{{pid=\"{pid}\",comm=\"syscalls\",syscall=\"nanosleep\",le=\"{le}\"}}"
            ),
        )
    };
    assert_eq!(bucket("0.004194304"), 0.0);
    assert_eq!(bucket("0.016777216"), 20.0);
    let sum = metric(
        &body,
        &format!(
            "cprof_syscall_latency_seconds_sum{{pid=\"{pid}\",comm=\"syscalls\",syscall=\"nanosleep\"}}"
        ),
    );
    assert!((0.1..0.13).contains(&sum), "20 x 5 ms slept: sum {sum} s");
    for health in [
        "cprof_windows_written_total",
        "cprof_agent_cpu_seconds_total",
        "cprof_agent_resident_memory_bytes",
        "cprof_unsymbolized_addresses_total",
        "cprof_push_failures_total",
        "cprof_bpf_program_runs_total{program=\"on_sys_enter\"}",
        "cprof_lost_samples_total{reason=\"syscall_map_full\"}",
    ] {
        metric(&body, health);
    }
    assert!(metric(&body, "cprof_agent_resident_memory_bytes") > 1e6);

    let checked = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(body.as_bytes())?;
            child.wait_with_output()
        })
        .expect("running promtool (Debian package prometheus; cargo xtask test installs it)");
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    agent.stop(libc::SIGTERM);
}

#[test]
fn sigterm_mid_window_writes_it_and_exits_within_five_seconds() {
    let dir = out_dir("agent-sigterm");
    let spinner = Workload::start("calltree", &["30"]);
    let agent = Agent::start(&[
        "--interval",
        "60s",
        "--event",
        "cpu,offcpu",
        "-F",
        "499",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let (took, lines) = agent.stop(libc::SIGTERM);
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
    let found = windows(&dir);
    assert_eq!(found.len(), 1, "{found:?} {lines:?}");
    let (stamp, names) = found.iter().next().unwrap();
    assert_eq!(names.len(), 3, "cpu, offcpu, offwake: {names:?}");
    let cpu = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
    let spun = samples_where(&cpu, |s| {
        cpu.label_num(s, "pid") == Some(i64::from(spinner.pid()))
    });
    assert!(spun > 200, "up to 2 s at 499 Hz of the busy thread: {spun}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("stopped: terminated (SIGTERM)")),
        "{lines:?}"
    );
}

#[test]
fn processes_started_later_are_profiled_and_symbolized_after_they_exit() {
    let dir = out_dir("agent-late");
    let agent = Agent::start(&[
        "--interval",
        "60s",
        "-F",
        "499",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    let mut late = Command::new(workload_binary("calltree"))
        .arg("2")
        .stdout(Stdio::null())
        .spawn()
        .expect("running the workload");
    let late_pid = i64::from(late.id());
    assert!(late.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(1500));
    let (_, lines) = agent.stop(libc::SIGINT);
    let found = windows(&dir);
    let (stamp, _) = found
        .iter()
        .next()
        .unwrap_or_else(|| panic!("no window: {lines:?}"));
    let cpu = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
    let of_late = |f: &str| {
        samples_where(&cpu, |s| {
            cpu.label_num(s, "pid") == Some(late_pid) && on_stack(&cpu, s, f)
        })
    };
    let (a, b) = (of_late("path_a"), of_late("path_b"));
    assert!(
        a + b > 200,
        "up to 2 s at 499 Hz, symbolized after exit: path_a {a} path_b {b}"
    );
    let share = a as f64 / (a + b) as f64;
    assert!((0.62..0.78).contains(&share), "70/30 split: {share}");
}

/// A cgroup v2 directory made for a test, removed (after its processes) when dropped.
struct TestCgroup {
    path: PathBuf,
    /// As `/proc/<pid>/cgroup` names it.
    relative: String,
}

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = cprof::agent::config::cgroup2_root().expect("a cgroup2 mount");
        let path = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let relative = format!("/{}", path.strip_prefix(&root).unwrap().display());
        Self { path, relative }
    }

    /// Starts `binary args` inside this cgroup (a shell moves itself in, then execs).
    fn spawn(&self, binary: &Path, args: &[&str]) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.path.display()
            ))
            .arg(binary)
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a workload in the cgroup")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn cgroup_targets_only_their_processes_and_label_them() {
    let cgroup = TestCgroup::new("cprof-agent-test");
    let dir = out_dir("agent-cgroup");
    let outside = Workload::start("calltree", &["30"]);
    let agent = Agent::start(&[
        "--cgroup",
        cgroup.path.to_str().unwrap(),
        "--interval",
        "60s",
        "-F",
        "499",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        "off",
    ]);
    // Started after the agent, in a cgroup created before it.
    let mut inside = cgroup.spawn(&workload_binary("calltree"), &["3"]);
    assert!(inside.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(1200));
    let (_, lines) = agent.stop(libc::SIGTERM);
    let found = windows(&dir);
    let (stamp, _) = found
        .iter()
        .next()
        .unwrap_or_else(|| panic!("no window: {lines:?}"));
    let cpu = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
    let total: i64 = cpu.sample.iter().map(|s| s.value[0]).sum();
    let of_outside = samples_where(&cpu, |s| {
        cpu.label_num(s, "pid") == Some(i64::from(outside.pid()))
    });
    let in_cgroup = samples_where(&cpu, |s| {
        cpu.label_str(s, "cgroup") == Some(cgroup.relative.as_str())
    });
    assert_eq!(
        of_outside, 0,
        "the busy process outside the cgroup is not recorded"
    );
    assert!(
        in_cgroup > 200,
        "up to 3 s at 499 Hz inside the cgroup: {in_cgroup}"
    );
    assert_eq!(
        in_cgroup, total,
        "every sample is from the cgroup and labelled with it"
    );
}

#[test]
fn windows_are_pushed_to_pyroscope_and_spooled_while_it_is_down() {
    use crate::receiver::Receiver;
    let dir = out_dir("agent-push");
    let token = dir.with_extension("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let mut receiver = Receiver::start();
    let spinner = Workload::start("calltree", &["60"]);
    let mut agent = Agent::start(&[
        "--interval",
        "2s",
        "--event",
        "cpu,syscall",
        "-F",
        "199",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        "off",
        "--push-pyroscope",
        &receiver.url(),
        "--push-bearer-token-file",
        token.to_str().unwrap(),
        "--push-tenant",
        "team-a",
    ]);
    let first = agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    let stamp = first
        .split_whitespace()
        .nth(2)
        .unwrap()
        .trim_end_matches(':')
        .to_owned();
    // One request per window and signal: cpu and syscall.
    let requests = receiver.wait_for_requests(2, Duration::from_secs(10));
    for r in &requests {
        assert_eq!(r.path, "/push.v1.PusherService/Push");
        assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(r.header("x-scope-orgid"), Some("team-a"));
    }
    check_pushed_cpu(&requests, &dir, &stamp, spinner.pid());

    // The backend goes away for two windows, then comes back: nothing is lost.
    receiver.stop();
    let before = receiver.requests().len();
    agent.skip_backlog();
    for _ in 0..2 {
        agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    }
    let spool = dir.join("spool");
    let pending = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| Path::new(n).extension().is_some_and(|x| x == "push"))
            .collect();
        names.sort();
        names
    };
    // The window's line comes just before its requests are spooled.
    let deadline = Instant::now() + Duration::from_secs(3);
    while pending().len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let spooled = pending();
    assert!(
        spooled.len() >= 4,
        "two windows of two signals in the spool: {spooled:?}"
    );
    receiver.restart();
    let all = receiver.wait_for_requests(before + 4, Duration::from_secs(20));
    let (_, lines) = agent.stop(libc::SIGTERM);
    let delivered: Vec<_> = all.iter().skip(before).collect();
    assert!(
        delivered.len() >= 4,
        "{} delivered after the outage; {lines:?}",
        delivered.len()
    );
    let left = pending();
    assert!(
        left.len() <= 2,
        "at most the last window is still spooled: {left:?}"
    );
}

/// The cpu request of window `stamp`: one series per process, calltree's holding just its own
/// samples, as many as the window's file on disk.
fn check_pushed_cpu(requests: &[crate::receiver::Request], dir: &Path, stamp: &str, pid: u32) {
    let cpu: Vec<_> = requests
        .iter()
        .flat_map(super::receiver::Request::decode)
        .filter(|s| s.label("__name__") == Some("process_cpu"))
        .collect();
    let services: Vec<&str> = cpu.iter().filter_map(|s| s.label("service_name")).collect();
    assert!(
        services.contains(&"calltree"),
        "one series per process: {services:?}"
    );
    let calltree = cpu
        .iter()
        .find(|s| s.label("service_name") == Some("calltree"))
        .unwrap();
    assert_eq!(calltree.label("cprof_signal"), Some("cpu"));
    let profile = calltree.profile();
    let spun = samples_where(&profile, |s| {
        profile.label_num(s, "pid") == Some(i64::from(pid))
    });
    let on_disk = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
    let on_disk_spun = samples_where(&on_disk, |s| {
        on_disk.label_num(s, "pid") == Some(i64::from(pid))
    });
    assert!(
        spun > 50 && spun == on_disk_spun,
        "pushed {spun}, on disk {on_disk_spun}"
    );
    assert!(
        profile
            .sample
            .iter()
            .all(|s| profile.label_str(s, "process") == Some("calltree")),
        "the calltree series holds only calltree's samples"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The BPF objects `pid` holds: (links, programs, entries of the maps named in `maps`), read
/// from its `/proc/<pid>/fdinfo` and counted with `bpftool map dump`.
fn bpf_objects(pid: u32, maps: &[&str]) -> (usize, usize, BTreeMap<String, usize>) {
    let (mut links, mut progs, mut entries) = (0, 0, BTreeMap::new());
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        links += usize::from(field("link_id:").is_some());
        progs += usize::from(field("prog_id:").is_some() && field("link_id:").is_none());
        let Some(id) = field("map_id:") else {
            continue;
        };
        let bpftool = |args: &[&str]| -> serde_json::Value {
            let out = Command::new("bpftool")
                .arg("-j")
                .args(args)
                .output()
                .expect("running bpftool");
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
        };
        let show = bpftool(&["map", "show", "id", &id]);
        let Some(name) = show["name"].as_str().filter(|n| maps.contains(n)) else {
            continue;
        };
        let dump = bpftool(&["map", "dump", "id", &id]);
        entries.insert(name.to_owned(), dump.as_array().map_or(0, Vec::len));
    }
    (links, progs, entries)
}

#[test]
fn churn_leaves_no_processes_or_descriptors_behind() {
    let port = 19_466;
    let dir = out_dir("agent-churn");
    let mut agent = Agent::start(&[
        "--interval",
        "2s",
        "--event",
        "cpu,syscall",
        "-F",
        "499",
        "--output-dir",
        dir.to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let cached = |body: &str| metric(body, "cprof_symbol_cache_entries{cache=\"processes\"}");
    let churn_round = |agent: &mut Agent| {
        let churn = Command::new(workload_binary("churn"))
            .args(["200", "4"])
            .output()
            .expect("running the churn workload");
        assert!(churn.status.success());
        let started = measured(&String::from_utf8_lossy(&churn.stdout), "started");
        assert!(started > 400, "{started} processes started");
        let during = cached(&scrape(port));
        // Exited processes are forgotten one window after the window they were found gone in.
        agent.skip_backlog();
        for _ in 0..3 {
            agent.wait_for_line("cprof: window ", Duration::from_secs(6));
        }
        let after = cached(&scrape(port));
        assert!(
            after < 200.0,
            "processes cached: {during} right after the churn, {after} three windows later ({started} started)"
        );
        open_fds(agent.pid())
    };
    // The first round opens what the agent keeps open (the files its symbolizer parsed, up to
    // 256); the second adds at most a binary or two seen for the first time, not one per process.
    let maps = [
        "SYSCALL_START",
        "COUNTS_A",
        "COUNTS_B",
        "SYSCALLS_A",
        "SYSCALLS_B",
    ];
    let before = bpf_objects(agent.pid(), &maps);
    let fds_first = churn_round(&mut agent);
    let first = bpf_objects(agent.pid(), &maps);
    let fds_second = churn_round(&mut agent);
    let second = bpf_objects(agent.pid(), &maps);
    let (_, lines) = agent.stop(libc::SIGTERM);
    eprintln!(
        "churn: fds {fds_first} -> {fds_second}; BPF (links, programs, entries) before {before:?}, \
         after one round {first:?}, after two {second:?}"
    );
    assert!(
        fds_second < fds_first + 10,
        "descriptors: {fds_first} after one churn, {fds_second} after two; {lines:?}"
    );
    assert!(
        before.0 > 0 && before.1 > 0,
        "the agent holds its links and programs"
    );
    assert_eq!(
        (before.0, before.1),
        (second.0, second.1),
        "links and programs neither leak nor vanish"
    );
    // Threads inside a syscall: a handful at any time, not one per thread that ever ended
    // (each of the 800+ processes ends in exit_group, which never returns).
    let in_syscall = |o: &(usize, usize, BTreeMap<String, usize>)| o.2["SYSCALL_START"];
    assert!(
        in_syscall(&second) < 400 && in_syscall(&second) < in_syscall(&first) + 200,
        "SYSCALL_START entries: {} after one round, {} after two",
        in_syscall(&first),
        in_syscall(&second)
    );
}

#[test]
fn own_pid_namespace_records_its_processes_with_their_pids() {
    // As a sidecar in a pod sharing its pid namespace: the agent and a workload in a new pid and
    // mount namespace (its own /proc); a busy process outside it must not be recorded.
    let outside = Workload::start("calltree", &["30"]);
    let dir = out_dir("agent-pidns");
    let script = format!(
        "{} 4 >/dev/null & exec {} agent --pid-namespace self --interval 60s -F 499 --output-dir {} --metrics-addr off",
        workload_binary("calltree").display(),
        env!("CARGO_BIN_EXE_cprof"),
        dir.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script]);
    let agent = Agent::start_command(cmd);
    std::thread::sleep(Duration::from_millis(3500));
    let (_, lines) = agent.stop(libc::SIGTERM);
    let found = windows(&dir);
    let (stamp, _) = found
        .iter()
        .next()
        .unwrap_or_else(|| panic!("no window: {lines:?}"));
    let cpu = decode(&dir.join(format!("cpu-{stamp}.pb.gz")));
    let pids: std::collections::BTreeSet<i64> = cpu
        .sample
        .iter()
        .filter_map(|s| cpu.label_num(s, "pid"))
        .collect();
    assert!(
        pids.iter().all(|&p| p < 100),
        "only the namespace's own small pids: {pids:?}"
    );
    assert!(!pids.contains(&i64::from(outside.pid())));
    let on = |f: &str| samples_where(&cpu, |s| on_stack(&cpu, s, f));
    let (a, b) = (on("path_a"), on("path_b"));
    assert!(
        a + b > 200,
        "the namespace's workload, symbolized through its /proc: path_a {a} path_b {b}"
    );
    let share = a as f64 / (a + b) as f64;
    assert!((0.62..0.78).contains(&share), "70/30 split: {share}");
}

/// `GET path` from 127.0.0.1:`port`; the body, if the answer is 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

#[test]
fn a_real_prometheus_server_scrapes_the_agent() {
    let (agent_port, prom_port) = (19_467, 19_468);
    let dir = out_dir("agent-prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cprof\n    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        ),
    )
    .unwrap();
    let agent = Agent::start(&[
        "--event",
        "syscall",
        "--output-dir",
        dir.join("windows").to_str().unwrap(),
        "--metrics-addr",
        &format!("127.0.0.1:{agent_port}"),
    ]);
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running prometheus (Debian package prometheus; cargo xtask test installs it)");
    let mut workload = PausedWorkload::start("syscalls", &["20", "100", "5"]);
    let pid = workload.pid();
    workload.go();
    workload.finish();
    // The value Prometheus stored for the workload's nanosleeps, once it has scraped them.
    let query = format!(
        "/api/v1/query?query=cprof_syscall_latency_seconds_count%7Bpid%3D%22{pid}%22%2Csyscall%3D%22nanosleep%22%7D"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let answer = http_get(prom_port, &query).unwrap_or_default();
        if let Some(v) = answer.split("\"value\":[").nth(1) {
            break v.split('"').nth(1).unwrap_or_default().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus stored no sample of the workload within 30 s: {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let up = http_get(prom_port, "/api/v1/query?query=up").unwrap_or_default();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    agent.stop(libc::SIGTERM);
    assert_eq!(stored, "20", "20 nanosleeps, as Prometheus stored them");
    assert!(up.contains("\"1\"]"), "the target is up: {up}");
}
