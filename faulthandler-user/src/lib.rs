pub mod modules;
pub mod report;
