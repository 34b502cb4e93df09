//! The report model (the JSON contract in report.schema.json) and its
//! text and JSON renderings.

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Frame {
    /// Absolute instruction address, hex.
    pub address: String,
    pub module: Option<String>,
    pub module_offset: Option<String>,
    pub build_id: Option<String>,
    pub function: Option<String>,
    pub function_offset: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub inlined: bool,
    pub language: Option<&'static str>,
}
