//! A deliberately small reader for the kernel's raw BTF (Documentation/bpf/btf.rst).
//!
//! Rust eBPF has no CO-RE relocations, so the loader looks up the kernel struct
//! offsets the probes need and hands them over in `Config`. Only struct/union
//! layouts are kept; every other kind is skipped by its size.

use std::collections::HashMap;
use std::io;

use faulthandler_common::KernelOffsets;

pub const SYS_FS_PATH: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;

const KIND_INT: u8 = 1;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_PTR: u8 = 2;
const KIND_TYPEDEF: u8 = 8;
const KIND_FUNC_PROTO: u8 = 13;
/// typedef, volatile, const, restrict, type_tag: no layout of their own.
const MODIFIERS: [u8; 5] = [8, 9, 10, 11, 18];

// Real kernels nest a few levels at most; the cap only stops crafted or
// corrupt input (a typedef cycle, say) from looping forever.
const MAX_DEPTH: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "kernel BTF not found at {SYS_FS_PATH}: rfh-trace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    NotFound(#[source] io::Error),
    #[error("cannot read kernel BTF at {SYS_FS_PATH}")]
    Read(#[source] io::Error),
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("struct {name} not found in kernel BTF")]
    StructNotFound { name: String },
    #[error("struct {struct_name} has no member '{member}' in kernel BTF")]
    MemberNotFound { struct_name: String, member: String },
    #[error(
        "cannot walk into '{member}' of struct {struct_name}: it is not an embedded struct or union"
    )]
    NotEmbedded { struct_name: String, member: String },
    #[error(
        "kernel too old: rfh-trace needs the tracepoint {tracepoint} with at least {args} arguments ({what})"
    )]
    KernelTooOld {
        tracepoint: &'static str,
        args: u32,
        what: &'static str,
    },
    #[error("member '{member}' of struct {struct_name} is a bitfield and has no byte offset")]
    Bitfield { struct_name: String, member: String },
}

fn malformed(reason: impl Into<String>) -> BtfError {
    BtfError::Malformed(reason.into())
}

#[derive(Debug, Default)]
struct Type {
    kind: u8,
    name_off: u32,
    size_or_type: u32,
    /// This type's members within `Btf::members`: one shared vector
    /// instead of tens of thousands of small ones keeps parsing fast.
    members: std::ops::Range<u32>,
    /// Entries after the header: members, enumerators, parameters.
    vlen: u32,
}

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// Parsed kernel BTF, reduced to what offset lookups need.
#[derive(Debug)]
pub struct Btf {
    strings: Vec<u8>,
    /// Indexed by type id; id 0 is `void` and never looked at.
    types: Vec<Type>,
    members: Vec<Member>,
    composites: HashMap<String, u32>,
    /// `btf_trace_<tracepoint>` typedefs: the raw tracepoints' prototypes.
    tracepoints: HashMap<String, u32>,
}

/// Native-endian: the running kernel writes BTF in its own byte order, and
/// that is the only BTF read here.
fn word(data: &[u8], pos: usize) -> Result<u32, BtfError> {
    let b = section(data, pos, 4, "word")?;
    Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn section<'a>(data: &'a [u8], off: usize, len: usize, what: &str) -> Result<&'a [u8], BtfError> {
    off.checked_add(len)
        .and_then(|end| data.get(off..end))
        .ok_or_else(|| malformed(format!("{what} at byte {off} runs past the end")))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let bytes = std::fs::read(SYS_FS_PATH).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => BtfError::NotFound(source),
            _ => BtfError::Read(source),
        })?;
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, BtfError> {
        if bytes.len() < HEADER_LEN || u16::from_ne_bytes([bytes[0], bytes[1]]) != MAGIC {
            return Err(malformed("no native-endian BTF header"));
        }
        if bytes[2] != 1 {
            return Err(malformed(format!("unsupported version {}", bytes[2])));
        }
        let w = |i: usize| word(bytes, 4 * i).map(|v| v as usize);
        let (hdr_len, type_off, type_len, str_off, str_len) = (w(1)?, w(2)?, w(3)?, w(4)?, w(5)?);
        // A newer kernel may grow the header; the offsets stay relative to its end.
        let data = bytes
            .get(hdr_len.max(HEADER_LEN)..)
            .ok_or_else(|| malformed("header length exceeds the data"))?;
        let mut btf = Btf {
            strings: section(data, str_off, str_len, "string section")?.to_vec(),
            types: vec![Type::default()],
            members: Vec::new(),
            composites: HashMap::new(),
            tracepoints: HashMap::new(),
        };
        let types = section(data, type_off, type_len, "type section")?;
        let mut pos = 0;
        while pos < types.len() {
            let ty = btf.parse_type(types, &mut pos)?;
            if matches!(ty.kind, KIND_STRUCT | KIND_UNION) && ty.name_off != 0 {
                // Dedup leaves two types of one name only when their layouts
                // really differ between compilation units; take the first.
                let name = btf.str_at(ty.name_off)?.to_owned();
                btf.composites.entry(name).or_insert(btf.types.len() as u32);
            } else if ty.kind == KIND_TYPEDEF
                && ty.name_off != 0
                && let Some(tp) = btf.str_at(ty.name_off)?.strip_prefix("btf_trace_")
            {
                let tp = tp.to_owned();
                btf.tracepoints.insert(tp, btf.types.len() as u32);
            }
            btf.types.push(ty);
        }
        Ok(btf)
    }

    fn parse_type(&mut self, data: &[u8], pos: &mut usize) -> Result<Type, BtfError> {
        let w = |i| word(data, *pos + i);
        let (name_off, info, size_or_type) = (w(0)?, w(4)?, w(8)?);
        let (vlen, kind) = ((info & 0xffff) as usize, ((info >> 24) & 0x1f) as u8);
        // Bytes that follow the common header, per btf.rst: (fixed, per vlen entry).
        let (fixed, each) = match kind {
            KIND_STRUCT | KIND_UNION | 15 | 19 => (0, 12), // and datasec, enum64
            6 | 13 => (0, 8),                              // enum, func_proto
            KIND_INT | 14 | 17 => (4, 0),                  // and var, decl_tag
            3 => (12, 0),                                  // array
            2 | 7..=12 | 16 | 18 => (0, 0),
            _ => {
                let id = self.types.len();
                return Err(malformed(format!("type {id} has unknown kind {kind}")));
            }
        };
        let trailer = section(data, *pos + 12, fixed + vlen * each, "type record")?;
        *pos += 12 + trailer.len();
        let first = self.members.len() as u32;
        if matches!(kind, KIND_STRUCT | KIND_UNION) {
            for rec in trailer.chunks_exact(12) {
                let w = |i| word(rec, i);
                // With kind_flag the offset word packs the bitfield width into
                // its top byte. Kernel BTF always sets it when a struct has
                // bitfields (building it needs pahole >= 1.16), so the older
                // narrow-INT encoding of bitfields is not looked for.
                let (name_off, type_id, offset) = (w(0)?, w(4)?, w(8)?);
                let (bit_offset, bitfield_size) = match info >> 31 {
                    1 => (offset & 0x00ff_ffff, offset >> 24),
                    _ => (offset, 0),
                };
                self.members.push(Member {
                    name_off,
                    type_id,
                    bit_offset,
                    bitfield_size,
                });
            }
        }
        Ok(Type {
            kind,
            name_off,
            size_or_type,
            members: first..self.members.len() as u32,
            vlen: vlen as u32,
        })
    }

    fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        let s = std::ffi::CStr::from_bytes_until_nul(tail)
            .ok()
            .and_then(|s| s.to_str().ok());
        s.ok_or_else(|| malformed(format!("no utf-8 string at offset {off}")))
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        self.types
            .get(id as usize)
            .ok_or_else(|| malformed(format!("type id {id} is out of range")))
    }

    /// Follows typedefs and qualifiers to the type that defines the layout.
    fn resolve(&self, mut id: u32) -> Result<(u32, &Type), BtfError> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            if !MODIFIERS.contains(&ty.kind) {
                return Ok((id, ty));
            }
            id = ty.size_or_type;
        }
        Err(malformed(format!("type chain at id {id} is too deep")))
    }

    fn lookup(&self, name: &str) -> Result<u32, BtfError> {
        self.composites
            .get(name)
            .copied()
            .ok_or_else(|| BtfError::StructNotFound { name: name.into() })
    }

    /// Finds `name` among the members of composite `id`, descending into
    /// anonymous struct/union members the way C name lookup does. The
    /// returned member carries the bit offset from the start of `id`.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Result<Option<Member>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous members nest too deeply"));
        }
        let range = self.ty(id)?.members.clone();
        for m in &self.members[range.start as usize..range.end as usize] {
            if m.name_off != 0 {
                if self.str_at(m.name_off)? == name {
                    return Ok(Some(*m));
                }
                continue;
            }
            let (inner, inner_ty) = self.resolve(m.type_id)?;
            if matches!(inner_ty.kind, KIND_STRUCT | KIND_UNION)
                && let Some(mut found) = self.find_member(inner, name, depth + 1)?
            {
                found.bit_offset = found.bit_offset.saturating_add(m.bit_offset);
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Byte offset of `member` in struct `name`, searching through anonymous
    /// struct/union members recursively; `member` may be a dotted path like
    /// "f_path.dentry" that walks into embedded (non-pointer) struct members.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u32, BtfError> {
        let not_found = || BtfError::MemberNotFound {
            struct_name: struct_name.into(),
            member: member.into(),
        };
        let mut id = self.lookup(struct_name)?;
        let mut bits: u64 = 0;
        let mut walked = 0;
        let mut last: Option<Member> = None;
        for part in member.split('.') {
            if let Some(prev) = last {
                let (inner, inner_ty) = self.resolve(prev.type_id)?;
                if !matches!(inner_ty.kind, KIND_STRUCT | KIND_UNION) {
                    return Err(BtfError::NotEmbedded {
                        struct_name: struct_name.into(),
                        member: member[..walked - 1].into(),
                    });
                }
                id = inner;
            }
            let m = self.find_member(id, part, 0)?.ok_or_else(not_found)?;
            bits += u64::from(m.bit_offset);
            walked += part.len() + 1;
            last = Some(m);
        }
        let m = last.ok_or_else(not_found)?;
        if m.bitfield_size != 0 || !bits.is_multiple_of(8) {
            return Err(BtfError::Bitfield {
                struct_name: struct_name.into(),
                member: member.into(),
            });
        }
        u32::try_from(bits / 8).map_err(|_| malformed("member offset overflows u32"))
    }

    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.ty(self.lookup(name)?)?.size_or_type)
    }

    /// How many arguments raw tracepoint `name` passes (its
    /// `btf_trace_<name>` prototype, minus the leading `void *data`), or
    /// None when the kernel has no such tracepoint.
    pub fn tracepoint_args(&self, name: &str) -> Option<u32> {
        let typedef = self.ty(*self.tracepoints.get(name)?).ok()?;
        let ptr = self.ty(typedef.size_or_type).ok()?;
        let proto = self.ty(ptr.size_or_type).ok()?;
        (ptr.kind == KIND_PTR && proto.kind == KIND_FUNC_PROTO)
            .then(|| proto.vlen.saturating_sub(1))
    }
}

/// The raw tracepoints the probes attach to, the arguments they read,
/// and what needs them: checked before loading, so an old kernel gets a
/// sentence instead of a verifier log.
pub(crate) const TRACEPOINTS: [(&str, u32, &str); 7] = [
    ("signal_deliver", 3, "crash capture; Linux 4.x and later"),
    (
        "signal_generate",
        5,
        "kills from outside; Linux 4.x and later",
    ),
    ("sched_process_fork", 2, "following children"),
    (
        "sched_process_exec",
        3,
        "exec tracking; Linux 3.4 and later",
    ),
    (
        "sched_process_exit",
        2,
        "its group_dead argument, Linux 6.x; older kernels cannot tell the last thread",
    ),
    // Older kernels pass a pid, not the task: two arguments tell them apart.
    ("mark_victim", 2, "OOM kills; Linux 6.x"),
    (
        "ma_write",
        4,
        "noticing libraries loaded after start; Linux 6.1 and later",
    ),
];

/// Fails with `KernelTooOld` when a tracepoint the probes use is missing
/// or passes fewer arguments than they read.
pub fn check_tracepoints(btf: &Btf) -> Result<(), BtfError> {
    for (tracepoint, args, what) in TRACEPOINTS {
        if btf.tracepoint_args(tracepoint).is_none_or(|n| n < args) {
            return Err(BtfError::KernelTooOld {
                tracepoint,
                args,
                what,
            });
        }
    }
    Ok(())
}

/// Every kernel offset the probes use, from the running kernel's layouts.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let m = |s: &str, f: &str| btf.member_offset(s, f);
    Ok(KernelOffsets {
        task_pid: m("task_struct", "pid")?,
        task_tgid: m("task_struct", "tgid")?,
        task_thread_pid: m("task_struct", "thread_pid")?,
        task_group_leader: m("task_struct", "group_leader")?,
        pid_level: m("pid", "level")?,
        pid_numbers: m("pid", "numbers")?,
        upid_size: btf.struct_size("upid")?,
        vma_vm_start: m("vm_area_struct", "vm_start")?,
        vma_vm_end: m("vm_area_struct", "vm_end")?,
        vma_vm_pgoff: m("vm_area_struct", "vm_pgoff")?,
        vma_vm_file: m("vm_area_struct", "vm_file")?,
        vma_vm_flags: m("vm_area_struct", "vm_flags")?,
        file_f_inode: m("file", "f_inode")?,
        file_f_path_dentry: m("file", "f_path.dentry")?,
        inode_i_ino: m("inode", "i_ino")?,
        inode_i_sb: m("inode", "i_sb")?,
        sb_s_dev: m("super_block", "s_dev")?,
        dentry_d_name_name: m("dentry", "d_name.name")?,
        task_sighand: m("task_struct", "sighand")?,
        sighand_action: m("sighand_struct", "action")?,
        k_sigaction_size: btf.struct_size("k_sigaction")?,
        binprm_filename: m("linux_binprm", "filename")?,
        task_comm: m("task_struct", "comm")?,
        task_state: m("task_struct", "__state")?,
        task_signal: m("task_struct", "signal")?,
        signal_nr_threads: m("signal_struct", "nr_threads")?,
        upid_ns: m("upid", "ns")?,
        pidns_inum: m("pid_namespace", "ns.inum")?,
        task_fsbase: m("task_struct", "thread.fsbase")?,
        thread_cr2: m("task_struct", "thread.cr2")?,
        thread_trap_nr: m("task_struct", "thread.trap_nr")?,
        thread_error_code: m("task_struct", "thread.error_code")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_kernel_offsets() {
        let btf = match Btf::from_sys_fs() {
            Err(BtfError::NotFound(_)) => {
                eprintln!("skipping: {SYS_FS_PATH} is absent on this machine");
                return;
            }
            r => r.unwrap(),
        };
        let o = kernel_offsets(&btf).unwrap();
        check_tracepoints(&btf).unwrap();
        assert_eq!(btf.tracepoint_args("signal_deliver"), Some(3));
        assert_eq!(btf.tracepoint_args("no_such_tracepoint"), None);
        assert_eq!(o.upid_size, 16);
        assert!(o.pid_numbers > o.pid_level);
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert_eq!(o.vma_vm_end, o.vma_vm_start + 8);
        let d_name = btf.member_offset("dentry", "d_name").unwrap();
        assert_eq!(o.dentry_d_name_name, d_name + 8);
        let f_path = btf.member_offset("file", "f_path").unwrap();
        assert_eq!(o.file_f_path_dentry, f_path + 8);
        assert!(o.task_tgid < btf.struct_size("task_struct").unwrap());
    }

    /// Builds a native-endian BTF blob type by type; ids count from 1.
    struct Blob {
        strs: Vec<u8>,
        types: Vec<u8>,
    }

    impl Blob {
        fn name(&mut self, s: &str) -> u32 {
            self.strs.extend(s.bytes().chain([0]));
            if s.is_empty() {
                0
            } else {
                (self.strs.len() - s.len() - 1) as u32
            }
        }

        fn ty(&mut self, name: &str, info: u32, size: u32, words: &[u32]) {
            let name = self.name(name);
            for w in [name, info, size].iter().chain(words) {
                self.types.extend(w.to_ne_bytes());
            }
        }

        fn composite(&mut self, name: &str, info: u32, size: u32, m: &[(&str, u32, u32)]) {
            let words: Vec<u32> = m
                .iter()
                .flat_map(|&(n, t, o)| [self.name(n), t, o])
                .collect();
            self.ty(name, info | m.len() as u32, size, &words);
        }
    }

    fn sample() -> Vec<u8> {
        let (strs, types) = (vec![0], Vec::new());
        let mut b = Blob { strs, types };
        let (int, ptr, strct, union, typedef, cnst) =
            (1 << 24, 2 << 24, 4 << 24, 5 << 24, 8 << 24, 10 << 24);
        b.ty("int", int, 4, &[1 << 24 | 32]); // 1
        b.ty("long", int, 8, &[1 << 24 | 64]); // 2
        b.ty("char", int, 1, &[8]); // 3
        b.composite("", union, 8, &[("x", 1, 0), ("y", 2, 0)]); // 4
        b.composite("inner", strct, 8, &[("pad", 3, 0), ("c", 1, 32)]); // 5
        b.ty("", cnst, 5, &[]); // 6
        b.ty("inner_t", typedef, 6, &[]); // 7
        b.ty("", ptr, 5, &[]); // 8
        let bitfields = [("a", 1, 3 << 24), ("b", 1, 5 << 24 | 3), ("", 4, 64)];
        let plain = [("inner", 7, 128), ("z", 8, 192), ("w", 1, 256)];
        let members = [&bitfields[..], &plain[..]].concat();
        b.composite("s", strct | 1 << 31, 40, &members); // 9: has kind_flag
        let mut out = [MAGIC.to_ne_bytes(), [1, 0]].concat();
        let (tl, sl) = (b.types.len() as u32, b.strs.len() as u32);
        out.extend(
            [HEADER_LEN as u32, 0, tl, tl, sl]
                .iter()
                .flat_map(|w| w.to_ne_bytes()),
        );
        [out, b.types, b.strs].concat()
    }

    #[test]
    fn hand_built_blob() {
        let btf = Btf::parse(&sample()).unwrap();
        let off = |s, m| btf.member_offset(s, m);
        let err = |s, m| off(s, m).unwrap_err().to_string();
        assert_eq!(off("s", "x").unwrap(), 8);
        assert_eq!(off("s", "y").unwrap(), 8);
        assert_eq!(off("s", "inner").unwrap(), 16);
        assert_eq!(off("s", "inner.c").unwrap(), 20);
        assert_eq!(off("s", "z").unwrap(), 24);
        assert_eq!(off("s", "w").unwrap(), 32);
        for (s, m) in [("s", "a"), ("s", "b")] {
            assert!(err(s, m).contains("is a bitfield"), "{s}.{m}");
        }
        assert!(err("s", "z.c").starts_with("cannot walk into 'z' of struct s"));
        assert_eq!(
            err("s", "nope"),
            "struct s has no member 'nope' in kernel BTF"
        );
        assert!(err("s", "inner.nope").contains("no member 'inner.nope'"));
        assert_eq!(btf.struct_size("s").unwrap(), 40);
        assert_eq!(btf.struct_size("inner").unwrap(), 8);
        let e = btf.struct_size("nope").unwrap_err();
        assert_eq!(e.to_string(), "struct nope not found in kernel BTF");
    }

    #[test]
    fn rejects_bad_input() {
        let bad = |b: &[u8]| matches!(Btf::parse(b), Err(BtfError::Malformed(_)));
        let good = sample();
        assert!(bad(&good[..10]) && bad(&[&[0, 0][..], &good[2..]].concat()));
        // Shrink the type section by one word so the last record is cut short.
        let mut cut = good.clone();
        let type_len = u32::from_ne_bytes(cut[12..16].try_into().unwrap()) - 4;
        cut[12..16].copy_from_slice(&type_len.to_ne_bytes());
        assert!(bad(&cut));
        let e = BtfError::NotFound(io::ErrorKind::NotFound.into());
        assert!(e.to_string().contains("CONFIG_DEBUG_INFO_BTF=y"));
    }
}
