//! On-CPU recording against workloads with a known call tree.

use std::process::Stdio;
use std::time::Duration;

use cprof::pprof::ProfileExt as _;

use crate::util::{self, Workload};

/// Percent of `total` that `part` is.
fn pct(part: i64, total: i64) -> f64 {
    100.0 * part as f64 / total as f64
}

/// calltree spends 70% of its worker's CPU time under `path_a` and 30% under `path_b`.
#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one recording, every property of its profile"
)]
fn attributes_a_known_call_tree_70_30() {
    util::require_root();
    let w = Workload::start("calltree", &["10"]);
    let pid = w.pid();
    let dir = util::out_dir("calltree");
    let pid_arg = pid.to_string();
    let args = [
        "--pid",
        &pid_arg,
        "--duration",
        "4",
        "-F",
        "999",
        "--top",
        "30",
    ];
    let out = util::record(&args, &dir);
    let p = util::read_profile(&dir);

    // Sample types, period, time.
    let types: Vec<_> = p
        .sample_type
        .iter()
        .map(|t| (p.str(t.r#type), p.str(t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    let period_type = p.period_type.as_ref().unwrap();
    assert_eq!(
        (p.str(period_type.r#type), p.str(period_type.unit)),
        ("cpu", "nanoseconds")
    );
    assert_eq!(p.period, 1_000_000_000 / 999);
    assert!(
        p.time_nanos > 1_700_000_000_000_000_000,
        "time_nanos is wall-clock: {}",
        p.time_nanos
    );
    let secs = p.duration_nanos as f64 / 1e9;
    assert!(
        (3.9..4.6).contains(&secs),
        "duration_nanos {} for a 4 s recording",
        p.duration_nanos
    );
    for s in &p.sample {
        assert_eq!(
            s.value[1],
            s.value[0] * p.period,
            "cpu/nanoseconds = count x period"
        );
    }

    // Only the target, with its labels.
    let total = util::samples_where(&p, |_| true);
    // 4 s at 999 Hz of one busy thread: about 3996 samples.
    assert!(
        (3600..=4200).contains(&total),
        "expected ~3996 samples of a busy thread, got {total}"
    );
    for s in &p.sample {
        assert_eq!(
            p.label_num(s, "pid"),
            Some(i64::from(pid)),
            "the pid filter lets only the target in"
        );
        assert_eq!(p.label_str(s, "process"), Some("calltree"));
        assert!(p.label_num(s, "tid").is_some());
    }
    let worker = util::samples_where(&p, |s| p.label_str(s, "comm") == Some("cpt-worker"));
    assert!(
        pct(worker, total) > 95.0,
        "the worker thread does the work: {worker} of {total}"
    );

    // The attribution.
    let a = util::samples_where(&p, |s| util::on_stack(&p, s, "path_a"));
    let b = util::samples_where(&p, |s| util::on_stack(&p, s, "path_b"));
    let (pa, pb) = (pct(a, total), pct(b, total));
    eprintln!(
        "calltree attribution: path_a {pa:.1}% path_b {pb:.1}% of {total} samples (expected 70/30)"
    );
    assert!(
        (pa - 70.0).abs() <= 5.0,
        "path_a: expected 70% +-5, got {pa:.1}%"
    );
    assert!(
        (pb - 30.0).abs() <= 5.0,
        "path_b: expected 30% +-5, got {pb:.1}%"
    );
    for caller in ["cpu_work", "worker"] {
        let n = util::samples_where(&p, |s| util::on_stack(&p, s, caller));
        assert!(
            pct(n, total) > 95.0,
            "{caller} should be on ~every stack: {n} of {total}"
        );
    }

    // Inlined frames: mix_inline as the innermost line of a location whose last line is path_a.
    let inlined = p.location.iter().any(|l| {
        let names: Vec<_> = l
            .line
            .iter()
            .map(|line| p.str(p.function[line.function_id as usize - 1].name))
            .collect();
        names.first() == Some(&"mix_inline") && names.last() == Some(&"path_a")
    });
    assert!(
        inlined,
        "expected a location with lines [mix_inline, path_a]"
    );
    // File and line numbers.
    let path_a = p
        .function
        .iter()
        .find(|f| p.str(f.name) == "path_a")
        .expect("function path_a");
    assert!(
        p.str(path_a.filename)
            .ends_with("tests/workloads/calltree.c")
    );
    assert!(p.location.iter().flat_map(|l| &l.line).all(|l| l.line >= 0));
    assert!(
        p.location
            .iter()
            .flat_map(|l| &l.line)
            .any(|l| l.function_id == path_a.id && l.line > 0),
        "path_a has line numbers"
    );

    // Mappings: the workload binary with its build id, marked symbolized.
    let exe = util::workload_binary("calltree");
    let mapping = p
        .mapping
        .iter()
        .find(|m| p.str(m.filename) == exe.to_str().unwrap())
        .unwrap_or_else(|| panic!("a mapping for {}", exe.display()));
    assert_eq!(
        p.str(mapping.build_id),
        cprof::elf_vet::build_id_of(&exe).unwrap()
    );
    assert!(mapping.memory_start < mapping.memory_limit);
    assert!(mapping.has_functions && mapping.has_line_numbers && mapping.has_inline_frames);
    let ids: std::collections::HashSet<_> = p.location.iter().map(|l| l.id).collect();
    assert_eq!(ids.len(), p.location.len(), "location ids are unique");
    assert!(!ids.contains(&0));

    // The summary names the hot functions and the file.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mix_inline") && stdout.contains("path_a"),
        "summary:\n{stdout}"
    );
    assert!(stdout.contains("Lost samples: 0"), "summary:\n{stdout}");
    assert!(
        stdout.contains(dir.join("cpu.pb.gz").to_str().unwrap()),
        "summary:\n{stdout}"
    );

    // The same attribution through go tool pprof, a client we did not write.
    let top = util::go_pprof(&[
        "-top",
        "-cum",
        "-nodecount=100",
        dir.join("cpu.pb.gz").to_str().unwrap(),
    ]);
    let cum_pct = |function: &str| -> f64 {
        let line = top
            .lines()
            .find(|l| l.split_whitespace().last() == Some(function))
            .unwrap_or_else(|| panic!("go tool pprof -top lists no {function}:\n{top}"));
        // flat flat% sum% cum cum% name
        let cum = line.split_whitespace().nth(4).unwrap();
        cum.trim_end_matches('%').parse().unwrap()
    };
    let (ga, gb) = (cum_pct("path_a"), cum_pct("path_b"));
    eprintln!("go tool pprof: path_a {ga}% path_b {gb}%");
    assert!(
        (ga - 70.0).abs() <= 5.0,
        "go tool pprof path_a cum {ga}%:\n{top}"
    );
    assert!(
        (gb - 30.0).abs() <= 5.0,
        "go tool pprof path_b cum {gb}%:\n{top}"
    );
}

/// Reading /dev/zero spends its time in the kernel: kernel frames sit under the user frames.
#[test]
fn kernel_frames_for_a_workload_in_the_kernel() {
    util::require_root();
    let w = Workload::start("calltree", &["--kernel", "10"]);
    let dir = util::out_dir("kernel");
    util::record_pid(w.pid(), "2", "499", &dir);
    let p = util::read_profile(&dir);
    let total = util::samples_where(&p, |_| true);
    let in_read = util::samples_where(&p, |s| util::on_stack(&p, s, "vfs_read"));
    assert!(total > 500, "expected ~1000 samples, got {total}");
    assert!(
        pct(in_read, total) > 80.0,
        "vfs_read on {in_read} of {total} stacks"
    );
    let kernel = p
        .mapping
        .iter()
        .find(|m| p.str(m.filename) == "[kernel]")
        .expect("a [kernel] mapping");
    // Leaf first: kernel frames, then the user frames that made the syscall.
    let s = p
        .sample
        .iter()
        .find(|s| util::on_stack(&p, s, "vfs_read"))
        .unwrap();
    let names = p.stack_names(s);
    let vfs = names.iter().position(|n| *n == "vfs_read").unwrap();
    let worker = names
        .iter()
        .position(|n| *n == "worker")
        .expect("user frames under the kernel ones");
    assert!(
        vfs < worker,
        "kernel frames come first (leaf first): {names:?}"
    );
    let first = p
        .location
        .iter()
        .find(|l| l.id == s.location_id[0])
        .unwrap();
    assert_eq!(first.mapping_id, kernel.id, "the leaf is a kernel frame");
    assert!(
        first.address >= 0xffff_8000_0000_0000,
        "kernel address {:#x}",
        first.address
    );
}

/// A target that exits ends the recording, and is still symbolized.
#[test]
fn recording_ends_when_every_target_exits() {
    util::require_root();
    let w = Workload::start("calltree", &["1.5"]);
    let dir = util::out_dir("exit");
    let start = std::time::Instant::now();
    let out = util::record_pid(w.pid(), "60", "499", &dir);
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "recording took {took:?} for a 1.5 s target"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("every target process exited"),
        "stderr:\n{stderr}"
    );
    let p = util::read_profile(&dir);
    let total = util::samples_where(&p, |_| true);
    let a = util::samples_where(&p, |s| util::on_stack(&p, s, "path_a"));
    assert!(total > 300, "expected ~650 samples, got {total}");
    assert!(
        pct(a, total) > 50.0,
        "the exited process is symbolized: path_a on {a} of {total}"
    );
}

/// SIGINT and SIGTERM end an open-ended recording, and what was collected is written.
#[test]
fn signals_end_the_recording_and_keep_the_data() {
    util::require_root();
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let w = Workload::start("calltree", &["10"]);
        let dir = util::out_dir(name);
        let child = util::cprof()
            .args([
                "record",
                "--pid",
                &w.pid().to_string(),
                "-F",
                "499",
                "--output",
            ])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        util::kill(child.id(), signal);
        let (out, took) = util::wait_with_deadline(child, Duration::from_secs(5));
        assert!(out.status.success(), "{name}: exit {}", out.status);
        eprintln!("{name}: exited {took:?} after the signal");
        let p = util::read_profile(&dir);
        let total = util::samples_where(&p, |_| true);
        assert!(
            total > 700,
            "{name}: 2 s at 499 Hz is ~1000 samples, got {total}"
        );
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["cpu.pb.gz"],
            "{name}: only the final file, no temp file"
        );
    }
}

/// Without --pid every process is sampled, each sample labelled with its process.
#[test]
fn system_wide_recording_labels_every_process() {
    util::require_root();
    let w = Workload::start("calltree", &["10"]);
    let dir = util::out_dir("all");
    util::record(&["--duration", "2", "-F", "199"], &dir);
    let p = util::read_profile(&dir);
    let pid = i64::from(w.pid());
    let ours = util::samples_where(&p, |s| p.label_num(s, "pid") == Some(pid));
    assert!(
        ours > 250,
        "calltree ran ~2 s at 199 Hz: got {ours} samples"
    );
    let labelled = util::samples_where(&p, |s| {
        p.label_num(s, "pid") == Some(pid)
            && p.label_str(s, "process") == Some("calltree")
            && p.label_str(s, "comm").is_some()
    });
    assert_eq!(labelled, ours);
    let pids: std::collections::HashSet<_> = p
        .sample
        .iter()
        .filter_map(|s| p.label_num(s, "pid"))
        .collect();
    assert!(pids.len() >= 2, "more than one process sampled: {pids:?}");
}

/// Tiny maps overflow: the losses are counted, shown, and stored in the profile, and every
/// sample the kernel saw is accounted for.
#[test]
fn full_maps_are_counted_not_silent() {
    util::require_root();
    let _w = Workload::start("calltree", &["10"]);
    let dir = util::out_dir("fullmaps");
    let out = util::record(
        &[
            "--duration",
            "2",
            "-F",
            "999",
            "--stack-map-size",
            "16",
            "--count-map-size",
            "16",
        ],
        &dir,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let number_after = |text: &str, prefix: &str| -> u64 {
        let rest = &text[text
            .find(prefix)
            .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"))
            + prefix.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let lost = number_after(&stdout, "Lost samples: ");
    let lost_stacks = number_after(&stdout, "lost stacks: ");
    assert!(
        lost > 0,
        "16 keys cannot hold a 999 Hz recording:\n{stdout}"
    );
    assert!(
        lost_stacks > 0,
        "16 stacks cannot hold a 999 Hz recording:\n{stdout}"
    );
    let p = util::read_profile(&dir);
    let comments: Vec<_> = p.comment.iter().map(|&c| p.str(c)).collect();
    let line = comments
        .iter()
        .find(|c| c.starts_with("samples:"))
        .expect("a samples comment");
    let seen = number_after(line, "seen ");
    let recorded = number_after(line, "recorded ");
    let lost_in_profile = number_after(line, "lost ");
    let filtered = number_after(line, "filtered ");
    let idle = number_after(line, "idle ");
    assert_eq!(lost_in_profile, lost);
    assert_eq!(
        seen,
        recorded + lost + filtered + idle,
        "every sample accounted for: {line}"
    );
    let total = util::samples_where(&p, |_| true) as u64;
    assert_eq!(total, recorded, "every recorded sample is in the profile");
    let stack_comment = comments
        .iter()
        .find(|c| c.starts_with("stacks lost:"))
        .unwrap();
    assert!(
        stack_comment.contains("map full")
            && !stack_comment.contains("user 0 map full, 0 collisions; kernel 0 map full, 0"),
        "{stack_comment}"
    );
}

/// C++ and Rust function names come out demangled.
#[test]
fn names_are_demangled() {
    util::require_root();
    let w = Workload::start("demangle", &["10"]);
    let dir = util::out_dir("demangle-cpp");
    util::record_pid(w.pid(), "2", "499", &dir);
    let p = util::read_profile(&dir);
    let names: Vec<_> = p.function.iter().map(|f| p.str(f.name)).collect();
    for expected in [
        "shapes::Spinner::spin(unsigned long)",
        "unsigned long churn<unsigned long>(unsigned long)",
    ] {
        assert!(
            names.contains(&expected),
            "expected {expected:?} among {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.starts_with("_Z")),
        "a mangled name is left: {names:?}"
    );

    // Rust: a thread of this very test process spins in a named function.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || rust_spin_for_cprof(&stop))
    };
    let dir = util::out_dir("demangle-rust");
    util::record_pid(std::process::id(), "2", "499", &dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let spun = spinner.join().unwrap();
    assert!(spun > 0);
    let p = util::read_profile(&dir);
    let names: Vec<_> = p.function.iter().map(|f| p.str(f.name)).collect();
    assert!(
        names.contains(&"integration::oncpu::rust_spin_for_cprof"),
        "expected the demangled Rust path among {names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("_ZN") || n.starts_with("_R")),
        "{names:?}"
    );
}

#[inline(never)]
fn rust_spin_for_cprof(stop: &std::sync::atomic::AtomicBool) -> u64 {
    let mut x = 1u64;
    let mut rounds = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for _ in 0..10_000 {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        rounds += 1;
    }
    rounds
}
