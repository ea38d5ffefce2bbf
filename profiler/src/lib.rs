//! cprof's agent library: everything behind the `cprof` binary.
//!
//! - [`bpf`]: load and attach the eBPF programs, drain their in-kernel aggregates.
//! - [`procfs`]: memory maps and names of target processes.
//! - [`symbolize`]: one blazesym symbolizer on its own thread.
//! - [`collect`]: merge drained samples, resolve their symbols, build the pprof.
//! - [`pprof`]: the pprof message types and a builder.
//! - [`record`]: the `cprof record` command.
//! - [`cli`], [`config`], [`privilege`], [`output`]: flags, validated settings, capability
//!   checks, atomic output files.

pub mod bpf;
pub mod cli;
pub mod collect;
pub mod config;
pub mod output;
pub mod pprof;
pub mod privilege;
pub mod procfs;
pub mod record;
pub mod symbolize;
