//! Builds the eBPF programs (`profiler-ebpf`) for the BPF target with the nightly toolchain and
//! leaves the object in `OUT_DIR/profiler`, which `src/bpf.rs` embeds. `AYA_BUILD_SKIP=1` skips
//! it (for `cargo check` / `clippy` without nightly); the binary then refuses to load.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {manifest_dir}"))?;
    let ebpf_dir = root.join("profiler-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    println!(
        "cargo:rerun-if-changed={}",
        root.join("profiler-common").display()
    );
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("profiler");
    if std::env::var_os("AYA_BUILD_SKIP").is_some() && !out.exists() {
        std::fs::write(&out, b"")?;
    }
    aya_build::build_ebpf(
        [Package {
            name: "profiler-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (cargo xtask build installs bpf-linker and rust-src)")
}
