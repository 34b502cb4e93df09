//! Symbol names as reports print them. blazesym's own demangling is off
//! (see `Symbolizer::with_debug_dirs`) because it would also "demangle"
//! plain C names.

/// A function's name for a frame, demangled; None when blazesym has none.
pub(super) fn function_name(name: &str) -> Option<String> {
    (!name.is_empty()).then(|| demangle(name))
}

/// The demangled form of a mangled C++ (Itanium) or Rust name; any other
/// name verbatim. Only names with a mangling prefix are tried: the C++
/// demangler also accepts bare type manglings, so C functions named `t`,
/// `i` or `c` would become `unsigned short`, `int` and `char`.
/// Output as blazesym's demangling gave it: C++ with cpp_demangle's default
/// options, Rust without the hash (rustc-demangle's alternate format).
pub(super) fn demangle(name: &str) -> String {
    // `__Z`/`__R`: the extra underscore some platforms prefix to symbols.
    let itanium = name.starts_with("_Z") || name.starts_with("__Z");
    let rust_v0 = name.starts_with("_R") || name.starts_with("__R");
    if rust_v0 {
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            return format!("{d:#}");
        }
    } else if itanium {
        // Legacy Rust names are Itanium names ending in a `17h<hash>E`
        // path element; rustc-demangle shows that hash only when not in
        // the alternate format. Other Itanium names are C++.
        if let Ok(d) = rustc_demangle::try_demangle(name) {
            let short = format!("{d:#}");
            if format!("{d}") != short {
                return short;
            }
        }
        if let Some(d) = cpp_demangle::Symbol::new(name)
            .ok()
            .and_then(|sym| sym.demangle().ok())
        {
            return d;
        }
    }
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::Symbolizer;
    use super::super::testutil::*;
    use super::*;

    /// `t`, `i`, `c` and `s` are also the Itanium manglings of the types
    /// `unsigned short`, `int`, `char` and `short`. `noclone` keeps GCC from
    /// naming a part `t.constprop.0` and the like.
    const PLAIN_NAMES_SRC: &str = r#"
#include <pthread.h>
static int sink;
static inline __attribute__((always_inline)) int s(int x) {
    sink += x * 5; /* MARK_S */
    return sink;
}
__attribute__((noinline, noclone)) void *t(void *a) { sink += (int)(long)a; return a; }
__attribute__((noinline, noclone)) int i(int x) { return s(x) + 1; }
__attribute__((noinline, noclone)) int c(int x) { sink ^= x; return sink * 3; }
int main(int argc, char **argv) {
    (void)argv;
    pthread_t th;
    if (argc > 5 && pthread_create(&th, 0, t, 0) == 0) pthread_join(th, 0);
    t((void *)(long)argc);
    return i(argc) + c(argc);
}
"#;

    /// Names that are not mangled come back verbatim, from DWARF and from
    /// the symbol table alike, for outer and inlined frames.
    #[test]
    fn plain_c_names_are_not_demangled() {
        let dir = tempfile::tempdir().unwrap();
        let exe = compile_with(dir.path(), "cc", "plain.c", PLAIN_NAMES_SRC, &["-pthread"]);
        let funcs: Vec<(&str, u64, u64)> = ["t", "i", "c", "main"]
            .into_iter()
            .map(|f| {
                let (addr, size) = symbol(&exe, false, |n| n == f);
                (f, addr, size)
            })
            .collect();
        let check = |with_dwarf: bool| {
            let modules = [exec_module(&exe)];
            let mut s = Symbolizer::new();
            let mut saw_inlined = false;
            for &(func, addr, size) in &funcs {
                assert!(size > 0, "{func} has no size");
                for off in 0..size {
                    let frames = s.symbolize(&[BIAS + addr + off], &modules);
                    let (outer, inlined) = frames.split_last().unwrap();
                    assert_eq!((name(outer), outer.inlined), (func, false), "{frames:?}");
                    assert_eq!(outer.function_offset, Some(off), "{frames:?}");
                    assert_eq!(outer.file.is_some(), with_dwarf, "{frames:?}");
                    for f in inlined {
                        assert_eq!((func, name(f), f.inlined), ("i", "s", true), "{frames:?}");
                        assert_eq!(f.line, line_of(PLAIN_NAMES_SRC, "MARK_S"));
                        saw_inlined = true;
                    }
                }
            }
            assert!(
                !with_dwarf || saw_inlined,
                "no address in i() had s() inlined"
            );
        };
        check(true);
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg(&exe)
            .status();
        assert!(stripped.unwrap().success());
        check(false);
    }

    #[test]
    fn only_mangled_names_are_demangled() {
        for (mangled, want) in [
            (
                "_ZN3app6renderERKNS_6WidgetEi",
                "app::render(app::Widget const&, int)",
            ),
            ("_ZNK3app6Widget4pokeEi", "app::Widget::poke(int) const"),
            (
                "_ZN3app6renderERKNS_6WidgetEi.cold",
                "app::render(app::Widget const&, int) [clone .cold]",
            ),
            (
                "__ZN3app6renderERKNS_6WidgetEi",
                "app::render(app::Widget const&, int)",
            ),
            (
                "_ZN4core9panicking9panic_fmt17h5f1a6fd39197ad62E",
                "core::panicking::panic_fmt",
            ),
            ("_RNvCs15kBYyAo9fc_7mycrate7example", "mycrate::example"),
            // Not mangled, though the C++ demangler would take them as types.
            ("t", "t"),
            ("i", "i"),
            ("c", "c"),
            ("St", "St"),
            ("main", "main"),
            ("_start", "_start"),
            // Mangling prefix but not a valid name: verbatim.
            ("_Zfoo", "_Zfoo"),
            ("_Rfoo", "_Rfoo"),
        ] {
            assert_eq!(demangle(mangled), want, "{mangled}");
        }
    }

    #[test]
    fn cpp_names_are_demangled() {
        let src = r#"
namespace outerns { namespace inner {
__attribute__((noinline)) int compute(int x) { return x * 7 + 1; } // MARK_CPP
} }
int main(int argc, char **) { return outerns::inner::compute(argc); }
"#;
        let dir = tempfile::tempdir().unwrap();
        let exe = compile(dir.path(), "c++", "prog.cpp", src);
        let (addr, _) = symbol(&exe, false, |n| n.contains("compute"));
        let frames = Symbolizer::new().symbolize(&[BIAS + addr], &[exec_module(&exe)]);
        let f = frames.last().unwrap();
        assert!(name(f).starts_with("outerns::inner::compute"), "{f:?}");
        assert!(f.file.as_deref().unwrap().ends_with("/prog.cpp"));
        assert_eq!(f.line, line_of(src, "MARK_CPP"));
    }
}
