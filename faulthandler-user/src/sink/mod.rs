//! Sink stage: where finished reports go. Each sink renders its own
//! format; text and JSON Lines are siblings behind one trait, and so are
//! the agent's sinks.

mod json;
mod text;

use std::{
    fs::File,
    io::{self, Write},
};

pub use self::{json::JsonSink, text::TextSink};
use crate::report::{LossRecord, Report};

/// A destination for reports and loss records. A failed write is the
/// caller's to count: it never stops the watch.
pub trait Sink: Send {
    fn report(&mut self, report: &Report) -> io::Result<()>;
    fn loss(&mut self, loss: &LossRecord) -> io::Result<()>;
}

/// The stream a sink writes to.
#[derive(Debug)]
pub enum Out {
    /// Crash reports, as faulthandler writes them.
    Stderr,
    /// Dumps, so `rfh-trace dump PID | less` works (as eu-stack and py-spy).
    Stdout,
    File(File),
}

impl Out {
    /// Writes one record with a single `write_all`: with O_APPEND, records
    /// of several rfh-trace instances sharing a file do not interleave,
    /// and locking stderr keeps log lines from cutting in.
    pub fn write_record(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut w: Box<dyn Write + '_> = match self {
            Out::Stderr => Box::new(io::stderr().lock()),
            Out::Stdout => Box::new(io::stdout().lock()),
            Out::File(f) => Box::new(f),
        };
        w.write_all(bytes)?;
        w.flush()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text { color: bool },
    Json,
}

pub fn new(format: Format, out: Out) -> Box<dyn Sink> {
    match format {
        Format::Text { color } => Box::new(TextSink::new(out, color)),
        Format::Json => Box::new(JsonSink::new(out)),
    }
}
