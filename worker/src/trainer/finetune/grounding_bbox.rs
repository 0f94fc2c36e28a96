//! `task: grounding_bbox`: RefCOCO+ grounding with box regression (`Grounding_bbox.py`,
//! configs/Grounding_bbox.yaml) on the task runner. Train: models/model_bbox.py (vision, text,
//! `bbox_head`) with L1 + GIoU against the REFER box after the official crop that keeps the box, the
//! careful flip (`careful_hflip`, true when the config lacks it) and `box_transform`. Evaluation: the
//! predicted (cx, cy, w, h) times the image's width and height from `instances.json`, top-left
//! corner, inclusive-pixel IoU >= 0.5 with the REFER box: `val_d`, `testA_d`, `testB_d` over every
//! `test_file` expression, the best checkpoint on `val_d`. Each rank predicts a contiguous run of whole
//! batches; the boxes are gathered in `test_file` order.
//!
//! `init_checkpoint` is a pre-training checkpoint (its `bbox_head` is the starting head), a box
//! domain pre-training or a fine-tuned box model; a checkpoint without `bbox_head` starts a new head,
//! as the official non-strict load does.

use std::sync::Arc;

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::{gather_shares, rank_slices, Collective};
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::grounding::{
    load_split, GroundingBoxBatch, GroundingBoxTrainData, GroundingDataConfig,
};
use xvlm_model::data::finetune::grounding_eval::GroundingEvalData;
use xvlm_model::tasks::grounding_bbox::{to_pixel_xywh, GroundingBboxModel};
use xvlm_model::xvlm::ModelError;

use super::grounding::{load_eval_set, score_predictions};
use super::init::{load_init_weights, read_finetune_checkpoint, task_tokenizer};
use super::{FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::runner::outputs::Outputs;
use crate::trainer::task::{TaskContext, TaskError};

/// The box grounding task of one rank: its evaluation expressions.
pub struct GroundingBboxTask {
    eval: Option<GroundingEvalData>,
    batch_size_test: usize,
    seed: u64,
    device: Device,
    outputs: Option<Outputs>,
}

impl GroundingBboxTask {
    /// This rank's predicted boxes `[x, y, w, h]` (flattened) for the expressions of `share`.
    fn predict_share(
        &self,
        model: &GroundingBboxModel,
        set: &GroundingEvalData,
        share: std::ops::Range<usize>,
    ) -> Result<Vec<f64>, TaskError> {
        let mut boxes = Vec::with_capacity(4 * share.len());
        super::score_in_batches(set, share, self.batch_size_test, self.seed, |chunk, b| {
            let wh: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| {
                    let (w, h) = set.items[i].image_wh;
                    [w as f32, h as f32]
                })
                .collect();
            let image_wh = Tensor::from_slice(&wh).view([chunk.len() as i64, 2]);
            let coord = tch::no_grad(|| {
                model
                    .forward(
                        &b.image.to_device(self.device),
                        &b.text_ids.to_device(self.device),
                        &b.text_atts.to_device(self.device),
                        false,
                    )
                    .map(|out| out.bbox.coord.to_device(Device::Cpu))
            })
            .map_err(other)?;
            let pixels = to_pixel_xywh(&coord, &image_wh).to_kind(Kind::Double);
            boxes.extend(Vec::<f64>::try_from(pixels.contiguous().view([-1])).map_err(other)?);
            Ok(())
        })?;
        Ok(boxes)
    }
}

fn to_device(batch: GroundingBoxBatch, device: Device) -> GroundingBoxBatch {
    GroundingBoxBatch {
        image: batch.image.to_device(device),
        text_ids: batch.text_ids.to_device(device),
        text_atts: batch.text_atts.to_device(device),
        target_bbox: batch.target_bbox.to_device(device),
    }
}

impl FinetuneTask for GroundingBboxTask {
    type Model = GroundingBboxModel;
    type Data = GroundingBoxTrainData;
    const NAME: &'static str = "grounding_bbox";
    const BEST_METRIC: &'static str = "val_d";

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<GroundingBboxModel, ModelError> {
        GroundingBboxModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &GroundingBboxModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let sd = read_finetune_checkpoint(task, url)?;
        load_init_weights(
            vs,
            &sd,
            model.core.tied_aliases(),
            url,
            "grounding_bbox",
            |k| k.starts_with("bbox_head."),
        )
    }

    fn state_dict(model: &GroundingBboxModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, GroundingBoxTrainData), TaskError> {
        let cfg = GroundingDataConfig::from_task_config(task).map_err(other)?;
        let keys = FinetuneKeys::from_task(task).map_err(other)?;
        let tokenizer = task_tokenizer(task)?;
        let entries = load_split(&cfg, &cfg.train_file).map_err(other)?;
        let refer = cfg.refer().map_err(other)?;
        let train = GroundingBoxTrainData::new(Arc::new(entries), &refer, tokenizer.clone(), &cfg)
            .map_err(other)?;
        let eval = load_eval_set(&cfg, tokenizer, false)?;
        Ok((
            Self {
                eval,
                batch_size_test: keys.batch_size_test,
                seed: ctx.spec.seed,
                device: ctx.device,
                outputs: (ctx.rank == 0).then(|| Outputs::open(ctx.output)).flatten(),
            },
            train,
        ))
    }

    fn to_device(batch: GroundingBoxBatch, device: Device) -> GroundingBoxBatch {
        to_device(batch, device)
    }

    /// Both splits score every `test_file` expression (val, testA, testB), as `Grounding_bbox.py`
    /// does at each epoch; the test split does so with the best validation weights.
    fn evaluate(
        &self,
        model: &GroundingBboxModel,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let Some(set) = &self.eval else {
            return Ok(None);
        };
        let slices = rank_slices(
            set.items.len(),
            self.batch_size_test.max(1),
            comm.world_size(),
        );
        let mine = self.predict_share(model, set, slices[comm.rank()].clone())?;
        let flat = gather_shares(comm, &slices, mine, 4, f64::NAN).map_err(other)?;
        let boxes: Vec<[f64; 4]> = flat
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect();
        let file = format!("eval/grounding_bbox_{}_result.json", split.as_str());
        score_predictions(&set.items, &boxes, self.outputs.as_ref(), &file).map(Some)
    }
}
