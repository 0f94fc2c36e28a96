//! Randomness is derived, never carried (DESIGN.md "Job lifecycle"): every draw comes from a generator
//! seeded by (job seed, step, rank, purpose), so a resume needs only the step.

use sha2::{Digest, Sha256};

/// What a derived seed is for; distinct purposes give independent streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The pre-training coin deciding whether an iteration runs a region step (rank-independent).
    RegionCoin,
    /// ITM hard-negative draws of a region-batch step.
    ItmRegion,
    /// ITM hard-negative draws of an image-text-batch step.
    ItmGeneral,
    /// libtorch's global generator (dropout, drop-path) for a region-batch step.
    TorchRegion,
    /// libtorch's global generator for an image-text-batch step.
    TorchGeneral,
}

impl Purpose {
    fn tag(self) -> &'static [u8] {
        match self {
            Purpose::RegionCoin => b"region-coin",
            Purpose::ItmRegion => b"itm-region",
            Purpose::ItmGeneral => b"itm-general",
            Purpose::TorchRegion => b"torch-region",
            Purpose::TorchGeneral => b"torch-general",
        }
    }
}

/// A 64-bit seed that is a pure function of its arguments (SHA-256 of them, first 8 bytes).
pub fn derive_seed(job_seed: u64, step: u64, rank: usize, purpose: Purpose) -> u64 {
    let mut h = Sha256::new();
    h.update(job_seed.to_le_bytes());
    h.update(step.to_le_bytes());
    h.update((rank as u64).to_le_bytes());
    h.update(purpose.tag());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// A uniform draw in [0, 1) from (seed, step, purpose): the `random.random()` of the official loop.
pub fn uniform(job_seed: u64, step: u64, purpose: Purpose) -> f64 {
    // 53 random mantissa bits, as Python's random() gives.
    (derive_seed(job_seed, step, 0, purpose) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_depend_on_every_argument() {
        let base = derive_seed(42, 7, 0, Purpose::ItmGeneral);
        assert_eq!(base, derive_seed(42, 7, 0, Purpose::ItmGeneral));
        assert_ne!(base, derive_seed(43, 7, 0, Purpose::ItmGeneral));
        assert_ne!(base, derive_seed(42, 8, 0, Purpose::ItmGeneral));
        assert_ne!(base, derive_seed(42, 7, 1, Purpose::ItmGeneral));
        assert_ne!(base, derive_seed(42, 7, 0, Purpose::ItmRegion));
    }

    #[test]
    fn coin_frequency_is_near_its_probability() {
        let hits = (0..4000)
            .filter(|&s| uniform(1, s, Purpose::RegionCoin) < 0.5)
            .count();
        assert!((1800..2200).contains(&hits), "{hits}");
    }
}
