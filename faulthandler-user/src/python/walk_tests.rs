//! The walk on synthetic memory: a hand-built 3.12 process, torn and
//! looping structures, and random bytes.

use std::collections::BTreeMap;

use super::*;
use crate::python::discover::{PyTarget, PyVersion};
use crate::python::layout::static_layout;

/// Memory made of disjoint regions; a read must fall inside one.
#[derive(Default)]
struct FakeMem {
    regions: BTreeMap<u64, Vec<u8>>,
}

impl FakeMem {
    fn put(&mut self, addr: u64, bytes: &[u8]) {
        self.regions.insert(addr, bytes.to_vec());
    }

    /// A zeroed region of `len` bytes with `(offset, value)` u64 fields.
    fn obj(&mut self, addr: u64, len: usize, fields: &[(u64, u64)]) {
        let mut b = vec![0u8; len];
        for &(off, v) in fields {
            let off = off as usize;
            b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.put(addr, &b);
    }

    fn set_u8(&mut self, addr: u64, v: u8) {
        let (start, region) = self.regions.range_mut(..=addr).next_back().unwrap();
        region[(addr - start) as usize] = v;
    }
}

impl Memory for FakeMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        let err = || PyError::Read {
            addr,
            len: buf.len(),
            source: None,
        };
        let (start, region) = self.regions.range(..=addr).next_back().ok_or_else(err)?;
        let off = (addr - start) as usize;
        let src = region.get(off..off + buf.len()).ok_or_else(err)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    /// What the region holding `addr` has from there on, as a copy
    /// that was cut short has.
    fn readable(&self, addr: u64, len: usize) -> usize {
        self.regions
            .range(..=addr)
            .next_back()
            .map_or(0, |(start, r)| {
                r.len().saturating_sub((addr - start) as usize)
            })
            .min(len)
    }
}

const RUNTIME: u64 = 0x10_0000;
const INTERP: u64 = 0x20_0000;
const TSTATE: u64 = 0x30_0000;
const CFRAME: u64 = 0x31_0000;
const CODE_TYPE: u64 = 0x60_0000;

fn target() -> PyTarget {
    PyTarget {
        runtime_addr: RUNTIME,
        version: PyVersion {
            major: 3,
            minor: 12,
            hex: Some(0x030c01f0),
        },
        layout: static_layout(12).unwrap(),
        code_type_addr: Some(CODE_TYPE),
    }
}

/// A compact ASCII str (3.12: data right after the 40-byte header).
fn ascii(mem: &mut FakeMem, addr: u64, s: &str) {
    let mut b = vec![0u8; 40 + s.len() + 1];
    b[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
    b[16..24].copy_from_slice(&(s.len() as u64).to_le_bytes());
    b[32..36].copy_from_slice(&(0x20u32 | 0x40 | (1 << 2)).to_le_bytes());
    b[40..40 + s.len()].copy_from_slice(s.as_bytes());
    mem.put(addr, &b);
}

fn bytes(mem: &mut FakeMem, addr: u64, data: &[u8]) {
    let mut b = vec![0u8; 32 + data.len() + 1];
    b[16..24].copy_from_slice(&(data.len() as u64).to_le_bytes());
    b[32..32 + data.len()].copy_from_slice(data);
    mem.put(addr, &b);
}

/// A code object at `addr` named `name`, first line 10, whose location
/// table puts code units 0–3 on line 11 and 4–7 on line 13.
fn code(mem: &mut FakeMem, addr: u64, name: &str) {
    let l = static_layout(12).unwrap();
    ascii(mem, addr + 0x1000, name);
    ascii(mem, addr + 0x2000, "/app/job.py");
    // NO_COLUMNS entries of 4 units: svarint(+1) = 2, svarint(+2) = 4.
    bytes(
        mem,
        addr + 0x3000,
        &[0x80 | 13 << 3 | 3, 2, 0x80 | 13 << 3 | 3, 4],
    );
    mem.obj(
        addr,
        (l.code_adaptive + 16) as usize,
        &[
            (l.object_type, CODE_TYPE),
            (l.code_name, addr + 0x1000),
            (l.code_qualname, addr + 0x1000),
            (l.code_filename, addr + 0x2000),
            (l.code_linetable, addr + 0x3000),
        ],
    );
    let first = addr + l.code_firstlineno;
    for (i, b) in 10i32.to_le_bytes().into_iter().enumerate() {
        mem.set_u8(first + i as u64, b);
    }
}

/// A 3.12 frame: `owner` 0 is a Python frame, 3 a C-stack shim.
fn frame(mem: &mut FakeMem, addr: u64, code: u64, unit: u64, previous: u64, owner: u8) {
    let l = static_layout(12).unwrap();
    mem.obj(
        addr,
        80,
        &[
            (l.frame_code, code),
            (l.frame_previous, previous),
            (l.frame_instr, code + l.code_adaptive + 2 * unit),
        ],
    );
    mem.set_u8(addr + l.frame_owner, owner);
}

/// Runtime → interpreter → one thread state (tid 4242) whose frames start
/// at `first_frame`.
fn process(first_frame: u64) -> FakeMem {
    let l = static_layout(12).unwrap();
    let mut mem = FakeMem::default();
    mem.obj(RUNTIME, 64, &[(l.runtime_interpreters_head, INTERP)]);
    mem.obj(
        INTERP,
        1024,
        &[(l.interp_next, 0), (l.interp_threads_head, TSTATE)],
    );
    mem.obj(
        TSTATE,
        256,
        &[
            (l.tstate_next, 0),
            (l.tstate_interp, INTERP),
            (l.tstate_frame, CFRAME),
            (l.tstate_thread_id, 0x7f00_0000_0640),
            (l.tstate_native_thread_id, 4242),
        ],
    );
    mem.obj(CFRAME, 16, &[(l.cframe_current_frame, first_frame)]);
    code(&mut mem, 0x50_0000, "handler");
    code(&mut mem, 0x51_0000, "<module>");
    mem
}

#[test]
fn walks_a_synthetic_3_12_process() {
    // handler (line 13) ← shim ← <module> (line 11) ← shim.
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 5, 0x40_1000, 0);
    frame(&mut mem, 0x40_1000, 0, 0, 0x40_2000, 3);
    frame(&mut mem, 0x40_2000, 0x51_0000, 1, 0x40_3000, 0);
    frame(&mut mem, 0x40_3000, 0, 0, 0, 3);
    let w = walk(&mem, &target()).unwrap();
    assert!(w.error.is_none());
    assert_eq!(w.threads.len(), 1);
    let t = &w.threads[0];
    assert!(t.error.is_none(), "{t:?}");
    assert_eq!(t.native_tid, Some(4242));
    assert_eq!(t.pthread_id, Some(0x7f00_0000_0640));
    let got: Vec<_> = t
        .frames
        .iter()
        .map(|f| (f.function.as_str(), f.file.as_str(), f.line, f.is_entry))
        .collect();
    assert_eq!(
        got,
        [
            ("handler", "/app/job.py", Some(13), true),
            ("<module>", "/app/job.py", Some(11), true),
        ]
    );
    assert_eq!(t.frames[0].instr_addr, Some(0x50_0000 + 192 + 10));
    assert_eq!(t.frames[0].qualified_name.as_deref(), Some("handler"));
}

#[test]
fn a_line_table_copied_in_part_gives_approximate_lines_past_the_part() {
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 5, 0x40_2000, 0);
    frame(&mut mem, 0x40_2000, 0x51_0000, 1, 0x40_3000, 0);
    frame(&mut mem, 0x40_3000, 0, 0, 0, 3);
    // As the kernel copies a table longer than its cap: the header says
    // 4 bytes, 2 follow (the first entry: units 0-3, line 11).
    for code in [0x50_0000u64, 0x51_0000] {
        let mut b = vec![0u8; 32 + 2];
        b[16..24].copy_from_slice(&4u64.to_le_bytes());
        b[32..34].copy_from_slice(&[0x80 | 13 << 3 | 3, 2]);
        mem.put(code + 0x3000, &b);
    }
    let w = walk(&mem, &target()).unwrap();
    let got: Vec<_> = w.threads[0]
        .frames
        .iter()
        .map(|f| (f.function.as_str(), f.line, f.approximate))
        .collect();
    // Unit 5 is past the copied part: the first line, marked; unit 1 is
    // inside it.
    assert_eq!(
        got,
        [("handler", Some(10), true), ("<module>", Some(11), false)]
    );
}

#[test]
fn frames_inlined_in_one_eval_call_are_not_entries() {
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 0, 0x40_2000, 0);
    frame(&mut mem, 0x40_2000, 0x51_0000, 0, 0x40_3000, 0);
    frame(&mut mem, 0x40_3000, 0, 0, 0, 3);
    let w = walk(&mem, &target()).unwrap();
    let entries: Vec<_> = w.threads[0].frames.iter().map(|f| f.is_entry).collect();
    assert_eq!(entries, [false, true]);
}

#[test]
fn a_looping_frame_chain_stops() {
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 0, 0x40_2000, 0);
    frame(&mut mem, 0x40_2000, 0x51_0000, 0, 0x40_0000, 0);
    let w = walk(&mem, &target()).unwrap();
    let t = &w.threads[0];
    assert_eq!(t.frames.len(), 2);
    assert!(matches!(
        t.error,
        Some(PyError::Cycle {
            what: "frame",
            addr: 0x40_0000
        })
    ));
}

#[test]
fn a_too_long_frame_chain_stops_at_the_limit() {
    let mut mem = process(0x100_0000);
    let n = MAX_FRAMES as u64 + 10;
    for i in 0..n {
        let addr = 0x100_0000 + i * 0x100;
        frame(&mut mem, addr, 0x50_0000, 0, addr + 0x100, 0);
    }
    let w = walk(&mem, &target()).unwrap();
    let t = &w.threads[0];
    assert_eq!(t.frames.len(), MAX_FRAMES);
    assert!(matches!(
        t.error,
        Some(PyError::TooMany { what: "frames", .. })
    ));
}

#[test]
fn a_wrong_code_type_is_refused() {
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 0, 0x40_2000, 0);
    frame(&mut mem, 0x40_2000, TSTATE, 0, 0, 0);
    let w = walk(&mem, &target()).unwrap();
    let t = &w.threads[0];
    assert_eq!(t.frames.len(), 1);
    assert!(matches!(t.error, Some(PyError::NotCode { addr: TSTATE })));
}

#[test]
fn code_type_is_learnt_from_tp_name() {
    let mut mem = process(0x40_0000);
    frame(&mut mem, 0x40_0000, 0x50_0000, 0, 0, 0);
    mem.obj(CODE_TYPE, 64, &[(24, CODE_TYPE + 0x100)]);
    mem.put(CODE_TYPE + 0x100, b"code\0");
    let mut t = target();
    t.code_type_addr = None;
    let w = walk(&mem, &t).unwrap();
    assert_eq!(w.threads[0].frames.len(), 1);
    // Any other name is not a code object.
    mem.put(CODE_TYPE + 0x100, b"codex");
    let w = walk(&mem, &t).unwrap();
    assert!(matches!(w.threads[0].error, Some(PyError::NotCode { .. })));
}

#[test]
fn a_looping_thread_list_is_reported() {
    let l = static_layout(12).unwrap();
    let mut mem = process(0);
    mem.obj(
        TSTATE,
        256,
        &[
            (l.tstate_next, TSTATE),
            (l.tstate_interp, INTERP),
            (l.tstate_frame, 0),
        ],
    );
    let w = walk(&mem, &target()).unwrap();
    assert_eq!(w.threads.len(), 1);
    assert!(matches!(
        w.error,
        Some(PyError::Cycle {
            what: "thread state",
            ..
        })
    ));
}

#[test]
fn a_thread_of_another_interpreter_ends_the_list() {
    let l = static_layout(12).unwrap();
    let mut mem = process(0);
    mem.obj(TSTATE, 256, &[(l.tstate_interp, INTERP + 8)]);
    assert!(matches!(
        walk(&mem, &target()),
        Err(PyError::ForeignThread { .. })
    ));
}

/// Random bytes wherever read: each read of the same address gives the
/// same bytes, like a (garbage) memory would.
struct RandomMem {
    seed: u64,
}

impl Memory for RandomMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        let mut x = addr ^ self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Ok(())
    }
}

/// Random memory whose pointers are all plausible and 8-aligned, into a
/// small range, so the walk follows them as far as it can.
struct PointerSoup {
    seed: u64,
}

impl Memory for PointerSoup {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        let mut x = (addr / 8) ^ self.seed ^ 0x9e37_79b9_7f4a_7c15;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = 0x10_0000 + (x % 0x1000) * 8;
            let bytes = p.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(())
    }
}

fn every_layout() -> Vec<PyTarget> {
    let mut out = Vec::new();
    for minor in 8..=12 {
        let mut t = target();
        t.layout = static_layout(minor).unwrap();
        t.version.minor = minor;
        out.push(t.clone());
        t.code_type_addr = None;
        out.push(t);
    }
    out
}

#[test]
fn garbage_memory_terminates_without_frames() {
    for t in every_layout() {
        for seed in 0..20 {
            for mem in [&RandomMem { seed } as &dyn Memory, &PointerSoup { seed }] {
                // Never a frame from garbage: the code type cannot match.
                if let Ok(w) = walk(mem, &t) {
                    for th in &w.threads {
                        assert!(th.frames.is_empty(), "{th:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn unreadable_memory_is_an_error() {
    let mem = FakeMem::default();
    let at = RUNTIME + static_layout(12).unwrap().runtime_interpreters_head;
    assert!(matches!(walk(&mem, &target()), Err(PyError::Read { addr, .. }) if addr == at));
}

#[test]
fn strings_of_every_kind() {
    assert_eq!(decode(b"abc", 1), "abc");
    assert_eq!(decode(&[0xe9], 1), "é");
    assert_eq!(decode(&[0xfd, 0x51, 0x70, 0x65], 2), "函数");
    assert_eq!(decode(&[0x00, 0xf6, 0x01, 0x00], 4), "😀");
    // A lone surrogate or an out-of-range code point is replaced.
    assert_eq!(decode(&[0x00, 0xd8], 2), "\u{fffd}");
    assert_eq!(decode(&[0xff, 0xff, 0xff, 0x7f], 4), "\u{fffd}");
}
