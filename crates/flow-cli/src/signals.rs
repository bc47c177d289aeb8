//! Ctrl-C and SIGTERM, for every command: temporary files are removed and the process
//! ends with status 130. A command that can stop at a safe point (training, which
//! then saves a resumable checkpoint) asks for the first signal instead, through
//! [`stop_at_safe_point`]; a second signal ends it at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the first signal while a command stops at safe points.
static STOP: AtomicBool = AtomicBool::new(false);

/// Whether the running command stops at safe points.
static SAFE_POINTS: AtomicBool = AtomicBool::new(false);

/// The exit status of a process ended by a signal (128 + SIGINT, as shells report).
pub const INTERRUPTED: u8 = 130;

/// Installs the handler; once, before a command runs.
pub fn install() {
    // Files are only ever replaced by rename, so none is left half-written; the
    // temporary files of writers still open are removed here.
    let _ = ctrlc::set_handler(|| {
        if SAFE_POINTS.load(Ordering::SeqCst) && !STOP.swap(true, Ordering::SeqCst) {
            eprintln!("interrupt: finishing the current step and saving (again to quit at once)");
            return;
        }
        flow_io::remove_temp_files();
        std::process::exit(i32::from(INTERRUPTED));
    });
}

/// From now on the first signal only sets the returned flag, which the command reads
/// at its safe points.
pub fn stop_at_safe_point() -> &'static AtomicBool {
    SAFE_POINTS.store(true, Ordering::SeqCst);
    &STOP
}
