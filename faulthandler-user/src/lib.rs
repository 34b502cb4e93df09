pub mod btf;
pub mod capture;
pub mod cli;
pub mod decode;
pub mod diag;
pub mod dumps;
pub mod modules;
pub mod output;
pub mod pipeline;
pub mod procs;
pub mod profile;
// Not wired into the pipeline yet (issue 8, phase 2): only tests use it.
#[allow(dead_code)]
pub(crate) mod python;
pub mod report;
pub mod run;
pub mod signals;
pub mod spawn;
pub mod symbolize;
pub mod unwind;
pub mod watch;
