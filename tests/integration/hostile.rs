//! Hostile files and odd targets: files truncated, damaged or swapped under the profiler,
//! symlinks out of a target's root, main threads that exit, targets that exit or whose binary
//! is deleted, pids reused, targets in their own pid and mount namespaces.
//!
//! Each test runs the real cprof against real processes and checks what a user relies on: cprof
//! exits 0 and writes a profile `go tool pprof` reads, the right functions are (or are not) in
//! it for the right pid, and the refusal counters name the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cprof::pprof::{Profile, ProfileExt as _};

use crate::util::{
    Recording, Workload, comment, go_pprof, number_after, on_stack, out_dir, read_profile,
    record_pid, require_root, samples_where, workload_binary,
};

/// A scratch directory for one test, empty.
fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hostile-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `tests/workloads/spinlib.c` as a shared library at `out`, with debug info.
fn build_spinlib(out: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workloads/spinlib.c");
    let status = Command::new("cc")
        .args([
            "-O1",
            "-g",
            "-fPIC",
            "-shared",
            "-fno-omit-frame-pointer",
            "-o",
        ])
        .arg(out)
        .arg(&src)
        .status()
        .expect("running cc (install gcc)");
    assert!(status.success(), "building {}", out.display());
}

/// `tests/workloads/calltree.c` with its functions renamed `host_marker_*`: the same code at the
/// same offsets under names that must never appear when this file must not be read.
fn build_marker(out: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/workloads/calltree.c");
    let status = Command::new("cc")
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-mno-omit-leaf-frame-pointer",
        ])
        .args(["-fno-optimize-sibling-calls", "-pthread"])
        .args(["-Dpath_a=host_marker_a", "-Dpath_b=host_marker_b"])
        .args([
            "-Dcpu_work=host_marker_work",
            "-Dtick=host_marker_tick",
            "-o",
        ])
        .arg(out)
        .arg(&src)
        .status()
        .expect("running cc (install gcc)");
    assert!(status.success(), "building {}", out.display());
}

/// Function names anywhere in the profile.
fn functions(p: &Profile) -> Vec<&str> {
    p.function.iter().map(|f| p.str(f.name)).collect()
}

/// Samples of `pid` with `function` on the stack.
fn of_pid(p: &Profile, pid: u32, function: &str) -> i64 {
    samples_where(p, |s| {
        p.label_num(s, "pid") == Some(i64::from(pid)) && on_stack(p, s, function)
    })
}

/// The count of `reason` in the profile's refusal comment.
fn refused(p: &Profile, reason: &str) -> u64 {
    let line = comment(p, "files refused for symbolization");
    number_after(line, &format!("{reason}="))
}

/// `go tool pprof -top` reads the file.
fn pprof_reads(dir: &Path) {
    let top = go_pprof(&["-top", dir.join("cpu.pb.gz").to_str().unwrap()]);
    assert!(top.contains("flat"), "go tool pprof -top:\n{top}");
}

/// cprof run to completion, with its peak resident memory.
struct Measured {
    stdout: String,
    stderr: String,
    max_rss_kib: i64,
}

/// Runs `cprof record <args> --output <dir>` and collects its peak RSS through `wait4` (which
/// reaps it: `Child::wait` would not give the child's own rusage).
#[expect(
    clippy::zombie_processes,
    reason = "reaped by wait4, which also returns its rusage"
)]
fn record_measured(args: &[&str], dir: &Path) -> Measured {
    let mut child = crate::util::record_command(args, dir)
        .spawn()
        .expect("running cprof");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let mut status = 0;
    // SAFETY: rusage is plain data filled by wait4 for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as i32, &raw mut status, 0, &raw mut usage) };
    assert_eq!(rc, child.id() as i32, "wait4");
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "cprof record {args:?} did not exit 0 (wait status {status:#x}):\n{stderr}"
    );
    Measured {
        stdout,
        stderr,
        max_rss_kib: usage.ru_maxrss,
    }
}

/// The position of the section header of `name` in a 64-bit little-endian ELF, and the
/// section's file offset (`sh_offset`).
fn section(bytes: &[u8], name: &str) -> (usize, usize) {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(bytes).expect("an ELF file");
    let index = file
        .section_by_name(name)
        .unwrap_or_else(|| panic!("no section {name}"))
        .index()
        .0;
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let entsize = usize::from(u16::from_le_bytes(bytes[0x3a..0x3c].try_into().unwrap()));
    let header = word(0x28) + index * entsize;
    (header, word(header + 0x18))
}

#[test]
fn damaged_elf_files_are_refused_with_bounded_memory() {
    require_root();
    let dir = scratch("damaged");
    let intact = dir.join("intact.so");
    build_spinlib(&intact);

    // A section header whose size runs 1 TiB past the end of the file (dlopen reads program
    // headers only, so the library still loads and runs).
    let mut bytes = std::fs::read(&intact).unwrap();
    let (header, _) = section(&bytes, ".debug_str");
    bytes[header + 0x20..header + 0x28].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let oversized = dir.join("oversized.so");
    std::fs::write(&oversized, &bytes).unwrap();

    // Compressed debug info whose header declares 64 GiB once inflated.
    let compressed = dir.join("bomb.so");
    let status = Command::new("objcopy")
        .arg("--compress-debug-sections=zlib")
        .arg(&intact)
        .arg(&compressed)
        .status()
        .expect("running objcopy (install binutils)");
    assert!(status.success());
    let mut bytes = std::fs::read(&compressed).unwrap();
    let (header, offset) = section(&bytes, ".debug_info");
    let flags = u64::from_le_bytes(bytes[header + 8..header + 16].try_into().unwrap());
    assert_ne!(
        flags & 0x800,
        0,
        "objcopy compressed .debug_info (SHF_COMPRESSED)"
    );
    // Elf64_Chdr: ch_type, ch_reserved, then ch_size at 8.
    bytes[offset + 8..offset + 16].copy_from_slice(&(64u64 << 30).to_le_bytes());
    std::fs::write(&compressed, &bytes).unwrap();

    let spin = |lib: &Path| Workload::start("dlspin", &[lib.to_str().unwrap(), "6"]);
    let (good, bad, bomb) = (spin(&intact), spin(&oversized), spin(&compressed));
    let out = out_dir("hostile-damaged");
    let pids = [good.pid(), bad.pid(), bomb.pid()].map(|p| p.to_string());
    let run = record_measured(
        &[
            "--pid",
            &pids[0],
            "--pid",
            &pids[1],
            "--pid",
            &pids[2],
            "--duration",
            "2s",
            "-F",
            "499",
        ],
        &out,
    );
    let p = read_profile(&out);
    pprof_reads(&out);

    let good_spin = of_pid(&p, good.pid(), "spinlib_work");
    assert!(
        good_spin > 50,
        "the intact library symbolizes: {good_spin} samples in spinlib_work"
    );
    for (name, w) in [("oversized", &bad), ("bomb", &bomb)] {
        assert_eq!(
            of_pid(&p, w.pid(), "spinlib_work"),
            0,
            "{name} is never parsed"
        );
        let main = of_pid(&p, w.pid(), "dlspin_main");
        assert!(
            main > 50,
            "{name}: its caller in dlspin still symbolizes ({main})"
        );
    }
    assert_eq!(refused(&p, "malformed"), 1, "the oversized section");
    assert_eq!(refused(&p, "decompression_too_big"), 1, "the 64 GiB claim");
    assert!(
        run.stdout
            .contains("Files refused for symbolization: 2 (malformed 1, decompression_too_big 1)"),
        "summary:\n{}",
        run.stdout
    );
    let cap_kib = 300 * 1024;
    eprintln!(
        "damaged ELF: intact spinlib_work {good_spin} samples; refused malformed {}, decompression_too_big {}; cprof peak RSS {} MiB (cap {} MiB)",
        refused(&p, "malformed"),
        refused(&p, "decompression_too_big"),
        run.max_rss_kib / 1024,
        cap_kib / 1024
    );
    assert!(
        run.max_rss_kib < cap_kib,
        "cprof's peak RSS {} KiB; stderr:\n{}",
        run.max_rss_kib,
        run.stderr
    );
}

#[test]
fn a_library_truncated_during_the_recording_is_refused_without_a_crash() {
    require_root();
    let dir = scratch("truncated");
    let original = dir.join("original.so");
    build_spinlib(&original);
    let size = std::fs::metadata(&original).unwrap().len();
    for (cut_to, reason) in [(0, "not_elf"), (size / 2, "malformed")] {
        let lib = dir.join(format!("cut-{cut_to}.so"));
        std::fs::copy(&original, &lib).unwrap();
        let target = Workload::start("dlspin", &[lib.to_str().unwrap(), "4"]);
        let out = out_dir(&format!("hostile-truncated-{cut_to}"));
        let pid = target.pid().to_string();
        let rec = Recording::start(&["--pid", &pid, "--duration", "3s", "-F", "499"], &out);
        // Samples land in the library; the first drain (after 1 s) finds it cut.
        std::thread::sleep(Duration::from_millis(400));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&lib)
            .unwrap()
            .set_len(cut_to)
            .unwrap();
        let stdout = rec.wait(Duration::from_secs(20));
        let p = read_profile(&out);
        pprof_reads(&out);
        assert_eq!(
            of_pid(&p, target.pid(), "spinlib_work"),
            0,
            "cut to {cut_to}: the library is not parsed"
        );
        assert!(
            of_pid(&p, target.pid(), "dlspin_main") > 30,
            "cut to {cut_to}: the samples before the cut are there, the caller symbolized"
        );
        eprintln!(
            "truncated to {cut_to}: dlspin_main {} samples, spinlib_work {}, {reason} {}",
            of_pid(&p, target.pid(), "dlspin_main"),
            of_pid(&p, target.pid(), "spinlib_work"),
            refused(&p, reason)
        );
        assert_eq!(refused(&p, reason), 1, "cut to {cut_to} bytes: {stdout}");
        assert!(
            stdout.contains(&format!("{reason} 1")),
            "summary:\n{stdout}"
        );
    }
}

#[test]
fn main_thread_exited_workers_are_still_profiled_and_symbolized() {
    require_root();
    let target = Workload::start("mainexit", &["5"]);
    let pid = target.pid();
    let out = out_dir("hostile-mainexit");
    let stdout = String::from_utf8(record_pid(pid, "2s", "499", &out).stdout).unwrap();
    assert!(
        stdout.contains("(duration reached)"),
        "the process lives on without its main thread:\n{stdout}"
    );
    let p = read_profile(&out);
    let workers = of_pid(&p, pid, "mainexit_worker");
    eprintln!("main thread exited: mainexit_worker {workers} samples of pid {pid}");
    // Two threads for 2 s at 499 Hz: ~2000; a loaded machine gives less.
    assert!(
        workers > 150,
        "samples of pid {pid} in mainexit_worker: {workers}; functions {:?}",
        functions(&p)
    );
}

#[test]
fn a_target_that_exits_mid_recording_ends_it_with_its_samples_symbolized() {
    require_root();
    let target = Workload::start("calltree", &["3"]);
    let out = out_dir("hostile-exits");
    let started = Instant::now();
    let stdout = String::from_utf8(record_pid(target.pid(), "20s", "499", &out).stdout).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the recording ends when the target does, took {:?}",
        started.elapsed()
    );
    assert!(stdout.contains("every target process exited"), "{stdout}");
    let p = read_profile(&out);
    let (a, b) = (
        of_pid(&p, target.pid(), "path_a"),
        of_pid(&p, target.pid(), "path_b"),
    );
    eprintln!(
        "target exits: path_a {a} path_b {b}, recording took {:?}",
        started.elapsed()
    );
    // About 2 s at 499 Hz between the start of the recording and the exit: ~1000 on an idle
    // machine, a quarter of that on a loaded one.
    assert!(
        a + b > 100,
        "samples before the exit: path_a {a} path_b {b}"
    );
}

#[test]
fn a_binary_deleted_after_start_is_still_symbolized() {
    require_root();
    let dir = scratch("deleted");
    let copy = dir.join("calltree-deleted");
    std::fs::copy(workload_binary("calltree"), &copy).unwrap();
    let target = Child(
        Command::new(&copy)
            .arg("5")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(200));
    std::fs::remove_file(&copy).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", target.0.id())).unwrap();
    assert!(maps.contains("calltree-deleted (deleted)"), "{maps}");
    let out = out_dir("hostile-deleted");
    let stdout = String::from_utf8(record_pid(target.0.id(), "2s", "499", &out).stdout).unwrap();
    let p = read_profile(&out);
    let (a, b) = (
        of_pid(&p, target.0.id(), "path_a"),
        of_pid(&p, target.0.id(), "path_b"),
    );
    eprintln!("deleted binary: path_a {a} path_b {b}");
    assert!(
        a + b > 150,
        "symbolized through /proc/<pid>/map_files: path_a {a} path_b {b}\n{stdout}"
    );
    assert!(
        stdout.contains("Files refused for symbolization: 0"),
        "{stdout}"
    );
}

/// A child process killed and reaped when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first child of `parent` (an `unshare --fork` and what it runs), once its name is `comm`.
fn child_named(parent: u32, comm: &str) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            && cprof::procfs::read_comm(pid).is_ok_and(|c| c == comm)
        {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no child {comm} of {parent} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_target_in_its_own_pid_and_mount_namespace_is_found_through_its_root() {
    require_root();
    // The binary exists only on a tmpfs mounted in the target's mount namespace.
    let hidden = scratch("pidns-mnt");
    let script = format!(
        "mount -t tmpfs tmpfs {dir} && cp {bin} {dir}/app && exec {dir}/app 6",
        dir = hidden.display(),
        bin = workload_binary("calltree").display()
    );
    let wrapper = Child(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--propagation", "private"])
            .args(["sh", "-c", &script])
            .spawn()
            .expect("running unshare"),
    );
    let pid = child_named(wrapper.0.id(), "calltree");
    assert!(
        !hidden.join("app").exists(),
        "the binary is not visible from the host"
    );
    let out = out_dir("hostile-pidns-mnt");
    record_pid(pid, "2s", "499", &out);
    let p = read_profile(&out);
    let pids: std::collections::BTreeSet<i64> = p
        .sample
        .iter()
        .filter_map(|s| p.label_num(s, "pid"))
        .collect();
    assert_eq!(
        pids,
        [i64::from(pid)].into(),
        "samples carry the host pid (in its namespace it is 1)"
    );
    let (a, b) = (of_pid(&p, pid, "path_a"), of_pid(&p, pid, "path_b"));
    eprintln!("own pid+mount namespace: host pid {pid}, pids {pids:?}, path_a {a} path_b {b}");
    assert!(
        a + b > 150,
        "symbolized through its root: path_a {a} path_b {b}; functions {:?}",
        functions(&p)
    );
    let share = a as f64 / (a + b) as f64;
    assert!((0.6..0.8).contains(&share), "70/30 split: {share}");
}

/// A target in a root of its own as a container has one: a new mount namespace whose root is a
/// tmpfs (`pivot_root`), with /usr bound in and the host's tree left at /old; it runs
/// `/app/bin`, a copy of calltree. Returns the wrapper and the target's host pid.
fn contained_calltree(root: &Path) -> (Child, u32) {
    std::fs::create_dir_all(root).unwrap();
    let script = format!(
        "set -e; R={root}; mount -t tmpfs tmpfs $R; mkdir -p $R/usr $R/app $R/old; \
         mount --bind /usr $R/usr; for d in lib lib64 bin sbin; do ln -s usr/$d $R/$d; done; \
         cp {bin} $R/app/bin; cd $R; pivot_root . old; exec /app/bin 8",
        root = root.display(),
        bin = workload_binary("calltree").display()
    );
    let wrapper = Child(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--fork"])
            .args(["sh", "-c", &script])
            .spawn()
            .expect("running unshare"),
    );
    let pid = child_named(wrapper.0.id(), "calltree");
    (wrapper, pid)
}

/// Runs `script` in the mount namespace of `pid`, from its root.
fn in_mount_namespace(pid: u32, script: &str) {
    let status = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount", "sh", "-c", script])
        .status()
        .expect("running nsenter (install util-linux)");
    assert!(status.success(), "nsenter: {script}");
}

#[test]
fn a_mapped_path_swapped_for_a_symlink_out_of_the_root_or_another_file_is_not_read() {
    require_root();
    let dir = scratch("swapped");
    // A host file with the target's code at the same offsets under other names: if cprof read
    // it, host_marker_a would appear for the target's samples.
    let marker = dir.join("host-marker");
    build_marker(&marker);
    let (_w1, escaped) = contained_calltree(&dir.join("root-symlink"));
    let (_w2, replaced) = contained_calltree(&dir.join("root-copy"));
    // Over-mount /app in each root: /app/bin is now a symlink to the host file (absolute: out
    // of the target's root), or another regular file. The targets' maps still say /app/bin.
    in_mount_namespace(
        escaped,
        &format!(
            "mount -t tmpfs tmpfs /app && ln -s {} /app/bin",
            marker.display()
        ),
    );
    in_mount_namespace(
        replaced,
        &format!(
            "mount -t tmpfs tmpfs /app && cp /old{} /app/bin",
            marker.display()
        ),
    );
    let maps = std::fs::read_to_string(format!("/proc/{escaped}/maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.ends_with(" /app/bin")),
        "the mapping keeps its path:\n{maps}"
    );

    let out = out_dir("hostile-swapped");
    let (a, b) = (escaped.to_string(), replaced.to_string());
    let run = record_measured(
        &["--pid", &a, "--pid", &b, "--duration", "2s", "-F", "499"],
        &out,
    );
    let p = read_profile(&out);
    pprof_reads(&out);
    let names = functions(&p);
    assert!(
        !names.iter().any(|n| n.starts_with("host_marker")),
        "the host file was never parsed: {names:?}"
    );
    for pid in [escaped, replaced] {
        assert_eq!(
            of_pid(&p, pid, "path_a"),
            0,
            "no symbols from a swapped file"
        );
        let libc = samples_where(&p, |s| p.label_num(s, "pid") == Some(i64::from(pid)));
        assert!(libc > 50, "pid {pid} was sampled ({libc})");
    }
    eprintln!(
        "swapped: host_marker functions {}, outside_root {}, inode_changed {}",
        names
            .iter()
            .filter(|n| n.starts_with("host_marker"))
            .count(),
        refused(&p, "outside_root"),
        refused(&p, "inode_changed")
    );
    assert_eq!(
        refused(&p, "outside_root"),
        1,
        "the symlink out of the root"
    );
    assert_eq!(
        refused(&p, "inode_changed"),
        1,
        "the other file at the path"
    );
    assert!(
        run.stdout.contains("inode_changed 1") && run.stdout.contains("outside_root 1"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_reused_pid_is_symbolized_with_its_new_binary() {
    require_root();
    let dir = scratch("reuse");
    let marker = dir.join("host-marker");
    build_marker(&marker);
    let windows = out_dir("hostile-reuse");
    // The agent as pid 1 of a fresh pid namespace, seeing its pids: there, writing
    // ns_last_pid puts the next process on a chosen pid.
    let script = format!(
        "exec {} agent --pid-namespace self --interval 2s -F 499 --output-dir {} --metrics-addr off",
        env!("CARGO_BIN_EXE_cprof"),
        windows.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script]);
    let mut agent = crate::agent::Agent::start_command(cmd);
    let agent_pid = agent.pid().to_string();
    // Runs `binary 3` on pid 100 (about 1000 samples of path_a or host_marker_a on an idle
    // machine, fewer on a loaded one) of the namespace; returns that pid as the namespace sees it.
    let run_on_pid_100 = |binary: &Path| -> String {
        let out = Command::new("nsenter")
            .args(["--target", &agent_pid, "--pid", "--mount", "sh", "-c"])
            .arg(format!(
                "echo 99 > /proc/sys/kernel/ns_last_pid; {} 3 >/dev/null & echo $!; wait",
                binary.display()
            ))
            .output()
            .expect("running nsenter (install util-linux)");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let first = run_on_pid_100(&workload_binary("calltree"));
    // The first process is gone; the next window ends while the agent still knows it.
    agent.skip_backlog();
    agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    let second = run_on_pid_100(&marker);
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("100", "100"),
        "both ran as pid 100"
    );
    agent.skip_backlog();
    agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    agent.wait_for_line("cprof: window ", Duration::from_secs(6));
    let (_, lines) = agent.stop(libc::SIGTERM);

    let mut calltree = 0;
    let mut marker_samples = 0;
    for entry in std::fs::read_dir(&windows).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap();
        if !name.starts_with("cpu-") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let p = cprof::pprof::decode(&bytes).unwrap();
        let (a, m) = (of_pid(&p, 100, "path_a"), of_pid(&p, 100, "host_marker_a"));
        assert!(
            a == 0 || m == 0,
            "{name}: pid 100 shows both programs (path_a {a}, host_marker_a {m})"
        );
        calltree += a;
        marker_samples += m;
    }
    eprintln!("pid reuse: pid 100 path_a {calltree}, host_marker_a {marker_samples}");
    assert!(
        calltree > 50 && marker_samples > 50,
        "each process of pid 100 with its own functions: path_a {calltree}, host_marker_a {marker_samples}; {lines:?}"
    );
}
