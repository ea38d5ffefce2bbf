//! Helpers: building and running workloads (killed on drop), running cprof, reading its output.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cprof::pprof::{self, Profile, ProfileExt as _};

/// The cprof binary under test.
pub fn cprof() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cprof"))
}

/// Panics unless we are root: these tests load eBPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the integration tests load eBPF programs: run them as root (cargo xtask test)"
    );
}

/// `tests/workloads/<name>.c` (or `.cpp`), built once per test run with frame pointers.
pub fn workload_binary(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if let Some((_, path)) = built.iter().find(|(n, _)| n == name) {
        return path.clone();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let c = root.join(format!("tests/workloads/{name}.c"));
    let (src, compiler) = if c.exists() {
        (c, "cc")
    } else {
        (root.join(format!("tests/workloads/{name}.cpp")), "c++")
    };
    assert!(src.exists(), "no workload {name} in tests/workloads");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let status = Command::new(compiler)
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-mno-omit-leaf-frame-pointer",
        ])
        .args(["-fno-optimize-sibling-calls", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("running {compiler} (install gcc/g++) to build {name}: {e}"));
    assert!(status.success(), "building {}", src.display());
    built.push((name.to_owned(), out.clone()));
    out
}

/// A running workload, killed and reaped when dropped.
pub struct Workload {
    pub child: Child,
}

impl Workload {
    pub fn start(name: &str, args: &[&str]) -> Self {
        let child = Command::new(workload_binary(name))
            .args(args)
            .spawn()
            .expect("starting the workload");
        // Let it create its worker thread before we look at it.
        std::thread::sleep(Duration::from_millis(200));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh, empty output directory path (not created) under the test tmpdir.
pub fn out_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("out-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `cprof record <args> --output <dir>` to completion.
pub fn record(args: &[&str], dir: &Path) -> Output {
    let out = cprof()
        .arg("record")
        .args(args)
        .arg("--output")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running cprof");
    assert!(
        out.status.success(),
        "cprof record {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cprof record --pid <pid> --duration <duration> -F <hz> --output <dir>` to completion.
pub fn record_pid(pid: u32, duration: &str, hz: &str, dir: &Path) -> Output {
    record(
        &["--pid", &pid.to_string(), "--duration", duration, "-F", hz],
        dir,
    )
}

/// Decodes `dir/cpu.pb.gz`.
pub fn read_profile(dir: &Path) -> Profile {
    let path = dir.join("cpu.pb.gz");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    pprof::decode(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display()))
}

/// Sum of the first value of the samples for which `keep` holds.
pub fn samples_where(p: &Profile, keep: impl Fn(&cprof::pprof::proto::Sample) -> bool) -> i64 {
    p.sample
        .iter()
        .filter(|s| keep(s))
        .map(|s| s.value[0])
        .sum()
}

/// Whether `function` is on the sample's stack.
pub fn on_stack(p: &Profile, s: &cprof::pprof::proto::Sample, function: &str) -> bool {
    p.stack_names(s).contains(&function)
}

/// Runs `go tool pprof <args>` and returns its stdout; fails loudly when go is missing.
pub fn go_pprof(args: &[&str]) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("running `go tool pprof`: install golang-go (cargo xtask test does)");
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits for `child` with a deadline; returns its output and how long it took.
pub fn wait_with_deadline(mut child: Child, deadline: Duration) -> (Output, Duration) {
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return (child.wait_with_output().unwrap(), start.elapsed());
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "cprof did not exit within {deadline:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: plain syscall.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal})");
}

/// A workload that waits for a line on stdin before it starts its measured phase, so that a
/// recording can attach first. Its stdout is captured.
pub struct PausedWorkload {
    pub child: Child,
}

impl PausedWorkload {
    pub fn start(name: &str, args: &[&str]) -> Self {
        let mut cmd = Command::new(workload_binary(name));
        cmd.args(args);
        Self::start_command(cmd)
    }

    /// Starts `cmd` (for example the workload under `ip netns exec`; it must exec the workload so
    /// that the pid stays the same).
    pub fn start_command(mut cmd: Command) -> Self {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the workload");
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the measured phase.
    pub fn go(&mut self) {
        use std::io::Write as _;
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        stdin.write_all(b"go\n").expect("writing to the workload");
        stdin.flush().unwrap();
    }

    /// Waits for the workload to finish and returns what it printed.
    pub fn finish(mut self) -> String {
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        assert!(out.status.success(), "the workload failed: {}", out.status);
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for PausedWorkload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=<number>` from a workload's output.
pub fn measured(output: &str, name: &str) -> u64 {
    let prefix = format!("{name}=");
    output
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= in the workload's output: {output:?}"))
        .parse()
        .unwrap()
}

/// The lines `child` writes to its (piped) stderr, read by a thread of their own.
pub fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx
}

/// `cprof record <args> --output <dir>`, stdin closed, stdout and stderr piped.
pub fn record_command(args: &[&str], dir: &Path) -> Command {
    let mut cmd = cprof();
    cmd.arg("record")
        .args(args)
        .arg("--output")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A `cprof record` running in the background, started once it reports that it is recording.
pub struct Recording {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Recording {
    pub fn start(args: &[&str], dir: &Path) -> Self {
        let mut child = record_command(args, dir).spawn().expect("running cprof");
        let rx = stderr_lines(&mut child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("cprof: recording") => break,
                Ok(line) if line.contains("error") => panic!("cprof failed to start: {line}"),
                Ok(_) => {}
                Err(e) => panic!("cprof did not start recording within 30 s ({e})"),
            }
        }
        Self { child, stderr: rx }
    }

    /// The cprof process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for cprof to exit by itself (within `deadline`); returns its stdout.
    pub fn wait(mut self, deadline: Duration) -> String {
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < deadline,
                "cprof did not finish within {deadline:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap())
            .wait_with_output()
            .unwrap();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        assert!(
            out.status.success(),
            "cprof failed ({}): {stderr:?}",
            out.status
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Decodes `dir/<name>`.
pub fn read_named_profile(dir: &Path, name: &str) -> Profile {
    let path = dir.join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    pprof::decode(&bytes).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display()))
}

/// The number after `prefix` in `text` (for summary lines and pprof comments).
pub fn number_after(text: &str, prefix: &str) -> u64 {
    let at = text
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    text[at + prefix.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {prefix:?} in:\n{text}"))
}

/// The comment of `p` that starts with `prefix`.
pub fn comment<'p>(p: &'p Profile, prefix: &str) -> &'p str {
    p.comment
        .iter()
        .map(|&c| p.str(c))
        .find(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no comment starting with {prefix:?}"))
}

/// The ids of every BPF program, link and map loaded in the kernel (`bpftool -j ... show`), and
/// which of them a live process holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BpfObjects {
    pub progs: std::collections::BTreeSet<u32>,
    pub links: std::collections::BTreeSet<u32>,
    pub maps: std::collections::BTreeSet<u32>,
    /// Programs' maps and links' programs, to follow what a held object keeps alive.
    prog_maps: Vec<(u32, Vec<u32>)>,
    link_progs: Vec<(u32, u32)>,
}

impl BpfObjects {
    /// Lists them now; fails loudly without bpftool.
    pub fn now() -> Self {
        let show = |what: &str| -> Vec<serde_json::Value> {
            let out = Command::new("bpftool")
                .args(["-j", what, "show"])
                .output()
                .expect("running bpftool (Debian package bpftool; cargo xtask test installs it)");
            assert!(
                out.status.success(),
                "bpftool {what} show: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("bpftool -j prints JSON")
        };
        let id = |v: &serde_json::Value, key: &str| v[key].as_u64().map(|n| n as u32);
        let progs = show("prog");
        let links = show("link");
        Self {
            progs: progs.iter().filter_map(|p| id(p, "id")).collect(),
            links: links.iter().filter_map(|l| id(l, "id")).collect(),
            maps: show("map").iter().filter_map(|m| id(m, "id")).collect(),
            prog_maps: progs
                .iter()
                .filter_map(|p| {
                    let maps = p["map_ids"].as_array().map(|a| {
                        a.iter()
                            .filter_map(serde_json::Value::as_u64)
                            .map(|n| n as u32)
                            .collect()
                    });
                    Some((id(p, "id")?, maps.unwrap_or_default()))
                })
                .collect(),
            link_progs: links
                .iter()
                .filter_map(|l| Some((id(l, "id")?, id(l, "prog_id")?)))
                .collect(),
        }
    }

    /// What is here and not in `before`, leaving out what live processes hold (through a file
    /// descriptor, or through a held link or program): the objects some process left behind.
    /// Other engineers' and tests' processes load programs too; theirs are held.
    pub fn orphans_since(&self, before: &Self) -> Self {
        let held = held_bpf_ids();
        let mut progs: std::collections::BTreeSet<u32> = held.0;
        let links: std::collections::BTreeSet<u32> = held.1;
        let mut maps: std::collections::BTreeSet<u32> = held.2;
        for (link, prog) in &self.link_progs {
            if links.contains(link) {
                progs.insert(*prog);
            }
        }
        for (prog, prog_maps) in &self.prog_maps {
            if progs.contains(prog) {
                maps.extend(prog_maps);
            }
        }
        let new = |now: &std::collections::BTreeSet<u32>,
                   then: &std::collections::BTreeSet<u32>,
                   held: &std::collections::BTreeSet<u32>| {
            now.iter()
                .filter(|id| !then.contains(id) && !held.contains(id))
                .copied()
                .collect()
        };
        Self {
            progs: new(&self.progs, &before.progs, &progs),
            links: new(&self.links, &before.links, &links),
            maps: new(&self.maps, &before.maps, &maps),
            ..Self::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.links.is_empty() && self.maps.is_empty()
    }
}

/// (programs, links, maps) that live processes hold file descriptors of, from
/// `/proc/*/fdinfo/*` (`prog_id:`, `link_id:`, `map_id:` lines).
fn held_bpf_ids() -> (
    std::collections::BTreeSet<u32>,
    std::collections::BTreeSet<u32>,
    std::collections::BTreeSet<u32>,
) {
    let (mut progs, mut links, mut maps) = Default::default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (progs, links, maps);
    };
    for p in procs.flatten() {
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if !target.to_string_lossy().starts_with("anon_inode:bpf") {
                continue;
            }
            let info = p.path().join("fdinfo").join(fd.file_name());
            let Ok(text) = std::fs::read_to_string(info) else {
                continue;
            };
            for line in text.lines() {
                let Some((key, value)) = line.split_once(':') else {
                    continue;
                };
                let Ok(id) = value.trim().parse::<u32>() else {
                    continue;
                };
                match key {
                    "prog_id" => progs.insert(id),
                    "link_id" => links.insert(id),
                    "map_id" => maps.insert(id),
                    _ => false,
                };
            }
        }
    }
    (progs, links, maps)
}

/// Waits (up to `within`) until every BPF object that appeared since `before` is held by a live
/// process: what an exited cprof loaded is gone. Returns how long that took; panics with `what`
/// and the ids left behind.
pub fn assert_bpf_released(before: &BpfObjects, within: Duration, what: &str) -> Duration {
    let start = Instant::now();
    loop {
        let orphans = BpfObjects::now().orphans_since(before);
        if orphans.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{what}: BPF objects left behind after {within:?}: programs {:?}, links {:?}, maps {:?}",
            orphans.progs,
            orphans.links,
            orphans.maps
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Checks that every file in `dir` is complete: no temporary file (`.name.tmp-pid`), each
/// `.pb.gz` parsed by `go tool pprof -raw`, each `.json` and `.jsonl` parsed. Returns the
/// names of the final files; `what` goes into every failure message.
pub fn assert_complete_files(dir: &Path, what: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with('.'),
            "{what}: a temporary file {name} was left in {}",
            dir.display()
        );
        let path = dir.join(&name);
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if name.ends_with(".pb.gz") {
            let out = Command::new("go")
                .args(["tool", "pprof", "-raw"])
                .arg(&path)
                .env("HOME", std::env::temp_dir())
                .output()
                .expect("running `go tool pprof`: install golang-go (cargo xtask test does)");
            assert!(
                out.status.success(),
                "{what}: go tool pprof -raw {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else if extension == "jsonl" {
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                serde_json::from_str::<serde_json::Value>(line)
                    .unwrap_or_else(|e| panic!("{what}: {name}: a line does not parse: {e}"));
            }
        } else if extension == "json" {
            let bytes = std::fs::read(&path).unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{what}: {name} does not parse: {e}"));
        }
        names.push(name);
    }
    names.sort();
    names
}
