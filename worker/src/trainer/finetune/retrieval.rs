//! `task: retrieval`: image-text retrieval fine-tuning (`Retrieval.py`, COCO / Flickr30k) on the
//! task runner. Train: `re_train_dataset` items (ITC with `idx` positives, ITM hard negatives),
//! `init_checkpoint` loaded as the official fine-tune loader does (an official pre-training `.th`, or
//! an xvlm run's `final/model.safetensors`). Evaluation: `Retrieval.py: evaluation` distributed over
//! the ranks (each encodes its slice; ITM re-scoring split across ranks), `r_mean` picks the best.

use std::ops::Range;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::finetune::retrieval::{
    RetrievalData, RetrievalDataConfig, RetrievalEvalSet, RetrievalTrainBatch, RetrievalTrainData,
};
use xvlm_model::data::DataError;
use xvlm_model::metrics::retrieval::GroundTruth;
use xvlm_model::tasks::retrieval::eval::{RetrievalEvalConfig, RetrievalSource};
use xvlm_model::tasks::retrieval::RetrievalModel;
use xvlm_model::xvlm::ModelError;

use super::init::{load_init_weights, read_finetune_checkpoint, task_tokenizer};
use super::{FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::task::{TaskContext, TaskError};

/// The retrieval task of one rank: its evaluation splits.
pub struct RetrievalTask {
    val: Option<RetrievalEvalSet>,
    test: Option<RetrievalEvalSet>,
    eval: RetrievalEvalConfig,
    device: Device,
    threads: usize,
}

/// One split's images and texts for this rank's slices, on the model's device.
struct EvalSource<'a> {
    set: &'a RetrievalEvalSet,
    device: Device,
    threads: usize,
}

impl RetrievalSource for EvalSource<'_> {
    type Error = DataError;

    fn images(&mut self, range: Range<usize>) -> Result<Tensor, DataError> {
        Ok(self
            .set
            .load_image_range(range, self.threads)?
            .to_device(self.device))
    }

    fn texts(&mut self, range: Range<usize>) -> Result<(Tensor, Tensor), DataError> {
        let batch = self.set.tokenize_texts(range)?;
        Ok((
            batch.ids.to_device(self.device),
            batch.atts.to_device(self.device),
        ))
    }
}

/// A retrieval batch moved to `device` (also the weak grounding task's batches).
pub(super) fn to_device(batch: RetrievalTrainBatch, device: Device) -> RetrievalTrainBatch {
    RetrievalTrainBatch {
        image: batch.image.to_device(device),
        text_ids: batch.text_ids.to_device(device),
        text_atts: batch.text_atts.to_device(device),
        idx: batch.idx.to_device(device),
    }
}

impl FinetuneTask for RetrievalTask {
    type Model = RetrievalModel;
    type Data = RetrievalTrainData;
    const NAME: &'static str = "retrieval";
    const BEST_METRIC: &'static str = "r_mean";

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<RetrievalModel, ModelError> {
        RetrievalModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &RetrievalModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let sd = read_finetune_checkpoint(task, url)?;
        // The pre-training heads (MLM, box) are dropped; every retrieval weight must be there.
        load_init_weights(vs, &sd, model.core.tied_aliases(), url, "retrieval", |_| {
            false
        })
    }

    fn state_dict(model: &RetrievalModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, RetrievalTrainData), TaskError> {
        let cfg = RetrievalDataConfig::from_task_config(task).map_err(other)?;
        let tokenizer = task_tokenizer(task)?;
        let data = RetrievalData::load(&cfg, tokenizer.clone()).map_err(other)?;
        let train = data.train_data(tokenizer).map_err(other)?;
        let eval = RetrievalEvalConfig::from_task(task).map_err(other)?;
        Ok((
            Self {
                val: data.val,
                test: data.test,
                eval,
                device: ctx.device,
                threads: super::loader_threads(),
            },
            train,
        ))
    }

    fn to_device(batch: RetrievalTrainBatch, device: Device) -> RetrievalTrainBatch {
        to_device(batch, device)
    }

    fn evaluate(
        &self,
        model: &RetrievalModel,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let set = match split {
            Split::Val => self.val.as_ref(),
            Split::Test => self.test.as_ref(),
        };
        let Some(set) = set else { return Ok(None) };
        let gt = GroundTruth::new(set.txt2img.clone(), set.img2txt.clone()).map_err(other)?;
        let mut source = EvalSource {
            set,
            device: self.device,
            threads: self.threads,
        };
        let out = model
            .evaluate(comm, &gt, &mut source, &self.eval)
            .map_err(other)?;
        let mut metrics: Vec<(String, f64)> = out
            .itm
            .as_pairs()
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        metrics.extend(
            out.itc
                .as_pairs()
                .iter()
                .map(|(k, v)| (format!("itc_{k}"), *v)),
        );
        Ok(Some(metrics))
    }
}
