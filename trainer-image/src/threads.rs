//! CPU thread settings the trainer binaries apply first thing in `main`.
//!
//! candle's CPU backend runs its elementwise ops (adds, products, copies) on a thread pool of
//! its own beside rayon's, and after every op its workers spin 25,000 `pause`s (about a
//! millisecond here) before they sleep. A training step runs thousands of those ops between
//! the rayon-parallel GEMMs and kernels, so that spinning was about a fifth of a full SD1.5
//! step's CPU time and took cores from the rayon threads: 28.2 → 21.8–25.9 CPU-s per step
//! over several runs with the limit below (`trainer-bench --only-full`; the machine drifts
//! ±15 %).

/// The environment variable candle reads (once, when its pool starts) for the spin limit.
const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Spins before a candle pool worker sleeps: tens of microseconds, enough to catch the next
/// op of a burst, short of burning a core between them.
const SPIN_LIMIT: &str = "1000";

/// Limits candle's pool spinning, unless the environment already sets a limit.
///
/// # Safety
///
/// Call before the process starts any other thread (first thing in `main`): it sets an
/// environment variable, which is unsound while another thread may read the environment.
#[allow(unsafe_code)]
pub unsafe fn limit_candle_spinning() {
    if std::env::var_os(SPIN_LIMIT_VAR).is_none() {
        // SAFETY: the caller guarantees no other thread exists yet.
        unsafe {
            std::env::set_var(SPIN_LIMIT_VAR, SPIN_LIMIT);
        }
    }
}
