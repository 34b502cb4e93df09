use clap::Parser;
use faulthandler_user::{cli::Cli, run};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go out as clap writes them; a usage error is one
        // line, like every other error, and status 2.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("rfh-trace: {}", first.trim_start_matches("error: "));
            std::process::exit(2);
        }
    };
    match run::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, as anyhow's alternate form prints them.
            eprintln!("rfh-trace: {:#}", anyhow::Error::from(e));
            std::process::exit(2);
        }
    }
}
