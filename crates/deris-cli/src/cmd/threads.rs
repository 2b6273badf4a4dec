//! Worker thread counts, fixed once per process before any pool starts.
//!
//! candle asks for its thread count on every matrix product; unless `RAYON_NUM_THREADS` is set,
//! that re-reads `/proc/cpuinfo` each time (measured: ~11 % of a training step of the synthetic
//! model). So the count is worked out once here and written to the environment.

use anyhow::{ensure, Context, Result};

/// Sets the thread counts: `threads` workers (default: what candle detects) for rayon and the
/// matrix products, and `op_threads` (default: `threads`) for candle's element-wise and reduction
/// ops. A count already in the environment (`RAYON_NUM_THREADS`, `CANDLE_NUM_THREADS`) is kept
/// unless the flag gives one. Call first, while only the main thread runs.
pub fn configure(threads: Option<usize>, op_threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        ensure!(n > 0, "--threads must be at least 1");
        set("RAYON_NUM_THREADS", n);
    }
    // Reads RAYON_NUM_THREADS, or detects the cores once when it is unset.
    let n = candle_core::utils::get_num_threads();
    set("RAYON_NUM_THREADS", n);
    if threads.is_some() || std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        set("CANDLE_NUM_THREADS", op_threads.unwrap_or(n).min(n));
    }
    rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")
}

fn set(var: &str, n: usize) {
    // Sound: called before any other thread of this process starts (see `configure`).
    std::env::set_var(var, n.to_string());
}
