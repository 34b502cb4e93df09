//! rfh-trace: crash reports for any process, from the outside.
//!
//! The pipeline, stage by stage: capture (eBPF programs and the ring) →
//! decode → assemble (crash rules) → workers: unwind → symbolize → report
//! → sink. `watch` is the event loop that owns the capture; `run` holds
//! the modes on top.

pub(crate) mod agent;
pub(crate) mod assemble;
pub(crate) mod btf;
pub(crate) mod capture;
pub mod cli;
pub(crate) mod decode;
pub mod diag;
pub(crate) mod dumps;
pub(crate) mod escape;
pub(crate) mod losses;
pub(crate) mod modules;
pub(crate) mod output;
pub(crate) mod paths;
pub(crate) mod pipeline;
pub(crate) mod procs;
pub(crate) mod profile;
pub(crate) mod python;
pub(crate) mod ready;
pub(crate) mod report;
pub mod run;
pub(crate) mod signals;
pub(crate) mod sink;
pub(crate) mod spawn;
pub(crate) mod symbolize;
pub(crate) mod unwind;
pub(crate) mod watch;
pub(crate) mod workers;
