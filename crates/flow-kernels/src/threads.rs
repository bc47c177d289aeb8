//! The thread count candle's CPU matrix products ask for.

/// candle asks for its thread count at every CPU matrix product and, when
/// `RAYON_NUM_THREADS` is unset, counts the physical cores by parsing `/proc/cpuinfo`
/// each time: on the small products of flow layers that costs as much as the product
/// (half of a small Glow's training step). Setting the variable once, to the count
/// candle would find, turns every later ask into a lookup. A set variable is left
/// alone.
///
/// Call it first thing in `main`, before the process has started other threads: it
/// changes the environment.
#[allow(unsafe_code)]
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let n = candle::utils::get_num_threads();
    // SAFETY: the caller runs this at the start of `main`, while the process has one
    // thread, so no other thread reads or writes the environment concurrently.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
}
