//! cprof's agent library: everything behind the `cprof` binary.
//!
//! - [`bpf`]: load and attach the eBPF programs, drain their in-kernel aggregates.
//! - [`btf`]: field offsets of kernel structs, for programs that read kernel memory.
//! - [`procfs`]: memory maps and names of target processes.
//! - [`symbolize`]: one blazesym symbolizer on its own thread; [`target_file`] opens the files
//!   of target processes without leaving their root, [`elf_vet`] refuses hostile files before
//!   parsing, [`sigbus`] survives a mapped file truncated under the parser.
//! - [`symbols`]: the process table and symbol caches of a recording; stacks to pprof locations.
//! - [`oncpu`], [`offcpu`], [`syscalls`], [`tcp`]: merge drained data and build their output files.
//! - [`syscall_names`], [`tables`]: syscall and errno names from the kernel's tables.
//! - [`pprof`]: the pprof message types and a builder.
//! - [`top`]: rankings for the summary.
//! - [`session`]: probes, symbolizer and profiles of one run, shared by both commands.
//! - [`record`]: the `cprof record` command; [`agent`]: the `cprof agent` command.
//! - [`cli`], [`config`], [`privilege`], [`output`]: flags, validated settings, capability
//!   checks, atomic output files.

pub mod agent;
pub mod bpf;
pub mod btf;
pub mod civil;
pub mod cli;
pub mod config;
pub mod container;
pub mod elf_vet;
pub mod offcpu;
pub mod oncpu;
pub mod output;
pub mod pprof;
pub mod privilege;
pub mod procfs;
pub mod push;
pub mod record;
pub mod session;
pub mod sigbus;
pub mod symbolize;
pub mod symbols;
pub mod syscall_names;
pub mod syscalls;
pub mod target_file;
pub mod tcp;
#[rustfmt::skip]
pub mod tables;
pub mod top;

/// The parsers that are private to their modules, re-exported unchanged for the fuzz targets in
/// `profiler/fuzz/` (the public ones are fuzzed where they are). Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::push::client::{CredentialKind, credential_header};
    pub use crate::push::spool::{parse_file_name as parse_spool_file_name, valid_job_name};
}
