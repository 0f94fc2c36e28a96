//! The demo learns (issue 5): the demo model of configs/Pretrain_XVLM_demo.yaml, pre-trained in-process
//! for a short budget on the corpus `scripts/demo.sh` writes (`xvlm synth-data` with the same shape and
//! background settings), through the real loaders and trainer, ranks the held-out test pairs by ITC
//! similarity far above chance in both directions. With the official augmentation and lr (or the old demo
//! config) the features collapse and the ranks stay at chance, so this test fails there.

use std::path::Path;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::SingleProcess;
use xvlm_model::config::{configs_dir, TaskConfig};
use xvlm_model::data::batch::{ImageTextBatch, RegionBatch};
use xvlm_model::data::caption::pre_caption;
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{ImageTextLoader, PretrainDataConfig, RegionLoader};
use xvlm_model::data::synth::{generate, SynthConfig};
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::data::transform::TestTransform;
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::PretrainTrainer;

/// Iterations of the short budget (one rank, 8 pairs per batch): 5 epochs of the 320 training images.
const ITERATIONS: u64 = 200;

fn general(b: ImageTextBatch) -> PretrainBatch {
    PretrainBatch {
        image: b.image,
        text_ids: b.text_ids,
        text_atts: b.text_atts,
        text_ids_masked: b.text_ids_masked,
        masked_pos: b.masked_pos,
        masked_ids: b.masked_ids,
        region: None,
    }
}

fn region(b: RegionBatch) -> PretrainBatch {
    PretrainBatch {
        image: b.image,
        text_ids: b.text_ids,
        text_atts: b.text_atts,
        text_ids_masked: b.text_ids_masked,
        masked_pos: b.masked_pos,
        masked_ids: b.masked_ids,
        region: Some(RegionInputs {
            idx_to_group_img: b.idx_to_group_img,
            image_atts: b.image_atts,
            target_bbox: b.target_bbox,
            is_image: b.is_image,
        }),
    }
}

/// Zero-shot ITC retrieval on `finetune/retrieval_test.json`, as `xvlm eval-retrieval` ranks it: the
/// rank of the ground truth in each direction (ties count against it, so collapsed, all-equal features
/// rank last), and what a random ranking scores.
struct Ranking {
    /// Per image: the rank of its best-ranked own caption among all captions (1 = top).
    text_ranks: Vec<usize>,
    /// Per caption: the rank of its image among all images.
    image_ranks: Vec<usize>,
    /// Captions per image.
    per_image: usize,
}

impl Ranking {
    fn recall(ranks: &[usize], k: usize) -> f64 {
        ranks.iter().filter(|&&r| r <= k).count() as f64 / ranks.len() as f64
    }

    fn mean(ranks: &[usize]) -> f64 {
        ranks.iter().sum::<usize>() as f64 / ranks.len() as f64
    }

    /// Text retrieval R@k and its chance (some of an image's `per_image` captions among k random ones).
    fn text_recall(&self, k: usize) -> (f64, f64) {
        let nt = self.image_ranks.len();
        let miss: f64 = (0..k)
            .map(|i| (nt - self.per_image - i) as f64 / (nt - i) as f64)
            .product();
        (Self::recall(&self.text_ranks, k), 1.0 - miss)
    }

    /// Image retrieval R@k and its chance.
    fn image_recall(&self, k: usize) -> (f64, f64) {
        let ni = self.text_ranks.len();
        (Self::recall(&self.image_ranks, k), k as f64 / ni as f64)
    }

    /// Mean ranks (text, image) and their chance values: the best of `per_image` random ranks among
    /// `nt`, and a uniform rank among `ni`.
    fn mean_ranks(&self) -> [(f64, f64); 2] {
        let (ni, nt) = (self.text_ranks.len(), self.image_ranks.len());
        [
            (
                Self::mean(&self.text_ranks),
                (nt + 1) as f64 / (self.per_image + 1) as f64,
            ),
            (Self::mean(&self.image_ranks), (ni + 1) as f64 / 2.0),
        ]
    }
}

fn mean_off_diagonal_cosine(feat: &Tensor) -> f64 {
    let n = feat.size()[0];
    let s = feat.matmul(&feat.tr());
    ((s.sum(Kind::Double) - s.trace().to_kind(Kind::Double)) / (n * (n - 1)) as f64)
        .double_value(&[])
}

fn evaluate(model: &PretrainModel, task: &TaskConfig, data: &Path) -> Ranking {
    let file = data.join("finetune/retrieval_test.json");
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let tok = TextTokenizer::from_dir(data, false).unwrap();
    let max_tokens = task.max_tokens.unwrap();
    let transform = TestTransform::new(task.image_res as usize);
    let (mut pixels, mut ids, mut atts, mut txt2img) = (vec![], vec![], vec![], vec![]);
    for (i, e) in entries.iter().enumerate() {
        let bytes = std::fs::read(data.join(e["image"].as_str().unwrap())).unwrap();
        pixels.extend(transform.apply_bytes(&bytes).unwrap());
        for c in e["caption"].as_array().unwrap() {
            let clean = pre_caption(c.as_str().unwrap(), task.max_words.unwrap()).unwrap();
            let enc = tok.encode(&clean, max_tokens).unwrap();
            let (row, mask) = tok.pad(&enc.ids, max_tokens);
            ids.extend(row);
            atts.extend(mask);
            txt2img.push(i);
        }
    }
    let (ni, nt) = (entries.len(), txt2img.len());
    let res = task.image_res;
    let images = Tensor::from_slice(&pixels).view([ni as i64, 3, res, res]);
    let text_ids = Tensor::from_slice(&ids).view([nt as i64, max_tokens as i64]);
    let text_atts = Tensor::from_slice(&atts).view([nt as i64, max_tokens as i64]);
    let sims = tch::no_grad(|| {
        let core = &model.core;
        let text = core
            .text_feat(&core.get_text_embeds(&text_ids, &text_atts, false))
            .unwrap();
        let image = core
            .image_feat(&core.get_vision_embeds(&images, false).embeds)
            .unwrap();
        eprintln!(
            "mean cosine between different items: images {:.3}, texts {:.3} (1.000 = collapsed)",
            mean_off_diagonal_cosine(&image),
            mean_off_diagonal_cosine(&text)
        );
        image.matmul(&text.tr()).to_kind(Kind::Double)
    });
    let sims: Vec<Vec<f64>> = (0..ni as i64)
        .map(|i| Vec::<f64>::try_from(sims.get(i)).unwrap())
        .collect();
    // Ties count against the ground truth.
    let rank = |scores: &[f64], own: &dyn Fn(usize) -> bool| {
        let best = (0..scores.len())
            .filter(|&j| own(j))
            .map(|j| scores[j])
            .fold(f64::NEG_INFINITY, f64::max);
        1 + (0..scores.len())
            .filter(|&j| !own(j) && scores[j] >= best)
            .count()
    };
    let text_ranks = (0..ni)
        .map(|i| rank(&sims[i], &|t| txt2img[t] == i))
        .collect();
    let image_ranks = (0..nt)
        .map(|t| {
            let column: Vec<f64> = sims.iter().map(|row| row[t]).collect();
            rank(&column, &|i| i == txt2img[t])
        })
        .collect();
    Ranking {
        text_ranks,
        image_ranks,
        per_image: nt / ni,
    }
}

#[test]
fn demo_pretraining_learns_zero_shot_retrieval() {
    let start = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // scripts/demo.sh: xvlm synth-data --shape-min 0.6 --shape-max 0.95 --background-min 225 --background-max 225
    let synth = SynthConfig {
        shape_side: (0.6, 0.95),
        background: (225, 225),
        ..SynthConfig::default()
    };
    let summary = generate(&data, &synth).unwrap();
    let d = data.display();
    // The demo config as is, pointed at this corpus, its linear schedule shortened to the budget.
    let epochs = ITERATIONS / 40;
    let overrides: serde_yaml::Value = serde_yaml::from_str(&format!(
        "{{train_file: ['{d}/pretrain/image_text'], train_file_regions: ['{d}/pretrain/regions'], \
          text_encoder: '{d}', schedular: {{epochs: {epochs}}}}}"
    ))
    .unwrap();
    let task =
        TaskConfig::load_with_overrides(&configs_dir().join("Pretrain_XVLM_demo.yaml"), &overrides)
            .unwrap();
    assert_eq!(task.train_dataset_size, Some(summary.splits[0] as u64));
    let cfg: PretrainDataConfig =
        serde_yaml::from_value(serde_yaml::to_value(&task).unwrap()).unwrap();
    let seed = 42;
    // One intra-op thread (as each demo worker uses): beside the loader thread on a busy 2-core machine,
    // libtorch's spinning OpenMP workers make every step several times slower.
    tch::set_num_threads(1);
    tch::manual_seed(seed as i64);
    let vs = VarStore::new(Device::Cpu);
    let model = PretrainModel::new(&vs.root(), &task).unwrap();
    let mut trainer = PretrainTrainer::from_task(&model, &vs, &task, 1).unwrap();
    let mut images = ImageTextLoader::start(&cfg, 0, 1, seed, StreamState::default()).unwrap();
    let mut regions = RegionLoader::start(&cfg, 0, 1, seed, StreamState::default()).unwrap();

    let mut itc = Vec::new();
    for it in 0..ITERATIONS {
        let r = trainer
            .region_step_due()
            .then(|| region(regions.next_batch().unwrap().0));
        let r_refs: Vec<&PretrainBatch> = r.iter().collect();
        let g = general(images.next_batch().unwrap().0);
        let log = trainer
            .run_iteration(r.is_some().then_some(&r_refs[..]), &[&g], &SingleProcess)
            .unwrap();
        let s = log.steps.last().unwrap();
        itc.push(s.loss_itc);
        if it % 25 == 0 || it + 1 == ITERATIONS {
            eprintln!(
                "iteration {it:3}: itc {:.3} itm {:.3} mlm {:.3} temp {:.3}",
                s.loss_itc,
                s.loss_itm,
                s.loss_mlm,
                model.core.temp().unwrap().double_value(&[])
            );
        }
    }
    let last: f64 = itc[itc.len() - 25..].iter().sum::<f64>() / 25.0;
    let r = evaluate(&model, &task, &data);
    let (t1, t1_chance) = r.text_recall(1);
    let (i1, i1_chance) = r.image_recall(1);
    let (t5, t5_chance) = r.text_recall(5);
    let (i5, i5_chance) = r.image_recall(5);
    let [(text_rank, text_rank_chance), (image_rank, image_rank_chance)] = r.mean_ranks();
    eprintln!(
        "after {ITERATIONS} iterations ({:.0}s): ITC loss (last 25 mean) {last:.3} vs ln 8 = {:.3}\n\
         text retrieval: R@1 {:.1}% (chance {:.1}%), R@5 {:.1}% (chance {:.1}%), mean rank {text_rank:.1} \
         (chance {text_rank_chance:.1})\n\
         image retrieval: R@1 {:.1}% (chance {:.1}%), R@5 {:.1}% (chance {:.1}%), mean rank {image_rank:.1} \
         (chance {image_rank_chance:.1})",
        start.elapsed().as_secs_f64(),
        8f64.ln(),
        100.0 * t1,
        100.0 * t1_chance,
        100.0 * t5,
        100.0 * t5_chance,
        100.0 * i1,
        100.0 * i1_chance,
        100.0 * i5,
        100.0 * i5_chance,
    );
    // Margins: ITC well below its chance level; in both directions R@5 at least 2x chance and the mean
    // rank of the ground truth at most 0.6x a random ranking's. R@1 is printed, not asserted: 40 held-out
    // images make it a count of two or three hits, which float rounding on another CPU's kernels moves
    // (this run is deterministic per machine: seeded data, seeded draws keyed by file name, one
    // thread). A random ranking's mean rank over 80 captions has a standard deviation near 1.3.
    assert!(
        last < 0.8 * 8f64.ln(),
        "ITC loss {last:.3} did not fall below 0.8 x ln 8"
    );
    for (what, got, chance) in [("text", t5, t5_chance), ("image", i5, i5_chance)] {
        assert!(
            got >= 2.0 * chance,
            "{what} retrieval R@5 {:.1}% does not reach 2x chance ({:.1}%)",
            100.0 * got,
            100.0 * chance
        );
    }
    for (what, got, chance) in [
        ("text", text_rank, text_rank_chance),
        ("image", image_rank, image_rank_chance),
    ] {
        assert!(
            got <= 0.6 * chance,
            "{what} retrieval mean rank {got:.1} is not below 0.6x chance ({chance:.1})"
        );
    }
}
