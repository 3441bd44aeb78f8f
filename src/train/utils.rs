//! The spec's small utilities: `set_seed` and `get_device`.

use rand::SeedableRng;
use rand::rngs::StdRng;

/// **Spec `set_seed(seed)`**. Rust has no global random state to seed: every random choice in
/// this crate takes an explicit RNG or seed. This returns the seeded generator to pass on, so
/// a run is reproduced by its seed (and its thread count, see [`crate::kernels::parallel`]).
pub fn set_seed(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The compute device: always the CPU, with rayon's thread count and the SIMD level in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Threads in rayon's pool (set with `RAYON_NUM_THREADS`).
    pub threads: usize,
    /// The SIMD kernels chosen at run time (`Scalar`, `Avx2`, `Avx512`).
    pub simd: String,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cpu ({} threads, {} kernels)", self.threads, self.simd)
    }
}

/// **Spec `get_device()`**: the CPU and its thread count.
pub fn get_device() -> Device {
    Device { threads: rayon::current_num_threads(), simd: format!("{:?}", crate::kernels::simd::level()) }
}
