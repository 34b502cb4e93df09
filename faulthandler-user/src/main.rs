use std::io::Write as _;

use clap::Parser;
use faulthandler_user::{cli::Cli, run};

/// One line on stderr; a closed stderr is no reason to panic (which
/// `eprintln!` would), least of all on the way out.
fn error_line(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "rfh-trace: {message}");
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go out as clap writes them (ignoring a closed
        // stdout); a usage error is one line, like every other error, and
        // status 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            error_line(&faulthandler_user::cli::one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    // RUST_LOG=debug: rfh-trace's own diagnostics and the kernel side's
    // (aya-log), on stderr. Unset, nothing is logged and nothing costs.
    if std::env::var_os("RUST_LOG").is_some() {
        env_logger::Builder::from_env(env_logger::Env::default()).init();
    }
    match run::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, as anyhow's alternate form prints them.
            error_line(&format!("{:#}", anyhow::Error::from(e)));
            std::process::exit(2);
        }
    }
}
