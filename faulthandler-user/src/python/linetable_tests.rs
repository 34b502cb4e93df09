use super::*;

/// What `testdata/linetable_fixture.py` printed on one interpreter.
struct Fixture {
    version: String,
    firstlineno: i32,
    table: Vec<u8>,
    /// The interpreter's own line for each 2-byte code unit.
    lines: Vec<Option<u32>>,
}

fn parse(line: &str) -> Fixture {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 4, "bad fixture line {line:?}");
    let hex = f[2];
    Fixture {
        version: f[0].to_string(),
        firstlineno: f[1].parse().unwrap(),
        table: (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect(),
        lines: f[3]
            .split(',')
            .map(|l| {
                if l == "-" {
                    None
                } else {
                    Some(l.parse().unwrap())
                }
            })
            .collect(),
    }
}

fn kind_of(version: &str) -> LineTableKind {
    match version {
        "3.8" | "3.9" => LineTableKind::Lnotab,
        "3.10" => LineTableKind::Lines310,
        _ => LineTableKind::Locations,
    }
}

fn check(fx: &Fixture) {
    let kind = kind_of(&fx.version);
    assert!(fx.lines.len() > 20, "{}: too few instructions", fx.version);
    for (unit, want) in fx.lines.iter().enumerate() {
        let got = line_for(kind, &fx.table, fx.firstlineno, 2 * unit as i64);
        assert_eq!(
            got,
            *want,
            "python {}: code unit {unit} (byte offset {})",
            fx.version,
            2 * unit
        );
    }
    // The fixture's `return` is 300 lines below the body: the table needs
    // its multi-entry / long forms to get there.
    assert!(fx.lines.contains(&Some(310)), "{}", fx.version);
}

/// Recorded from pyenv 3.8–3.13, Debian's python3.11 and Debian sid's
/// 3.13, 3.14 and 3.15.
#[test]
fn recorded_tables_match_the_interpreters() {
    let text = include_str!("testdata/linetables.txt");
    let fixtures: Vec<Fixture> = text.lines().map(parse).collect();
    let versions: Vec<&str> = fixtures.iter().map(|f| f.version.as_str()).collect();
    for v in ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14", "3.15"] {
        assert!(versions.contains(&v), "no fixture for {v}");
    }
    for fx in &fixtures {
        check(fx);
    }
}

/// The same against every interpreter on this machine, so a new build is
/// checked without re-recording.
#[test]
fn tables_built_now_match_the_interpreters() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/python/testdata/linetable_fixture.py"
    );
    let mut ran = 0;
    let interps = crate::python::live_tests::interpreters();
    for py in &interps {
        let Some(mut cmd) = py.command_with_file(script) else {
            continue;
        };
        let out = match cmd.output() {
            Ok(o) if o.status.success() => o,
            other => panic!("{}: fixture script failed: {other:?}", py.label),
        };
        let fx = parse(String::from_utf8_lossy(&out.stdout).trim());
        check(&fx);
        ran += 1;
    }
    crate::python::live_tests::remove_chroot_copies(&interps, script);
    assert!(ran > 0, "no interpreter could run the fixture script");
}

#[test]
fn negative_offset_is_the_first_line() {
    assert_eq!(line_for(LineTableKind::Locations, &[], 7, -2), Some(7));
    assert_eq!(line_for(LineTableKind::Lnotab, &[], 7, -1), Some(7));
}

#[test]
fn garbage_tables_never_panic() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    for len in 0..200 {
        let table: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for kind in [
            LineTableKind::Lnotab,
            LineTableKind::Lines310,
            LineTableKind::Locations,
        ] {
            for off in [0, 1, 2, 100, 1 << 20, i64::MAX / 4] {
                let _ = line_for(kind, &table, i32::MAX, off);
                let _ = line_for(kind, &table, i32::MIN, off);
            }
        }
    }
    // A varint that never ends.
    let endless = [
        0x80 | (14 << 3),
        0x7f,
        0x7f,
        0x7f,
        0x7f,
        0x7f,
        0x7f,
        0x7f,
        0x7f,
        0x7f,
    ];
    assert_eq!(line_for(LineTableKind::Locations, &endless, 1, 0), None);
}
