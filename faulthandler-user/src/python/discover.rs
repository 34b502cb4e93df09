//! Finding the CPython interpreter in a process from its mapped ELF files:
//! which file holds `_PyRuntime`, where it is loaded, which version it is
//! and so which layout to read it with. Only files are read here, never the
//! process's memory: `_PyRuntime`'s `_Py_DebugOffsets` (3.13+) and
//! `Py_Version` (3.11+) are initialized data, the same in the file.

use std::fs::File;
use std::path::Path;

use object::read::elf::{ElfFile64, ProgramHeader as _, SectionHeader as _, Sym as _};
use object::{Endianness, Object as _, ObjectSection as _, ReadCache, ReadRef};

use super::PyError;
use super::debug_offsets;
use super::layout::{self, PyLayout};
use crate::modules::Module;

/// The oldest and newest minor versions of CPython 3 read here.
pub(crate) const MIN_MINOR: u32 = 8;
pub(crate) const MAX_MINOR: u32 = 15;

/// One executable mapping of an ELF file, as the process has it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MappedElf<'a> {
    /// Where this process can open the file (`/proc/PID/map_files/...`,
    /// `/proc/PID/root/...`, a held fd).
    pub open_path: &'a Path,
    /// The path as the target sees it (for the version in a file name).
    pub name: &'a str,
    pub start: u64,
    pub file_offset: u64,
}

impl<'a> From<&'a Module> for MappedElf<'a> {
    fn from(m: &'a Module) -> Self {
        Self {
            open_path: &m.open_path,
            name: &m.name,
            start: m.start,
            file_offset: m.file_offset,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PyVersion {
    pub major: u32,
    pub minor: u32,
    /// `PY_VERSION_HEX` when the file has it (3.11+), else `None`.
    pub hex: Option<u32>,
}

/// A process's interpreter, ready to walk.
#[derive(Clone, Debug)]
pub(crate) struct PyTarget {
    /// Address of `_PyRuntime` in the process.
    pub runtime_addr: u64,
    pub version: PyVersion,
    pub layout: PyLayout,
    /// Address of `PyCode_Type` in the process, when the file names it;
    /// else the walk learns it from the first code object.
    pub code_type_addr: Option<u64>,
}

/// Finds the interpreter among `modules` (a process's executable mappings).
/// Files whose name says "python" are tried first; the first with a
/// `_PyRuntime` decides: its errors (an unsupported version, a
/// free-threaded build, no version) are the answer.
#[cfg(test)]
pub(crate) fn discover<'a>(
    modules: impl IntoIterator<Item = MappedElf<'a>>,
) -> Result<PyTarget, PyError> {
    discover_with(modules, probe)
}

/// `discover` with the probe of one mapped file given (a cached one).
pub(crate) fn discover_with<'a>(
    modules: impl IntoIterator<Item = MappedElf<'a>>,
    mut probe: impl FnMut(MappedElf<'a>) -> Result<Option<PyTarget>, PyError>,
) -> Result<PyTarget, PyError> {
    let mut seen: Vec<&Path> = Vec::new();
    let mut candidates: Vec<MappedElf<'a>> = Vec::new();
    for m in modules {
        // One file is mapped several times; its first exec mapping serves.
        if seen.contains(&m.open_path) || candidates.iter().any(|c| c.name == m.name) {
            continue;
        }
        seen.push(m.open_path);
        candidates.push(m);
    }
    let named_python = |m: &MappedElf<'_>| file_name(m.name).contains("python");
    candidates.sort_by_key(|m| !named_python(m));
    for m in candidates {
        if let Some(found) = probe(m)? {
            return Ok(found);
        }
    }
    Err(PyError::NotPython)
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// What a file says about the interpreter it holds, wherever it is
/// mapped: cached per file, since probing reads its symbol tables.
#[derive(Clone, Debug)]
pub(crate) struct FileInterp {
    runtime_vaddr: u64,
    code_type_vaddr: Option<u64>,
    version: PyVersion,
    layout: PyLayout,
    loads: Vec<Load>,
}

impl FileInterp {
    /// The interpreter as the process that maps `m` has it.
    pub(crate) fn target(&self, m: MappedElf<'_>) -> Result<PyTarget, PyError> {
        let bias = load_bias(&self.loads, m.start, m.file_offset).ok_or_else(|| PyError::Elf {
            path: m.name.to_string(),
            what: "no PT_LOAD segment holds the mapping".to_string(),
        })?;
        Ok(PyTarget {
            runtime_addr: self.runtime_vaddr.wrapping_add(bias),
            version: self.version,
            layout: self.layout,
            code_type_addr: self.code_type_vaddr.map(|a| a.wrapping_add(bias)),
        })
    }
}

/// `Ok(None)`: not an interpreter (or not a readable ELF at all: a file we
/// cannot parse is nobody's `_PyRuntime`).
#[cfg(test)]
fn probe(m: MappedElf<'_>) -> Result<Option<PyTarget>, PyError> {
    probe_file(m.open_path, m.name)?
        .map(|f| f.target(m))
        .transpose()
}

/// Reads `open_path` (named `name` in the process) for a CPython runtime.
pub(crate) fn probe_file(open_path: &Path, name: &str) -> Result<Option<FileInterp>, PyError> {
    let Ok(file) = File::open(open_path) else {
        return Ok(None);
    };
    let cache = ReadCache::new(file);
    let Ok(elf) = ElfFile64::<Endianness, _>::parse(&cache) else {
        return Ok(None);
    };
    let syms = Symbols::find(&elf);
    let runtime_vaddr = match syms.runtime {
        Some(a) => a,
        None => match elf.section_by_name(".PyRuntime") {
            Some(s) => s.address(),
            None => return Ok(None),
        },
    };
    let endian = elf.endian();
    let loads: Vec<Load> = elf
        .elf_program_headers()
        .iter()
        .filter(|ph| ph.p_type(endian) == object::elf::PT_LOAD)
        .map(|ph| Load {
            vaddr: ph.p_vaddr(endian),
            offset: ph.p_offset(endian),
            filesz: ph.p_filesz(endian),
            memsz: ph.p_memsz(endian),
            exec: ph.p_flags(endian) & object::elf::PF_X != 0,
        })
        .collect();
    let read = |vaddr: u64, len: usize| file_bytes(&cache, &loads, vaddr, len);

    // `_Py_DebugOffsets` starts `_PyRuntime` on 3.13+; its cookie is
    // checked before anything else is believed.
    let head = read(runtime_vaddr, debug_offsets::DEBUG_FREE_THREADED_AT + 8);
    let debug = head.as_deref().and_then(|h| {
        if !h.starts_with(debug_offsets::DEBUG_COOKIE) {
            return None;
        }
        let at = |o: usize| h.get(o..o + 8)?.try_into().ok().map(u64::from_le_bytes);
        Some((
            at(debug_offsets::DEBUG_VERSION_AT)?,
            at(debug_offsets::DEBUG_FREE_THREADED_AT)?,
        ))
    });
    let py_version = syms
        .py_version
        .and_then(|v| read(v, 4))
        .and_then(|b| Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)));
    let version = version_of(name, py_version, debug.map(|(v, _)| v as u32))?;
    let (major, minor) = (version.major, version.minor);
    if major != 3 || !(MIN_MINOR..=MAX_MINOR).contains(&minor) {
        return Err(PyError::UnsupportedVersion { major, minor });
    }
    let debug_err = |what: &str| PyError::DebugOffsets {
        path: name.to_string(),
        what: what.to_string(),
    };
    let layout = match layout::static_layout(minor) {
        Some(l) => l,
        None => {
            let Some((_, free_threaded)) = debug else {
                return Err(debug_err(
                    "no \"xdebugpy\" cookie at the start of _PyRuntime",
                ));
            };
            if free_threaded != 0 {
                return Err(PyError::FreeThreaded { major, minor });
            }
            let size = debug_offsets::debug_offsets_size(minor)
                .ok_or(PyError::UnsupportedVersion { major, minor })?;
            let raw = read(runtime_vaddr, size).ok_or_else(|| debug_err("not in the file"))?;
            debug_offsets::from_debug_offsets(minor, &raw).map_err(|e| debug_err(&e))?
        }
    };
    Ok(Some(FileInterp {
        runtime_vaddr,
        code_type_vaddr: syms.code_type,
        version,
        layout,
        loads,
    }))
}

/// The version from, in order of trust: `_Py_DebugOffsets.version`,
/// `Py_Version`, then a `python3.N` in the file's name (3.8–3.10 have
/// neither symbol). The two symbols must agree when both exist.
fn version_of(
    name: &str,
    py_version: Option<u32>,
    debug_version: Option<u32>,
) -> Result<PyVersion, PyError> {
    let split = |hex: u32| PyVersion {
        major: hex >> 24,
        minor: (hex >> 16) & 0xff,
        hex: Some(hex),
    };
    match (debug_version.map(split), py_version.map(split)) {
        (Some(d), Some(p)) if (d.major, d.minor) != (p.major, p.minor) => {
            Err(PyError::DebugOffsets {
                path: name.to_string(),
                what: format!(
                    "they say {}.{} but Py_Version says {}.{}",
                    d.major, d.minor, p.major, p.minor
                ),
            })
        }
        (Some(v), _) | (None, Some(v)) => Ok(v),
        (None, None) => version_from_name(file_name(name)).ok_or_else(|| PyError::NoVersion {
            path: name.to_string(),
        }),
    }
}

/// `libpython3.9.so.1.0`, `python3.10`, `libpython3.8d.so` → 3.N.
pub(crate) fn version_from_name(name: &str) -> Option<PyVersion> {
    let rest = &name[name.find("python")? + "python".len()..];
    let (major, rest) = rest.split_once('.')?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    Some(PyVersion {
        major: major.parse().ok()?,
        minor: rest[..digits].parse().ok()?,
        hex: None,
    })
}

/// The defined symbols discovery needs, from `.dynsym` and else `.symtab`.
#[derive(Default)]
struct Symbols {
    runtime: Option<u64>,
    py_version: Option<u64>,
    code_type: Option<u64>,
}

impl Symbols {
    fn find<'d, R: ReadRef<'d>>(elf: &ElfFile64<'d, Endianness, R>) -> Self {
        let mut s = Symbols::default();
        // Debian strips .symtab but exports these in .dynsym; pyenv's
        // libpython has both. .symtab (large) only when .dynsym has no
        // runtime: 3.8–3.10 have no Py_Version, and it is exported where
        // it exists.
        s.scan(elf, object::elf::SHT_DYNSYM);
        if s.runtime.is_none() {
            s.scan(elf, object::elf::SHT_SYMTAB);
        }
        s
    }

    /// One symbol table, read whole with its string table (two reads: a
    /// name at a time through a file cache would be a read per symbol).
    fn scan<'d, R: ReadRef<'d>>(&mut self, elf: &ElfFile64<'d, Endianness, R>, kind: u32) {
        let endian = elf.endian();
        let data = elf.data();
        let sections = elf.elf_section_table();
        let Some(table) = sections.iter().find(|sh| sh.sh_type(endian) == kind) else {
            return;
        };
        let Ok(strtab) = sections.section(object::SectionIndex(table.sh_link(endian) as usize))
        else {
            return;
        };
        let (Ok(raw), Ok(names)) = (table.data(endian, data), strtab.data(endian, data)) else {
            return;
        };
        let Ok((syms, _)) = object::pod::slice_from_bytes::<object::elf::Sym64<Endianness>>(
            raw,
            raw.len() / size_of::<object::elf::Sym64<Endianness>>(),
        ) else {
            return;
        };
        for sym in syms {
            if sym.st_shndx(endian) == object::elf::SHN_UNDEF {
                continue;
            }
            let Some(name) = names.get(sym.st_name(endian) as usize..) else {
                continue;
            };
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            let slot = match name {
                b"_PyRuntime" => &mut self.runtime,
                b"Py_Version" => &mut self.py_version,
                b"PyCode_Type" => &mut self.code_type,
                _ => continue,
            };
            slot.get_or_insert(sym.st_value(endian));
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Load {
    vaddr: u64,
    offset: u64,
    filesz: u64,
    memsz: u64,
    exec: bool,
}

const PAGE: u64 = 4096;

/// The load bias of a file mapped at `start` from `file_offset`: 0 for a
/// non-PIE executable, the base address for PIE executables and libraries.
fn load_bias(loads: &[Load], start: u64, file_offset: u64) -> Option<u64> {
    // The kernel maps whole pages: a mapping may begin up to a page before
    // its segment's first byte. Prefer PF_X, as the mappings given are code.
    let holds = |l: &&Load| {
        l.offset & !(PAGE - 1) <= file_offset && file_offset < l.offset.saturating_add(l.filesz)
    };
    let mut held = loads.iter().filter(holds);
    let l = held.clone().find(|l| l.exec).or(held.next())?;
    // p_vaddr ≡ p_offset (mod page): the same difference holds for every
    // byte of the mapping, rounded head included.
    let svma = l.vaddr.wrapping_sub(l.offset).wrapping_add(file_offset);
    Some(start.wrapping_sub(svma))
}

/// `len` bytes of the file's image at `vaddr`: from the file, or zeros
/// where the segment is zero-filled (.bss). `None` outside every segment.
fn file_bytes<'d, R: ReadRef<'d>>(
    data: R,
    loads: &[Load],
    vaddr: u64,
    len: usize,
) -> Option<Vec<u8>> {
    let l = loads
        .iter()
        .find(|l| l.vaddr <= vaddr && vaddr < l.vaddr.saturating_add(l.memsz))?;
    let rel = vaddr - l.vaddr;
    let end = rel.checked_add(len as u64)?;
    if end > l.memsz {
        return None;
    }
    let mut out = vec![0u8; len];
    if rel < l.filesz {
        let n = (l.filesz - rel).min(len as u64);
        let bytes = data.read_bytes_at(l.offset + rel, n).ok()?;
        out[..bytes.len()].copy_from_slice(bytes);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_names() {
        let v = |n| version_from_name(n).map(|v| (v.major, v.minor));
        assert_eq!(v("libpython3.9.so.1.0"), Some((3, 9)));
        assert_eq!(v("python3.10"), Some((3, 10)));
        assert_eq!(v("libpython3.8d.so"), Some((3, 8)));
        assert_eq!(v("python3"), None);
        assert_eq!(v("bash"), None);
    }

    #[test]
    fn symbols_must_agree() {
        assert!(version_of("x", Some(0x030d00f0), Some(0x030d00f0)).is_ok());
        assert!(matches!(
            version_of("x", Some(0x030c00f0), Some(0x030d00f0)),
            Err(PyError::DebugOffsets { .. })
        ));
        let v = version_of("/usr/lib/libpython3.9.so.1.0", None, None).unwrap();
        assert_eq!((v.major, v.minor, v.hex), (3, 9, None));
        assert!(matches!(
            version_of("/usr/bin/python3", None, None),
            Err(PyError::NoVersion { .. })
        ));
    }

    #[test]
    fn bias_of_pie_and_non_pie() {
        let loads = [
            Load {
                vaddr: 0,
                offset: 0,
                filesz: 0x1000,
                memsz: 0x1000,
                exec: false,
            },
            Load {
                vaddr: 0x1000,
                offset: 0x1000,
                filesz: 0x5000,
                memsz: 0x5000,
                exec: true,
            },
        ];
        assert_eq!(
            load_bias(&loads, 0x7f00_0000_1000, 0x1000),
            Some(0x7f00_0000_0000)
        );
        let exec = [Load {
            vaddr: 0x401000,
            offset: 0x1000,
            filesz: 0x5000,
            memsz: 0x5000,
            exec: true,
        }];
        assert_eq!(load_bias(&exec, 0x401000, 0x1000), Some(0));
        assert_eq!(load_bias(&exec, 0x401000, 0x9000), None);
    }

    #[test]
    fn bss_reads_as_zeros() {
        let loads = [Load {
            vaddr: 0x1000,
            offset: 0,
            filesz: 4,
            memsz: 0x100,
            exec: false,
        }];
        let data: &[u8] = &[1, 2, 3, 4];
        assert_eq!(file_bytes(data, &loads, 0x1002, 4), Some(vec![3, 4, 0, 0]));
        assert_eq!(file_bytes(data, &loads, 0x10fe, 4), None);
        assert_eq!(file_bytes(data, &loads, 0x0, 4), None);
    }
}
