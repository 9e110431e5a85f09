//! The process allocator: mimalloc, told never to hand freed memory back to the kernel.
//!
//! A training step allocates and frees buffers of tens of MB (activations, gradients, the
//! convs' input copies). glibc returns those to the kernel at once (they are above its mmap
//! threshold); mimalloc by default "purges" them 10 ms after the free (100 ms inside its
//! arenas). Either way the next step faults them back in, and the kernel zeroes every
//! transparent huge page it maps: `perf` put 41 % of a cpu fi-RevNet CE step at 1 thread in
//! `clear_page_erms` with mimalloc's defaults. Without purging, a process keeps its peak
//! footprint (a few hundred MB for the cpu profile) until it exits, and reuses it.
//!
//! The binary (src/main.rs) and the training-step benchmark install [`Allocator`] as the
//! global allocator and call [`keep_freed_memory`] first thing in `main`.

/// The global allocator of the `repro` binary and of the benchmarks.
pub type Allocator = mimalloc::MiMalloc;

/// Index of `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the version
/// libmimalloc-sys 0.1.49 builds; its Rust bindings name only the older options). Its
/// default is 10 (ms); the unit test below checks both before anything relies on them.
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
    /// would silently set some other option: its default must be purge_delay's, and setting
    /// it must read back.
    #[test]
    fn purge_delay_index_is_mimallocs() {
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(
            default == 10 || default == -1,
            "option {MI_OPTION_PURGE_DELAY} reads {default}, not purge_delay's default 10"
        );
        keep_freed_memory();
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
