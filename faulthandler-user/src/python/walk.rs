//! Walking a CPython process: interpreters → thread states → frames → code
//! objects, through a `Memory`, with the offsets of a `PyLayout`.
//!
//! Live memory changes under the walk, so every loop is bounded, every
//! pointer is checked (`mem::plausible`) before it is followed, every chain
//! is checked for cycles, and every code object's `ob_type` must be
//! `PyCode_Type`. A thread whose walk fails keeps the frames read so far and
//! says why; nothing here panics or loops on garbage.
//!
//! # The reads, in order (the kernel side mirrors this)
//! All offsets are `PyLayout` fields; `L` is the layout, `R` `_PyRuntime`.
//! 1. `interp = *(R + L.runtime_interpreters_head)`; later interpreters
//!    from `*(interp + L.interp_next)`.
//! 2. `ts = *(interp + L.interp_threads_head)`; later threads from
//!    `*(ts + L.tstate_next)`. Per thread one read of
//!    `[ts, ts + max(field) + 8)` gives `next`, `interp` (must equal
//!    `interp`: else the list is torn), `thread_id`, `native_thread_id`
//!    and the frame pointer `f = *(ts + L.tstate_frame)`; with
//!    `flags::CFRAME` (3.11, 3.12) that is a `_PyCFrame *` and the frame is
//!    `*(f + L.cframe_current_frame)` (one more 8-byte read, f != 0).
//! 3. Per frame, one read of `L.frame_read_size` bytes at `f`:
//!    `previous` at `L.frame_previous`, `code` at `L.frame_code` (clear
//!    `CODE_TAG_MASK` with `flags::CODE_TAGGED`), `instr` at
//!    `L.frame_instr` (an i32 `f_lasti` for 3.8–3.10, else a pointer),
//!    `owner` (u8) at `L.frame_owner`, `is_entry` (u8) at
//!    `L.frame_is_entry`. With `flags::SHIM_OWNER` and `owner >=
//!    L.shim_owner_min` the frame is the eval loop's entry shim: skip it
//!    (no code read) and mark the previous Python frame (the one just
//!    before in walk order) as an entry frame. Then `f = previous`.
//! 4. Per distinct code object `c`, one read of `L.code_read_size` bytes:
//!    `ob_type` at `L.object_type` (must equal `PyCode_Type`), pointers
//!    `co_name`, `co_qualname` (3.11+), `co_filename`, `co_linetable` /
//!    `co_lnotab`, `co_code` (3.8–3.10), and the i32 `co_firstlineno`.
//! 5. Per string `s` (name, qualname, filename): one read of
//!    `L.unicode_ascii_data` bytes (the PyASCIIObject header) gives
//!    `length` (i64) at `L.unicode_length` and the u32 `state` at
//!    `L.unicode_state` (kind = bits 2–4, compact = bit 5, ascii = bit 6;
//!    not compact = refused); the characters (`length * kind` bytes) follow
//!    at `s + L.unicode_ascii_data` (ascii) or `s + L.unicode_compact_data`.
//! 6. Per line table `b`: one read of `L.bytes_data` bytes gives the i64
//!    size at `L.bytes_size`; the table follows at `b + L.bytes_data`.
//! 7. The instruction: 3.11+ `instr` is its address and its byte offset is
//!    `instr - (c + L.code_adaptive)`; 3.8–3.10 its address is `co_code +
//!    L.bytes_data + offset`, the offset being `f_lasti` (3.8, 3.9) or
//!    `2 * f_lasti` (3.10). `linetable::line_for` maps the offset to a line.

use std::collections::{HashMap, HashSet};

use super::PyError;
use super::discover::PyTarget;
use super::layout::{ABSENT, CODE_TAG_MASK, InstrKind, LineTableKind, PyLayout, flags};
use super::layout::{UNICODE_ASCII_BIT, UNICODE_COMPACT_BIT, UNICODE_KIND_SHIFT};
use super::linetable::line_for;
use super::mem::{Memory, check_ptr, field_i32, field_u8, field_u64, read_u64, read_vec};

/// Interpreters (subinterpreters included) walked at most.
pub(crate) const MAX_INTERPRETERS: usize = 64;
/// Thread states per interpreter walked at most.
pub(crate) const MAX_THREADS: usize = 4096;
/// Frames per thread (shim frames included) walked at most.
pub(crate) const MAX_FRAMES: usize = 4096;
/// Longest function name / file name read, in characters.
const MAX_NAME_CHARS: i64 = 1024;
const MAX_FILE_CHARS: i64 = 4096;
/// Longest line table read, in bytes.
const MAX_LINETABLE: i64 = 1 << 20;
/// Longest bytecode a frame's instruction offset may point into.
const MAX_CODE_BYTES: i64 = 1 << 26;

/// One Python frame, innermost first in `PyThread::frames`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PyFrame {
    pub code_addr: u64,
    /// `co_name`, what faulthandler prints.
    pub function: String,
    /// `co_qualname` (3.11+).
    pub qualified_name: Option<String>,
    /// `co_filename`.
    pub file: String,
    /// `None` for an instruction without a line.
    pub line: Option<u32>,
    /// Address of the current instruction in the bytecode.
    pub instr_addr: Option<u64>,
    /// The oldest frame run by its call of the eval loop: a native eval
    /// frame ran this frame and every newer one up to the previous entry
    /// frame. Always true on 3.8–3.10 (one eval call per frame).
    pub is_entry: bool,
    /// The line is a best effort: the line table was copied only in part
    /// (at signal time) and the instruction lies past that part.
    pub approximate: bool,
}

/// One thread state and its frames.
#[derive(Debug)]
pub(crate) struct PyThread {
    /// `native_thread_id`: the tid in the target's PID namespace (3.11+).
    pub native_tid: Option<u32>,
    /// `thread_id`: the thread's pthread_t (its TCB address on glibc, i.e.
    /// the fs base), the only way to match a thread on 3.8–3.10.
    pub pthread_id: Option<u64>,
    /// `threading.Thread.name`: not read yet (always `None`).
    pub python_name: Option<String>,
    pub frames: Vec<PyFrame>,
    /// Why the walk of this thread's frames stopped early.
    pub error: Option<PyError>,
}

/// What a code object contributes to each of its frames.
#[derive(Clone, Debug)]
struct Code {
    function: String,
    qualified_name: Option<String>,
    file: String,
    firstlineno: i32,
    linetable: Vec<u8>,
    /// Only the start of the line table could be read.
    linetable_cut: bool,
    /// 3.8–3.10: address of the first bytecode byte (`co_code`'s data).
    bytecode: Option<u64>,
}

/// Every thread of every interpreter of a process.
#[derive(Debug)]
pub(crate) struct PyWalk {
    pub threads: Vec<PyThread>,
    /// Why the thread lists were not read to their end (a torn list).
    pub error: Option<PyError>,
}

/// Walks every thread of every interpreter of `target`. `Err` only when
/// not even the first interpreter's first thread could be read.
pub(crate) fn walk(mem: &dyn Memory, target: &PyTarget) -> Result<PyWalk, PyError> {
    let mut w = Walker::new(mem, target);
    let mut threads = Vec::new();
    match w.interpreters(&mut threads) {
        Err(e) if threads.is_empty() => Err(e),
        r => Ok(PyWalk {
            threads,
            error: r.err(),
        }),
    }
}

/// The walk's state: the layout and what it learnt on the way.
pub(crate) struct Walker<'a> {
    mem: &'a dyn Memory,
    layout: PyLayout,
    runtime: u64,
    code_type: Option<u64>,
    codes: HashMap<u64, Code>,
}

impl<'a> Walker<'a> {
    pub(crate) fn new(mem: &'a dyn Memory, target: &PyTarget) -> Self {
        Self {
            mem,
            layout: target.layout,
            runtime: target.runtime_addr,
            code_type: target.code_type_addr,
            codes: HashMap::new(),
        }
    }

    fn interpreters(&mut self, out: &mut Vec<PyThread>) -> Result<(), PyError> {
        let l = self.layout;
        let mut interp = read_u64(
            self.mem,
            self.runtime.wrapping_add(l.runtime_interpreters_head),
        )?;
        let mut seen = HashSet::new();
        while interp != 0 {
            if seen.len() == MAX_INTERPRETERS {
                return Err(PyError::TooMany {
                    what: "interpreters",
                    limit: MAX_INTERPRETERS,
                });
            }
            check_ptr("interpreter state", interp)?;
            if !seen.insert(interp) {
                return Err(PyError::Cycle {
                    what: "interpreter",
                    addr: interp,
                });
            }
            self.threads_of(interp, out)?;
            interp = read_u64(self.mem, interp.wrapping_add(l.interp_next))?;
        }
        Ok(())
    }

    /// Appends `interp`'s threads to `out`; `Err` when its list is torn.
    fn threads_of(&mut self, interp: u64, out: &mut Vec<PyThread>) -> Result<(), PyError> {
        let l = self.layout;
        let mut ts = read_u64(self.mem, interp.wrapping_add(l.interp_threads_head))?;
        let mut seen = HashSet::new();
        while ts != 0 {
            if seen.len() == MAX_THREADS {
                return Err(PyError::TooMany {
                    what: "threads",
                    limit: MAX_THREADS,
                });
            }
            check_ptr("thread state", ts)?;
            if !seen.insert(ts) {
                return Err(PyError::Cycle {
                    what: "thread state",
                    addr: ts,
                });
            }
            let (thread, next) = self.thread(interp, ts)?;
            out.push(thread);
            ts = next;
        }
        Ok(())
    }

    /// Reads the thread state at `ts` and walks its frames. Returns the
    /// thread and the next thread state.
    pub(crate) fn thread(&mut self, interp: u64, ts: u64) -> Result<(PyThread, u64), PyError> {
        let l = self.layout;
        let size = [
            l.tstate_next,
            l.tstate_interp,
            l.tstate_frame,
            l.tstate_thread_id,
            l.tstate_native_thread_id,
        ]
        .into_iter()
        .filter(|&o| o != ABSENT)
        .max()
        .unwrap_or(0)
            + 8;
        let head = read_vec(self.mem, ts, size as usize)?;
        let get = |off: u64| {
            if off == ABSENT {
                None
            } else {
                field_u64(&head, off)
            }
        };
        if get(l.tstate_interp) != Some(interp) {
            return Err(PyError::ForeignThread { addr: ts });
        }
        let next = get(l.tstate_next).unwrap_or(0);
        let mut thread = PyThread {
            native_tid: get(l.tstate_native_thread_id).and_then(|t| u32::try_from(t).ok()),
            pthread_id: get(l.tstate_thread_id),
            python_name: None,
            frames: Vec::new(),
            error: None,
        };
        let mut frame = get(l.tstate_frame).unwrap_or(0);
        if l.has(flags::CFRAME) && frame != 0 {
            frame = match check_ptr("cframe", frame)
                .and_then(|cf| read_u64(self.mem, cf.wrapping_add(l.cframe_current_frame)))
            {
                Ok(f) => f,
                Err(e) => {
                    thread.error = Some(e);
                    return Ok((thread, next));
                }
            };
        }
        if let Err(e) = self.frames(frame, &mut thread.frames) {
            thread.error = Some(e);
        }
        Ok((thread, next))
    }

    /// Walks the frame chain from `frame` (innermost) into `out`.
    pub(crate) fn frames(&mut self, mut frame: u64, out: &mut Vec<PyFrame>) -> Result<(), PyError> {
        let l = self.layout;
        let mut seen = HashSet::new();
        let result = loop {
            if frame == 0 {
                break Ok(());
            }
            if seen.len() == MAX_FRAMES {
                break Err(PyError::TooMany {
                    what: "frames",
                    limit: MAX_FRAMES,
                });
            }
            if let Err(e) = check_ptr("frame", frame) {
                break Err(e);
            }
            if !seen.insert(frame) {
                break Err(PyError::Cycle {
                    what: "frame",
                    addr: frame,
                });
            }
            let head = match read_vec(self.mem, frame, l.frame_read_size as usize) {
                Ok(h) => h,
                Err(e) => break Err(e),
            };
            let previous = field_u64(&head, l.frame_previous).unwrap_or(0);
            if l.has(flags::SHIM_OWNER)
                && field_u8(&head, l.frame_owner).map(u32::from) >= Some(l.shim_owner_min)
            {
                if let Some(last) = out.last_mut() {
                    last.is_entry = true;
                }
                frame = previous;
                continue;
            }
            match self.frame(&head) {
                Ok(f) => out.push(f),
                Err(e) => break Err(e),
            }
            frame = previous;
        };
        // The oldest frame was necessarily started by a call of the eval
        // loop (on 3.12+ its shim ends the chain; on 3.11 it is flagged).
        if result.is_ok()
            && let Some(last) = out.last_mut()
        {
            last.is_entry = true;
        }
        result
    }

    /// One Python frame from its header bytes.
    fn frame(&mut self, head: &[u8]) -> Result<PyFrame, PyError> {
        let l = self.layout;
        let mut code_addr = field_u64(head, l.frame_code).unwrap_or(0);
        if l.has(flags::CODE_TAGGED) {
            code_addr &= !CODE_TAG_MASK;
        }
        let code = self.code(code_addr)?;
        // Byte offset of the current instruction and its address.
        let (offset, instr_addr) = match l.instr_kind() {
            kind @ (InstrKind::LastiBytes | InstrKind::LastiUnits) => {
                let lasti = i64::from(field_i32(head, l.frame_instr).unwrap_or(-1));
                let offset = if kind == InstrKind::LastiUnits {
                    2 * lasti
                } else {
                    lasti
                };
                let addr = code
                    .bytecode
                    .filter(|_| (0..MAX_CODE_BYTES).contains(&offset))
                    .map(|b| b.wrapping_add(offset as u64));
                (offset, addr)
            }
            InstrKind::Pointer => {
                let instr = field_u64(head, l.frame_instr).unwrap_or(0);
                let base = code_addr.wrapping_add(l.code_adaptive);
                let offset = instr.wrapping_sub(base) as i64;
                // prev_instr is one unit before the code before the first
                // instruction ran (3.11, 3.12).
                let offset = if instr < base { -1 } else { offset };
                // The pointer is a word of the frame: only an address inside
                // the code object's bytecode is one; anything else could be
                // memory contents, and a report never shows those.
                let inside = (0..MAX_CODE_BYTES).contains(&offset);
                (offset, inside.then_some(instr))
            }
        };
        let mut line = if offset < MAX_CODE_BYTES {
            line_for(
                l.linetable_kind(),
                &code.linetable,
                code.firstlineno,
                offset,
            )
        } else {
            None
        };
        // Past the copied part of a cut table: the function's first line
        // (or, for lnotab, the last line the part reached), marked so.
        let approximate = code.linetable_cut
            && offset >= 0
            && past_table(l.linetable_kind(), &code.linetable, offset);
        if approximate && line.is_none() {
            line = u32::try_from(code.firstlineno).ok();
        }
        let is_entry = match l.instr_kind() {
            InstrKind::LastiBytes | InstrKind::LastiUnits => true,
            InstrKind::Pointer if l.has(flags::ENTRY_FLAG) => {
                field_u8(head, l.frame_is_entry).is_some_and(|b| b != 0)
            }
            // Set by the caller when the next frame is a shim.
            InstrKind::Pointer => false,
        };
        Ok(PyFrame {
            code_addr,
            function: code.function.clone(),
            qualified_name: code.qualified_name.clone(),
            file: code.file.clone(),
            line,
            instr_addr,
            is_entry,
            approximate,
        })
    }

    /// The code object at `addr`, read once per walk.
    fn code(&mut self, addr: u64) -> Result<&Code, PyError> {
        if !self.codes.contains_key(&addr) {
            let code = self.read_code(addr)?;
            self.codes.insert(addr, code);
        }
        self.codes.get(&addr).ok_or(PyError::NotCode { addr })
    }

    fn read_code(&mut self, addr: u64) -> Result<Code, PyError> {
        let l = self.layout;
        check_ptr("code object", addr)?;
        let head = read_vec(self.mem, addr, l.code_read_size as usize)?;
        let ptr = |off: u64| {
            if off == ABSENT {
                None
            } else {
                field_u64(&head, off)
            }
        };
        let ob_type = ptr(l.object_type).unwrap_or(0);
        match self.code_type {
            Some(t) if t != ob_type => return Err(PyError::NotCode { addr }),
            Some(_) => {}
            None => {
                if !self.is_code_type(ob_type) {
                    return Err(PyError::NotCode { addr });
                }
                self.code_type = Some(ob_type);
            }
        }
        let function = self.string(ptr(l.code_name).unwrap_or(0), MAX_NAME_CHARS)?;
        let qualified_name = match ptr(l.code_qualname) {
            Some(q) => Some(self.string(q, MAX_NAME_CHARS)?),
            None => None,
        };
        let file = self.string(ptr(l.code_filename).unwrap_or(0), MAX_FILE_CHARS)?;
        let (_, linetable, linetable_cut) =
            self.bytes(ptr(l.code_linetable).unwrap_or(0), MAX_LINETABLE)?;
        let bytecode = match ptr(l.code_code) {
            Some(b) => Some(check_ptr("co_code", b)?.wrapping_add(l.bytes_data)),
            None => None,
        };
        Ok(Code {
            function,
            qualified_name,
            file,
            firstlineno: field_i32(&head, l.code_firstlineno).unwrap_or(0),
            linetable,
            linetable_cut,
            bytecode,
        })
    }

    /// Without a `PyCode_Type` symbol: a type named "code" is it.
    fn is_code_type(&self, ty: u64) -> bool {
        let Ok(ty) = check_ptr("type", ty) else {
            return false;
        };
        let Ok(name) = read_u64(self.mem, ty.wrapping_add(self.layout.type_name)) else {
            return false;
        };
        let mut buf = [0u8; 5];
        self.mem.read(name, &mut buf).is_ok() && &buf == b"code\0"
    }

    /// A compact `str` of at most `max_chars` characters.
    fn string(&self, addr: u64, max_chars: i64) -> Result<String, PyError> {
        let l = self.layout;
        let bad = PyError::BadString { addr };
        check_ptr("string", addr)?;
        // The PyASCIIObject header holds length and state; a shorter read
        // than the compact header, which an ASCII string does not have.
        let head = read_vec(self.mem, addr, l.unicode_ascii_data as usize)?;
        let len = field_u64(&head, l.unicode_length).ok_or(PyError::BadString { addr })? as i64;
        let state = field_i32(&head, l.unicode_state).ok_or(PyError::BadString { addr })? as u32;
        let kind = (state >> UNICODE_KIND_SHIFT) & 7;
        let ascii = state & UNICODE_ASCII_BIT != 0;
        if state & UNICODE_COMPACT_BIT == 0
            || !matches!(kind, 1 | 2 | 4)
            || (ascii && kind != 1)
            || !(0..=max_chars).contains(&len)
        {
            return Err(bad);
        }
        let data = addr.wrapping_add(if ascii {
            l.unicode_ascii_data
        } else {
            l.unicode_compact_data
        });
        let want = (len as usize) * kind as usize;
        // A copy cut short keeps its whole characters and says so.
        let have = self.mem.readable(data, want).min(want);
        let have = have - have % kind as usize;
        let raw = read_vec(self.mem, data, have)?;
        let mut text = decode(&raw, kind);
        if have < want {
            text.push('…');
        }
        Ok(text)
    }

    /// A `bytes` object of at most `max` bytes: its data address, data,
    /// and whether only the start of it could be read.
    fn bytes(&self, addr: u64, max: i64) -> Result<(u64, Vec<u8>, bool), PyError> {
        let l = self.layout;
        check_ptr("bytes", addr)?;
        let size = read_u64(self.mem, addr.wrapping_add(l.bytes_size))? as i64;
        if !(0..=max).contains(&size) {
            return Err(PyError::BadBytes { addr, size });
        }
        let data = addr.wrapping_add(l.bytes_data);
        let want = size as usize;
        let have = self.mem.readable(data, want).min(want);
        Ok((data, read_vec(self.mem, data, have)?, have < want))
    }
}

/// Whether byte offset `offset` lies past what `table` describes.
fn past_table(kind: LineTableKind, table: &[u8], offset: i64) -> bool {
    let covered: i64 = match kind {
        LineTableKind::Lnotab | LineTableKind::Lines310 => {
            table.chunks_exact(2).map(|p| i64::from(p[0])).sum()
        }
        // Entries start with a header byte `1cccclll` (length - 1 in code
        // units): a cut table counts its whole entries' lengths, which is
        // at least what it covers.
        LineTableKind::Locations => {
            return line_for(kind, table, 1, offset).is_none();
        }
    };
    offset >= covered
}

/// PEP 393 storage: 1 byte per char (latin-1), 2 (UCS-2) or 4 (UCS-4).
fn decode(raw: &[u8], kind: u32) -> String {
    match kind {
        1 => raw.iter().map(|&b| char::from(b)).collect(),
        2 => raw
            .chunks_exact(2)
            .map(|c| {
                let u = u16::from_le_bytes([c[0], c[1]]);
                char::from_u32(u32::from(u)).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
    }
}

#[cfg(test)]
#[path = "walk_tests.rs"]
mod tests;
