//! Code mapped after start: a library dlopen'd from a directory no
//! system library lives in is symbolized only if rfh-trace noticed the
//! executable mapping while the process was alive (the kernel-side
//! capture at death has the file's name, not its directory).

#[path = "common/mod.rs"]
mod common;

use common::*;

#[test]
fn dlopened_library_outside_library_dirs_is_symbolized() {
    require_root();
    let flags = ["-g", "-O2", "-fomit-frame-pointer"];
    let plugin = build("plugin.c", &[&flags[..], &["-shared", "-fPIC"]].concat());
    let host = build("plugin_host.c", &[&flags[..], &["-ldl"]].concat());
    let run = trace(
        &[],
        &[host.exe.to_str().unwrap(), plugin.exe.to_str().unwrap()],
    );
    assert_eq!(
        run.status.code(),
        Some(signal_status(11)),
        "stderr: {}",
        run.stderr
    );
    let t = current_thread(only_report(&run));
    let idx = assert_order(t, &["plugin_crash", "plugin_entry", "main"]);
    assert_eq!(
        idx[0], 0,
        "the faulting function must be the innermost frame"
    );
    let f = frame(t, "plugin_crash");
    assert_eq!(f["module"], plugin.exe.to_str().unwrap());
    assert_line(
        t,
        "plugin_crash",
        &plugin.source,
        line_of(&plugin.source, "plugin_crash"),
    );
    assert_line(t, "main", &host.source, line_of(&host.source, "call"));
}
