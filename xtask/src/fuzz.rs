//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `profiler/fuzz/` (one per parser cprof
//! has: `/proc` files, BPF records, config files, BTF, pprof, file names, HTTP requests) for a
//! time each, and fails on the first input that crashes a target or breaks one of its
//! invariants, naming the input and the command that reproduces it.
//!
//! Installs what it needs, idempotently: `cargo-fuzz` (into the cargo home, as bpf-linker) and
//! uses the preinstalled nightly toolchain (libFuzzer's sanitizer flags need it). The targets are
//! built into `target/fuzz-build` (optimised) or `target/fuzz-dev` (`--quick`, as `cargo xtask
//! test` builds them), with `AYA_BUILD_SKIP=1`: no target loads eBPF programs. Each target
//! grows its corpus in `target/fuzz/corpus/<target>/` from the committed seeds in
//! `profiler/fuzz/corpus/<target>/` (never written to); crashing inputs land in
//! `target/fuzz/artifacts/<target>/`, libFuzzer's output in `target/fuzz/logs/<target>.log`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};

/// The cargo-fuzz release installed when none is: the newest that builds with the stable
/// toolchain here and drives the nightly's libFuzzer flags.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Per-target seconds of `cargo xtask test`: 13 targets, about 2.5 minutes, after a
/// [`Build::Quick`] build (about 3 minutes from scratch on 2 CPUs).
pub const TEST_SECONDS: u64 = 10;

/// How the targets are built. Every build and run of one kind gets the same flags and target
/// directory, so that `cargo fuzz run` reuses the build.
#[derive(Clone, Copy)]
pub enum Build {
    /// `-O -a --codegen-units 16` into `target/fuzz-build`: optimised, with debug assertions and
    /// overflow checks (an overflow is a finding); about 6.5 minutes from scratch on 2 CPUs.
    /// For `cargo xtask fuzz`, where the time goes to fuzzing.
    Optimized,
    /// `--dev` into `target/fuzz-dev`: unoptimised (debug assertions and overflow checks
    /// included), a third of the build time for fewer executions per second. For the short
    /// run of `cargo xtask test`.
    Quick,
}

impl Build {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Self::Optimized => &["-O", "-a", "--codegen-units", "16", "--target-dir"],
            Self::Quick => &["--dev", "--target-dir"],
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Optimized => "target/fuzz-build",
            Self::Quick => "target/fuzz-dev",
        }
    }
}

/// What one target did.
struct Outcome {
    target: String,
    executions: u64,
    per_second: u64,
    corpus: usize,
    /// `None`: no crash.
    failure: Option<String>,
}

/// Runs `only` (or every target) for `seconds` each; fails if any target found a crash.
pub fn run(root: &Path, seconds: u64, only: Option<&str>, build_kind: Build) -> anyhow::Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let fuzz_dir = root.join("profiler/fuzz");
    let all = targets(&fuzz_dir)?;
    let targets: Vec<String> = match only {
        Some(name) if all.iter().any(|t| t == name) => vec![name.to_owned()],
        Some(name) => bail!("unknown fuzz target {name:?} (one of: {})", all.join(", ")),
        None => all,
    };
    install_cargo_fuzz()?;

    let started = Instant::now();
    let mut build = cargo_fuzz(root, "build", build_kind);
    build.args(only);
    super::run(&mut build).context("building the fuzz targets")?;
    println!(
        "xtask fuzz: built {} target(s) in {:.0} s",
        targets.len(),
        started.elapsed().as_secs_f64()
    );

    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = run_target(root, target, seconds, build_kind)?;
        println!(
            "xtask fuzz: {target}: {} executions ({}/s), corpus {}{}",
            outcome.executions,
            outcome.per_second,
            outcome.corpus,
            if outcome.failure.is_some() {
                ", FAILED"
            } else {
                ""
            }
        );
        outcomes.push(outcome);
    }
    println!("{}", table(&outcomes, seconds));
    println!(
        "xtask fuzz: {} target(s) in {:.0} s (build included)",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    for o in &failed {
        eprintln!("{}", o.failure.as_deref().unwrap_or_default());
    }
    if !failed.is_empty() {
        let names: Vec<&str> = failed.iter().map(|o| o.target.as_str()).collect();
        bail!("fuzzing found crashes in: {}", names.join(", "));
    }
    Ok(())
}

/// The targets: `profiler/fuzz/fuzz_targets/<name>.rs`, sorted.
fn targets(fuzz_dir: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(names)
}

/// `cargo +nightly fuzz <command>` with the shared flags.
fn cargo_fuzz(root: &Path, command: &str, build: Build) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz", command, "--fuzz-dir", "profiler/fuzz"])
        .args(build.flags())
        .arg(root.join(build.dir()))
        .env("AYA_BUILD_SKIP", "1")
        // Set by the `cargo run` that started us; the nightly must be the one that runs.
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn run_target(root: &Path, target: &str, seconds: u64, build: Build) -> anyhow::Result<Outcome> {
    let work = root.join("target/fuzz");
    let corpus = work.join("corpus").join(target);
    let artifacts = work.join("artifacts").join(target);
    let logs = work.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = root.join("profiler/fuzz/corpus").join(target);
    if !seeds.is_dir() {
        bail!(
            "fuzz target {target} has no seed corpus {}",
            seeds.display()
        );
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = cargo_fuzz(root, "run", build);
    // The first corpus directory is the one libFuzzer adds new inputs to.
    cmd.arg(target).arg(&corpus).arg(&seeds).arg("--");
    cmd.arg(format!("-max_total_time={seconds}"))
        // One slow input is a finding too (a loop that does not end).
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let failure = (!status.success()).then(|| failure_report(target, &text, &log_path, build));
    Ok(Outcome {
        target: target.to_owned(),
        executions: stat("number_of_executed_units"),
        per_second: stat("average_exec_per_sec"),
        corpus: std::fs::read_dir(&corpus).map_or(0, Iterator::count),
        failure,
    })
}

/// What a failed target printed that matters (the panic or sanitizer report), where the input
/// is, and the command that runs it again.
fn failure_report(target: &str, log: &str, log_path: &Path, build: Build) -> String {
    let input = log
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map(PathBuf::from);
    let mut report = format!(
        "xtask fuzz: {target} failed; libFuzzer's output: {}\n",
        log_path.display()
    );
    let interesting: Vec<&str> = log
        .lines()
        .skip_while(|l| !(l.contains("panicked at") || l.contains("ERROR: ")))
        .take(12)
        .collect();
    for line in interesting {
        report.push_str("    ");
        report.push_str(line);
        report.push('\n');
    }
    match input {
        Some(input) => {
            let _ = writeln!(report, "  crashing input: {}", input.display());
            let _ = writeln!(
                report,
                "  reproduce: AYA_BUILD_SKIP=1 cargo +nightly fuzz run --fuzz-dir profiler/fuzz {} {} {target} {}",
                build.flags().join(" "),
                build.dir(),
                input.display()
            );
        }
        None => report.push_str("  (no crashing input was written; see the log)\n"),
    }
    report
}

/// The results as a markdown table.
fn table(outcomes: &[Outcome], seconds: u64) -> String {
    let mut out = String::from(
        "| target | seconds | executions | executions/s | corpus | result |\n| --- | ---: | ---: | ---: | ---: | --- |\n",
    );
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {seconds} | {} | {} | {} | {} |",
            o.target,
            o.executions,
            o.per_second,
            o.corpus,
            if o.failure.is_some() { "crash" } else { "ok" }
        );
    }
    out
}

/// Installs cargo-fuzz into the cargo home unless `cargo fuzz` already runs.
fn install_cargo_fuzz() -> anyhow::Result<()> {
    let runs = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about 2 minutes, once)");
    super::run(
        Command::new("cargo")
            .args(["+stable", "install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    let runs = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .is_ok_and(|s| s.success());
    if !runs {
        bail!(
            "cargo-fuzz was installed but `cargo fuzz` does not run; is the cargo bin directory on PATH?"
        );
    }
    Ok(())
}
