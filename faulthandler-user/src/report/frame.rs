//! The frames of a report: native frames from the symbolizer and Python
//! frames from the interpreter's own structures, one type between the
//! symbolize stage and the sinks.

use serde::{Serialize, Serializer, ser::SerializeMap};

/// One frame of a thread's stack, innermost first in `Thread::frames`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Native(NativeFrame),
    // Constructed once Python frames are merged in (issue 8).
    #[allow(dead_code)]
    Python(PythonFrame),
}

/// A frame of machine code, symbolized from its module's ELF and DWARF.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NativeFrame {
    /// Absolute instruction address in the process.
    pub address: u64,
    pub module: Option<String>,
    /// File offset of `address` in `module`.
    pub module_offset: Option<u64>,
    /// Hex, as the schema prints build-ids.
    pub build_id: Option<String>,
    pub function: Option<String>,
    pub function_offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub column: Option<u32>,
    /// Inlined into the next (outer) frame.
    pub inlined: bool,
    /// A signal trampoline: the kernel called a signal handler here, and
    /// the frames after it are the interrupted code (gdb's `<signal
    /// handler called>`).
    pub signal_frame: bool,
}

/// A frame of Python code, read from the interpreter's frame objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PythonFrame {
    /// Address of the frame's current bytecode instruction.
    pub address: u64,
    /// `co_name`, as faulthandler prints it.
    pub function: String,
    /// `co_qualname` (3.11+).
    pub qualified_name: Option<String>,
    pub file: String,
    pub line: Option<u32>,
    /// The line is a best effort (e.g. the function's first line).
    pub approximate: bool,
}

impl Frame {
    pub fn function(&self) -> Option<&str> {
        match self {
            Frame::Native(f) => f.function.as_deref(),
            Frame::Python(f) => Some(&f.function),
        }
    }

    pub fn native(&self) -> Option<&NativeFrame> {
        match self {
            Frame::Native(f) => Some(f),
            Frame::Python(_) => None,
        }
    }
}

/// `0x…`, the schema's spelling of every address and offset.
pub fn hex(v: u64) -> String {
    format!("{v:#x}")
}

/// Serializes as one flat object with the schema's field names, so a
/// consumer tells the kinds apart by `language`.
impl Serialize for Frame {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            Frame::Native(f) => {
                m.serialize_entry("address", &hex(f.address))?;
                m.serialize_entry("module", &f.module)?;
                m.serialize_entry("module_offset", &f.module_offset.map(hex))?;
                m.serialize_entry("build_id", &f.build_id)?;
                m.serialize_entry("function", &f.function)?;
                m.serialize_entry("function_offset", &f.function_offset.map(hex))?;
                m.serialize_entry("file", &f.file)?;
                m.serialize_entry("line", &f.line)?;
                m.serialize_entry("column", &f.column)?;
                m.serialize_entry("inlined", &f.inlined)?;
                m.serialize_entry("language", "native")?;
                if f.signal_frame {
                    m.serialize_entry("signal_frame", &true)?;
                }
            }
            Frame::Python(f) => {
                m.serialize_entry("address", &hex(f.address))?;
                m.serialize_entry("function", &f.function)?;
                m.serialize_entry("qualified_name", &f.qualified_name)?;
                m.serialize_entry("file", &f.file)?;
                m.serialize_entry("line", &f.line)?;
                m.serialize_entry("inlined", &false)?;
                m.serialize_entry("language", "python")?;
                if f.approximate {
                    m.serialize_entry("approximate", &true)?;
                }
            }
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_and_python_serialize_flat() {
        let n = Frame::Native(NativeFrame {
            address: 0x401000,
            module_offset: Some(0x1000),
            function: Some("main".into()),
            ..NativeFrame::default()
        });
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["address"], "0x401000");
        assert_eq!(v["module_offset"], "0x1000");
        assert_eq!(v["language"], "native");
        assert!(v.get("signal_frame").is_none());
        let p = Frame::Python(PythonFrame {
            address: 0x7f00,
            function: "inner".into(),
            file: "/app/jobs.py".into(),
            line: Some(42),
            ..PythonFrame::default()
        });
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["language"], "python");
        assert_eq!(v["line"], 42);
        assert_eq!(v["function"], "inner");
    }
}
