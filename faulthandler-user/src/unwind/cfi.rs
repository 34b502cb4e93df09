//! What a module's CFI covers, read with gimli: the address ranges of its
//! FDEs (framehop does not say whether a step used CFI, and silently falls
//! back to frame pointers outside them) and which of them are signal
//! trampolines (a CIE with the `S` augmentation, as glibc gives
//! `__restore_rt`).

use std::collections::HashMap;

use gimli::{
    BaseAddresses, CieOrFde, CommonInformationEntry, DebugFrame, EhFrame, LittleEndian,
    UnwindSection,
};

/// Sorted `[start, end)` SVMAs.
pub(super) type Ranges = Vec<(u64, u64)>;

#[derive(Default)]
pub(super) struct Coverage {
    pub(super) fdes: Ranges,
    pub(super) trampolines: Ranges,
}

impl Coverage {
    /// Total bytes of code covered, to choose between .eh_frame and
    /// .debug_frame.
    pub(super) fn span(&self) -> u64 {
        (self.fdes.iter()).fold(0, |n, r| n.saturating_add(r.1 - r.0))
    }

    /// Approximate heap bytes, for the cache budget.
    pub(super) fn heap_bytes(&self) -> u64 {
        ((self.fdes.len() + self.trampolines.len()) * size_of::<(u64, u64)>()) as u64
    }
}

pub(super) fn contains(ranges: &[(u64, u64)], svma: u64) -> bool {
    let i = ranges.partition_point(|r| r.0 <= svma);
    i > 0 && svma < ranges[i - 1].1
}

/// SVMAs of the sections FDE pointers may be relative to.
#[derive(Clone, Copy, Default)]
pub(super) struct Bases {
    pub(super) text: u64,
    pub(super) got: u64,
}

/// The FDEs of `.eh_frame` (`data` loaded at `svma`).
pub(super) fn eh_frame(data: &[u8], svma: u64, bases: Bases) -> Coverage {
    let mut section = EhFrame::new(data, LittleEndian);
    section.set_address_size(8);
    let bases = BaseAddresses::default()
        .set_eh_frame(svma)
        .set_text(bases.text)
        .set_got(bases.got);
    coverage(&section, &bases)
}

/// The FDEs of `.debug_frame`, which holds plain addresses.
pub(super) fn debug_frame(data: &[u8]) -> Coverage {
    let mut section = DebugFrame::new(data, LittleEndian);
    section.set_address_size(8);
    coverage(&section, &BaseAddresses::default())
}

type Slice<'a> = gimli::EndianSlice<'a, LittleEndian>;

fn coverage<'a, S: UnwindSection<Slice<'a>>>(section: &S, bases: &BaseAddresses) -> Coverage
where
    S::Offset: std::hash::Hash,
{
    type Cie<'a> = Result<CommonInformationEntry<Slice<'a>>, gimli::Error>;
    let mut cies: HashMap<S::Offset, Cie<'a>> = HashMap::new();
    let mut out = Coverage::default();
    let mut entries = section.entries(bases);
    // A malformed entry ends the walk: its length cannot be trusted to find
    // the next one. What was read so far stays.
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        // Many FDEs share a few CIEs: parse each once.
        let fde = partial.parse(|s, b, off| {
            (cies.entry(off))
                .or_insert_with(|| s.cie_from_offset(b, off))
                .clone()
        });
        let Ok(fde) = fde else { continue };
        let range = (fde.initial_address(), fde.end_address());
        if range.0 < range.1 {
            out.fdes.push(range);
            if fde.is_signal_trampoline() {
                out.trampolines.push(range);
            }
        }
    }
    out.fdes.sort_unstable();
    out.trampolines.sort_unstable();
    out
}
