//! Who encodes and who scores what: rank slices made of whole encoding batches, and each rank's ITM
//! pairs in the world-independent order they are scored in. Pure bookkeeping, no tensors.

use std::ops::Range;

pub use crate::collective::{rank_slice, rank_slices};

/// One (image, text) pair to score with the ITM head and where its logit goes: a flat position in the
/// image→text top-k scores [Ni·k_i2t], in the text→image top-k scores [Nt·k_t2i], or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pair {
    pub image: usize,
    pub text: usize,
    pub i2t_slot: Option<usize>,
    pub t2i_slot: Option<usize>,
}

/// The pairs one rank scores, grouped into fusion batches.
#[derive(Debug)]
pub(crate) struct PairPlan {
    /// Sorted by (text chunk, image batch, image, text), each (image, text) once.
    pub pairs: Vec<Pair>,
    /// Index ranges into `pairs`: one fusion forward each, never spanning two text chunks or two image
    /// batches, at most `itm_batch` long.
    pub batches: Vec<Range<usize>>,
    /// For each text chunk, the range of `batches` scored while that chunk's states are held.
    pub rounds: Vec<Range<usize>>,
}

/// Sizes that fix the plan; equal on every rank.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlanShape {
    pub n_texts: usize,
    pub image_batch: usize,
    pub text_chunk: usize,
    pub itm_batch: usize,
}

/// The pairs whose image lies in `images`: every top-k text of those images (`i2t_idx` [Ni·k_i2t]
/// row-major) and every text whose top-k (`t2i_idx` [Nt·k_t2i]) names one of them. A pair in both
/// lists is scored once and its logit used twice. The grouping depends only on the global top-k and
/// `shape`, never on the world size, so each pair's logit comes from the same fusion batch at every
/// world size.
pub(crate) fn plan_pairs(
    images: Range<usize>,
    i2t_idx: &[usize],
    k_i2t: usize,
    t2i_idx: &[usize],
    k_t2i: usize,
    shape: PlanShape,
) -> PairPlan {
    let mut pairs = Vec::new();
    for i in images.clone() {
        for p in 0..k_i2t {
            let slot = i * k_i2t + p;
            pairs.push(Pair {
                image: i,
                text: i2t_idx[slot],
                i2t_slot: Some(slot),
                t2i_slot: None,
            });
        }
    }
    for (slot, &i) in t2i_idx.iter().enumerate() {
        if images.contains(&i) {
            pairs.push(Pair {
                image: i,
                text: slot / k_t2i,
                i2t_slot: None,
                t2i_slot: Some(slot),
            });
        }
    }
    let key = |p: &Pair| {
        (
            p.text / shape.text_chunk,
            p.image / shape.image_batch,
            p.image,
            p.text,
        )
    };
    pairs.sort_by_key(key);
    pairs.dedup_by(|later, kept| {
        let same = later.image == kept.image && later.text == kept.text;
        if same {
            kept.i2t_slot = kept.i2t_slot.or(later.i2t_slot);
            kept.t2i_slot = kept.t2i_slot.or(later.t2i_slot);
        }
        same
    });

    let n_chunks = shape.n_texts.div_ceil(shape.text_chunk);
    let mut batches = Vec::new();
    let mut rounds = Vec::with_capacity(n_chunks);
    let mut next = 0;
    for chunk in 0..n_chunks {
        let first_batch = batches.len();
        while next < pairs.len() && pairs[next].text / shape.text_chunk == chunk {
            let group = pairs[next].image / shape.image_batch;
            let start = next;
            while next < pairs.len()
                && next - start < shape.itm_batch
                && pairs[next].text / shape.text_chunk == chunk
                && pairs[next].image / shape.image_batch == group
            {
                next += 1;
            }
            batches.push(start..next);
        }
        rounds.push(first_batch..batches.len());
    }
    PairPlan {
        pairs,
        batches,
        rounds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slices are contiguous, cover 0..n once, start on batch boundaries and differ by at most one
    /// batch; with more ranks than batches the extra ranks get nothing.
    #[test]
    fn slices_cover_everything_once() {
        for n in [1usize, 5, 7, 16, 25] {
            for batch in [1usize, 2, 3, 8] {
                for world in 1..=6usize {
                    let slices = rank_slices(n, batch, world);
                    assert_eq!(slices[0].start, 0);
                    assert_eq!(slices[world - 1].end, n);
                    for w in slices.windows(2) {
                        assert_eq!(w[0].end, w[1].start, "n {n} batch {batch} world {world}");
                    }
                    let lens: Vec<usize> = slices.iter().map(|s| s.len()).collect();
                    let (min, max) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
                    assert!(max - min <= batch, "{lens:?}");
                    assert!(slices.iter().all(|s| s.start % batch == 0 || s.is_empty()));
                }
            }
        }
        assert_eq!(rank_slices(5, 2, 4), vec![0..0, 0..2, 2..4, 4..5]);
    }

    fn toy_topk() -> (Vec<usize>, Vec<usize>) {
        // 4 images, 6 texts, k = 2 both ways.
        let i2t = vec![0, 1, 2, 3, 4, 5, 0, 5];
        let t2i = vec![0, 1, 0, 2, 1, 0, 2, 1, 2, 3, 3, 0];
        (i2t, t2i)
    }

    const SHAPE: PlanShape = PlanShape {
        n_texts: 6,
        image_batch: 2,
        text_chunk: 4,
        itm_batch: 3,
    };

    /// The union over ranks of the planned pairs is every top-k slot exactly once, and a pair in both
    /// directions is scored once.
    #[test]
    fn plans_fill_every_slot_once_across_ranks() {
        let (i2t, t2i) = toy_topk();
        for world in 1..=4 {
            let mut i2t_hits = vec![0; i2t.len()];
            let mut t2i_hits = vec![0; t2i.len()];
            let mut total = 0;
            for images in rank_slices(4, 2, world) {
                let plan = plan_pairs(images, &i2t, 2, &t2i, 2, SHAPE);
                for p in &plan.pairs {
                    if let Some(s) = p.i2t_slot {
                        assert_eq!(i2t[s], p.text);
                        i2t_hits[s] += 1;
                    }
                    if let Some(s) = p.t2i_slot {
                        assert_eq!(t2i[s], p.image);
                        t2i_hits[s] += 1;
                    }
                }
                total += plan.pairs.len();
            }
            assert!(i2t_hits.iter().chain(&t2i_hits).all(|&h| h == 1));
            // 20 slots; (image, text) = (0,0) (0,1) (1,2) (1,3) (2,4) (3,5) are in both lists.
            assert_eq!(total, 20 - 6, "world {world}");
        }
    }

    /// The fusion batches are the same at every world size (only split between ranks), respect the
    /// chunk, image-batch and size bounds, and each round holds one text chunk.
    #[test]
    fn batches_do_not_depend_on_the_world() {
        let (i2t, t2i) = toy_topk();
        let batches_of = |world: usize| {
            let mut all: Vec<Vec<(usize, usize)>> = Vec::new();
            for images in rank_slices(4, 2, world) {
                let plan = plan_pairs(images, &i2t, 2, &t2i, 2, SHAPE);
                assert_eq!(plan.rounds.len(), 2);
                for (chunk, round) in plan.rounds.iter().enumerate() {
                    for b in &plan.batches[round.clone()] {
                        let pairs = &plan.pairs[b.clone()];
                        assert!(!pairs.is_empty() && pairs.len() <= SHAPE.itm_batch);
                        assert!(pairs.iter().all(|p| p.text / 4 == chunk));
                        assert!(pairs.iter().all(|p| p.image / 2 == pairs[0].image / 2));
                        all.push(pairs.iter().map(|p| (p.image, p.text)).collect());
                    }
                }
            }
            all.sort();
            all
        };
        let single = batches_of(1);
        for world in 2..=4 {
            assert_eq!(batches_of(world), single, "world {world}");
        }
    }
}
