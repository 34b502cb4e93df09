//! The layout of a 3.13+ interpreter, from its own `_Py_DebugOffsets`:
//! the first bytes of `_PyRuntime`, initialized data (so read from the ELF
//! file), giving the offsets of the fields out-of-process debuggers need.
//! Its own layout changes with each minor version; the three known ones
//! were read with `ptype /o struct _Py_DebugOffsets` from the DWARF of
//! pyenv's 3.13.0 and of Debian's python3.13 (3.13.18), python3.14
//! (3.14.10) and python3.15 (3.15.2) -dbg packages.

use super::layout::{ABSENT, InstrKind, LineTableKind, PyLayout, flags};

/// Where the fields the walk needs sit inside `_Py_DebugOffsets` of one
/// minor version (offsets into that struct, from its DWARF; see the module
/// comment).
struct DebugOffsetsMap {
    size: usize,
    interpreters_head: usize,
    interp_next: usize,
    threads_head: usize,
    imports_modules: usize,
    tstate_next: usize,
    tstate_interp: usize,
    current_frame: usize,
    thread_id: usize,
    native_thread_id: usize,
    frame_previous: usize,
    frame_executable: usize,
    frame_instr_ptr: usize,
    frame_owner: usize,
    code_filename: usize,
    code_name: usize,
    code_qualname: usize,
    code_linetable: usize,
    code_firstlineno: usize,
    code_adaptive: usize,
    ob_type: usize,
    tp_name: usize,
    bytes_size: usize,
    bytes_data: usize,
    unicode_state: usize,
    unicode_length: usize,
    unicode_ascii_size: usize,
    /// `compactunicodeobject_size`, from 3.15 on.
    unicode_compact_size: Option<usize>,
}

const DEBUG_3_13: DebugOffsetsMap = DebugOffsetsMap {
    size: 584,
    interpreters_head: 40,
    interp_next: 64,
    threads_head: 72,
    imports_modules: 88,
    tstate_next: 168,
    tstate_interp: 176,
    current_frame: 184,
    thread_id: 192,
    native_thread_id: 200,
    frame_previous: 232,
    frame_executable: 240,
    frame_instr_ptr: 248,
    frame_owner: 264,
    code_filename: 280,
    code_name: 288,
    code_qualname: 296,
    code_linetable: 304,
    code_firstlineno: 312,
    code_adaptive: 344,
    ob_type: 360,
    tp_name: 376,
    bytes_size: 520,
    bytes_data: 528,
    unicode_state: 544,
    unicode_length: 552,
    unicode_ascii_size: 560,
    unicode_compact_size: None,
};

/// 3.14 added sizes, `threads_main`, the code-object generation, frame
/// `stackpointer`/`tlbc_index`, `co_tlbc`, sets, generators, debugger support.
const DEBUG_3_14: DebugOffsetsMap = DebugOffsetsMap {
    size: 760,
    interpreters_head: 40,
    interp_next: 64,
    threads_head: 72,
    imports_modules: 96,
    tstate_next: 192,
    tstate_interp: 200,
    current_frame: 208,
    thread_id: 216,
    native_thread_id: 224,
    frame_previous: 256,
    frame_executable: 264,
    frame_instr_ptr: 272,
    frame_owner: 288,
    code_filename: 320,
    code_name: 328,
    code_qualname: 336,
    code_linetable: 344,
    code_firstlineno: 352,
    code_adaptive: 384,
    ob_type: 408,
    tp_name: 424,
    bytes_size: 600,
    bytes_data: 608,
    unicode_state: 624,
    unicode_length: 632,
    unicode_ascii_size: 640,
    unicode_compact_size: None,
};

/// 3.15 grew the thread state part (base frame, profiler fields, GIL
/// flags, exception state) and the type, unicode and gc parts.
const DEBUG_3_15: DebugOffsetsMap = DebugOffsetsMap {
    size: 888,
    interpreters_head: 40,
    interp_next: 64,
    threads_head: 72,
    imports_modules: 96,
    tstate_next: 192,
    tstate_interp: 200,
    current_frame: 208,
    thread_id: 240,
    native_thread_id: 248,
    frame_previous: 320,
    frame_executable: 328,
    frame_instr_ptr: 336,
    frame_owner: 352,
    code_filename: 384,
    code_name: 392,
    code_qualname: 400,
    code_linetable: 408,
    code_firstlineno: 416,
    code_adaptive: 448,
    ob_type: 472,
    tp_name: 488,
    bytes_size: 696,
    bytes_data: 704,
    unicode_state: 720,
    unicode_length: 728,
    unicode_ascii_size: 736,
    unicode_compact_size: Some(744),
};

/// `_Py_DebugOffsets.cookie`.
pub(crate) const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
/// Offsets of `version` and `free_threaded` in `_Py_DebugOffsets` (stable
/// since 3.13).
pub(crate) const DEBUG_VERSION_AT: usize = 8;
pub(crate) const DEBUG_FREE_THREADED_AT: usize = 16;

/// How many bytes of `_Py_DebugOffsets` `from_debug_offsets` needs for
/// `minor`, or `None` for a version without (or with an unknown) one.
pub(crate) fn debug_offsets_size(minor: u32) -> Option<usize> {
    debug_map(minor).map(|m| m.size)
}

fn debug_map(minor: u32) -> Option<&'static DebugOffsetsMap> {
    match minor {
        13 => Some(&DEBUG_3_13),
        14 => Some(&DEBUG_3_14),
        15 => Some(&DEBUG_3_15),
        _ => None,
    }
}

/// Builds the layout of a 3.13+ interpreter from its `_Py_DebugOffsets`
/// bytes (`raw`, at least `debug_offsets_size(minor)` long; cookie, version
/// and free-threading already checked by the caller). `Err` holds what is
/// wrong with them.
pub(crate) fn from_debug_offsets(minor: u32, raw: &[u8]) -> Result<PyLayout, String> {
    let map = debug_map(minor).ok_or_else(|| format!("no known layout for 3.{minor}"))?;
    if raw.len() < map.size {
        return Err(format!("{} bytes, {} needed", raw.len(), map.size));
    }
    let get = |at: usize| -> Result<u64, String> {
        let bytes: [u8; 8] = raw
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("field at {at} is out of bounds"))?;
        let v = u64::from_le_bytes(bytes);
        // Every offset here is into a struct of at most a few pages (the
        // interpreter state is the largest, ~10 KiB on 3.15).
        if v >= 1 << 20 {
            return Err(format!("implausible offset {v} at {at}"));
        }
        Ok(v)
    };
    let shim_owner_min = 3;
    let mut flags = flags::SHIM_OWNER;
    if minor >= 14 {
        flags |= flags::CODE_TAGGED;
    }
    let layout = PyLayout {
        flags,
        instr_kind: InstrKind::Pointer as u32,
        linetable_kind: LineTableKind::Locations as u32,
        shim_owner_min,
        runtime_interpreters_head: get(map.interpreters_head)?,
        interp_next: get(map.interp_next)?,
        interp_threads_head: get(map.threads_head)?,
        interp_modules: get(map.imports_modules)?,
        tstate_next: get(map.tstate_next)?,
        tstate_interp: get(map.tstate_interp)?,
        tstate_frame: get(map.current_frame)?,
        cframe_current_frame: ABSENT,
        tstate_thread_id: get(map.thread_id)?,
        tstate_native_thread_id: get(map.native_thread_id)?,
        frame_previous: get(map.frame_previous)?,
        frame_code: get(map.frame_executable)?,
        frame_instr: get(map.frame_instr_ptr)?,
        frame_owner: get(map.frame_owner)?,
        frame_is_entry: ABSENT,
        frame_read_size: 0,
        code_name: get(map.code_name)?,
        code_qualname: get(map.code_qualname)?,
        code_filename: get(map.code_filename)?,
        code_firstlineno: get(map.code_firstlineno)?,
        code_linetable: get(map.code_linetable)?,
        code_code: ABSENT,
        code_adaptive: get(map.code_adaptive)?,
        code_read_size: 0,
        object_type: get(map.ob_type)?,
        type_name: get(map.tp_name)?,
        bytes_size: get(map.bytes_size)?,
        bytes_data: get(map.bytes_data)?,
        unicode_length: get(map.unicode_length)?,
        unicode_state: get(map.unicode_state)?,
        unicode_ascii_data: get(map.unicode_ascii_size)?,
        // sizeof(PyCompactUnicodeObject) = PyASCIIObject + utf8_length +
        // utf8 pointer on 3.12–3.14 (Include/cpython/unicodeobject.h).
        unicode_compact_data: match map.unicode_compact_size {
            Some(at) => get(at)?,
            None => get(map.unicode_ascii_size)? + 16,
        },
    }
    .with_read_sizes();
    // The walk reads whole frame and code headers at once: keep them small.
    if layout.frame_read_size > 256 || layout.code_read_size > 512 {
        return Err("frame or code fields lie implausibly far".into());
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::layout::static_layout;

    /// The first bytes of `_PyRuntime` (its `.PyRuntime` section) of real
    /// builds, `_Py_DebugOffsets` and nothing more.
    fn fixture(hex: &str) -> Vec<u8> {
        let hex: String = hex.split_whitespace().collect();
        (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    fn debug_3_13() -> Vec<u8> {
        fixture(include_str!("testdata/debug_offsets_3.13.0-pyenv.hex"))
    }

    /// Expected values are the DWARF's (`print &((T *)0)->field`).
    #[test]
    fn debug_offsets_of_real_builds() {
        let l = from_debug_offsets(13, &debug_3_13()).unwrap();
        assert_eq!(&debug_3_13()[..8], DEBUG_COOKIE);
        assert_eq!(l.runtime_interpreters_head, 632);
        assert_eq!(l.interp_threads_head, 7344);
        assert_eq!(l.tstate_frame, 72);
        assert_eq!(l.tstate_native_thread_id, 160);
        assert_eq!(l.frame_instr, 56);
        assert_eq!(l.frame_owner, 70);
        assert_eq!(l.code_adaptive, 200);
        assert_eq!(l.unicode_compact_data, 56);
        assert_eq!(l.frame_read_size, 71);
        assert!(!l.has(flags::CODE_TAGGED));
        // The object headers did not move from 3.12.
        let v12 = static_layout(12).unwrap();
        assert_eq!(l.code_name, v12.code_name);
        assert_eq!(l.code_linetable, v12.code_linetable);
        assert_eq!(l.unicode_ascii_data, v12.unicode_ascii_data);

        let raw = fixture(include_str!("testdata/debug_offsets_3.14.10-debian.hex"));
        let l = from_debug_offsets(14, &raw).unwrap();
        assert_eq!(l.runtime_interpreters_head, 808);
        assert_eq!(l.interp_threads_head, 7344);
        assert_eq!(l.tstate_native_thread_id, 160);
        assert_eq!(l.frame_owner, 74);
        assert_eq!(l.code_adaptive, 208);
        assert_eq!(l.unicode_compact_data, 56);
        assert!(l.has(flags::CODE_TAGGED));

        let raw = fixture(include_str!("testdata/debug_offsets_3.15.2-debian.hex"));
        let l = from_debug_offsets(15, &raw).unwrap();
        assert_eq!(l.runtime_interpreters_head, 936);
        assert_eq!(l.interp_threads_head, 7336);
        assert_eq!(l.tstate_thread_id, 176);
        assert_eq!(l.tstate_native_thread_id, 184);
        assert_eq!(l.frame_owner, 74);
        assert_eq!(l.code_adaptive, 208);
        assert_eq!(l.unicode_compact_data, 56);
    }

    #[test]
    fn debug_offsets_reject_garbage() {
        let mut raw = debug_3_13();
        raw[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(from_debug_offsets(13, &raw).is_err());
        assert!(from_debug_offsets(13, &debug_3_13()[..100]).is_err());
        assert!(from_debug_offsets(16, &debug_3_13()).is_err());
        // 3.13's bytes read as 3.14's: too short.
        assert!(from_debug_offsets(14, &debug_3_13()).is_err());
    }
}
