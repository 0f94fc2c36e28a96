//! The distributed retrieval evaluation over the TCP ring: the same metrics, top-k and ITM logits (bit
//! for bit) at world sizes 1, 2 and 4 on the `retrieval` fixture's tiny model with random images and
//! captions; each rank scores about 1/W of the ITM pairs; more ranks than encoding batches works; ranks
//! that disagree on the split fail with a message naming the rank.

use std::ops::Range;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_model::config::TaskConfig;
use xvlm_model::metrics::retrieval::{GroundTruth, RetrievalMetrics};
use xvlm_model::parity::{load_case_weights, WeightsSource};
use xvlm_model::tasks::retrieval::eval::{rank_slice, RetrievalEvalConfig, RetrievalSource};
use xvlm_model::tasks::RetrievalModel;
use xvlm_model::xvlm::ModelError;
use xvlm_worker::comm::ring::local_ring;

const TOKENS: i64 = 16;

/// A random split kept as plain vectors so every rank thread builds identical tensors from it.
#[derive(Clone)]
struct RandomSplit {
    n_images: usize,
    captions: usize,
    pixels: Vec<f32>,
    ids: Vec<i64>,
    atts: Vec<i64>,
}

impl RandomSplit {
    fn new(n_images: usize, captions: usize, seed: i64) -> Self {
        tch::manual_seed(seed);
        let nt = (n_images * captions) as i64;
        let pixels = Tensor::randn([n_images as i64, 3, 64, 64], (Kind::Float, Device::Cpu));
        // Random word pieces of the fixture's 228-entry vocabulary, random lengths 4..=TOKENS, padded
        // with 0.
        let ids = Tensor::randint_low(5, 228, [nt, TOKENS], (Kind::Int64, Device::Cpu));
        let lens = Tensor::randint_low(4, TOKENS + 1, [nt, 1], (Kind::Int64, Device::Cpu));
        let atts = Tensor::arange(TOKENS, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .lt_tensor(&lens)
            .to_kind(Kind::Int64);
        let ids = &ids * &atts;
        let vec_f = |t: &Tensor| Vec::<f32>::try_from(t.reshape([-1])).unwrap();
        let vec_i = |t: &Tensor| Vec::<i64>::try_from(t.reshape([-1])).unwrap();
        RandomSplit {
            n_images,
            captions,
            pixels: vec_f(&pixels),
            ids: vec_i(&ids),
            atts: vec_i(&atts),
        }
    }

    fn gt(&self) -> GroundTruth {
        let c = self.captions;
        let txt2img = (0..self.n_images * c).map(|t| t / c).collect();
        let img2txt = (0..self.n_images)
            .map(|i| (i * c..(i + 1) * c).collect())
            .collect();
        GroundTruth::new(txt2img, img2txt).unwrap()
    }
}

/// Serves one rank's batches and records which indices it was asked for.
struct Source<'a> {
    split: &'a RandomSplit,
    images_read: Vec<Range<usize>>,
    texts_read: Vec<Range<usize>>,
}

impl RetrievalSource for Source<'_> {
    type Error = std::convert::Infallible;
    fn images(&mut self, range: Range<usize>) -> Result<Tensor, Self::Error> {
        let per = 3 * 64 * 64;
        self.images_read.push(range.clone());
        let values = &self.split.pixels[range.start * per..range.end * per];
        Ok(Tensor::from_slice(values).view([range.len() as i64, 3, 64, 64]))
    }
    fn texts(&mut self, range: Range<usize>) -> Result<(Tensor, Tensor), Self::Error> {
        let t = TOKENS as usize;
        self.texts_read.push(range.clone());
        let rows = |v: &[i64]| {
            Tensor::from_slice(&v[range.start * t..range.end * t])
                .view([range.len() as i64, TOKENS])
        };
        Ok((rows(&self.split.ids), rows(&self.split.atts)))
    }
}

/// What one rank's evaluation gave, in plain values.
#[derive(Debug, Clone, PartialEq)]
struct RankResult {
    itc: RetrievalMetrics,
    itm: RetrievalMetrics,
    i2t_idx: Vec<i64>,
    t2i_idx: Vec<i64>,
    /// Bit patterns of the ITM logits and of the features.
    i2t_score: Vec<u32>,
    t2i_score: Vec<u32>,
    features: Vec<u32>,
}

struct RankRun {
    result: RankResult,
    itm_pairs: usize,
    images: Range<usize>,
    images_read: Vec<Range<usize>>,
    texts_read: Vec<Range<usize>>,
}

fn fixture_model() -> (VarStore, RetrievalModel) {
    let dir = xvlm_model::fixtures_dir().join("retrieval");
    let task = TaskConfig::load(&dir.join("config.yaml")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = RetrievalModel::new(&vs.root(), &task).unwrap();
    load_case_weights(
        &vs,
        &dir,
        WeightsSource::Safetensors,
        &model.core.tied_aliases(),
    )
    .unwrap();
    (vs, model)
}

fn evaluate(
    comm: &dyn Collective,
    split: &RandomSplit,
    cfg: &RetrievalEvalConfig,
) -> Result<RankRun, ModelError> {
    tch::set_num_threads(1);
    let (_vs, model) = fixture_model();
    let mut source = Source {
        split,
        images_read: Vec::new(),
        texts_read: Vec::new(),
    };
    let out = model.evaluate(comm, &split.gt(), &mut source, cfg)?;
    let bits = |t: &Tensor| {
        Vec::<f32>::try_from(t.reshape([-1]))
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    let ints = |t: &Tensor| Vec::<i64>::try_from(t.reshape([-1])).unwrap();
    let mut features = bits(&out.image_feat);
    features.extend(bits(&out.text_feat));
    Ok(RankRun {
        result: RankResult {
            itc: out.itc,
            itm: out.itm,
            i2t_idx: ints(&out.i2t.idx),
            t2i_idx: ints(&out.t2i.idx),
            i2t_score: bits(&out.i2t.itm_score),
            t2i_score: bits(&out.t2i.itm_score),
            features,
        },
        itm_pairs: out.itm_pairs,
        images: out.local.images,
        images_read: source.images_read,
        texts_read: source.texts_read,
    })
}

/// Every rank of a `world`-rank loopback ring, `cfg_of(rank)` its config.
fn on_ring(
    world: usize,
    split: &RandomSplit,
    cfg_of: impl Fn(usize) -> RetrievalEvalConfig,
) -> Vec<Result<RankRun, ModelError>> {
    let comms = local_ring(world).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let split = split.clone();
            let cfg = cfg_of(c.rank());
            std::thread::spawn(move || evaluate(&c, &split, &cfg))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn config() -> RetrievalEvalConfig {
    RetrievalEvalConfig {
        itm_batch: 3,
        text_chunk: 8,
        sim_rows: 5,
        ..RetrievalEvalConfig::new(4, 2, 3)
    }
}

/// 11 images (not divisible by 2 or 4) x 5 captions: world 2 and 4 give exactly the world-1 metrics,
/// top-k, logits and features on every rank; each rank scores exactly the distinct pairs of its images
/// (how many depends on how often its images are in the texts' top-k); every image and text is read
/// exactly once across the ranks.
#[test]
fn metrics_are_identical_at_world_1_2_4() {
    let split = RandomSplit::new(11, 5, 7);
    let single = evaluate(&SingleProcess, &split, &config()).unwrap();
    let total = single.itm_pairs;
    // Pairs named by both top-k lists are scored once: fewer than Ni·k + Nt·k forwards.
    assert!((55 * 4..=11 * 4 + 55 * 4).contains(&total), "{total}");
    // The recall is that of a real ranking, not a constant: ITC and ITM rank differently.
    assert_ne!(single.result.itc, single.result.itm);
    for world in [2usize, 4] {
        let runs: Vec<RankRun> = on_ring(world, &split, |_| config())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let mut images_read: Vec<Range<usize>> = Vec::new();
        let mut texts_read: Vec<Range<usize>> = Vec::new();
        for (rank, run) in runs.iter().enumerate() {
            assert_eq!(run.result, single.result, "world {world}, rank {rank}");
            assert_eq!(run.images, rank_slice(11, 2, world, rank));
            images_read.extend(run.images_read.iter().cloned());
            texts_read.extend(run.texts_read.iter().cloned());
        }
        let covered = |mut ranges: Vec<Range<usize>>, n: usize| {
            ranges.sort_by_key(|r| r.start);
            ranges.iter().map(|r| r.len()).sum::<usize>() == n
                && ranges.windows(2).all(|w| w[0].end == w[1].start)
                && ranges.first().map(|r| r.start) == Some(0)
        };
        assert!(covered(images_read, 11), "world {world}: images read once");
        assert!(covered(texts_read, 55), "world {world}: texts read once");

        // Each pair is scored once, on the rank holding its image.
        let per_image = pairs_per_image(&single.result, 11, 4);
        assert_eq!(per_image.iter().sum::<usize>(), total);
        for (rank, run) in runs.iter().enumerate() {
            let expected: usize = per_image[run.images.clone()].iter().sum();
            assert_eq!(run.itm_pairs, expected, "world {world}, rank {rank}");
            eprintln!(
                "world {world} rank {rank}: {} images, {} of {total} ITM pairs",
                run.images.len(),
                run.itm_pairs
            );
        }
    }
}

/// Distinct texts paired with each image by either top-k (flattened [Ni, k] and [Nt, k] indices).
fn pairs_per_image(r: &RankResult, n_images: usize, k: usize) -> Vec<usize> {
    let mut texts: Vec<std::collections::BTreeSet<i64>> = vec![Default::default(); n_images];
    for (slot, &t) in r.i2t_idx.iter().enumerate() {
        texts[slot / k].insert(t);
    }
    for (slot, &i) in r.t2i_idx.iter().enumerate() {
        texts[i as usize].insert((slot / k) as i64);
    }
    texts.iter().map(|s| s.len()).collect()
}

/// With k_test = Ni every image is a candidate of every text, so a rank scores exactly its images'
/// share of the pairs: |slice| x Nt, 1/W up to the slice sizes (whole batches of 2 of 12 images).
#[test]
fn itm_pairs_split_by_image_share() {
    let split = RandomSplit::new(12, 5, 5);
    let cfg = RetrievalEvalConfig {
        itm_batch: 16,
        text_chunk: 16,
        ..RetrievalEvalConfig::new(12, 2, 8)
    };
    let single = evaluate(&SingleProcess, &split, &cfg).unwrap();
    assert_eq!(single.itm_pairs, 12 * 60);
    for world in [2usize, 3] {
        let runs: Vec<RankRun> = on_ring(world, &split, |_| cfg)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for (rank, run) in runs.iter().enumerate() {
            assert_eq!(run.result, single.result, "world {world}, rank {rank}");
            assert_eq!(run.images.len(), 12 / world, "world {world}, rank {rank}");
            assert_eq!(run.itm_pairs, 12 * 60 / world, "world {world}, rank {rank}");
        }
    }
}

/// 3 images in batches of 2 and 6 texts in batches of 4 on 4 ranks: two ranks encode no image and two
/// no text, and every rank still gets the one-rank metrics.
#[test]
fn more_ranks_than_encoding_batches() {
    let split = RandomSplit::new(3, 2, 11);
    let cfg = RetrievalEvalConfig::new(2, 2, 4);
    let single = evaluate(&SingleProcess, &split, &cfg).unwrap();
    let runs: Vec<RankRun> = on_ring(4, &split, |_| cfg)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let no_images = runs.iter().filter(|r| r.images_read.is_empty()).count();
    let no_texts = runs.iter().filter(|r| r.texts_read.is_empty()).count();
    assert_eq!((no_images, no_texts), (2, 2));
    for (rank, run) in runs.iter().enumerate() {
        assert_eq!(run.result, single.result, "rank {rank}");
    }
    let pairs: usize = runs.iter().map(|r| r.itm_pairs).sum();
    assert_eq!(pairs, single.itm_pairs);
}

/// A rank evaluating with another k fails on every rank, naming the disagreement.
#[test]
fn ranks_that_disagree_fail_clearly() {
    let split = RandomSplit::new(4, 5, 3);
    let results = on_ring(2, &split, |rank| RetrievalEvalConfig {
        k_test: 2 + rank,
        ..config()
    });
    for r in results {
        let err = r.err().expect("a mismatched config fails").to_string();
        assert!(err.contains("rank") && err.contains("k"), "{err}");
    }
}
