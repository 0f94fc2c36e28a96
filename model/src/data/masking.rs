//! MLM masking exactly as the official `TextMaskingGenerator` (reference §3.3): round-half-even mask count,
//! shuffled candidates, skip-gram spans, the `##` whole-word rule (also for RoBERTa, quirk 5), 80/10/10.

use rand::seq::SliceRandom;
use rand::Rng;

use super::DataError;

/// Masking settings (official config keys).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskConfig {
    /// `mask_prob`.
    pub mask_prob: f64,
    /// `max_masks`.
    pub max_masks: usize,
    /// `skipgram_prb`.
    pub skipgram_prb: f64,
    /// `skipgram_size`.
    pub skipgram_size: usize,
    /// `mask_whole_word`.
    pub mask_whole_word: bool,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            mask_prob: 0.25,
            max_masks: 8,
            skipgram_prb: 0.2,
            skipgram_size: 3,
            mask_whole_word: true,
        }
    }
}

/// A masked text, unpadded ids plus the MLM targets padded to `max_masks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedText {
    /// The ids with masked positions replaced.
    pub ids_masked: Vec<i64>,
    /// Positions, padded with 0 to `max_masks`.
    pub masked_pos: Vec<i64>,
    /// Original ids at those positions, padded with -100.
    pub masked_ids: Vec<i64>,
}

/// Python's `round` (half to even) of a non-negative value.
pub fn round_half_even(x: f64) -> usize {
    x.round_ties_even().max(0.0) as usize
}

/// Mask `ids` (`[CLS]` first; `tokens` the matching strings) with `mask_id`, random ids from `0..vocab`.
pub fn mask_text(
    rng: &mut impl Rng,
    cfg: &MaskConfig,
    ids: &[i64],
    tokens: &[String],
    mask_id: i64,
    vocab: usize,
) -> Result<MaskedText, DataError> {
    let n = ids.len();
    if n < 2 {
        return Err(DataError::Sample("text has no tokens to mask".into()));
    }
    let n_pred = cfg
        .max_masks
        .min(round_half_even(n as f64 * cfg.mask_prob).max(1));
    let mut cand: Vec<usize> = (1..n).collect();
    cand.shuffle(rng);
    let is_sub = |i: usize| tokens.get(i).is_some_and(|t| t.starts_with("##"));
    let mut masked = vec![false; n];
    let mut count = 0;
    for &pos in &cand {
        if count >= n_pred {
            break;
        }
        if masked[pos] {
            continue;
        }
        let span = if cfg.skipgram_prb > 0.0
            && cfg.skipgram_size >= 2
            && rng.random::<f64>() < cfg.skipgram_prb
        {
            rng.random_range(2..=cfg.skipgram_size)
        } else {
            1
        };
        let (mut st, mut end) = (pos, pos + span);
        if cfg.mask_whole_word {
            while is_sub(st) {
                if st == 0 {
                    break;
                }
                st -= 1;
            }
            while end < n && is_sub(end) {
                end += 1;
            }
        }
        // The official loop stops at the first position that is 0 or past the end: a span that starts
        // at 0 adds nothing, one that runs past the end is cut.
        if st > 0 {
            for m in masked[st..end.min(n)].iter_mut() {
                if !*m {
                    *m = true;
                    count += 1;
                }
            }
        }
    }
    let mut chosen: Vec<usize> = (0..n).filter(|&i| masked[i]).collect();
    if chosen.len() > n_pred {
        chosen.shuffle(rng);
        chosen.truncate(n_pred);
    }
    let mut ids_masked = ids.to_vec();
    for &pos in &chosen {
        if rng.random::<f64>() < 0.8 {
            ids_masked[pos] = mask_id;
        } else if rng.random::<f64>() < 0.5 {
            ids_masked[pos] = rng.random_range(0..vocab as i64);
        }
    }
    let mut masked_pos = vec![0i64; cfg.max_masks];
    let mut masked_ids = vec![-100i64; cfg.max_masks];
    for (slot, &pos) in chosen.iter().enumerate().take(cfg.max_masks) {
        masked_pos[slot] = pos as i64;
        masked_ids[slot] = ids[pos];
    }
    Ok(MaskedText {
        ids_masked,
        masked_pos,
        masked_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::rng::{rng_for, Purpose};

    #[test]
    fn mask_count_rounds_half_to_even() {
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.5), 4);
        assert_eq!(round_half_even(2.25), 2);
    }

    /// 10 tokens x 0.25 = 2.5 -> 2 masks (never 3), and whole words are never split.
    #[test]
    fn masks_whole_words_and_counts() {
        let tokens: Vec<String> = [
            "[CLS]", "a", "u", "##m", "##b", "dog", "on", "the", "red", "mat",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let ids: Vec<i64> = (0..10).map(|i| 1000 + i).collect();
        let cfg = MaskConfig {
            skipgram_prb: 0.0,
            ..MaskConfig::default()
        };
        for s in 0..200 {
            let mut rng = rng_for(s, Purpose::Sample, &[]);
            let m = mask_text(&mut rng, &cfg, &ids, &tokens, 4, 30).unwrap();
            let real: Vec<i64> = m.masked_pos.iter().copied().filter(|&p| p > 0).collect();
            assert!(real.len() <= 2, "{real:?}");
            assert!(!real.contains(&0));
            for (&p, &label) in m.masked_pos.iter().zip(&m.masked_ids) {
                if p > 0 {
                    assert_eq!(label, ids[p as usize]);
                }
            }
        }
    }
}
