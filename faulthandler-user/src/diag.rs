//! Diagnostics on stderr that can never take rfh-trace down.
//!
//! `eprintln!` panics when stderr is closed (a closed pipe, `2>&-`), which
//! would leave a watched command running unwatched. Every message rfh-trace
//! prints about itself goes through `diag!` instead: one line, prefixed, and
//! a failed write is ignored (the loss of a diagnostic is not worth dying for).

use std::io::Write as _;

/// Writes `rfh-trace: <message>` and a newline to stderr, ignoring errors.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "rfh-trace: {args}");
}

/// `diag!("cannot dump pid {pid}: {e}")`: see the module comment.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::diag::line(format_args!($($arg)*))
    };
}
