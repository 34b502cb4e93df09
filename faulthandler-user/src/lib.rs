//! rfh-trace: crash reports for any process, from the outside.
//!
//! The pipeline, stage by stage: capture (eBPF programs and the ring) →
//! decode → assemble (crash rules) → workers: unwind → symbolize → report
//! → sink. `watch` is the event loop that owns the capture; `run` holds
//! the modes on top.

pub mod agent;
pub mod assemble;
pub mod btf;
pub mod capture;
pub mod cli;
pub mod decode;
pub mod diag;
pub mod dumps;
pub(crate) mod escape;
pub mod losses;
pub mod modules;
pub mod output;
pub(crate) mod paths;
pub mod pipeline;
pub mod procs;
pub mod profile;
// Not wired into the pipeline yet (issue 8, phase 2): only tests use it.
#[allow(dead_code)]
pub(crate) mod python;
pub mod ready;
pub mod report;
pub mod run;
pub mod signals;
pub mod sink;
pub mod spawn;
pub mod symbolize;
pub mod unwind;
pub mod watch;
pub mod workers;
