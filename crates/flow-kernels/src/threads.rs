//! The thread counts candle reads, and the one the kernels plan their work for.

use std::cell::Cell;

/// Fixes, once per process, the two thread counts candle's CPU backend reads:
///
/// - `RAYON_NUM_THREADS`: candle asks for it at every matrix product and, when it is
///   unset, counts the physical cores by parsing `/proc/cpuinfo` each time; on the
///   small products of flow layers that costs as much as the product (half of a small
///   Glow's training step). It is set to the count candle would find, so every later
///   ask is a lookup.
/// - `CANDLE_NUM_THREADS`: the workers of candle's pool for element-wise ops, which spin
///   while they wait. Beside the rayon pool that the matrix products and this crate's
///   kernels run on, they take cores the other pool's threads need (a quarter of an
///   NSF training step went to waiting at that pool's barrier); set to 1, element-wise
///   ops run on the calling thread.
///
/// A variable already set is left alone. Call it first thing in `main`, before the
/// process has started other threads: it changes the environment.
pub fn pin_thread_count() {
    pin_thread_count_among(1);
}

/// [`pin_thread_count`] for one of `processes` processes on this machine (the
/// processes of a data-parallel run that a launcher started here): each takes its
/// part of the cores, at least one, instead of all of them.
#[allow(unsafe_code)]
pub fn pin_thread_count_among(processes: usize) {
    let set = |name: &str, value: String| {
        if std::env::var_os(name).is_none() {
            // SAFETY: the caller runs this at the start of `main`, while the process
            // has one thread, so no other thread reads or writes the environment.
            unsafe { std::env::set_var(name, value) };
        }
    };
    set(
        "RAYON_NUM_THREADS",
        (candle::utils::get_num_threads() / processes.max(1))
            .max(1)
            .to_string(),
    );
    set("CANDLE_NUM_THREADS", "1".to_string());
}

thread_local! {
    /// Set while the calling thread runs [`on_this_thread`]'s closure.
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel it calls planning its work for the calling thread
/// alone: one batch chunk where the cache allows, no split of a product across
/// threads. For work that already keeps every thread busy with parts of its own (a
/// training batch split across the threads): splitting each op again only adds
/// overhead, and chunks sized for many threads are too small for one.
pub fn on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    /// Restores the flag even if `f` unwinds.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.set(self.0);
        }
    }
    let _restore = Restore(ALONE.replace(true));
    f()
}

/// The threads a kernel plans for: rayon's, or one inside [`on_this_thread`].
pub(crate) fn planned() -> usize {
    if ALONE.get() {
        1
    } else {
        rayon::current_num_threads().max(1)
    }
}
