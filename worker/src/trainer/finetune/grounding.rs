//! `task: grounding`: RefCOCO+ weakly supervised grounding (`Grounding.py`, configs/Grounding.yaml) on
//! the task runner. Train: the retrieval model (models/model_retrieval.py) on (expression, image)
//! pairs, ITC + ITM with `idx` numbering image files, so every expression of an image is a positive.
//! Evaluation: Grad-CAM on the cross-attention of text layer `block_num` (exact attention
//! probabilities and their gradient), every `dets.json` proposal scored on the upsampled map, the best
//! one compared with the REFER box (inclusive-pixel IoU >= 0.5): `val_d`, `testA_d`, `testB_d`, the best
//! checkpoint on `val_d`. Each rank maps a contiguous run of whole batches (the Grad-CAM mean divides by
//! the batch's padded length, so batches must be the same at every world size); the chosen proposals
//! are gathered and resolved in `test_file` order, where an expression without a positive score keeps
//! the previous expression's prediction, as the official loop does.
//!
//! `block_num_search: [8, 9, 10, 7]` in the task config (an xvlm key; `overrides:` in job.yaml) also
//! evaluates those layers, as run.py's `refcoco_block_num_search`, each reported as `block{n}.val_d`, ...

use std::sync::Arc;

use serde::Serialize;
use tch::nn::{self, VarStore};
use tch::Device;
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::{gather_shares, rank_slices, Collective};
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::grounding::{load_split, GroundingDataConfig, GroundingTrainData};
use xvlm_model::data::finetune::grounding_eval::{GroundingEvalData, GroundingEvalItem};
use xvlm_model::data::finetune::RetrievalTrainBatch;
use xvlm_model::metrics::grounding::{grounding_accuracy, GroundingSplit};
use xvlm_model::tasks::grounding_bbox::inclusive_iou;
use xvlm_model::tasks::grounding_weak::{
    choose_proposal, itm_gradcam, resolve_predictions, ExpressionInput, GradCamConfig,
};
use xvlm_model::tasks::retrieval::RetrievalModel;
use xvlm_model::xvlm::ModelError;

use super::init::task_tokenizer;
use super::retrieval::{self, RetrievalTask};
use super::{FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::runner::outputs::Outputs;
use crate::trainer::task::{TaskContext, TaskError};

/// The weak grounding task of one rank: its evaluation expressions and Grad-CAM settings.
pub struct GroundingTask {
    eval: Option<GroundingEvalData>,
    gradcam: GradCamConfig,
    /// Extra `block_num` values evaluated beside `gradcam.block_num`.
    block_search: Vec<usize>,
    batch_size_test: usize,
    seed: u64,
    device: Device,
    outputs: Option<Outputs>,
}

/// One expression's prediction in `eval/grounding_result.json`.
#[derive(Debug, Serialize)]
pub(super) struct GroundingPrediction<'a> {
    /// The REFER reference.
    pub ref_id: i64,
    /// Its split.
    pub split: &'a str,
    /// The predicted box `[x, y, w, h]` in original pixels.
    pub pred_box: [f64; 4],
    /// Inclusive-pixel IoU with the REFER box.
    pub iou: f64,
}

/// The per-split accuracies of predicted boxes (in `items` order), and the result file `file` on rank 0.
pub(super) fn score_predictions(
    items: &[GroundingEvalItem],
    boxes: &[[f64; 4]],
    outputs: Option<&Outputs>,
    file: &str,
) -> Result<Vec<(String, f64)>, TaskError> {
    if boxes.len() != items.len() {
        return Err(other(format!(
            "grounding evaluation predicted {} of {} expressions",
            boxes.len(),
            items.len()
        )));
    }
    let predictions: Vec<GroundingPrediction<'_>> = items
        .iter()
        .zip(boxes)
        .map(|(item, &pred_box)| GroundingPrediction {
            ref_id: item.entry.ref_id,
            split: &item.split,
            pred_box,
            iou: inclusive_iou(item.ref_box, pred_box),
        })
        .collect();
    let outcomes = predictions
        .iter()
        .map(|p| Ok((GroundingSplit::from_name(p.split)?, p.iou)))
        .collect::<Result<Vec<_>, ModelError>>()
        .map_err(other)?;
    let accuracy = grounding_accuracy(outcomes).map_err(other)?;
    if let Some(out) = outputs {
        out.write_json(file, &predictions)?;
    }
    let mut metrics: Vec<(String, f64)> = accuracy
        .as_pairs()
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    metrics.push(("expressions".into(), items.len() as f64));
    Ok(metrics)
}

/// The evaluation set of a grounding config (`None` without `test_file`).
pub(super) fn load_eval_set(
    cfg: &GroundingDataConfig,
    tokenizer: Arc<xvlm_model::data::tokenizer::TextTokenizer>,
    with_dets: bool,
) -> Result<Option<GroundingEvalData>, TaskError> {
    if cfg.test_file.is_empty() {
        return Ok(None);
    }
    GroundingEvalData::load(cfg, tokenizer, with_dets)
        .map(Some)
        .map_err(other)
}

impl GroundingTask {
    /// This rank's chosen proposal per expression of `share` (-1: no positive score) at `cfg`.
    fn choose_share(
        &self,
        model: &RetrievalModel,
        set: &GroundingEvalData,
        share: std::ops::Range<usize>,
        cfg: GradCamConfig,
    ) -> Result<Vec<i64>, TaskError> {
        let mut chosen = Vec::with_capacity(share.len());
        super::score_in_batches(set, share, self.batch_size_test, self.seed, |chunk, b| {
            let image = b.image.to_device(self.device);
            let ids = b.text_ids.to_device(self.device);
            let atts = b.text_atts.to_device(self.device);
            let maps = itm_gradcam(model, &image, &ids, &atts, cfg)
                .map_err(other)?
                .maps
                .to_device(Device::Cpu);
            for (k, &i) in chunk.iter().enumerate() {
                let item = &set.items[i];
                let input = ExpressionInput {
                    gradcam: maps.get(k as i64),
                    height: item.image_wh.1 as i64,
                    width: item.image_wh.0 as i64,
                    dets: item.dets.clone(),
                    ref_box: item.ref_box,
                    split: GroundingSplit::from_name(&item.split).map_err(other)?,
                };
                let choice = choose_proposal(&input).map_err(other)?;
                chosen.push(choice.chosen.map_or(-1, |c| c as i64));
            }
            Ok(())
        })?;
        Ok(chosen)
    }

    /// The accuracies at one `block_num`, every rank scoring its share.
    fn evaluate_at(
        &self,
        model: &RetrievalModel,
        set: &GroundingEvalData,
        cfg: GradCamConfig,
        comm: &dyn Collective,
        file: &str,
    ) -> Result<Vec<(String, f64)>, TaskError> {
        let slices = rank_slices(
            set.items.len(),
            self.batch_size_test.max(1),
            comm.world_size(),
        );
        let mine = self.choose_share(model, set, slices[comm.rank()].clone(), cfg)?;
        let chosen = gather_shares(comm, &slices, mine, 1, -1i64).map_err(other)?;
        let boxes = resolve_predictions(
            chosen
                .iter()
                .zip(set.items.iter())
                .map(|(&c, item)| (usize::try_from(c).ok(), item.dets.as_slice())),
        )
        .map_err(other)?;
        score_predictions(&set.items, &boxes, self.outputs.as_ref(), file)
    }
}

impl FinetuneTask for GroundingTask {
    type Model = RetrievalModel;
    type Data = GroundingTrainData;
    const NAME: &'static str = "grounding";
    const BEST_METRIC: &'static str = "val_d";

    // The retrieval model, built, loaded and saved exactly as the retrieval task does.
    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<RetrievalModel, ModelError> {
        RetrievalTask::build_model(root, task)
    }

    fn load_init_checkpoint(
        model: &RetrievalModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        RetrievalTask::load_init_checkpoint(model, vs, task, url)
    }

    fn state_dict(model: &RetrievalModel, vs: &VarStore) -> StateDict {
        RetrievalTask::state_dict(model, vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, GroundingTrainData), TaskError> {
        let cfg = GroundingDataConfig::from_task_config(task).map_err(other)?;
        let keys = FinetuneKeys::from_task(task).map_err(other)?;
        let tokenizer = task_tokenizer(task)?;
        let entries = load_split(&cfg, &cfg.train_file).map_err(other)?;
        let train = GroundingTrainData::new(Arc::new(entries), tokenizer.clone(), &cfg);
        let eval = load_eval_set(&cfg, tokenizer, true)?;
        let gradcam = GradCamConfig::from_task(task).map_err(other)?;
        Ok((
            Self {
                eval,
                gradcam,
                block_search: block_num_search(task)?,
                batch_size_test: keys.batch_size_test,
                seed: ctx.spec.seed,
                device: ctx.device,
                outputs: (ctx.rank == 0).then(|| Outputs::open(ctx.output)).flatten(),
            },
            train,
        ))
    }

    fn to_device(batch: RetrievalTrainBatch, device: Device) -> RetrievalTrainBatch {
        retrieval::to_device(batch, device)
    }

    /// Both splits score every `test_file` expression (val, testA, testB), as `Grounding.py` does at
    /// each epoch; the test split does so with the best validation weights.
    fn evaluate(
        &self,
        model: &RetrievalModel,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let Some(set) = &self.eval else {
            return Ok(None);
        };
        let file = format!("eval/grounding_{}_result.json", split.as_str());
        let mut metrics = self.evaluate_at(model, set, self.gradcam, comm, &file)?;
        for &block_num in &self.block_search {
            let cfg = GradCamConfig {
                block_num,
                ..self.gradcam
            };
            let file = format!("eval/grounding_{}_block{block_num}.json", split.as_str());
            let found = self.evaluate_at(model, set, cfg, comm, &file)?;
            metrics.extend(
                found
                    .into_iter()
                    .map(|(k, v)| (format!("block{block_num}.{k}"), v)),
            );
        }
        Ok(Some(metrics))
    }
}

/// `block_num_search` of the task config: absent or a list of non-negative layer indices.
fn block_num_search(task: &TaskConfig) -> Result<Vec<usize>, TaskError> {
    let Some(value) = task.extra.get("block_num_search") else {
        return Ok(Vec::new());
    };
    let bad = || {
        other(format!(
            "{}: `block_num_search` must be a list of text layer indices, got {value:?}",
            task.source.display()
        ))
    };
    value
        .as_sequence()
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(bad))
        .collect()
}
