//! `task: nlvr_pretrain`: the NLVR2 domain pre-training ("text-to-images alignment", `NLVR_pretrain.py`,
//! models/model_nlvr_pretrain.py) on the task runner. Model: the 18-layer NLVR2 encoder plus
//! `vision_proj` and a new `ta_head` ([`NlvrPretrainModel`]); data: the image-text json lines of a
//! pre-training-format config (`train_file`, `images:`; the job's `data.shards` replace `train_file`
//! when given) as a map-style dataset of lines ([`ImageTextLines`]), `images.batch_size` pairs per
//! rank; loss: CE of the three-way label of each text's drawn image pair (negatives from the local
//! batch). No evaluation split: the job trains for its epochs (or `steps:`) and its final weights are
//! the `init_checkpoint` of `task: nlvr` (already in the doubled layout, which `nlvr` detects by its
//! layer count; `ta_head` and `vision_proj` are extra keys the non-strict load skips).
//!
//! `init_checkpoint`: a general pre-training checkpoint (cross layers doubled on load as
//! `model_nlvr_pretrain.py:load_pretrained` does; `vision_proj` must be in it) or an earlier NLVR2
//! pre-training. Updates as the apex script does: `CLIP_GRAD_NORM`, O1 on CUDA; `ta_head` at
//! `lr × lr_mult`.
//!
//! Schedule: an epoch is one pass over the indexed lines (`floor(lines / global batch)` steps), the lr
//! schedule's `step_per_epoch = ceil(lines / global batch)`; `train_dataset_size` is not read (the
//! official script's epoch is `train_dataset_size / global batch` iterations of an endless stream:
//! the same when it equals the line count).

use tch::nn::{self, VarStore};
use tch::Device;
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::batch::ImageTextBatch;
use xvlm_model::data::finetune::jsonl::{ImageTextLines, ImageTextLinesBatch, LinesDataConfig};
use xvlm_model::data::finetune::loader::MapDataset;
use xvlm_model::tasks::nlvr_pretrain::NlvrPretrainModel;
use xvlm_model::train::EngineSettings;
use xvlm_model::xvlm::ModelError;

use super::init::{load_init_weights, read_finetune_checkpoint, task_tokenizer};
use super::nlvr::into_nlvr_layout;
use super::{apex_engine_settings, FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::task::{TaskContext, TaskError};

/// The NLVR2 domain pre-training of one rank (no evaluation state).
pub struct NlvrPretrainTask;

/// The data keys of `task`, `train_file` replaced by the job's `data.shards` when it names any.
fn data_config(task: &TaskConfig, ctx: &TaskContext<'_>) -> Result<LinesDataConfig, TaskError> {
    let mut cfg = LinesDataConfig::from_task_config(task).map_err(other)?;
    if !ctx.spec.data.shards.is_empty() {
        cfg.train_file = ctx.spec.data.shards.clone();
    }
    Ok(cfg)
}

impl FinetuneTask for NlvrPretrainTask {
    type Model = NlvrPretrainModel;
    type Data = ImageTextLines;
    const NAME: &'static str = "nlvr_pretrain";
    /// Never looked up: the task has no validation split.
    const BEST_METRIC: &'static str = "ce";

    /// `images.batch_size` (the script sets `config['batch_size']` from it).
    fn train_batch_size(task: &TaskConfig) -> Result<usize, TaskError> {
        let cfg = LinesDataConfig::from_task_config(task).map_err(other)?;
        Ok(cfg.images().map_err(other)?.batch_size)
    }

    fn engine_settings(task: &TaskConfig, device: Device) -> EngineSettings {
        apex_engine_settings(task, device)
    }

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<NlvrPretrainModel, ModelError> {
        NlvrPretrainModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &NlvrPretrainModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let mut sd = read_finetune_checkpoint(task, url)?;
        into_nlvr_layout(task, &mut sd)?;
        // `vision_proj` is loaded (the negatives need the pre-trained features); only `ta_head` is new.
        load_init_weights(
            vs,
            &sd,
            model.core.tied_aliases(),
            url,
            "NLVR2 pre-training",
            |k| k.starts_with("ta_head."),
        )
    }

    fn state_dict(model: &NlvrPretrainModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, ImageTextLines), TaskError> {
        let cfg = data_config(task, ctx)?;
        let data = ImageTextLines::open(&cfg, task_tokenizer(task)?).map_err(other)?;
        tracing::info!(
            task = Self::NAME,
            lines = data.len(),
            files = data.index().files().len(),
            train_dataset_size = ?task.train_dataset_size,
            "indexed the image-text json lines"
        );
        Ok((Self, data))
    }

    fn to_device(batch: ImageTextLinesBatch, device: Device) -> ImageTextLinesBatch {
        let b = batch.batch;
        // The MLM tensors are unused: they stay on the host.
        ImageTextLinesBatch {
            batch: ImageTextBatch {
                image: b.image.to_device(device),
                text_ids: b.text_ids.to_device(device),
                text_atts: b.text_atts.to_device(device),
                text_ids_masked: b.text_ids_masked,
                masked_pos: b.masked_pos,
                masked_ids: b.masked_ids,
            },
            draw_seed: batch.draw_seed,
        }
    }

    fn evaluate(
        &self,
        _model: &NlvrPretrainModel,
        _split: Split,
        _comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        Ok(None)
    }
}
