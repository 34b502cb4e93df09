//! The `.eh_frame`/`.debug_frame` FDE reader behind `Mapped::has_cfi_for`:
//! the address ranges a module's CFI covers.

use std::collections::HashMap;

/// Minimal CFI reader: framehop does not say whether a step used CFI, so
/// coverage comes from the FDE address ranges.
struct Rd<'a> {
    d: &'a [u8],
    pos: usize,
}

impl Rd<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.d.get(self.pos..self.pos.checked_add(N)?)?;
        self.pos += N;
        b.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes().map(u8::from_le_bytes)
    }

    fn word(&mut self, wide: bool) -> Option<u64> {
        match wide {
            true => self.bytes().map(u64::from_le_bytes),
            false => self.bytes().map(u32::from_le_bytes).map(u64::from),
        }
    }

    /// DWARF initial length and whether the record is 64-bit DWARF.
    fn length(&mut self) -> Option<(u64, bool)> {
        match self.word(false)? {
            0xffff_ffff => Some((self.word(true)?, true)),
            len => Some((len, false)),
        }
    }

    fn leb(&mut self, signed: bool) -> Option<u64> {
        let (mut v, mut shift) = (0u64, 0u32);
        loop {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            shift = shift.saturating_add(7);
            if b & 0x80 == 0 {
                let sign: u64 = if signed && b & 0x40 != 0 { !0 } else { 0 };
                return Some(v | sign.checked_shl(shift).unwrap_or(0));
            }
        }
    }

    /// A DW_EH_PE value in format `enc & 0x0f`, sign-extended.
    fn value(&mut self, enc: u8) -> Option<u64> {
        Some(match enc & 0x0f {
            0x00 | 0x04 | 0x0c => self.word(true)?,
            0x01 => self.leb(false)?,
            0x09 => self.leb(true)?,
            0x02 => u16::from_le_bytes(self.bytes()?).into(),
            0x03 => self.word(false)?,
            0x0a => i16::from_le_bytes(self.bytes()?) as u64,
            0x0b => i32::from_le_bytes(self.bytes()?) as u64,
            _ => return None,
        })
    }
}

/// `[start, end)` of every FDE in `.eh_frame` (`eh`, at `svma`) or
/// `.debug_frame`; `bases` are the .text and .got SVMAs.
pub(super) fn fde_ranges(d: &[u8], svma: u64, eh: bool, bases: (u64, u64)) -> Vec<(u64, u64)> {
    let (mut out, mut cies, mut pos) = (Vec::new(), HashMap::new(), 0);
    while let Some((next, range)) = cfi_record(d, pos, svma, eh, bases, &mut cies) {
        out.extend(range.filter(|r| r.0 < r.1));
        pos = next;
    }
    out.sort_unstable();
    out
}

/// The record at `pos`: where the next one starts, and its range if it is
/// an FDE we can read.
fn cfi_record(
    d: &[u8],
    pos: usize,
    svma: u64,
    eh: bool,
    bases: (u64, u64),
    cies: &mut HashMap<usize, Option<u8>>,
) -> Option<(usize, Option<(u64, u64)>)> {
    let mut r = Rd { d, pos };
    let (len, wide) = r.length()?;
    let next = (r.pos.checked_add(usize::try_from(len).ok()?)).filter(|&n| n <= d.len())?;
    if len == 0 {
        // .eh_frame ends at a zero terminator; .debug_frame may pad with them.
        return (!eh).then_some((next, None));
    }
    let id_pos = r.pos as u64;
    let id = r.word(wide)?;
    let cie_id = if wide { u64::MAX } else { 0xffff_ffff };
    let cie = match eh {
        true if id != 0 => id_pos.checked_sub(id),
        false if id != cie_id => Some(id),
        _ => return Some((next, None)),
    };
    let enc = (cie.and_then(|c| usize::try_from(c).ok()))
        .and_then(|c| *cies.entry(c).or_insert_with(|| cie_encoding(d, c, eh)));
    let range = enc.and_then(|enc| {
        let base = match enc & 0x70 {
            0x00 => 0,
            0x10 => svma.wrapping_add(r.pos as u64),
            0x20 => bases.0,
            0x30 => bases.1,
            _ => return None,
        };
        let start = base.wrapping_add(r.value(enc)?);
        Some((start, start.saturating_add(r.value(enc & 0x0f)?)))
    });
    Some((next, range))
}

/// The pointer encoding of the FDEs that use the CIE at `off`.
fn cie_encoding(d: &[u8], off: usize, eh: bool) -> Option<u8> {
    let mut r = Rd { d, pos: off };
    let wide = r.length()?.1;
    r.word(wide)?;
    let version = r.u8()?;
    let aug = d.get(r.pos..)?.split(|&b| b == 0).next()?;
    r.pos += aug.len() + 1;
    if !eh {
        // .debug_frame holds plain target addresses; v4 states their size.
        let size = if version >= 4 { r.u8()? } else { 8 };
        return match size {
            8 => Some(0x04),
            4 => Some(0x03),
            _ => None,
        };
    }
    let _code_align = r.leb(false)?;
    let _data_align = r.leb(true)?;
    let _ra_register = if version == 1 {
        r.u8().map(u64::from)
    } else {
        r.leb(false)
    }?;
    let Some(rest) = aug.strip_prefix(b"z") else {
        return aug.is_empty().then_some(0);
    };
    r.leb(false)?;
    for &c in rest {
        match c {
            b'R' => return r.u8(),
            b'L' => r.u8().map(|_| ())?,
            b'P' => r.u8().and_then(|enc| r.value(enc)).map(|_| ())?,
            b'S' | b'B' | b'G' => {}
            _ => return None,
        }
    }
    Some(0)
}
