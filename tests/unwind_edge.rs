//! Stacks a plain unwinder gets wrong, through the real rfh-trace: a call
//! through a NULL function pointer, a frame pointer aimed at secrets, and a
//! thread waiting inside its signal handler.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const OMIT_FP: &[&str] = &["-g", "-O2", "-fomit-frame-pointer"];

fn frames(thread: &Value) -> &Vec<Value> {
    thread["frames"].as_array().expect("frames")
}

/// gdb shows `0x0 in ?? ()`, then the caller at the call, then main.
#[test]
fn null_function_pointer_call_shows_its_caller() {
    require_root();
    let b = build("null_call.c", OMIT_FP);
    let run = trace(&[], &[b.exe.to_str().unwrap()]);
    assert_eq!(
        run.status.code(),
        Some(signal_status(11)),
        "stderr: {}",
        run.stderr
    );
    let r = only_report(&run);
    validate(r);
    assert_eq!(r["signal"]["code_name"], "SEGV_MAPERR");
    assert_eq!(r["signal"]["address"], "0x0");
    let t = current_thread(r);
    assert_eq!(frames(t)[0]["address"], "0x0", "{t:#}");
    assert_eq!(functions(t)[1..3], ["dispatch", "main"], "{t:#}");
    assert_line(t, "dispatch", &b.source, line_of(&b.source, "call"));
    assert_line(t, "main", &b.source, line_of(&b.source, "main"));
}

/// "SECRETPW" as the little-endian word a frame-pointer walk reads.
const SECRET_HEX: &str = "5750544552434553";

fn check_no_secret(flags: &[&str]) {
    require_root();
    let b = build("secret_rbp.c", flags);
    let exe = b.exe.to_str().unwrap();
    let run = trace(&[], &[exe]);
    assert_eq!(
        run.status.code(),
        Some(signal_status(11)),
        "stderr: {}",
        run.stderr
    );
    let r = only_report(&run);
    validate(r);
    let t = current_thread(r);
    assert_eq!(functions(t)[0], "crash_with_rbp", "{t:#}");
    assert_line(t, "crash_with_rbp", &b.source, line_of(&b.source, "crash"));
    // Every frame past the IP is a return address into a mapped module;
    // the walk stopped where the words stopped being code, and says so.
    for f in &frames(t)[1..] {
        assert!(f["module"].is_string(), "a non-code word as a frame: {t:#}");
    }
    assert!(t["error"].is_string(), "{t:#}");
    let json = r.to_string().to_lowercase();
    assert!(
        !json.contains(SECRET_HEX) && !json.contains("secretpw"),
        "{r:#}"
    );

    // The text report too, and whatever rfh-trace says on stderr.
    let out = Command::new(rfh_trace())
        .arg("--")
        .arg(exe)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(text.contains("crash_with_rbp"), "{text}");
    assert!(
        !text.contains(SECRET_HEX) && !text.contains("secretpw"),
        "{text}"
    );
}

/// The DWARF CFI says the return address is at rbp+8: the secret.
#[test]
fn frame_pointer_at_a_secret_with_cfi() {
    check_no_secret(&["-g", "-O0", "-fno-omit-frame-pointer"]);
}

/// No CFI at all: frame pointers only, in rfh-trace and in the kernel.
#[test]
fn frame_pointer_at_a_secret_without_cfi() {
    check_no_secret(&[
        "-g",
        "-O0",
        "-fno-omit-frame-pointer",
        "-fno-asynchronous-unwind-tables",
        "-fno-unwind-tables",
    ]);
}

/// A dump of a thread inside its handler shows the handler's frames, then
/// the interrupted ones: the fault at its own line (an exact address, not
/// a return address), then main, as gdb does.
#[test]
fn dump_inside_a_signal_handler_shows_the_interrupted_frames() {
    require_root();
    let b = build("in_handler.c", OMIT_FP);
    let mut child = Command::new(&b.exe).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    let stdout = child.stdout.as_mut().unwrap();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id();
    let out = Command::new(rfh_trace())
        .args(["dump", &pid.to_string(), "--format", "json"])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    // Reports go to stdout or stderr depending on the version: read both.
    let reports: Vec<Value> = [&out.stdout, &out.stderr]
        .iter()
        .flat_map(|o| {
            String::from_utf8_lossy(o)
                .into_owned()
                .lines()
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    assert_eq!(
        reports.len(),
        1,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = &reports[0];
    validate(r);
    let t = r["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tid"] == pid)
        .expect("the main thread");
    assert_order(t, &["wait_in_handler", "on_segv", "faulty", "main"]);
    assert_line(t, "wait_in_handler", &b.source, line_of(&b.source, "wait"));
    assert_line(t, "faulty", &b.source, line_of(&b.source, "fault"));
    assert_line(t, "main", &b.source, line_of(&b.source, "main"));
}
