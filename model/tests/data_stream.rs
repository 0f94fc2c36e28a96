//! Sharding, determinism and exact resume of the data stream (DESIGN "Data stream").

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use xvlm_model::config::RecordKeys;
use xvlm_model::data::augment::OpArithmetic;
use xvlm_model::data::loader::{Loader, LoaderConfig, StreamState};
use xvlm_model::data::masking::MaskConfig;
use xvlm_model::data::region::{RegionConfig, RegionProcessor};
use xvlm_model::data::sample::{ImageTextProcessor, ImageTextSample, TextPipeline};
use xvlm_model::data::shard::{Cursor, LineStream, ShardPlan, DEFAULT_MAX_LINE_BYTES};
use xvlm_model::data::store::list_shards;
use xvlm_model::data::synth::{generate, SynthConfig};
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::transform::TrainTransform;

/// Five shard files of unequal length (3, 7, 1, 12, 5 lines).
fn text_shards(dir: &Path) -> Vec<String> {
    let sizes = [3usize, 7, 1, 12, 5];
    for (f, &n) in sizes.iter().enumerate() {
        let body: String = (0..n)
            .map(|l| format!("{{\"f\": {f}, \"l\": {l}}}\n"))
            .collect();
        std::fs::write(dir.join(format!("shard-{f}.jsonl")), body).unwrap();
    }
    std::fs::write(dir.join("_SUCCESS"), "").unwrap();
    vec![dir.display().to_string()]
}

/// Lines (file, line) a rank reads in `epoch`, by walking its stream from the epoch's start.
fn epoch_lines(
    entries: &[String],
    rank: usize,
    world: usize,
    seed: u64,
    epoch: u64,
) -> Vec<(usize, u64)> {
    let plan = ShardPlan::new(list_shards(entries).unwrap(), rank, world, seed).unwrap();
    let start = Cursor {
        epoch,
        ..Cursor::default()
    };
    let mut stream = LineStream::new(plan, start, DEFAULT_MAX_LINE_BYTES);
    let mut out = Vec::new();
    loop {
        let line = stream.next_line().unwrap();
        if line.id.epoch != epoch {
            return out;
        }
        out.push((line.id.file, line.id.line));
    }
}

/// With 2 and 3 ranks over unequal files, every epoch's shares are disjoint, non-empty, and cover every
/// line exactly once; `_SUCCESS` markers are not shards.
#[test]
fn ranks_partition_every_line_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let entries = text_shards(dir.path());
    assert_eq!(list_shards(&entries).unwrap().len(), 5);
    let all: usize = 3 + 7 + 1 + 12 + 5;
    for world in [2, 3] {
        for epoch in 0..3 {
            let mut seen: HashMap<(usize, u64), usize> = HashMap::new();
            for rank in 0..world {
                let lines = epoch_lines(&entries, rank, world, 11, epoch);
                assert!(
                    !lines.is_empty(),
                    "rank {rank}/{world} epoch {epoch} is empty"
                );
                for l in lines {
                    *seen.entry(l).or_default() += 1;
                }
            }
            assert_eq!(
                seen.len(),
                all,
                "world {world} epoch {epoch}: lines missing"
            );
            assert!(
                seen.values().all(|&c| c == 1),
                "world {world} epoch {epoch}: a line read twice"
            );
        }
    }
}

/// More ranks than files is a clear error, not a silent duplication.
#[test]
fn too_few_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let entries = text_shards(dir.path());
    let err = ShardPlan::new(list_shards(&entries).unwrap(), 0, 6, 0).unwrap_err();
    assert!(err.to_string().contains("5 shard files"), "{err}");
}

/// Successive epochs and different seeds read the files in different orders.
#[test]
fn epochs_and_seeds_change_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let entries = text_shards(dir.path());
    let e0 = epoch_lines(&entries, 0, 1, 3, 0);
    let e1 = epoch_lines(&entries, 0, 1, 3, 1);
    assert_eq!(e0.len(), e1.len());
    assert_ne!(e0, e1, "epochs 0 and 1 read the same order");
    let other = epoch_lines(&entries, 0, 1, 4, 0);
    assert_ne!(e0, other, "seeds 3 and 4 read the same order");
    // Same seed, same epoch: identical.
    assert_eq!(e0, epoch_lines(&entries, 0, 1, 3, 0));
}

struct Corpus {
    _dir: tempfile::TempDir,
    entries: Vec<String>,
    regions: Vec<String>,
    text: TextPipeline,
}

fn corpus(images: usize, shards: usize) -> Corpus {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        images,
        seed: 5,
        width: 48,
        height: 40,
        shards,
        ..SynthConfig::default()
    };
    generate(dir.path(), &cfg).unwrap();
    let tok = TextTokenizer::from_vocab_txt(&dir.path().join("vocab.txt")).unwrap();
    let text = TextPipeline {
        tokenizer: Arc::new(tok),
        max_words: 12,
        max_tokens: 16,
        mask: MaskConfig {
            max_masks: 3,
            ..MaskConfig::default()
        },
        tokenized: false,
    };
    Corpus {
        entries: vec![dir.path().join("pretrain/image_text").display().to_string()],
        regions: vec![dir.path().join("pretrain/regions").display().to_string()],
        _dir: dir,
        text,
    }
}

fn image_text_loader(
    c: &Corpus,
    rank: usize,
    world: usize,
    seed: u64,
    threads: usize,
    state: StreamState,
) -> Loader<ImageTextSample> {
    let plan = ShardPlan::new(list_shards(&c.entries).unwrap(), rank, world, seed).unwrap();
    let processor = ImageTextProcessor {
        keys: RecordKeys::default(),
        text: c.text.clone(),
        transform: TrainTransform::pretrain(32),
    };
    let mut cfg = LoaderConfig::new(3, threads, seed);
    cfg.max_in_flight = 5;
    Loader::start(plan, Arc::new(processor), cfg, state)
}

type Batches = Vec<(Vec<ImageTextSample>, StreamState)>;

fn take(loader: &mut Loader<ImageTextSample>, n: usize) -> Batches {
    (0..n)
        .map(|_| {
            let b = loader.next_batch().unwrap();
            (b.samples, b.state)
        })
        .collect()
}

/// Same seed gives identical batches with 1 or 4 loader threads; another seed gives other batches.
#[test]
fn batches_do_not_depend_on_thread_count() {
    let c = corpus(40, 5);
    let one = take(
        &mut image_text_loader(&c, 0, 1, 9, 1, StreamState::default()),
        12,
    );
    let four = take(
        &mut image_text_loader(&c, 0, 1, 9, 4, StreamState::default()),
        12,
    );
    assert_eq!(one, four);
    assert!(
        one[11].1.cursor.epoch >= 1,
        "12 batches of 3 should cross an epoch of 32 lines"
    );
    let other = take(
        &mut image_text_loader(&c, 0, 1, 10, 2, StreamState::default()),
        12,
    );
    assert_ne!(
        one[0].0, other[0].0,
        "different seeds gave the same first batch"
    );
}

/// Two ranks over five unequal shard files: stopping after any batch (mid-file included) and resuming
/// from the saved (serialised) state yields exactly the batches the uninterrupted stream yields.
#[test]
fn resume_from_saved_state_continues_identically() {
    let c = corpus(40, 5);
    for rank in 0..2 {
        let full = take(
            &mut image_text_loader(&c, rank, 2, 21, 2, StreamState::default()),
            14,
        );
        let mut mid_file = 0;
        for stop in [1usize, 2, 3, 5, 8, 11] {
            let saved = serde_json::to_string(&full[stop - 1].1).unwrap();
            let state: StreamState = serde_json::from_str(&saved).unwrap();
            if state.cursor.line > 0 {
                mid_file += 1;
            }
            let resumed = take(&mut image_text_loader(&c, rank, 2, 21, 3, state), 14 - stop);
            assert_eq!(
                resumed,
                full[stop..].to_vec(),
                "rank {rank} resumed after batch {stop}"
            );
        }
        assert!(
            mid_file > 0,
            "rank {rank}: no stop point fell inside a file"
        );
    }
    // The two ranks' epoch-0 lines are disjoint.
    let lines = |rank| -> HashSet<(usize, u64)> {
        let plan = ShardPlan::new(list_shards(&c.entries).unwrap(), rank, 2, 21).unwrap();
        let mut s = LineStream::new(plan, Cursor::default(), DEFAULT_MAX_LINE_BYTES);
        let mut out = HashSet::new();
        loop {
            let l = s.next_line().unwrap();
            if l.id.epoch > 0 {
                return out;
            }
            out.insert((l.id.file, l.id.line));
        }
    };
    assert!(lines(0).is_disjoint(&lines(1)));
}

/// Region batches: shapes the model takes, patch masks that match the boxes, whole-image captions.
#[test]
fn region_batches_have_model_shapes() {
    let c = corpus(30, 3);
    let plan = ShardPlan::new(list_shards(&c.regions).unwrap(), 0, 1, 1).unwrap();
    let processor = RegionProcessor {
        keys: RecordKeys::default(),
        text: c.text.clone(),
        cfg: RegionConfig {
            image_res: 64,
            patch_size: 32,
            max_regions: 3,
            min_perc_in_image: 0.5,
            careful_hflip: false,
            arithmetic: OpArithmetic::Official,
        },
    };
    let mut loader = Loader::start(
        plan,
        Arc::new(processor),
        LoaderConfig::new(2, 2, 1),
        StreamState::default(),
    );
    let mut whole = 0;
    for _ in 0..5 {
        let b = loader.next_batch().unwrap();
        let mut rng = xvlm_model::data::rng::rng_for(
            1,
            xvlm_model::data::rng::Purpose::Collate,
            &[0, b.index],
        );
        let batch = xvlm_model::data::batch::RegionBatch::collate(&mut rng, &b.samples, 5);
        assert_eq!(batch.image.size(), vec![2, 3, 64, 64]);
        assert_eq!(batch.text_ids.size(), vec![5, 16]);
        assert_eq!(batch.masked_pos.size(), vec![5, 3]);
        assert_eq!(batch.image_atts.size(), vec![5, 5]);
        assert_eq!(batch.target_bbox.size(), vec![5, 4]);
        assert_eq!(batch.idx_to_group_img.size(), vec![5]);
        let is_image: Vec<i64> = Vec::try_from(&batch.is_image).unwrap();
        let atts: Vec<i64> = Vec::try_from(&batch.image_atts.view([-1])).unwrap();
        let boxes: Vec<f32> = Vec::try_from(&batch.target_bbox.view([-1])).unwrap();
        for t in 0..5 {
            assert_eq!(atts[t * 5], 1, "token 0 is always visible");
            let b = &boxes[t * 4..t * 4 + 4];
            assert!(b.iter().all(|v| (0.0..=1.0).contains(v)), "{b:?}");
            if is_image[t] == 1 {
                whole += 1;
                assert_eq!(&atts[t * 5..t * 5 + 5], &[1, 1, 1, 1, 1]);
                assert_eq!(b, &[0.5, 0.5, 1.0, 1.0]);
            }
        }
        let group: Vec<i64> = Vec::try_from(&batch.idx_to_group_img).unwrap();
        assert!(group.iter().all(|&g| (0..2).contains(&g)));
    }
    assert!(whole > 0, "no whole-image caption seen");
}

/// Empty shard files are fine (a rank may even draw only empty files in an epoch); a dataset of only
/// empty files is an error, not an endless loop.
#[test]
fn empty_files_are_tolerated_and_all_empty_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.jsonl"), "").unwrap();
    std::fs::write(dir.path().join("b.jsonl"), "{}\n{}\n").unwrap();
    let entries = vec![dir.path().display().to_string()];
    for rank in 0..2 {
        let plan = ShardPlan::new(list_shards(&entries).unwrap(), rank, 2, 0).unwrap();
        let mut s = LineStream::new(plan, Cursor::default(), DEFAULT_MAX_LINE_BYTES);
        for _ in 0..5 {
            assert_eq!(s.next_line().unwrap().id.file, 1, "only b.jsonl has lines");
        }
    }
    std::fs::write(dir.path().join("b.jsonl"), "").unwrap();
    let plan = ShardPlan::new(list_shards(&entries).unwrap(), 0, 1, 0).unwrap();
    let mut s = LineStream::new(plan, Cursor::default(), DEFAULT_MAX_LINE_BYTES);
    assert!(s.next_line().unwrap_err().to_string().contains("no lines"));
}
