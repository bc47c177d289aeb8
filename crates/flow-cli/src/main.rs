//! `flow`: train, sample, evaluate and convert normalizing flows.

mod cli;
mod commands;
mod output;
mod plot;
mod progress;

use std::process::ExitCode;

use clap::Parser;

/// A failure the command reports on one line; `code` is the exit status.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            message: e.to_string(),
            code: 2,
        }
    }
}

pub type CmdResult = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line: candle appends a backtrace after a newline when RUST_BACKTRACE
            // is set; the first line is the message.
            let msg = f
                .message
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("failed");
            eprintln!("error: {msg}");
            ExitCode::from(f.code)
        }
    }
}
