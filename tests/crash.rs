//! Crash capture end to end: the real rfh-trace binary, real eBPF, real
//! crashing programs compiled here.

#[path = "common/mod.rs"]
mod common;

use common::*;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer"];
const WITH_FP: &[&str] = &["-g", "-O0", "-fno-omit-frame-pointer"];

fn check_chain(flags: &[&str], method: &str) {
    require_root();
    let b = build("chain.c", flags);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(
        run.status.code(),
        Some(signal_status(11)),
        "stderr: {}",
        run.stderr
    );
    let r = only_report(&run);
    assert_eq!(r["kind"], "crash");
    assert_eq!(r["signal"]["name"], "SIGSEGV");
    assert_eq!(r["signal"]["code_name"], "SEGV_MAPERR");
    assert_eq!(r["signal"]["address"], "0x0");
    assert_eq!(r["signal"]["handled"], false);
    assert_eq!(r["process"]["exe"], b.exe.to_str().unwrap());
    let t = current_thread(r);
    assert_eq!(t["name"], "chain");
    assert_eq!(t["unwind"], method);
    let idx = assert_order(t, &["level3", "level2", "level1", "main"]);
    assert_eq!(
        idx[0], 0,
        "the faulting function must be the innermost frame"
    );
    for (func, tag) in [
        ("level3", "level3"),
        ("level2", "level2"),
        ("level1", "level1"),
        ("main", "main"),
    ] {
        assert_line(t, func, &b.source, line_of(&b.source, tag));
    }
    // The outermost frames come from libc and carry its debug info.
    let libc_start = frame(t, "__libc_start_call_main");
    assert!(
        libc_start["module"].as_str().unwrap().contains("libc.so"),
        "{libc_start}"
    );
    assert!(
        libc_start["line"].is_u64(),
        "libc frames get file:line from libc6-dbg: {libc_start}"
    );
}

#[test]
fn chain_without_frame_pointers() {
    check_chain(OMIT_FP, "dwarf");
}

#[test]
fn chain_with_frame_pointers() {
    check_chain(WITH_FP, "dwarf");
}

/// The expected stack comes from gdb on the same program, not from us.
#[test]
fn chain_matches_gdb() {
    require_root();
    let b = build("chain.c", OMIT_FP);
    let gdb = std::process::Command::new("gdb")
        .args(["-nx", "-batch", "-ex", "run", "-ex", "bt"])
        .arg(&b.exe)
        .output()
        .expect("gdb is installed by `cargo xtask setup`");
    let text = String::from_utf8_lossy(&gdb.stdout);
    // "#1  0x... in level2 (p=...) at chain.c:9" or "#0  level3 (...)".
    let gdb_funcs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .filter_map(|l| {
            let rest = l
                .split_once(" in ")
                .map(|(_, r)| r)
                .or_else(|| l.split_whitespace().nth(1))?;
            rest.split_whitespace().next()
        })
        .collect();
    assert!(gdb_funcs.len() >= 4, "gdb gave no backtrace: {text}");
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    let t = current_thread(only_report(&run));
    let ours: Vec<String> = functions(t)
        .into_iter()
        .filter(|f| gdb_funcs.contains(&f.as_str()))
        .collect();
    let theirs: Vec<&str> = gdb_funcs
        .iter()
        .copied()
        .filter(|f| ours.iter().any(|o| o == f))
        .collect();
    assert_eq!(ours, theirs, "gdb: {gdb_funcs:?}");
    assert!(
        theirs.starts_with(&["level3", "level2", "level1", "main"]),
        "gdb: {gdb_funcs:?}"
    );
}

#[test]
fn crash_in_qsort_callback() {
    require_root();
    let b = build("qsort_cb.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)));
    let t = current_thread(only_report(&run));
    let idx = assert_order(t, &["compare_items", "sort_items", "main"]);
    assert_eq!(idx[0], 0);
    let funcs = functions(t);
    assert!(
        funcs[idx[0] + 1..idx[1]]
            .iter()
            .any(|f| f.contains("qsort") || f.contains("msort")),
        "qsort's own frames between the callback and its caller: {funcs:?}"
    );
    assert_line(t, "compare_items", &b.source, line_of(&b.source, "compare"));
    assert_line(t, "sort_items", &b.source, line_of(&b.source, "sort"));
    assert_eq!(t["unwind"], "dwarf");
}

#[test]
fn assert_then_abort() {
    require_root();
    let b = build("assert.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(6)));
    let r = only_report(&run);
    assert_eq!(r["signal"]["name"], "SIGABRT");
    assert_eq!(r["signal"]["code_name"], "SI_TKILL");
    let t = current_thread(r);
    assert_order(t, &["abort", "check_value", "main"]);
    let funcs = functions(t);
    assert!(funcs.iter().any(|f| f.contains("assert_fail")), "{funcs:?}");
    assert_line(t, "check_value", &b.source, line_of(&b.source, "assert"));
}

#[test]
fn immediate_crash_in_main() {
    require_root();
    let b = build("immediate.c", &["-g", "-O2"]);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)));
    let t = current_thread(only_report(&run));
    assert_eq!(functions(t)[0], "main");
    assert_line(t, "main", &b.source, line_of(&b.source, "main"));
}

/// With /proc never read, the mappings the kernel resolved as the process
/// died are all there is; they must be enough for a full, symbolized
/// stack through libc.
#[test]
fn symbols_from_kernel_mappings_alone() {
    require_root();
    let b = build("qsort_cb.c", OMIT_FP);
    let out = std::process::Command::new(rfh_trace())
        .env("RFH_TRACE_TEST_NO_PROC", "1")
        .args(["--format", "json", "--"])
        .arg(&b.exe)
        .output()
        .unwrap();
    let line = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap()
        .to_string();
    let r: serde_json::Value = serde_json::from_str(&line).unwrap();
    validate(&r);
    let t = current_thread(&r);
    assert_order(
        t,
        &[
            "compare_items",
            "sort_items",
            "main",
            "__libc_start_call_main",
        ],
    );
    assert_line(t, "compare_items", &b.source, line_of(&b.source, "compare"));
}

fn check_signal(arg: &str, sig: i32, name: &str, code: &str, func: &str) {
    require_root();
    let b = build("signals.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap(), arg]);
    assert_eq!(
        run.status.code(),
        Some(signal_status(sig)),
        "stderr: {}",
        run.stderr
    );
    let r = only_report(&run);
    assert_eq!(r["signal"]["name"], name);
    assert_eq!(r["signal"]["code_name"], code);
    let t = current_thread(r);
    assert_order(t, &[func, "main"]);
    assert_eq!(functions(t)[0], func);
    assert_line(t, func, &b.source, line_of(&b.source, arg));
}

#[test]
fn sigbus() {
    check_signal("bus", 7, "SIGBUS", "BUS_ADRERR", "bus_error");
}

#[test]
fn sigfpe() {
    check_signal("fpe", 8, "SIGFPE", "FPE_INTDIV", "divide");
}

#[test]
fn sigill() {
    check_signal("ill", 4, "SIGILL", "ILL_ILLOPN", "illegal");
}

#[test]
fn cpp_inlined_and_demangled() {
    require_root();
    let b = build("widget.cpp", &["-g", "-O2"]);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)));
    let t = current_thread(only_report(&run));
    let idx = assert_order(t, &["app::Widget::poke", "app::render", "main"]);
    let poke = &t["frames"][idx[0]];
    assert_eq!(poke["inlined"], true, "poke is inlined into render: {poke}");
    assert_eq!(t["frames"][idx[1]]["inlined"], false);
    assert_eq!(poke["line"], line_of(&b.source, "poke"));
    assert_eq!(t["frames"][idx[1]]["line"], line_of(&b.source, "render"));
    let funcs = functions(t);
    assert!(
        funcs.iter().all(|f| !f.starts_with("_Z")),
        "names are demangled: {funcs:?}"
    );
}

#[test]
fn rust_panic_abort() {
    require_root();
    let b = build(
        "panic.rs",
        &[
            "-g",
            "-C",
            "opt-level=1",
            "-C",
            "panic=abort",
            "-C",
            "force-frame-pointers=no",
        ],
    );
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(6)));
    let t = current_thread(only_report(&run));
    let idx = assert_order(
        t,
        &[
            "abort",
            "rust_panic",
            "panic_fmt",
            "panic::explode",
            "panic::main",
        ],
    );
    assert_eq!(t["frames"][idx[3]]["line"], line_of(&b.source, "explode"));
    assert_eq!(t["frames"][idx[4]]["line"], line_of(&b.source, "main"));
}

#[test]
fn handled_faults_are_not_crashes() {
    require_root();
    let b = build("handled.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("survived 100 faults"));
    assert!(
        run.reports.is_empty(),
        "a handled fault is not a crash: {:#?}",
        run.reports
    );
}

#[test]
fn reraise_reports_the_original_fault_once() {
    require_root();
    let b = build("reraise.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(signal_status(11)));
    let r = only_report(&run);
    assert_eq!(
        r["signal"]["code_name"], "SEGV_MAPERR",
        "the original fault, not the raise()"
    );
    assert_eq!(r["signal"]["address"], "0x40");
    assert_eq!(r["signal"]["handled"], true);
    let t = current_thread(r);
    assert_eq!(functions(t)[0], "faulty_function");
    assert_order(t, &["faulty_function", "main"]);
    assert_line(
        t,
        "faulty_function",
        &b.source,
        line_of(&b.source, "faulty"),
    );
}

#[test]
fn text_report_is_faulthandler_like() {
    require_root();
    let b = build("chain.c", OMIT_FP);
    let out = std::process::Command::new(rfh_trace())
        .arg("--")
        .arg(&b.exe)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Fatal signal SIGSEGV (Segmentation fault), code SEGV_MAPERR"),
        "{text}"
    );
    assert!(text.contains("Current thread"), "{text}");
    assert!(text.contains("(most recent call first):"), "{text}");
    let l3 = text.find(" in level3").expect("level3 line");
    let main = text.find(" in main").expect("main line");
    assert!(l3 < main, "{text}");
    assert!(
        !text.contains('\x1b'),
        "no colour with NO_COLOR or off a TTY"
    );
    assert_eq!(out.status.code(), Some(signal_status(11)));
}

#[test]
fn command_not_found_is_127() {
    require_root();
    let run = trace(&[], &["/nonexistent/program"]);
    assert_eq!(run.status.code(), Some(127));
    assert!(run.reports.is_empty());
}

#[test]
fn schema_copy_matches_shared() {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/report.schema.json");
    let shared =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/report.schema.json");
    match std::fs::read(&shared) {
        Ok(s) => assert_eq!(
            std::fs::read(here).unwrap(),
            s,
            "tests/report.schema.json must equal ../shared"
        ),
        Err(_) => println!("skipped: no ../shared/report.schema.json beside this clone"),
    }
}
