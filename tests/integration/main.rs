//! Privileged integration tests: they run the real `cprof` binary, which loads the real eBPF
//! programs into this machine's kernel, against workloads whose truth is known, and check what it
//! writes by decoding the pprof and through `go tool pprof`.
//!
//! Run as root with `cargo xtask test` (one test at a time: they share the CPUs and the kernel).
//! A missing prerequisite (root, gcc, go) fails the test with a message; nothing is skipped.

mod agent;
mod bad_input;
mod files;
mod hostile;
mod lost;
mod offcpu;
mod oncpu;
mod privileges;
mod push;
mod receiver;
mod shutdown;
mod syscall;
mod tcp;
mod util;
