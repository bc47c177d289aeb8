//! The allocator's settings for a process that trains.
//!
//! A training step frees and allocates the same large buffers as the step before. mimalloc
//! returns freed memory to the system after a delay (a second by default), and the step
//! after takes a page fault for every page of those buffers again.

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_t`, `mimalloc.h`), which
/// its Rust bindings do not name: milliseconds before freed memory goes back to the
/// system, `-1` for never.
const PURGE_DELAY: mi_option_t = 15;

/// Has mimalloc keep the memory the process frees for its next allocations, never
/// returning it to the system: the resident size stays at its peak, and a step reuses
/// the pages of the one before. Call it at the start of a process whose global allocator
/// is mimalloc, before other threads start.
pub fn retain_freed_memory() {
    // SAFETY: `mi_option_set` stores one value in mimalloc's option table; the option
    // exists in every mimalloc this binds (v2 and v3), and -1 is a documented value of it.
    unsafe { mi_option_set(PURGE_DELAY, -1) }
}

/// The purge delay mimalloc uses now, in milliseconds (`-1`: never).
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: `mi_option_get` reads one value of mimalloc's option table.
    unsafe { mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        // The position is mimalloc's purge delay if it holds that option's default, the
        // 1 000 ms of mimalloc v3 (the one built here); the options beside it default to
        // 0, 1 or -1.
        let set = |name| std::env::var_os(name).is_some();
        if !set("MIMALLOC_PURGE_DELAY") && !set("MIMALLOC_RESET_DELAY") {
            assert_eq!(purge_delay_ms(), 1000);
        }
        retain_freed_memory();
        assert_eq!(purge_delay_ms(), -1);
    }
}
