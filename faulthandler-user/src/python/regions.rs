//! The memory the kernel copied at signal time (`EVENT_PYSTACK`), as a
//! `Memory`: the walker reads a crashed thread's frames from it exactly as
//! it reads a live process, and a read of anything not copied fails as a
//! read of unmapped memory would.

use faulthandler_common::PyRegion;

use super::PyError;
use super::mem::Memory;

/// Copied ranges of one thread's memory.
#[derive(Debug, Default)]
pub(crate) struct RegionMem {
    /// (address, bytes), sorted by address; ranges may overlap.
    regions: Vec<(u64, Vec<u8>)>,
}

const HEADER: usize = size_of::<PyRegion>();

impl RegionMem {
    /// Parses `nregions` regions from a record's bytes after its header;
    /// a record cut short keeps the regions before the cut.
    pub(crate) fn parse(raw: &[u8], nregions: u32) -> Self {
        let mut regions = Vec::new();
        let mut at = 0usize;
        for _ in 0..nregions {
            let Some(h) = raw.get(at..at + HEADER) else {
                break;
            };
            let addr = u64::from_le_bytes(h[..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default()) as usize;
            let start = at + HEADER;
            let Some(bytes) = raw.get(start..start.saturating_add(len)) else {
                break;
            };
            regions.push((addr, bytes.to_vec()));
            at = (start + len).next_multiple_of(8);
        }
        regions.sort_by_key(|r| r.0);
        Self { regions }
    }

    /// The longest run of bytes from `addr` one region holds.
    fn longest_from(&self, addr: u64) -> Option<&[u8]> {
        let end = self.regions.partition_point(|r| r.0 <= addr);
        self.regions[..end]
            .iter()
            .filter_map(|(start, bytes)| {
                let off = usize::try_from(addr - start).ok()?;
                bytes.get(off..)
            })
            .max_by_key(|b| b.len())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.regions.len()
    }
}

impl Memory for RegionMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        match self.longest_from(addr) {
            Some(b) if b.len() >= buf.len() => {
                buf.copy_from_slice(&b[..buf.len()]);
                Ok(())
            }
            _ => Err(PyError::Read {
                addr,
                len: buf.len(),
                source: None,
            }),
        }
    }

    fn readable(&self, addr: u64, len: usize) -> usize {
        self.longest_from(addr).map_or(0, |b| b.len().min(len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(regions: &[(u64, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (addr, bytes) in regions {
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out
    }

    #[test]
    fn reads_inside_regions_only() {
        let raw = record(&[(0x2000, &[1, 2, 3]), (0x1000, &[9; 10])]);
        let m = RegionMem::parse(&raw, 2);
        assert_eq!(m.len(), 2);
        let mut b = [0u8; 2];
        m.read(0x2001, &mut b).unwrap();
        assert_eq!(b, [2, 3]);
        assert!(m.read(0x2002, &mut b).is_err(), "runs past the region");
        assert!(m.read(0x0fff, &mut b).is_err());
        assert_eq!(m.readable(0x1004, 100), 6);
        assert_eq!(m.readable(0x3000, 4), 0);
    }

    #[test]
    fn overlapping_and_cut_records() {
        let raw = record(&[(0x1000, &[1; 4]), (0x1000, &[2; 16])]);
        let m = RegionMem::parse(&raw, 2);
        let mut b = [0u8; 12];
        m.read(0x1002, &mut b).unwrap();
        assert_eq!(b, [2; 12]);
        // Claims more regions than it holds, the last one cut short.
        let m = RegionMem::parse(&raw[..raw.len() - 4], 5);
        assert_eq!(m.len(), 1);
        assert!(RegionMem::parse(&[1, 2, 3], 1).len() == 0);
    }
}
