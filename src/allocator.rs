//! The process allocator: mimalloc, told never to hand freed memory back to the kernel.
//!
//! A training step allocates and frees buffers of tens of MB (activations, gradients, the
//! convs' input copies). glibc returns those to the kernel at once (they are above its mmap
//! threshold); mimalloc by default "purges" them 1000 ms after the free (the v3 build we
//! link; `MIMALLOC_VERBOSE=1` prints its options). A purged range faults back in on the next
//! touch, and the kernel zeroes every transparent huge page it maps (`clear_page_erms`, the
//! top entry of `just profile` before this change). Without purging a process keeps its peak
//! footprint (a few hundred MB for the cpu profile) until it exits, and reuses it.
//!
//! What it does not remove: mimalloc still takes fresh arena memory for some large blocks
//! (first touches, zeroed by the kernel), and a whole process can see seconds of system time
//! in bursts outside the steady state (transparent-huge-page faults on this machine); a
//! step's median barely moved with this option alone (the measured numbers are in issue 12's
//! note). It is kept because it never costs time and removes one source of variance.
//!
//! The binary (src/main.rs) and the training-step benchmark install [`Allocator`] as the
//! global allocator and call [`keep_freed_memory`] first thing in `main`.

/// The global allocator of the `repro` binary and of the benchmarks.
pub type Allocator = mimalloc::MiMalloc;

/// Index of `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the version
/// libmimalloc-sys 0.1.49 builds; its Rust bindings name only the older options). Its
/// default in that build is 1000 (ms; `MIMALLOC_VERBOSE=1` lists the options by name); the
/// unit test below checks the index by that default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Stops mimalloc from returning freed memory to the kernel for the rest of the process.
/// Call it before the first large allocation; later calls change nothing.
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; -1 is the
    // documented "never purge" value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// If libmimalloc-sys moves to a mimalloc whose option table differs, the index above
    /// would silently set some other option: its value must be purge_delay's default (or
    /// what `MIMALLOC_PURGE_DELAY` asks for), and setting it must read back.
    #[test]
    fn purge_delay_index_is_mimallocs() {
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        let expected = std::env::var("MIMALLOC_PURGE_DELAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        assert_eq!(
            default, expected,
            "option {MI_OPTION_PURGE_DELAY} is not purge_delay (default 1000)"
        );
        keep_freed_memory();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
