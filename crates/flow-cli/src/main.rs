//! `flow`: train, sample, evaluate and convert normalizing flows.

mod cli;
mod columns;
mod commands;
mod output;
mod plot;
mod progress;
mod signals;

use std::process::ExitCode;

use clap::Parser;

/// Training and evaluation allocate and free the same large buffers step after step;
/// mimalloc, told so at the start of `main`, keeps them instead of returning them to the
/// system (a page fault per page, every step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// Writes to standard output; a closed pipe (`flow inspect … | head`) is not an error.
pub fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn main() -> ExitCode {
    flow_nn::retain_freed_memory();
    // Processes that a launcher started together on this machine share its cores.
    flow_nn::pin_thread_count_among(flow_dist::local_processes());
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: the error, with the accepted values when clap lists them.
            let text = e.render().to_string();
            let line: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more"))
                .collect();
            eprintln!("{} (see --help)", line.join(" "));
            return ExitCode::from(2);
        }
    };
    flow_core::join_cpu_pool();
    signals::install();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) if f.message.is_empty() => ExitCode::from(f.code),
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
