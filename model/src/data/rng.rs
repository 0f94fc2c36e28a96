//! Derived randomness: every generator is seeded from (job seed, epoch or step, rank, purpose, ...), so a
//! resumed run needs only its cursor, and results never depend on thread scheduling.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What a random stream is used for (part of its seed, so purposes never share draws).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// The per-epoch order of shard files.
    FileShuffle = 1,
    /// Per-sample choices: caption pick, crop, flip, RandAugment, masking.
    Sample = 2,
    /// Per-batch choices: region-batch text selection.
    Collate = 3,
    /// Synthetic data generation.
    Synth = 4,
    /// The per-epoch order of a fine-tuning dataset's items.
    ItemShuffle = 5,
}

/// SplitMix64 finaliser: a strong 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seed derived from the job seed, the purpose and any further coordinates.
pub fn derive_seed(seed: u64, purpose: Purpose, parts: &[u64]) -> u64 {
    let mut h = mix(seed ^ mix(purpose as u64));
    for &p in parts {
        h = mix(h ^ p);
    }
    h
}

/// A generator for the given coordinates.
pub fn rng_for(seed: u64, purpose: Purpose, parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(derive_seed(seed, purpose, parts))
}
