//! Decode stage: raw ring-buffer records into typed events, checking every
//! length before anything is read.

use std::mem::size_of;

use faulthandler_common::{
    EVENT_EXEC, EVENT_EXIT, EVENT_FORK, EVENT_KILLED, EVENT_MMAP, EVENT_OOM, EVENT_SIGNAL,
    EVENT_VMAS, EventHeader, ExecEvent, ExitEvent, ProcEvent, STACK_MAX, SignalEvent, VmaEvent,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("event kind {kind} claims {len} bytes but the record holds {have}")]
    Length { kind: u32, len: u32, have: usize },
    #[error("unknown event kind {0}")]
    Kind(u32),
}

/// A signal event and the stack bytes that followed it.
#[derive(Clone, Debug)]
pub struct SignalCapture {
    pub event: SignalEvent,
    pub stack: Vec<u8>,
}

pub enum Event {
    Signal(Box<SignalCapture>),
    Exec(ExecEvent),
    Mmap(ProcEvent),
    Fork(ProcEvent),
    Exit(ExitEvent),
    Killed(ProcEvent),
    Oom(ProcEvent),
    Vmas(Box<VmaEvent>),
}

fn read<T: Copy>(bytes: &[u8]) -> T {
    debug_assert!(bytes.len() >= size_of::<T>());
    // SAFETY: the caller checked the length; T is a plain-integer repr(C)
    // type for which any bit pattern is valid.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let header: EventHeader = read(bytes);
    let need = |min: usize| {
        let len = header.len as usize;
        if len < min || len > bytes.len() {
            Err(DecodeError::Length {
                kind: header.kind,
                len: header.len,
                have: bytes.len(),
            })
        } else {
            Ok(len)
        }
    };
    match header.kind {
        EVENT_SIGNAL => {
            let len = need(size_of::<SignalEvent>())?;
            let event: SignalEvent = read(bytes);
            let stack_len = event.stack_len as usize;
            if stack_len > STACK_MAX || size_of::<SignalEvent>() + stack_len != len {
                return Err(DecodeError::Length {
                    kind: header.kind,
                    len: header.len,
                    have: bytes.len(),
                });
            }
            let stack = bytes[size_of::<SignalEvent>()..len].to_vec();
            Ok(Event::Signal(Box::new(SignalCapture { event, stack })))
        }
        EVENT_VMAS => {
            need(size_of::<VmaEvent>())?;
            Ok(Event::Vmas(Box::new(read(bytes))))
        }
        EVENT_EXEC => {
            need(size_of::<ExecEvent>())?;
            Ok(Event::Exec(read(bytes)))
        }
        EVENT_EXIT => {
            need(size_of::<ExitEvent>())?;
            Ok(Event::Exit(read(bytes)))
        }
        EVENT_MMAP | EVENT_FORK | EVENT_KILLED | EVENT_OOM => {
            need(size_of::<ProcEvent>())?;
            let ev: ProcEvent = read(bytes);
            Ok(match header.kind {
                EVENT_MMAP => Event::Mmap(ev),
                EVENT_FORK => Event::Fork(ev),
                EVENT_KILLED => Event::Killed(ev),
                _ => Event::Oom(ev),
            })
        }
        k => Err(DecodeError::Kind(k)),
    }
}

/// The bytes of a C string field up to its NUL.
pub fn c_str(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use faulthandler_common::{REG_SP, SignalRecord};

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: any initialized value can be viewed as its bytes.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
    }

    /// A record laid out exactly as the kernel writes it survives the trip.
    #[test]
    fn signal_round_trip() {
        // SAFETY: SignalRecord is plain integers; all-zero is valid.
        let mut rec: Box<SignalRecord> = unsafe { Box::new(std::mem::zeroed()) };
        rec.event.header = EventHeader {
            kind: EVENT_SIGNAL,
            len: (size_of::<SignalEvent>() + 24) as u32,
        };
        rec.event.pid = 42;
        rec.event.sig = 11;
        rec.event.addr = 0xdead;
        rec.event.regs[REG_SP] = 0x7fff_0000;
        rec.event.stack_len = 24;
        rec.event.comm[..4].copy_from_slice(b"prog");
        rec.stack[..24].copy_from_slice(&[7; 24]);
        let Event::Signal(s) = decode(as_bytes(&*rec)).unwrap() else {
            panic!("not a signal")
        };
        assert_eq!((s.event.pid, s.event.sig, s.event.addr), (42, 11, 0xdead));
        assert_eq!(s.stack, vec![7; 24]);
        assert_eq!(c_str(&s.event.comm), "prog");
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(decode(&[1, 0, 0]).err(), Some(DecodeError::Short(3)));
        // SAFETY: as above.
        let mut rec: Box<SignalRecord> = unsafe { Box::new(std::mem::zeroed()) };
        rec.event.header = EventHeader {
            kind: EVENT_SIGNAL,
            len: size_of::<SignalEvent>() as u32,
        };
        rec.event.stack_len = 8; // disagrees with header.len
        assert!(matches!(
            decode(as_bytes(&*rec)),
            Err(DecodeError::Length { .. })
        ));
        let short = &as_bytes(&*rec)[..100];
        assert!(matches!(decode(short), Err(DecodeError::Length { .. })));
        let ev = ProcEvent {
            header: EventHeader { kind: 99, len: 40 },
            ..Default::default()
        };
        assert_eq!(decode(as_bytes(&ev)).err(), Some(DecodeError::Kind(99)));
    }

    #[test]
    fn proc_event() {
        let ev = ProcEvent {
            header: EventHeader {
                kind: EVENT_FORK,
                len: size_of::<ProcEvent>() as u32,
            },
            pid: 5,
            arg: 6,
            ..Default::default()
        };
        let Event::Fork(f) = decode(as_bytes(&ev)).unwrap() else {
            panic!("not a fork")
        };
        assert_eq!((f.pid, f.arg), (5, 6));
    }
}
