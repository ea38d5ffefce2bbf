//! Installing what builds and tests need, each step a no-op when already done.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The bpf-linker release that builds against the nightly's LLVM 22 (see shared toolchain notes).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// rust-src for the nightly toolchain, and bpf-linker.
pub fn bpf_toolchain(root: &Path) -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .context("the eBPF programs need rustup's nightly toolchain")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: installing rust-src for nightly");
        super::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if bpf_linker_ok() {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM (a few minutes, once)"
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    // The real ELF is libLLVM.so.<ver>-rust-<ver>; the libLLVM-<ver>-rust-*.so next to it is a
    // linker script, which llvm-sys cannot use.
    let real = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = root.join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&real, &link)?;
    super::run(
        Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok() {
        bail!("bpf-linker was installed but does not run; is the cargo bin directory on PATH?");
    }
    Ok(())
}

/// Whether bpf-linker runs. It links the nightly's libLLVM dynamically, so it runs under
/// `rustup run nightly` (which sets the library path), as aya-build runs it.
fn bpf_linker_ok() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// Installs Debian packages whose command is missing: `(command, package)`.
pub fn debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    super::run(Command::new("apt-get").args(["update", "-q"]))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(command).is_file()))
}

/// Builds `tests/workloads/<name>.c` with frame pointers into `target/workloads/<name>`.
pub fn workload(root: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let src = root.join(format!("tests/workloads/{name}.c"));
    let out_dir = root.join("target/workloads");
    std::fs::create_dir_all(&out_dir)?;
    let out = out_dir.join(name);
    super::run(
        Command::new("cc")
            .args([
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-mno-omit-leaf-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-pthread",
                "-o",
            ])
            .arg(&out)
            .arg(&src),
    )?;
    Ok(out)
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
