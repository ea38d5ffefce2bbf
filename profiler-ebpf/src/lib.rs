//! Empty on the host: the programs live in the `profiler` binary target, built for the BPF target
//! by `profiler/build.rs`. This library exists so that `profiler` can name this crate as a
//! build-dependency and be rebuilt when it changes.
#![no_std]
