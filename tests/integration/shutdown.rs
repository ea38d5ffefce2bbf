//! Shutdown at any point. `cprof record --event all` (every probe) and `cprof agent` get SIGINT or
//! SIGTERM from right after spawn (while loading and attaching), through recording, to while they
//! write their files; and SIGKILL at seeded pseudo-random points. After each run:
//!
//! - a signal other than SIGKILL ends cprof within 5 s;
//! - every file under a final name is complete (`go tool pprof -raw` parses each pprof, the JSON
//!   files parse), or absent; a clean exit wrote every file and left no temporary file;
//! - every BPF program, link and map cprof loaded is gone (`bpftool`), within 3 s.
//!
//! The delays are a fixed sweep (and a fixed seed for SIGKILL), printed in every message, so a
//! failure reproduces.

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::util::{self, BpfObjects, Workload};

const EXIT_WITHIN: Duration = Duration::from_secs(5);
const RELEASE_WITHIN: Duration = Duration::from_secs(3);

/// The files of `cprof record --event all`.
const ALL_FILES: [&str; 8] = [
    "cpu.pb.gz",
    "offcpu.pb.gz",
    "offwake.pb.gz",
    "syscall-latency.json",
    "syscall.pb.gz",
    "tcp-events.jsonl",
    "tcp-latency.json",
    "tcp.pb.gz",
];

/// When the signal is sent.
#[derive(Clone, Copy, Debug)]
enum When {
    /// This long after spawning (the first second or so is loading and attaching).
    AfterSpawn(Duration),
    /// This long after cprof printed a line starting with the text.
    AfterLine(&'static str, Duration),
}

/// How one run ended.
struct Ended {
    status: ExitStatus,
    /// From the signal to the exit.
    took: Duration,
    stderr: Vec<String>,
    /// The signal was sent before cprof said it was recording.
    before_recording: bool,
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

/// Runs `cmd`, sends `signal` at `when`, waits for the exit.
fn run(mut cmd: Command, when: When, signal: i32, what: &str) -> Ended {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running cprof");
    let spawned = Instant::now();
    let rx = util::stderr_lines(&mut child);
    let mut stderr = Vec::new();
    let mut recording = false;
    let take = |line: String, stderr: &mut Vec<String>, recording: &mut bool| {
        *recording |= line.starts_with("cprof: recording") || line.starts_with("cprof: agent ");
        stderr.push(line);
    };
    match when {
        When::AfterSpawn(delay) => {
            std::thread::sleep(delay.saturating_sub(spawned.elapsed()));
        }
        When::AfterLine(prefix, delay) => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let line = rx.recv_timeout(left).unwrap_or_else(|e| {
                    panic!("{what}: no line {prefix:?} within 30 s ({e}): {stderr:?}")
                });
                let found = line.starts_with(prefix);
                take(line, &mut stderr, &mut recording);
                if found {
                    break;
                }
            }
            std::thread::sleep(delay);
        }
    }
    while let Ok(line) = rx.try_recv() {
        take(line, &mut stderr, &mut recording);
    }
    let before_recording = !recording;
    util::kill(child.id(), signal);
    let sent = Instant::now();
    let status = wait(&mut child, what);
    let took = sent.elapsed();
    drain(&rx, &mut stderr);
    Ended {
        status,
        took,
        stderr,
        before_recording,
    }
}

fn wait(child: &mut Child, what: &str) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: cprof still running 30 s after the signal");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The rest of the stderr lines, once the process is gone (the reader sees EOF).
fn drain(rx: &Receiver<String>, into: &mut Vec<String>) {
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        into.push(line);
    }
}

/// Tallies over a sweep, for the closing line.
#[derive(Default)]
struct Tally {
    runs: u32,
    clean_exits: u32,
    died_of_signal: u32,
    complete_files: u32,
    absent_files: u32,
    max_exit: Duration,
    max_release: Duration,
    temps_left: u32,
}

impl Tally {
    fn line(&self, title: &str) -> String {
        format!(
            "{title}: {} runs: {} clean exits, {} ended by the signal; files complete {}, absent {}; temporary files left {}; slowest exit {:.2?}, BPF objects released within {:.2?} (all)",
            self.runs,
            self.clean_exits,
            self.died_of_signal,
            self.complete_files,
            self.absent_files,
            self.temps_left,
            self.max_exit,
            self.max_release,
        )
    }
}

/// Checks one run of `cprof record --event all`: exit, files, BPF objects.
fn check_record_run(
    ended: &Ended,
    signal: i32,
    dir: &Path,
    before: &BpfObjects,
    what: &str,
    tally: &mut Tally,
) {
    tally.runs += 1;
    if signal != libc::SIGKILL {
        assert!(
            ended.took <= EXIT_WITHIN,
            "{what}: exited {:.2?} after the signal (at most {EXIT_WITHIN:?}); stderr {:?}",
            ended.took,
            ended.stderr
        );
        tally.max_exit = tally.max_exit.max(ended.took);
    }
    let died_of_signal = ended.status.signal() == Some(signal);
    if died_of_signal {
        // Only before the handlers are installed, that is before it said it was recording.
        assert!(
            signal == libc::SIGKILL || ended.before_recording,
            "{what}: killed by {} after it started recording: {:?}",
            signal_name(signal),
            ended.stderr
        );
        tally.died_of_signal += 1;
    } else {
        assert!(
            ended.status.success(),
            "{what}: exited with {} (expected 0, or killed by {} before recording); stderr {:?}",
            ended.status,
            signal_name(signal),
            ended.stderr
        );
        tally.clean_exits += 1;
    }
    if signal == libc::SIGKILL {
        // A SIGKILL may leave a temporary file (the next run removes it): set them aside.
        let temps: Vec<String> = list(dir)
            .into_iter()
            .filter(|n| n.starts_with('.'))
            .collect();
        tally.temps_left += temps.len() as u32;
        for t in &temps {
            assert!(
                t.contains(".tmp-"),
                "{what}: an unexpected hidden file {t} in {}",
                dir.display()
            );
            std::fs::remove_file(dir.join(t)).unwrap();
        }
    }
    let files = util::assert_complete_files(dir, what);
    for name in &files {
        assert!(
            ALL_FILES.contains(&name.as_str()),
            "{what}: an unexpected file {name}"
        );
    }
    if ended.status.success() {
        assert_eq!(files, ALL_FILES, "{what}: a clean exit writes every file");
    }
    tally.complete_files += files.len() as u32;
    tally.absent_files += (ALL_FILES.len() - files.len()) as u32;
    let released = util::assert_bpf_released(before, RELEASE_WITHIN, what);
    tally.max_release = tally.max_release.max(released);
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map_or_else(
        |_| Vec::new(),
        |entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        },
    )
}

fn record_command(dir: &Path, duration: &str) -> Command {
    let mut cmd = util::cprof();
    cmd.args([
        "record",
        "--event",
        "all",
        "-F",
        "999",
        "--duration",
        duration,
        "--output",
    ])
    .arg(dir);
    cmd
}

/// SIGINT and SIGTERM (alternating) at a sweep of points from spawn to the final write.
#[test]
fn record_stops_cleanly_on_sigint_or_sigterm_at_any_point() {
    util::require_root();
    let _w = Workload::start("calltree", &["600"]);
    let ms = Duration::from_millis;
    let mut points: Vec<When> = [0, 5, 20, 50, 100, 200, 400, 700, 1000, 1500]
        .into_iter()
        .map(|d| When::AfterSpawn(ms(d)))
        .collect();
    points.extend(
        [0, 50, 200, 700]
            .into_iter()
            .map(|d| When::AfterLine("cprof: recording", ms(d))),
    );
    // With --duration 1 cprof stops by itself and says so before it writes: the signal lands
    // during the final drain and write.
    points.extend(
        [0, 20, 100, 300]
            .into_iter()
            .map(|d| When::AfterLine("cprof: stopped", ms(d))),
    );
    let mut tally = Tally::default();
    for (i, &when) in points.iter().enumerate() {
        let signal = if i % 2 == 0 {
            libc::SIGINT
        } else {
            libc::SIGTERM
        };
        let what = format!("run {i}: {} at {when:?}", signal_name(signal));
        let dir = util::out_dir(&format!("shutdown-{i}"));
        let before = BpfObjects::now();
        let duration = if matches!(when, When::AfterLine("cprof: stopped", _)) {
            "1"
        } else {
            "30"
        };
        let ended = run(record_command(&dir, duration), when, signal, &what);
        check_record_run(&ended, signal, &dir, &before, &what, &mut tally);
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!("{}", tally.line("record, SIGINT/SIGTERM sweep"));
    assert!(
        tally.clean_exits > 0 && tally.died_of_signal > 0,
        "the sweep covers loading and recording"
    );
}

/// SIGKILL at seeded pseudo-random points: files complete or absent, BPF objects gone, and a
/// temporary file a kill left is removed by the next run in that directory.
#[test]
fn record_killed_at_random_points_leaves_no_partial_file() {
    util::require_root();
    let _w = Workload::start("calltree", &["600"]);
    let mut seed: u64 = 0x00c0_ffee;
    let mut next = || {
        // xorshift64: the same delays on every run of the test.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut tally = Tally::default();
    let dir = util::out_dir("shutdown-kill");
    for i in 0..10 {
        let when = if i % 2 == 0 {
            When::AfterSpawn(Duration::from_millis(next() % 2_500))
        } else {
            When::AfterLine("cprof: stopped", Duration::from_millis(next() % 400))
        };
        let what = format!("kill run {i} (seed 0xc0ffee): SIGKILL at {when:?}");
        let before = BpfObjects::now();
        // Files of the previous run stay: a kill must not damage them either.
        let ended = run(record_command(&dir, "1"), when, libc::SIGKILL, &what);
        check_record_run(&ended, libc::SIGKILL, &dir, &before, &what, &mut tally);
    }
    eprintln!("{}", tally.line("record, SIGKILL at random points"));

    // A temporary file of a killed writer (no such pid) is removed by the next run.
    let stale = dir.join(".cpu.pb.gz.tmp-4194305");
    std::fs::write(&stale, b"half a profile").unwrap();
    let ended = run(
        record_command(&dir, "1"),
        When::AfterLine("cprof: recording", Duration::ZERO),
        0,
        "cleanup run",
    );
    assert!(ended.status.success(), "cleanup run: {:?}", ended.stderr);
    assert!(!stale.exists(), "the stale temporary file was removed");
    assert_eq!(util::assert_complete_files(&dir, "cleanup run"), ALL_FILES);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The agent: SIGTERM or SIGINT while loading, mid-window, right after a window was written.
#[test]
fn agent_stops_cleanly_at_any_point() {
    util::require_root();
    let _w = Workload::start("calltree", &["600"]);
    let ms = Duration::from_millis;
    let points = [
        When::AfterSpawn(ms(0)),
        When::AfterSpawn(ms(50)),
        When::AfterSpawn(ms(300)),
        When::AfterLine("cprof: agent recording", ms(0)),
        When::AfterLine("cprof: agent recording", ms(500)),
        When::AfterLine("cprof: window", ms(0)),
        When::AfterLine("cprof: window", ms(300)),
    ];
    let (mut runs, mut clean, mut max_exit) = (0, 0, Duration::ZERO);
    for (i, &when) in points.iter().enumerate() {
        let signal = if i % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        let what = format!("agent run {i}: {} at {when:?}", signal_name(signal));
        let dir = util::out_dir(&format!("shutdown-agent-{i}"));
        let before = BpfObjects::now();
        let mut cmd = util::cprof();
        cmd.args([
            "agent",
            "--event",
            "all",
            "--interval",
            "1s",
            "--metrics-addr",
            "off",
        ])
        .arg("--output-dir")
        .arg(&dir);
        let ended = run(cmd, when, signal, &what);
        runs += 1;
        assert!(
            ended.took <= EXIT_WITHIN,
            "{what}: exited after {:.2?}",
            ended.took
        );
        max_exit = max_exit.max(ended.took);
        if ended.status.success() {
            clean += 1;
            assert!(
                ended
                    .stderr
                    .iter()
                    .any(|l| l.starts_with("cprof: agent stopped")),
                "{what}: {:?}",
                ended.stderr
            );
        } else {
            assert!(
                ended.status.signal() == Some(signal) && ended.before_recording,
                "{what}: exited with {}: {:?}",
                ended.status,
                ended.stderr
            );
        }
        let files = util::assert_complete_files(&dir, &what);
        if ended.status.success() {
            assert!(
                files.iter().any(|f| f.starts_with("cpu-")),
                "{what}: the last window was written: {files:?}"
            );
        }
        util::assert_bpf_released(&before, RELEASE_WITHIN, &what);
        let _ = std::fs::remove_dir_all(&dir);
    }
    eprintln!(
        "agent, SIGINT/SIGTERM sweep: {runs} runs, {clean} clean exits, slowest exit {max_exit:.2?}, BPF objects released in all"
    );
}
