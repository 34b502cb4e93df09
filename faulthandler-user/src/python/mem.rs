//! Reading another process's memory: the `Memory` trait the walk goes
//! through, a live implementation, and the typed reads built on it.

use std::io;

use super::PyError;

/// A source of the target's memory: the live process (`ProcMem`), or later
/// the regions the kernel copied at signal time.
pub(crate) trait Memory {
    /// Fills `buf` from `addr`, entirely or not at all (`PyError::Read`).
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError>;

    /// How many of the `len` bytes at `addr` can be read, when a source
    /// holds only the start of an object (the kernel copies names and line
    /// tables up to a cap). Live memory has it all: `len`.
    fn readable(&self, _addr: u64, len: usize) -> usize {
        len
    }
}

/// The live memory of a process, read with `process_vm_readv`: no ptrace
/// stop, the target runs on (so what we read may be torn).
pub(crate) struct ProcMem {
    pid: libc::pid_t,
}

impl ProcMem {
    pub(crate) fn new(pid: u32) -> Self {
        Self {
            pid: pid as libc::pid_t,
        }
    }
}

impl Memory for ProcMem {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), PyError> {
        let len = buf.len();
        let err = |source| PyError::Read { addr, len, source };
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we own mutably for the
        // call; the kernel checks `remote` against the target's mappings and
        // never writes outside `local`.
        let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(err(Some(io::Error::last_os_error())));
        }
        if n as usize != buf.len() {
            // A read crossing into an unmapped page stops short.
            return Err(err(None));
        }
        Ok(())
    }
}

/// Whether `addr` may point at a Python object: in user space, 8-aligned.
pub(crate) use faulthandler_common::py_plausible as plausible;

/// Checks `addr` with `plausible`, naming it in the error.
pub(crate) fn check_ptr(what: &'static str, addr: u64) -> Result<u64, PyError> {
    if plausible(addr) {
        Ok(addr)
    } else {
        Err(PyError::BadPointer { what, addr })
    }
}

pub(crate) fn read_u64(mem: &dyn Memory, addr: u64) -> Result<u64, PyError> {
    let mut b = [0u8; 8];
    mem.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// A little-endian field of `buf` (a header read in one go); `None` when
/// the layout puts it outside `buf`.
pub(crate) fn field_u64(buf: &[u8], off: u64) -> Option<u64> {
    let off = usize::try_from(off).ok()?;
    let b = buf.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

pub(crate) fn field_i32(buf: &[u8], off: u64) -> Option<i32> {
    let off = usize::try_from(off).ok()?;
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(i32::from_le_bytes(b.try_into().ok()?))
}

pub(crate) fn field_u8(buf: &[u8], off: u64) -> Option<u8> {
    buf.get(usize::try_from(off).ok()?).copied()
}

/// Reads `len` bytes at `addr` into a new buffer.
pub(crate) fn read_vec(mem: &dyn Memory, addr: u64, len: usize) -> Result<Vec<u8>, PyError> {
    let mut buf = vec![0u8; len];
    mem.read(addr, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let data: [u8; 5] = [1, 2, 3, 4, 5];
        let mem = ProcMem::new(std::process::id());
        let mut buf = [0u8; 5];
        mem.read(data.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
        assert!(matches!(
            mem.read(0, &mut buf),
            Err(PyError::Read {
                addr: 0,
                len: 5,
                ..
            })
        ));
    }

    #[test]
    fn fields_out_of_bounds_are_none() {
        let buf = [0xffu8; 12];
        assert_eq!(field_u64(&buf, 4), Some(u64::MAX));
        assert_eq!(field_u64(&buf, 5), None);
        assert_eq!(field_u64(&buf, u64::MAX), None);
        assert_eq!(field_i32(&buf, 8), Some(-1));
        assert_eq!(field_u8(&buf, 12), None);
    }

    #[test]
    fn plausible_pointers() {
        assert!(plausible(0x5555_5555_0000));
        assert!(!plausible(0));
        assert!(!plausible(0x5555_5555_0001));
        assert!(!plausible(0xffff_8000_0000_0000));
    }
}
