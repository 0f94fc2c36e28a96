//! `task: vqa`: VQA fine-tuning (`VQA.py`, models/model_vqa.py) on the task runner. Train: the
//! weighted answer NLL of the decoder (`train_file`s, the dataset's careful flip); `init_checkpoint` a
//! pre-training checkpoint (its text layers split between the encoder and the answer decoder as
//! `model_vqa.py:load_pretrained` does) or a VQA checkpoint (any `text_decoder.*` key: loaded as is,
//! the official `is_eval` path). Evaluation: `rank_answer` over `answer_list` with `k_test`, each rank
//! answering a contiguous share of whole `batch_size_test` batches, the answers gathered to every rank;
//! rank 0 writes the official submission file (`eval/vqa_result.json` for the test split,
//! `eval/vqa_val_result.json` for validation).
//!
//! Metrics (where the split has annotator answers), in percent rounded to 2 decimals as the official
//! evaluation prints them: `vqa_acc` (X-VLM's exact match) and `vqa_challenge_acc` (the VQA evaluation
//! server's accuracy). VQA.py selects nothing (it saves every
//! epoch and submits test-dev to the server); the runner picks the best epoch on `val_file` by
//! `vqa_challenge_acc`, the number VQA v2 results are reported in.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::official::vqa_init_state_dict;
use xvlm_model::checkpoint::{adapt_for_finetune, StateDict};
use xvlm_model::collective::{gather_shares, rank_slices, Collective};
use xvlm_model::config::{FinetuneKeys, TaskConfig};
use xvlm_model::data::finetune::annotations::{self, read_items};
use xvlm_model::data::finetune::config::{one_or_many, parse_keys, task_value, Resolver};
use xvlm_model::data::finetune::images::ImageTransform;
use xvlm_model::data::finetune::loader::{parallel_map, sample_rng};
use xvlm_model::data::finetune::retrieval::FinetuneTransformSection;
use xvlm_model::data::finetune::vqa::{
    collate_test, encode_answer_list, load_answer_list, load_test, load_train, VqaDataConfig,
    VqaEntry, VqaTrainBatch, VqaTrainData,
};
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::metrics::vqa::vqa_accuracy;
use xvlm_model::tasks::vqa::VqaModel;
use xvlm_model::train::finetune::FinetuneModel;
use xvlm_model::xvlm::{vision_config, ModelError};

use super::init::{load_init_weights, task_tokenizer};
use super::{FinetuneTask, Split};
use crate::trainer::harness::setup::{other, read_init_checkpoint};
use crate::trainer::runner::outputs::Outputs;
use crate::trainer::task::{TaskContext, TaskError};

/// `k_test` of configs/VQA.yaml, used when the config has none.
const DEFAULT_K_TEST: usize = 128;

/// The task keys beside [`VqaDataConfig`]'s.
#[derive(Debug, Deserialize)]
struct VqaTaskKeys {
    /// xvlm: a validation split in the test layout with the annotators' `answer`s (official VQA has
    /// none; it picks the best epoch here).
    #[serde(default, deserialize_with = "one_or_many")]
    val_file: Vec<String>,
    /// xvlm-only softening of `train_transform_wohflip` (the flip stays the dataset's careful flip).
    #[serde(default)]
    finetune_transform: Option<FinetuneTransformSection>,
}

/// One evaluation split: its questions and, where the file has them, the annotators' answers.
struct EvalSplit {
    /// The annotation files (for errors).
    files: Vec<String>,
    entries: Vec<VqaEntry>,
    truth: Option<BTreeMap<i64, Vec<String>>>,
}

impl EvalSplit {
    fn load(cfg: &VqaDataConfig, files: &[String]) -> Result<Self, TaskError> {
        let mut split_cfg = cfg.clone();
        split_cfg.test_file = files.to_vec();
        let entries = load_test(&split_cfg).map_err(other)?;
        let mut truth = BTreeMap::new();
        let (mut with, mut without) = (0usize, None);
        for file in files {
            let items = read_items(file, |it| {
                let qid = it.int("question_id")?;
                let answers = match it.get("answer") {
                    None => None,
                    Some(serde_json::Value::String(s)) => Some(vec![s.clone()]),
                    Some(_) => Some(it.str_list("answer")?),
                };
                Ok((qid, answers))
            })
            .map_err(other)?;
            for (i, (qid, answers)) in items.into_iter().enumerate() {
                match answers {
                    Some(a) => {
                        with += 1;
                        if truth.insert(qid, a).is_some() {
                            return Err(other(annotations::item_err(
                                file,
                                i,
                                format!("question_id {qid} appears twice"),
                            )));
                        }
                    }
                    None => without = without.or(Some((file.clone(), i))),
                }
            }
        }
        // Ground truth is all or nothing: a split half answered would score half its questions.
        if let (true, Some((file, i))) = (with > 0, &without) {
            return Err(other(annotations::item_err(
                file,
                *i,
                "has no `answer` although other questions of the split have one",
            )));
        }
        Ok(Self {
            files: files.to_vec(),
            entries,
            truth: (with > 0).then_some(truth),
        })
    }
}

/// One submission entry (`[{"question_id", "answer"}]`).
#[derive(Debug, Serialize)]
struct Prediction<'a> {
    question_id: i64,
    answer: &'a str,
}

/// The VQA task of one rank: its evaluation splits and the tokenized answer list.
pub struct VqaTask {
    val: Option<EvalSplit>,
    test: Option<EvalSplit>,
    /// The candidates without eos (what the submission names).
    answers: Vec<String>,
    /// The candidates with eos, tokenized once (`[CLS] answer [SEP] [PAD]…`), on the model's device.
    answer_ids: Tensor,
    answer_atts: Tensor,
    tokenizer: Arc<TextTokenizer>,
    transform: ImageTransform,
    res: usize,
    batch_size_test: usize,
    k_test: usize,
    device: Device,
    threads: usize,
    outputs: Option<Outputs>,
}

impl VqaTask {
    /// Answer indices of this rank's share of `set`, in question order.
    fn answer_share(
        &self,
        model: &VqaModel,
        set: &EvalSplit,
        share: std::ops::Range<usize>,
    ) -> Result<Vec<i64>, TaskError> {
        let k = self.k_test.min(self.answers.len()) as i64;
        let indices: Vec<usize> = share.collect();
        // Borrowed alone: the loader threads must not see the task's tensors.
        let transform = &self.transform;
        let mut out = Vec::with_capacity(indices.len());
        // Whole batches of `batch_size_test`: each question is padded with the same batch at every
        // world size, so its answer is bit-identical.
        for chunk in indices.chunks(self.batch_size_test.max(1)) {
            let entries: Vec<&VqaEntry> = chunk.iter().map(|&i| &set.entries[i]).collect();
            let images = parallel_map(entries.len(), self.threads, |j| {
                // The test transform draws nothing; the generator only fills the signature.
                transform.load(&mut sample_rng(0, 0, chunk[j]), &entries[j].image)
            })
            .map_err(other)?;
            let batch =
                collate_test(&self.tokenizer, &entries, &images, self.res).map_err(other)?;
            let (image, ids, atts) = (
                batch.image.to_device(self.device),
                batch.text_ids.to_device(self.device),
                batch.text_atts.to_device(self.device),
            );
            let pred = tch::no_grad(|| -> Result<Tensor, ModelError> {
                let (_, states) = model.encode_question(&image, &ids, &atts, false);
                let ranking =
                    model.rank_answer(&states, &atts, &self.answer_ids, &self.answer_atts, k)?;
                Ok(ranking.pred_answer_index())
            })
            .map_err(other)?;
            out.extend(Vec::<i64>::try_from(pred.to_device(Device::Cpu)).map_err(other)?);
        }
        Ok(out)
    }
}

fn to_device(batch: VqaTrainBatch, device: Device) -> VqaTrainBatch {
    VqaTrainBatch {
        image: batch.image.to_device(device),
        text_ids: batch.text_ids.to_device(device),
        text_atts: batch.text_atts.to_device(device),
        answer_ids: batch.answer_ids.to_device(device),
        answer_atts: batch.answer_atts.to_device(device),
        weights: batch.weights.to_device(device),
        k: batch.k,
    }
}

impl FinetuneTask for VqaTask {
    type Model = VqaModel;
    type Data = VqaTrainData;
    const NAME: &'static str = "vqa";
    const BEST_METRIC: &'static str = "vqa_challenge_acc";

    fn build_model(root: &nn::Path, task: &TaskConfig) -> Result<VqaModel, ModelError> {
        VqaModel::new(root, task)
    }

    fn load_init_checkpoint(
        model: &VqaModel,
        vs: &VarStore,
        task: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let mut sd = read_init_checkpoint(url)?;
        let fine_tuned = sd.keys().any(|k| k.starts_with("text_decoder."));
        if !fine_tuned {
            let vision = vision_config(task).map_err(other)?;
            adapt_for_finetune(&mut sd, &vision, false)
                .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
            let text = task.load_text_config().map_err(other)?;
            let num_text_layers = usize::try_from(text.fusion_layer).map_err(|_| {
                other(format!(
                    "text config: fusion_layer {} is negative",
                    text.fusion_layer
                ))
            })?;
            // The decoder's cross key/value stay new exactly when they are `init_params`.
            let fresh_cross_kv = model
                .is_init_param("text_decoder.bert.encoder.layer.0.crossattention.self.key.weight");
            vqa_init_state_dict(&mut sd, num_text_layers, fresh_cross_kv)
                .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
        }
        // The pre-training heads (ITC, ITM, box) are dropped; from a pre-training checkpoint the
        // decoder's `init_params` are new.
        load_init_weights(vs, &sd, model.tied_aliases(), url, "VQA", |k| {
            !fine_tuned && model.is_init_param(k)
        })
    }

    fn state_dict(model: &VqaModel, vs: &VarStore) -> StateDict {
        model.state_dict(vs)
    }

    fn load_data(
        task: &TaskConfig,
        ctx: &TaskContext<'_>,
    ) -> Result<(Self, VqaTrainData), TaskError> {
        let value = task_value(task).map_err(other)?;
        let resolver = Resolver::Task(task);
        let cfg = VqaDataConfig::from_yaml(&value, &resolver).map_err(other)?;
        let keys: VqaTaskKeys = parse_keys(&value, "vqa task config").map_err(other)?;
        let finetune = FinetuneKeys::from_task(task).map_err(other)?;
        let tokenizer = task_tokenizer(task)?;

        let mut train = VqaTrainData::new(
            Arc::new(load_train(&cfg).map_err(other)?),
            tokenizer.clone(),
            &cfg,
        );
        if let Some(section) = keys.finetune_transform {
            // `train_transform_wohflip`: the dataset flips (carefully), never the transform.
            let section = FinetuneTransformSection {
                hflip: false,
                ..section
            };
            train.transform = section.transform(cfg.image_res).map_err(other)?;
        }

        let val_files = resolver.resolve_all(&keys.val_file);
        let val = (!val_files.is_empty())
            .then(|| EvalSplit::load(&cfg, &val_files))
            .transpose()?;
        if let Some(v) = &val {
            if v.truth.is_none() {
                return Err(other(format!(
                    "{}: val_file {:?} has no `answer`s: the best epoch cannot be chosen",
                    task.source.display(),
                    v.files
                )));
            }
        }
        let test = (!cfg.test_file.is_empty())
            .then(|| EvalSplit::load(&cfg, &cfg.test_file))
            .transpose()?;

        let (answers, answer_ids, answer_atts) = match &cfg.answer_list {
            Some(file) => {
                let plain = annotations::answer_list(file).map_err(other)?;
                if plain.is_empty() {
                    return Err(other(format!("answer_list {file}: the list is empty")));
                }
                let with_eos = load_answer_list(&cfg).map_err(other)?;
                let batch = encode_answer_list(&tokenizer, &with_eos).map_err(other)?;
                (
                    plain,
                    batch.ids.to_device(ctx.device),
                    batch.atts.to_device(ctx.device),
                )
            }
            None if val.is_some() || test.is_some() => {
                return Err(other(format!(
                    "{}: missing key `answer_list` (the candidates of the evaluation)",
                    task.source.display()
                )))
            }
            None => (Vec::new(), Tensor::new(), Tensor::new()),
        };
        Ok((
            Self {
                val,
                test,
                answers,
                answer_ids,
                answer_atts,
                tokenizer,
                transform: ImageTransform::test(cfg.image_res),
                res: cfg.image_res,
                batch_size_test: finetune.batch_size_test,
                k_test: finetune.k_test.unwrap_or(DEFAULT_K_TEST),
                device: ctx.device,
                threads: super::loader_threads(),
                outputs: (ctx.rank == 0).then(|| Outputs::open(ctx.output)).flatten(),
            },
            train,
        ))
    }

    fn to_device(batch: VqaTrainBatch, device: Device) -> VqaTrainBatch {
        to_device(batch, device)
    }

    fn evaluate(
        &self,
        model: &VqaModel,
        split: Split,
        comm: &dyn Collective,
    ) -> Result<Option<Vec<(String, f64)>>, TaskError> {
        let set = match split {
            Split::Val => self.val.as_ref(),
            Split::Test => self.test.as_ref(),
        };
        let Some(set) = set else { return Ok(None) };
        let n = set.entries.len();
        let slices = rank_slices(n, self.batch_size_test.max(1), comm.world_size());
        let mine = self.answer_share(model, set, slices[comm.rank()].clone())?;
        let chosen = gather_shares(comm, &slices, mine, 1, -1i64).map_err(other)?;
        let mut results = Vec::with_capacity(n);
        for (entry, &a) in set.entries.iter().zip(&chosen) {
            let answer = usize::try_from(a)
                .ok()
                .and_then(|a| self.answers.get(a))
                .ok_or_else(|| {
                    other(format!(
                        "vqa evaluation: answer index {a} outside the {} candidates",
                        self.answers.len()
                    ))
                })?;
            results.push(Prediction {
                question_id: entry.question_id.unwrap_or(-1),
                answer,
            });
        }
        if results.len() != n {
            return Err(other(format!(
                "vqa evaluation answered {} of {n} questions over {} ranks",
                results.len(),
                comm.world_size()
            )));
        }
        if let Some(out) = &self.outputs {
            let file = match split {
                Split::Val => "eval/vqa_val_result.json",
                Split::Test => "eval/vqa_result.json",
            };
            out.write_json(file, &results)?;
        }
        let mut metrics = vec![("questions".to_string(), n as f64)];
        if let Some(truth) = &set.truth {
            let pairs: Vec<(i64, String)> = results
                .iter()
                .map(|p| (p.question_id, p.answer.to_string()))
                .collect();
            let acc =
                vqa_accuracy(&pairs, truth).map_err(|e| other(format!("{:?}: {e}", set.files)))?;
            // Percent rounded to 2 decimals, as vqaEval.py reports `overall`; short decimals also
            // survive the JSON round trip of the best-checkpoint manifest exactly.
            let percent = |x: f64| (x * 10_000.0).round() / 100.0;
            metrics.push(("vqa_acc".into(), percent(acc.exact)));
            metrics.push(("vqa_challenge_acc".into(), percent(acc.challenge)));
        }
        Ok(Some(metrics))
    }
}
