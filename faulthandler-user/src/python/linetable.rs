//! Instruction offset → source line, for the three line table formats of
//! CPython 3.8–3.15. Pure functions over the table's bytes, which may come
//! from torn memory: every loop is bounded by the table's length and bad
//! bytes give a wrong or no line, never a panic.

use super::layout::LineTableKind;

/// The line of the instruction at byte offset `offset` into the bytecode,
/// or `None` where the table says the instruction has no line (or the
/// table ends before it). A negative `offset` (a frame that has not run
/// its first instruction) is the first line, as in `PyCode_Addr2Line`.
pub(crate) fn line_for(
    kind: LineTableKind,
    table: &[u8],
    firstlineno: i32,
    offset: i64,
) -> Option<u32> {
    if offset < 0 {
        return u32::try_from(firstlineno).ok();
    }
    let line = match kind {
        LineTableKind::Lnotab => lnotab(table, firstlineno, offset),
        LineTableKind::Lines310 => lines_310(table, firstlineno, offset),
        LineTableKind::Locations => locations(table, firstlineno, offset),
    }?;
    u32::try_from(line).ok().filter(|&l| l > 0)
}

/// `co_lnotab` (3.8, 3.9): (unsigned byte increment, signed line
/// increment) pairs; the line of `offset` is the sum of the line
/// increments of the pairs whose address is at most `offset`
/// (Objects/codeobject.c `PyCode_Addr2Line`, Objects/lnotab_notes.txt).
fn lnotab(table: &[u8], firstlineno: i32, offset: i64) -> Option<i64> {
    let mut line = i64::from(firstlineno);
    let mut addr: i64 = 0;
    for pair in table.chunks_exact(2) {
        addr += i64::from(pair[0]);
        if addr > offset {
            break;
        }
        line += i64::from(pair[1] as i8);
    }
    Some(line)
}

/// `co_linetable` of 3.10: (unsigned byte length, signed line delta) per
/// address range, a delta of -128 meaning "no line"
/// (Objects/codeobject.c `PyLineTable_NextAddressRange`, `advance`).
fn lines_310(table: &[u8], firstlineno: i32, offset: i64) -> Option<i64> {
    let mut line = i64::from(firstlineno);
    let mut end: i64 = 0;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += i64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            Some(line)
        };
        if start <= offset && offset < end {
            return this;
        }
    }
    None
}

/// The location table of 3.11+ (Objects/locations.md): entries of one
/// header byte `1cccclll` (code, length-1 in code units) and then
/// code-dependent varints; only the line is decoded.
fn locations(table: &[u8], firstlineno: i32, offset: i64) -> Option<i64> {
    let unit = offset / 2;
    let mut line = i64::from(firstlineno);
    let mut addr: i64 = 0;
    let mut r = Reader { table, at: 0 };
    while let Some(head) = r.byte() {
        if head & 0x80 == 0 {
            // Not at an entry start: the table is corrupt.
            return None;
        }
        let code = (head >> 3) & 15;
        let len = i64::from(head & 7) + 1;
        let this = match code {
            // No location.
            15 => None,
            // Long form: line delta, end-line delta, column, end column.
            14 => {
                line = line.checked_add(r.svarint()?)?;
                r.varint()?;
                r.varint()?;
                r.varint()?;
                Some(line)
            }
            // No columns: line delta only.
            13 => {
                line = line.checked_add(r.svarint()?)?;
                Some(line)
            }
            // One line, delta 0..=2, then column and end column bytes.
            10..=12 => {
                line += i64::from(code - 10);
                r.byte()?;
                r.byte()?;
                Some(line)
            }
            // Short form: same line, one column byte.
            _ => {
                r.byte()?;
                Some(line)
            }
        };
        if addr <= unit && unit < addr + len {
            return this;
        }
        addr += len;
    }
    None
}

struct Reader<'a> {
    table: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.table.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// 6-bit groups, least significant first, bit 6 = more follow.
    fn varint(&mut self) -> Option<i64> {
        let mut v: i64 = 0;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > 42 {
                return None;
            }
            v |= i64::from(b & 63) << shift;
            shift += 6;
            if b & 64 == 0 {
                return Some(v);
            }
        }
    }

    /// Zig-zag-like: the low bit is the sign.
    fn svarint(&mut self) -> Option<i64> {
        let u = self.varint()?;
        Some(if u & 1 != 0 { -(u >> 1) } else { u >> 1 })
    }
}

#[cfg(test)]
#[path = "linetable_tests.rs"]
mod tests;
