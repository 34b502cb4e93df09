//! JSON Lines: one record per line, the contract of report.schema.json.

use std::io;

use serde::Serialize;

use super::{Out, Sink};
use crate::report::{LossRecord, Report};

pub struct JsonSink {
    out: Out,
}

impl JsonSink {
    pub fn new(out: Out) -> Self {
        Self { out }
    }

    fn write(&mut self, record: &impl Serialize) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.out.write_record(&line)
    }
}

impl Sink for JsonSink {
    fn report(&mut self, report: &Report) -> io::Result<()> {
        self.write(report)
    }

    fn loss(&mut self, loss: &LossRecord) -> io::Result<()> {
        self.write(loss)
    }
}
