//! `cargo xtask <command>`: the project's build, demo and test entry points.
//!
//! Each command first installs what it needs, idempotently: the nightly toolchain's `rust-src`,
//! `bpf-linker` (built against the nightly's own LLVM, into the cargo home), and for tests the
//! Debian packages of the real clients the tests check against (`go tool pprof`).

mod bench;
mod fuzz;
mod micro;
mod setup;
mod soak;
mod tables;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the BPF toolchain pieces if missing and build target/release/cprof.
    Build,
    /// Build, start the bundled demo workload, profile it for a few seconds, print the summary.
    Demo {
        /// Seconds to record.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// Measure the overhead of each signal against the peers, and run the criterion
    /// micro-benchmarks of the userspace hot paths (`cargo bench -p profiler`); writes
    /// target/bench/report.md and report.json. Needs root.
    Bench {
        /// Interleaved runs per configuration.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Run only the micro-benchmarks (pprof encoding, symbolization, map draining; a few
        /// minutes); writes target/bench/micro.md and micro.json, not report.md.
        #[arg(long, conflicts_with = "skip_micro")]
        only_micro: bool,
        /// Skip the micro-benchmarks: only the overhead benchmarks.
        #[arg(long)]
        skip_micro: bool,
        /// Run only the workloads whose name contains this (for example "cpu"); writes
        /// target/bench/report-partial.md instead of the full report.
        #[arg(long, value_name = "NAME")]
        workload: Option<String>,
        /// After the overhead benchmarks, the churn soak of `cargo xtask soak` for this many
        /// minutes (its long form; 0 skips it). Writes target/bench/soak.md.
        #[arg(long, value_name = "MINUTES", default_value_t = 60.0)]
        soak_minutes: f64,
    },
    /// Run `cprof agent --event all` system-wide for a long time under process churn (hundreds of
    /// processes a second) and report its RSS, file descriptors and caches every 10 s:
    /// target/bench/soak.md. Needs root.
    Soak {
        /// Minutes to run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Processes started per second.
        #[arg(long, default_value_t = 300)]
        rate: u32,
    },
    /// Fuzz every parser (`profiler/fuzz/`, cargo-fuzz with the nightly toolchain) for a time
    /// each; fails on a crash, naming the input and the command that reproduces it.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Build unoptimised (a third of the build time, fewer executions per second), as
        /// `cargo xtask test` does.
        #[arg(long)]
        quick: bool,
        /// Only this target (for example `proc_maps`); default: every target.
        target: Option<String>,
    },
    /// Regenerate profiler/src/tables.rs (syscall and errno names) from the kernel headers.
    GenTables,
    /// Build, install the test clients, run every test (unit and privileged integration tests),
    /// then fuzz every parser briefly (skipped when a test filter is given).
    Test {
        /// Extra arguments for the test harness (for example a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Build => build(&root).map(|_| ()),
        Task::Demo { seconds } => demo(&root, seconds),
        Task::Test { args } => test(&root, &args),
        Task::GenTables => tables::generate(&root),
        Task::Fuzz {
            seconds,
            quick,
            target,
        } => {
            let build = if quick {
                fuzz::Build::Quick
            } else {
                fuzz::Build::Optimized
            };
            fuzz::run(&root, seconds, target.as_deref(), build)
        }
        Task::Soak { minutes, rate } => {
            let cprof = build(&root)?;
            require_root("the soak loads eBPF programs")?;
            soak::run(&root, &cprof, minutes, rate)
        }
        Task::Bench {
            runs,
            only_micro,
            skip_micro,
            workload,
            soak_minutes,
        } => {
            if only_micro {
                setup::bpf_toolchain(&root)?;
                require_root("the drain micro-benchmark loads eBPF programs")?;
                return bench::run_micro_only(&root);
            }
            let cprof = build(&root)?;
            require_root("the benchmarks load eBPF programs")?;
            setup::debian_packages(&[
                ("perf", "linux-perf"),
                ("bpftrace", "bpftrace"),
                ("bpftool", "bpftool"),
                ("offcputime", "libbpf-tools"),
            ])?;
            // First: they take minutes where the overhead benchmarks take much longer, and a
            // failure shows early.
            let micro = if skip_micro {
                None
            } else {
                Some(micro::run(&root)?)
            };
            bench::run(&root, &cprof, runs, micro.as_deref(), workload.as_deref())?;
            if soak_minutes > 0.0 && workload.is_none() {
                soak::run(&root, &cprof, soak_minutes, 300)?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build(root: &Path) -> anyhow::Result<PathBuf> {
    setup::bpf_toolchain(root)?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "profiler",
        "--bin",
        "cprof",
    ]))?;
    Ok(root.join("target/release/cprof"))
}

fn demo(root: &Path, seconds: u32) -> anyhow::Result<()> {
    let cprof = build(root)?;
    let workload = setup::workload(root, "calltree")?;
    require_root("the demo loads eBPF programs")?;
    let out = root.join("target/demo");
    let _ = std::fs::remove_dir_all(&out);
    println!(
        "demo: starting {} (a 70/30 split between path_a and path_b)",
        workload.display()
    );
    let mut child = Command::new(&workload)
        .arg((seconds + 3).to_string())
        .spawn()
        .with_context(|| format!("starting {}", workload.display()))?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = Command::new(&cprof)
        .args(["record", "--pid", &child.id().to_string()])
        .args(["--duration", &seconds.to_string(), "--frequency", "999"])
        .arg("--output")
        .arg(&out)
        .status();
    let _ = child.kill();
    let _ = child.wait();
    if !status?.success() {
        bail!("cprof record failed");
    }
    println!(
        "demo: try `go tool pprof -top {}`",
        out.join("cpu.pb.gz").display()
    );
    Ok(())
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    build(root)?;
    require_root("the integration tests load eBPF programs")?;
    setup::debian_packages(&[
        ("go", "golang-go"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("promtool", "prometheus"),
        ("protoc", "protobuf-compiler"),
        // tests/integration/hostile.rs: damaging ELF files, entering a target's namespaces.
        ("objcopy", "binutils"),
        ("nsenter", "util-linux"),
        // The shutdown and privilege tests: BPF objects left behind, reduced capabilities,
        // files opened.
        ("bpftool", "bpftool"),
        ("setpriv", "util-linux"),
        ("strace", "strace"),
    ])?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "profiler-ebpf",
    ]);
    cmd.args(["--lib", "--bins", "--tests", "--"]);
    // The integration tests share the kernel and both CPUs; run them one at a time.
    cmd.arg("--test-threads=1").args(args);
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    for line in std::io::BufRead::lines(stdout) {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    // One closing line over every test binary (cargo prints one per binary).
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    if args.is_empty() {
        fuzz::run(root, fuzz::TEST_SECONDS, None, fuzz::Build::Quick)
    } else {
        println!("xtask: a test filter was given; not fuzzing");
        Ok(())
    }
}

/// `test result: ok. 23 passed; 0 failed; ...` -> (23, 0).
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        let before = rest.split(&format!(" {word}")).next()?;
        before
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((count("passed")?, count("failed")?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_cargo_test_result_lines() {
        let line = "test result: ok. 23 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(super::parse_test_result(line), Some((23, 1)));
        assert_eq!(super::parse_test_result("running 3 tests"), None);
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!("run as root: {why} (for example `sudo -E cargo xtask ...`)");
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
