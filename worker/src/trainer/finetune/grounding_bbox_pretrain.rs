//! `task: grounding_bbox_pretrain`: the box-grounding domain pre-training (`Grounding_bbox_pretrain.py`,
//! models/model_bbox_pretrain.py) on the task runner. Model: vision + text + `bbox_head`
//! ([`BboxPretrainModel`], the layout of `task: grounding_bbox`); data: the region json lines of a
//! pre-training-format config (`train_file_regions`, `regions:`; the job's `data.shards` replace
//! `train_file_regions` when given) as a map-style dataset of image lines ([`RegionLines`]): a rank's
//! batch is `regions.max_images` lines, each through the pre-training region sampling (§3.5), collated
//! into exactly `regions.batch_size` texts; loss: L1 + GIoU of every text's box over its full image,
//! whole-image captions masked by `is_image` unless `calc_image_bbox_loss`. No evaluation split: the
//! final weights are the `init_checkpoint` of `task: grounding_bbox` (the official
//! `--load_bbox_pretrain`).
//!
//! `init_checkpoint`: a general pre-training checkpoint (its `bbox_head` the starting head; one
//! without starts a new head, as the official non-strict load does). Updates as the apex script does:
//! `CLIP_GRAD_NORM`, O1 on CUDA; no `init_params`.
//!
//! Schedule: an epoch is one pass over the indexed image lines (`floor(lines / (max_images x
//! world))` steps); `train_dataset_size` is not read (the official epoch is `train_dataset_size /
//! (regions.batch_size x world)` iterations of an endless stream, counted in texts).

use tch::nn::{self, VarStore};
use tch::Device;
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::batch::RegionBatch;
use xvlm_model::data::finetune::jsonl::{LinesDataConfig, RegionLines};
use xvlm_model::data::finetune::loader::MapDataset;
use xvlm_model::tasks::bbox_pretrain::BboxPretrainModel;
use xvlm_model::train::EngineSettings;
use xvlm_model::xvlm::ModelError;

use super::init::{load_init_weights, read_finetune_checkpoint, task_tokenizer};
use super::{apex_engine_settings, FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::task::{TaskContext, TaskError};

/// The box domain pre-training of one rank (no evaluation state).
pub struct GroundingBboxPretrainTask;

impl FinetuneTask for GroundingBboxPretrainTask {
    type Model = BboxPretrainModel;
    type Data = RegionLines;
    const NAME: &'static str = "grounding_bbox_pretrain";
    /// Never looked up: the task has no validation split.
    const BEST_METRIC: &'static str = "bbox";

    /// `regions.max_images` image lines (the script's DataLoader batch); the collate turns them into
    /// `regions.batch_size` texts.
    fn train_batch_size(task: &TaskConfig) -> Result<usize, TaskError> {
        let cfg = LinesDataConfig::from_task_config(task).map_err(other)?;
        Ok(cfg.regions().map_err(other)?.max_images)
    }

    fn engine_settings(task: &TaskConfig, device: Device) -> EngineSettings {
        apex_engine_settings(task, device)
    }

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<BboxPretrainModel, ModelError> {
        BboxPretrainModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &BboxPretrainModel,
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
            "box pre-training",
            |k| k.starts_with("bbox_head."),
        )
    }

    fn state_dict(model: &BboxPretrainModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, RegionLines), TaskError> {
        let mut cfg = LinesDataConfig::from_task_config(task).map_err(other)?;
        if !ctx.spec.data.shards.is_empty() {
            cfg.train_file_regions = ctx.spec.data.shards.clone();
        }
        let data = RegionLines::open(&cfg, task_tokenizer(task)?).map_err(other)?;
        tracing::info!(
            task = Self::NAME,
            lines = data.len(),
            files = data.index().files().len(),
            train_dataset_size = ?task.train_dataset_size,
            "indexed the region json lines"
        );
        Ok((Self, data))
    }

    fn to_device(batch: RegionBatch, device: Device) -> RegionBatch {
        // The MLM tensors and patch masks are unused (full images, no MLM): they stay on the host.
        RegionBatch {
            image: batch.image.to_device(device),
            idx_to_group_img: batch.idx_to_group_img.to_device(device),
            text_ids: batch.text_ids.to_device(device),
            text_atts: batch.text_atts.to_device(device),
            text_ids_masked: batch.text_ids_masked,
            masked_pos: batch.masked_pos,
            masked_ids: batch.masked_ids,
            image_atts: batch.image_atts,
            target_bbox: batch.target_bbox.to_device(device),
            is_image: batch.is_image.to_device(device),
        }
    }

    fn evaluate(
        &self,
        _model: &BboxPretrainModel,
        _split: Split,
        _comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        Ok(None)
    }
}
