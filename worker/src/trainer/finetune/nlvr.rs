//! `task: nlvr`: NLVR2 fine-tuning (`NLVR.py`) on the task runner. Train: CE of the two-class
//! head on (sentence, left image, right image); `init_checkpoint` a general pre-training checkpoint
//! (its cross layers doubled into the 18-layer layout as `model_nlvr.py:load_pretrained` does) or one
//! already in that layout. Evaluation: accuracy over dev (`val_file`) and test1 (`test_file`), each rank
//! scoring a contiguous share, the counts summed over the ranks: every example counts exactly once
//! (the official `DistributedSampler` pads the last batch and counts a few examples twice).

use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};
use xvlm_model::checkpoint::StateDict;
use xvlm_model::collective::{rank_slice, Collective};
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::loader::MapDataset;
use xvlm_model::data::finetune::nlvr::{NlvrBatch, NlvrData, NlvrDataConfig};
use xvlm_model::tasks::nlvr::double_cross_layers;
use xvlm_model::tasks::NlvrModel;
use xvlm_model::xvlm::ModelError;

use super::init::{load_init_weights, read_finetune_checkpoint, task_tokenizer};
use super::{FinetuneTask, Split};
use crate::trainer::harness::setup::other;
use crate::trainer::task::{TaskContext, TaskError};

/// The NLVR2 task of one rank: its evaluation splits.
pub struct NlvrTask {
    val: Option<NlvrData>,
    test: Option<NlvrData>,
    batch_size_test: usize,
    seed: u64,
    device: Device,
}

impl NlvrTask {
    /// This rank's (correct, scored) counts on `set`.
    fn score_share(
        &self,
        model: &NlvrModel,
        set: &NlvrData,
        comm: &dyn Collective,
    ) -> Result<(i64, i64), TaskError> {
        // Whole batches of `batch_size_test`: each example is scored in the same batch at every world
        // size, so the predictions (and the accuracy) are identical at world 1, 2, 4.
        let batch = self.batch_size_test.max(1);
        let share = rank_slice(set.len(), batch, comm.world_size(), comm.rank());
        let (mut correct, mut scored) = (0i64, 0i64);
        super::score_in_batches(set, share, batch, self.seed, |chunk, batch| {
            let batch = to_device(batch, self.device);
            let images = Tensor::cat(&[&batch.image0, &batch.image1], 0);
            let pred = tch::no_grad(|| {
                model
                    .forward(&images, &batch.text_ids, &batch.text_atts, false)
                    .map(|out| out.pred_class())
            })
            .map_err(other)?;
            correct += pred
                .eq_tensor(&batch.targets)
                .sum(Kind::Int64)
                .int64_value(&[]);
            scored += chunk.len() as i64;
            Ok(())
        })?;
        Ok((correct, scored))
    }
}

fn to_device(batch: NlvrBatch, device: Device) -> NlvrBatch {
    NlvrBatch {
        image0: batch.image0.to_device(device),
        image1: batch.image1.to_device(device),
        text_ids: batch.text_ids.to_device(device),
        text_atts: batch.text_atts.to_device(device),
        targets: batch.targets.to_device(device),
    }
}

/// `sd` (a general checkpoint or one already in the NLVR2 layout) in the doubled cross-layer layout
/// of `task`'s text config (`model_nlvr.py:load_pretrained`, shared by the NLVR2 pre-training).
pub(super) fn into_nlvr_layout(task: &TaskConfig, sd: &mut StateDict) -> Result<(), TaskError> {
    let text = task.load_text_config().map_err(other)?;
    let layer_count = |v: i64, what: &str| {
        usize::try_from(v).map_err(|_| other(format!("text config: {what} {v} is negative")))
    };
    double_cross_layers(
        sd,
        layer_count(text.fusion_layer, "fusion_layer")?,
        layer_count(text.num_hidden_layers, "num_hidden_layers")?,
    );
    Ok(())
}

impl FinetuneTask for NlvrTask {
    type Model = NlvrModel;
    type Data = NlvrData;
    const NAME: &'static str = "nlvr";
    const BEST_METRIC: &'static str = "acc";

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<NlvrModel, ModelError> {
        NlvrModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &NlvrModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let mut sd = read_finetune_checkpoint(task, url)?;
        into_nlvr_layout(task, &mut sd)?;
        // The pre-training heads (ITC, ITM, MLM, box) are dropped and `cls_head` is new.
        load_init_weights(vs, &sd, model.core.tied_aliases(), url, "NLVR2", |k| {
            k.starts_with("cls_head.")
        })
    }

    fn state_dict(model: &NlvrModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    fn load_data(task: &TaskConfig, ctx: &TaskContext<'_>) -> Result<(Self, NlvrData), TaskError> {
        let cfg = NlvrDataConfig::from_task_config(task).map_err(other)?;
        let keys = FinetuneKeys::from_task(task).map_err(other)?;
        let tokenizer = task_tokenizer(task)?;
        let train = NlvrData::train(&cfg, tokenizer.clone()).map_err(other)?;
        let val = NlvrData::eval(&cfg, &cfg.val_file, tokenizer.clone()).map_err(other)?;
        let test = NlvrData::eval(&cfg, &cfg.test_file, tokenizer).map_err(other)?;
        Ok((
            Self {
                val,
                test,
                batch_size_test: keys.batch_size_test,
                seed: ctx.spec.seed,
                device: ctx.device,
            },
            train,
        ))
    }

    fn to_device(batch: NlvrBatch, device: Device) -> NlvrBatch {
        to_device(batch, device)
    }

    fn evaluate(
        &self,
        model: &NlvrModel,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let set = match split {
            Split::Val => self.val.as_ref(),
            Split::Test => self.test.as_ref(),
        };
        let Some(set) = set else { return Ok(None) };
        let (correct, scored) = self.score_share(model, set, comm)?;
        let mut counts = Tensor::from_slice(&[correct, scored]);
        comm.all_reduce_sum(&mut counts).map_err(other)?;
        let (correct, scored) = (counts.int64_value(&[0]), counts.int64_value(&[1]));
        if scored != set.len() as i64 {
            return Err(other(format!(
                "nlvr evaluation scored {scored} of {} examples over {} ranks",
                set.len(),
                comm.world_size()
            )));
        }
        // A fraction, as NLVR.py prints it.
        let acc = if scored == 0 {
            0.0
        } else {
            correct as f64 / scored as f64
        };
        Ok(Some(vec![
            ("acc".into(), acc),
            ("correct".into(), correct as f64),
            ("examples".into(), scored as f64),
        ]))
    }
}
