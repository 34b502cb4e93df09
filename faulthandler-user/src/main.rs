use clap::Parser;
use faulthandler_user::{cli::Cli, run};

fn main() {
    match run::run(Cli::parse()) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes, as anyhow's alternate form prints them.
            eprintln!("rfh-trace: {:#}", anyhow::Error::from(e));
            std::process::exit(2);
        }
    }
}
