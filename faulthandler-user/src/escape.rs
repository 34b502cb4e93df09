//! Escaping of untrusted strings for text output.
//!
//! Thread names, comm, executable paths, command lines, file and function
//! names all come from the watched process or its files, so any of them can
//! hold a newline that forges a report line, or an ESC that drives the
//! reader's terminal. Text output shows every such character as a visible
//! escape instead; the report model (and JSON, which escapes by itself)
//! keeps the raw string.

use std::{borrow::Cow, fmt::Write as _};

/// Whether `c` must not reach a terminal or a line-oriented reader raw:
/// C0 controls, DEL, C1 controls, the bidirectional overrides, embeddings
/// and isolates that let a string reorder the rest of its line, the
/// invisible direction marks, and the Unicode line and paragraph
/// separators that some viewers break lines at.
fn needs_escape(c: char) -> bool {
    c.is_control() // C0, DEL and C1: U+0000–U+001F, U+007F–U+009F
        || matches!(
            c,
            '\u{202a}'..='\u{202e}' // LRE, RLE, PDF, LRO, RLO
                | '\u{2066}'..='\u{2069}' // LRI, RLI, FSI, PDI
                | '\u{200e}' | '\u{200f}' | '\u{061c}' // LRM, RLM, ALM
                | '\u{2028}' | '\u{2029}' // line and paragraph separators
        )
}

/// `s` with every character [`needs_escape`] names written as an escape:
/// `\n`, `\r`, `\t`, `\xHH` for the rest of C0 and DEL, `\u{HHHH}` for the
/// others, and a backslash as `\\`, so that an escape in the output always
/// stands for exactly one character of the input. Borrowed when there is
/// nothing to escape, which is nearly always.
pub fn escape(s: &str) -> Cow<'_, str> {
    let Some(first) = s.find(|c: char| c == '\\' || needs_escape(c)) else {
        return Cow::Borrowed(s);
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(&s[..first]);
    for c in s[first..].chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape;
    use std::borrow::Cow;

    #[test]
    fn plain_strings_are_borrowed() {
        for s in [
            "",
            "main",
            "std::vector<int>::push_back(int const&)",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "ünïcödé 名前 🦀",
        ] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn control_characters() {
        assert_eq!(
            escape("x\nFatal signal SIGSEGV"),
            "x\\nFatal signal SIGSEGV"
        );
        assert_eq!(escape("a\tb\rc"), "a\\tb\\rc");
        assert_eq!(escape("\x1b[31mred\x07"), "\\x1b[31mred\\x07");
        assert_eq!(escape("\0"), "\\x00");
        assert_eq!(escape("\x7f"), "\\x7f");
        // C1: U+009B is the one-character CSI of 8-bit terminals.
        assert_eq!(escape("\u{9b}2J"), "\\u{9b}2J");
        assert_eq!(escape("\u{85}"), "\\u{85}");
    }

    #[test]
    fn bidi_and_separators() {
        assert_eq!(escape("abc\u{202e}gnp.exe"), "abc\\u{202e}gnp.exe");
        for c in ('\u{202a}'..='\u{202e}').chain('\u{2066}'..='\u{2069}') {
            assert_eq!(escape(&c.to_string()), format!("\\u{{{:x}}}", c as u32));
        }
        assert_eq!(
            escape("\u{200f}\u{2028}\u{2029}"),
            "\\u{200f}\\u{2028}\\u{2029}"
        );
        // Neighbours of the ranges are ordinary characters.
        assert_eq!(
            escape("\u{2029}\u{202f}\u{2065}\u{206a}"),
            "\\u{2029}\u{202f}\u{2065}\u{206a}"
        );
    }

    #[test]
    fn backslash_keeps_it_unambiguous() {
        // A name that spells an escape must not read as the character.
        assert_eq!(escape("a\\nb"), "a\\\\nb");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_ne!(escape("a\\nb"), escape("a\nb"));
        assert_eq!(escape("C:\\x1b"), "C:\\\\x1b");
    }

    /// The inverse of `escape`, to show that no two inputs share an output.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match it.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some('x') => {
                    let hex: String = it.by_ref().take(2).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                Some('u') => {
                    assert_eq!(it.next(), Some('{'));
                    let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                other => panic!("stray escape {other:?} in {s:?}"),
            }
        }
        out
    }

    #[test]
    fn output_is_printable_and_reversible() {
        let all: String = (0u32..0x3000)
            .chain([0xfeff, 0x1f980])
            .filter_map(char::from_u32)
            .collect();
        let out = escape(&all);
        assert!(!out.chars().any(super::needs_escape));
        assert_eq!(unescape(&out), all);
        for s in ["\\x41", "\\\n", "a\\", "\\u{202e}", "\u{202e}\\"] {
            assert_eq!(unescape(&escape(s)), s, "{s:?}");
        }
    }
}
