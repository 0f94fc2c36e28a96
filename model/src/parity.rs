//! Runs a parity case folder against its expected tensors (`xvlm parity`).
//!
//! A case folder holds `case.yaml` (kind and tolerances), inputs and `expected.safetensors`; every expected
//! tensor must be computed and compared, and an unknown kind is an error. Kinds run here: `pretrain`,
//! `retrieval`, `vqa`, `nlvr`, `grounding_bbox` (task forwards, the model on any device), `param_keys`
//! (state-dict key sets of the base models), `relpos_resize` (checkpoint resize), `pretrain_train_steps`
//! (the trainer's replay, `train::run_train_steps_case`), `image_preprocessing` (the data pipeline's test
//! transform and text encoding), `finetune_data` (the fine-tuning datasets and collate functions),
//! `grounding_weak_eval` (the weakly supervised RefCOCO+ evaluation, Grad-CAM on the retrieval model).

pub mod finetune_data;
pub mod grounding_weak_eval;
pub mod image_preprocessing;
pub mod param_keys;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::checkpoint;
use crate::collective::SingleProcess;
use crate::config::TaskConfig;
use crate::loss::ReplaySampler;
use crate::metrics::retrieval::{itm_eval, GroundTruth, TieRule};
use crate::tasks::grounding_bbox::{self, GroundingBboxModel};
use crate::tasks::retrieval::eval::{similarities, RetrievalEvalConfig, SplitTensors};
use crate::tasks::retrieval::RetrievalModel;
use crate::tasks::vqa::VqaModel;
use crate::tasks::{NlvrModel, PretrainBatch, PretrainModel, RegionInputs};
use crate::xvlm::ModelError;

/// Per-tensor tolerance: `max|got - expected| <= rtol * max|expected| + atol`.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Tolerance {
    /// Relative part, scaled by the largest expected magnitude.
    pub rtol: f64,
    /// Absolute floor.
    pub atol: f64,
}

/// The outcome for one named tensor.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Tensor name as in `expected.safetensors`.
    pub name: String,
    /// max |got - expected|.
    pub max_abs: f64,
    /// max_abs / max |expected|.
    pub max_rel: f64,
    /// Whether it is within tolerance (and shapes agree).
    pub passed: bool,
    /// Why it failed when it is not a numeric miss (shape mismatch, not computed).
    pub note: Option<String>,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<60} max_abs {:.3e} max_rel {:.3e} {}",
            self.name,
            self.max_abs,
            self.max_rel,
            if self.passed { "PASS" } else { "FAIL" }
        )?;
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

/// Compares `got` with `expected` under `tol` (integer tensors must match exactly).
pub fn compare(name: &str, got: &Tensor, expected: &Tensor, tol: Tolerance) -> Comparison {
    if got.size() != expected.size() {
        return Comparison {
            name: name.to_string(),
            max_abs: f64::INFINITY,
            max_rel: f64::INFINITY,
            passed: false,
            note: Some(format!(
                "shape {:?} != expected {:?}",
                got.size(),
                expected.size()
            )),
        };
    }
    let exact = !expected.is_floating_point();
    let g = got.to_device(expected.device()).to_kind(Kind::Double);
    let e = expected.to_kind(Kind::Double);
    let (max_abs, scale) = if e.numel() == 0 {
        (0.0, 0.0)
    } else {
        (
            (&g - &e).abs().max().double_value(&[]),
            e.abs().max().double_value(&[]),
        )
    };
    let max_rel = if scale > 0.0 {
        max_abs / scale
    } else {
        max_abs
    };
    let passed = if exact {
        max_abs == 0.0
    } else {
        max_abs <= tol.rtol * scale + tol.atol
    };
    Comparison {
        name: name.to_string(),
        max_abs,
        max_rel,
        passed,
        note: None,
    }
}

/// The failure for an expected tensor the runner did not compute.
pub fn not_computed(name: &str) -> Comparison {
    Comparison {
        name: name.to_string(),
        max_abs: f64::INFINITY,
        max_rel: f64::INFINITY,
        passed: false,
        note: Some("not computed".into()),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Case runner
// ---------------------------------------------------------------------------------------------------------

/// A case folder that cannot be run (as opposed to a tensor that does not match).
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// A file of the case could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// `case.yaml` names a kind nobody knows.
    #[error("unknown parity kind {0:?} (known: {KNOWN_KINDS:?})")]
    UnknownKind(String),
    /// A known kind whose computation is not available in this build.
    #[error("parity kind {kind:?} is not implemented yet: {reason}")]
    NotImplemented {
        /// The kind.
        kind: String,
        /// What is missing.
        reason: String,
    },
    /// An input tensor the kind needs is absent from `batch.safetensors`.
    #[error("{path} lacks input tensor {name}")]
    MissingInput {
        /// The batch file.
        path: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// The model could not be built, loaded or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The training replay could not run.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
}

/// Every kind a `case.yaml` may name.
pub const KNOWN_KINDS: [&str; 12] = [
    "pretrain",
    "pretrain_train_steps",
    "finetune_train_steps",
    "grounding_weak_eval",
    "retrieval",
    "grounding_bbox",
    "nlvr",
    "vqa",
    "image_preprocessing",
    "param_keys",
    "relpos_resize",
    "finetune_data",
];

/// Where the model weights of a case come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightsSource {
    /// `model.th` if present, else `model.safetensors`.
    #[default]
    Auto,
    /// The official `torch.save` file `model.th`.
    TorchSave,
    /// `model.safetensors`.
    Safetensors,
}

/// `case.yaml`: the kind and its tolerances (other keys are kind-specific).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CaseSpec {
    /// Which computation.
    pub kind: String,
    /// Relative tolerance (per tensor, scaled by its largest magnitude).
    #[serde(default)]
    pub rtol: Option<f64>,
    /// Absolute floor.
    #[serde(default)]
    pub atol: Option<f64>,
    /// Kind-specific keys.
    #[serde(flatten)]
    pub extra: std::collections::BTreeMap<String, serde_yaml::Value>,
}

impl CaseSpec {
    /// Reads `dir/case.yaml`.
    pub fn load(dir: &Path) -> Result<Self, ParityError> {
        let path = dir.join("case.yaml");
        let text = std::fs::read_to_string(&path).map_err(|e| ParityError::Read {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        serde_yaml::from_str(&text).map_err(|e| ParityError::Read {
            path,
            reason: e.to_string(),
        })
    }

    /// The tolerance (defaults: the README's 1e-5 relative, 1e-6 absolute).
    pub fn tolerance(&self) -> Tolerance {
        Tolerance {
            rtol: self.rtol.unwrap_or(1e-5),
            atol: self.atol.unwrap_or(1e-6),
        }
    }
}

/// The result of one case: one row per expected tensor (or key set).
#[derive(Debug)]
pub struct CaseReport {
    /// The case kind.
    pub kind: String,
    /// One row per compared item.
    pub rows: Vec<Comparison>,
}

impl CaseReport {
    /// True when every row passed and there is at least one row.
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.passed)
    }

    /// The rows that failed.
    pub fn failures(&self) -> Vec<&Comparison> {
        self.rows.iter().filter(|r| !r.passed).collect()
    }
}

/// Runs the case in `dir` according to its `case.yaml`, on the CPU.
pub fn run_case(dir: &Path, weights: WeightsSource) -> Result<CaseReport, ParityError> {
    run_case_on(dir, weights, Device::Cpu)
}

/// Runs the case in `dir` with the model on `device` (expected tensors stay on the CPU), with oneDNN
/// convolutions off: their backward is machine-dependent beyond the fixtures' tolerances (see the shim).
pub fn run_case_on(
    dir: &Path,
    weights: WeightsSource,
    device: Device,
) -> Result<CaseReport, ParityError> {
    crate::runtime::with_reference_cpu_kernels(|| {
        run_case_with_current_kernels(dir, weights, device)
    })
}

fn run_case_with_current_kernels(
    dir: &Path,
    weights: WeightsSource,
    device: Device,
) -> Result<CaseReport, ParityError> {
    let spec = CaseSpec::load(dir)?;
    if device != Device::Cpu
        && !["pretrain", "nlvr", "grounding_bbox", "retrieval", "vqa"].contains(&spec.kind.as_str())
    {
        return Err(ParityError::NotImplemented {
            kind: spec.kind,
            reason: format!("only the CPU is supported for this kind, not {device:?}"),
        });
    }
    let rows = match spec.kind.as_str() {
        "pretrain" => run_pretrain(dir, &spec, weights, device)?,
        "nlvr" => run_nlvr(dir, &spec, weights, device)?,
        "grounding_bbox" => run_grounding_bbox(dir, &spec, weights, device)?,
        "retrieval" => run_retrieval(dir, &spec, weights, device)?,
        "vqa" => run_vqa(dir, &spec, weights, device)?,
        "param_keys" => param_keys::run(dir)?,
        "relpos_resize" => run_relpos_resize(dir, &spec)?,
        "image_preprocessing" => {
            let expected = read_tensors(&dir.join("expected.safetensors"))?;
            image_preprocessing::run(dir, &spec, &expected)?
        }
        "finetune_data" => {
            let expected = read_tensors(&dir.join("expected.safetensors"))?;
            finetune_data::run(dir, &spec, &expected)?
        }
        // Grad-CAM of the ITM score, detection scoring and accuracy per split (tasks::grounding_weak).
        "grounding_weak_eval" => grounding_weak_eval::run(dir, &spec, weights)?,
        // The trainer's replay of `Pretrain.train` (train/replay/): per-step losses, lrs, grad norms,
        // param groups and final weights.
        "pretrain_train_steps" => crate::train::run_train_steps_case(dir, weights)?,
        // The shared fine-tuning step replaying the official loop of the case's `task:`.
        "finetune_train_steps" => crate::train::run_finetune_steps_case(dir, weights)?,
        k if KNOWN_KINDS.contains(&k) => {
            return Err(ParityError::NotImplemented {
                kind: spec.kind.clone(),
                reason: "its task model is not part of this build".into(),
            })
        }
        _ => return Err(ParityError::UnknownKind(spec.kind)),
    };
    Ok(CaseReport {
        kind: spec.kind,
        rows,
    })
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, ParityError> {
    Tensor::read_safetensors(path).map_err(|e| ParityError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Compares every tensor of `expected` with the computed one of the same name; an expected tensor that
/// was not computed is a failure.
pub fn compare_all(
    expected: &[(String, Tensor)],
    computed: &HashMap<String, Tensor>,
    tol: Tolerance,
) -> Vec<Comparison> {
    expected
        .iter()
        .map(|(name, e)| match computed.get(name) {
            Some(got) => compare(name, got, e, tol),
            None => not_computed(name),
        })
        .collect()
}

/// Loads the case's weights into `vs` strictly (every variable filled; computed buffers and tied aliases
/// in the file are skipped).
pub fn load_case_weights(
    vs: &VarStore,
    dir: &Path,
    source: WeightsSource,
    aliases: &[(String, String)],
) -> Result<(), ParityError> {
    let th = dir.join("model.th");
    let st = dir.join("model.safetensors");
    let path = match source {
        WeightsSource::TorchSave => th,
        WeightsSource::Safetensors => st,
        WeightsSource::Auto if th.exists() => th,
        WeightsSource::Auto => st,
    };
    let sd = checkpoint::read_state_dict(&path).map_err(ModelError::from)?;
    let opts = checkpoint::LoadOptions {
        strict: true,
        ignore: aliases.iter().map(|(alias, _)| alias.clone()).collect(),
    };
    checkpoint::load_state_dict(vs, &sd, &opts).map_err(ModelError::from)?;
    Ok(())
}

/// A case's model built from its `config.yaml`, with the case's weights loaded strictly.
struct CaseModel<M> {
    task: TaskConfig,
    // Owns the variables the model's tensors point into.
    _vs: VarStore,
    model: M,
}

impl<M> CaseModel<M> {
    fn load(
        dir: &Path,
        weights: WeightsSource,
        device: Device,
        new: impl FnOnce(&tch::nn::Path, &TaskConfig) -> Result<M, ModelError>,
        aliases: impl FnOnce(&M) -> Vec<(String, String)>,
    ) -> Result<Self, ParityError> {
        let task = TaskConfig::load(&dir.join("config.yaml")).map_err(ModelError::from)?;
        let vs = VarStore::new(device);
        let model = new(&vs.root(), &task)?;
        load_case_weights(&vs, dir, weights, &aliases(&model))?;
        Ok(CaseModel {
            task,
            _vs: vs,
            model,
        })
    }
}

/// A case's recorded inputs (`batch.safetensors`), handed out on the model's device.
struct CaseBatch {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    device: Device,
}

impl CaseBatch {
    fn open(dir: &Path, device: Device) -> Result<Self, ParityError> {
        let path = dir.join("batch.safetensors");
        let tensors = read_tensors(&path)?.into_iter().collect();
        Ok(CaseBatch {
            path,
            tensors,
            device,
        })
    }

    fn get(&self, name: &str) -> Result<Tensor, ParityError> {
        self.tensors
            .get(name)
            .map(|t| t.to_device(self.device))
            .ok_or_else(|| ParityError::MissingInput {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }
}

/// Named computed tensors.
fn named<const N: usize>(pairs: [(&str, Tensor); N]) -> HashMap<String, Tensor> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Compares `computed` with the case's `expected.safetensors`.
fn check_expected(
    dir: &Path,
    spec: &CaseSpec,
    computed: &HashMap<String, Tensor>,
) -> Result<Vec<Comparison>, ParityError> {
    let expected = read_tensors(&dir.join("expected.safetensors"))?;
    Ok(compare_all(&expected, computed, spec.tolerance()))
}

/// Kind `pretrain`: the official pre-training forward on the `general` batch and the `region` batch,
/// with the recorded ITM negatives replayed.
fn run_pretrain(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
    device: Device,
) -> Result<Vec<Comparison>, ParityError> {
    let case = CaseModel::load(dir, weights, device, PretrainModel::new, |m| {
        m.core.tied_aliases()
    })?;
    let batch = CaseBatch::open(dir, device)?;
    let mut computed = HashMap::new();
    for prefix in ["general", "region"] {
        let t = |name: &str| batch.get(&format!("{prefix}.{name}"));
        let region = if prefix == "region" {
            Some(RegionInputs {
                idx_to_group_img: t("idx_to_group_img")?,
                image_atts: t("image_atts")?,
                target_bbox: t("target_bbox")?,
                is_image: t("is_image")?,
            })
        } else {
            None
        };
        let input = PretrainBatch {
            image: t("image")?,
            text_ids: t("text_ids")?,
            text_atts: t("text_atts")?,
            text_ids_masked: t("text_ids_masked")?,
            masked_pos: t("masked_pos")?,
            masked_ids: t("masked_ids")?,
            region,
        };
        let mut sampler = ReplaySampler::new(t("itm_neg_image_idx")?, t("itm_neg_text_idx")?);
        // The fixtures ran in train mode with every dropout / drop-path at 0, i.e. an eval forward.
        let out = tch::no_grad(|| {
            case.model
                .forward(&input, &SingleProcess, &mut sampler, false)
        })?;
        for (name, tensor) in out.named_tensors() {
            computed.insert(format!("{prefix}.{name}"), tensor);
        }
    }
    check_expected(dir, spec, &computed)
}

/// Kind `nlvr`: the NLVR2 forward (logits, loss, prediction, accuracy) on the recorded pairs.
fn run_nlvr(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
    device: Device,
) -> Result<Vec<Comparison>, ParityError> {
    let CaseModel { model, .. } = CaseModel::load(dir, weights, device, NlvrModel::new, |m| {
        m.core.tied_aliases()
    })?;
    let batch = CaseBatch::open(dir, device)?;
    let t = |name: &str| batch.get(name);
    let targets = t("targets")?;
    let (image, ids, atts) = (t("image")?, t("text_ids")?, t("text_atts")?);
    let out = tch::no_grad(|| model.forward(&image, &ids, &atts, false))?;
    let pred = out.pred_class();
    let computed = named([
        ("loss", out.loss(&targets)),
        ("accuracy", NlvrModel::accuracy(&pred, &targets)),
        ("pred_class", pred),
        ("image_embeds", out.image_embeds),
        ("cross_cls", out.cross_cls),
        ("logits", out.logits),
    ]);
    check_expected(dir, spec, &computed)
}

/// Kind `grounding_bbox`: box prediction, L1 + GIoU against made-up targets, and the VLUE score.
fn run_grounding_bbox(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
    device: Device,
) -> Result<Vec<Comparison>, ParityError> {
    let CaseModel { model, .. } =
        CaseModel::load(dir, weights, device, GroundingBboxModel::new, |m| {
            m.core.tied_aliases()
        })?;
    let batch = CaseBatch::open(dir, device)?;
    let t = |name: &str| batch.get(name);
    let (image, ids, atts) = (t("image")?, t("text_ids")?, t("text_atts")?);
    let out = tch::no_grad(|| model.forward(&image, &ids, &atts, false))?;
    let (l1, giou) = GroundingBboxModel::loss(&out.bbox.coord, &t("target_bbox")?);
    let pred_xywh = grounding_bbox::to_pixel_xywh(&out.bbox.coord, &t("eval.image_wh")?);
    let (iou, score) = grounding_bbox::grounding_score(&t("eval.ref_bbox_xywh")?, &pred_xywh);
    let computed = named([
        ("loss_total", &l1 + &giou),
        ("loss_bbox", l1),
        ("loss_giou", giou),
        ("eval.iou", iou),
        ("eval.score", Tensor::from(score)),
        ("eval.pred_box_xywh", pred_xywh),
        ("eval.output_coord", out.bbox.coord.shallow_clone()),
        ("output_coord", out.bbox.coord),
        ("bbox_head_output", out.bbox.head_output),
        ("image_embeds", out.image_embeds),
    ]);
    check_expected(dir, spec, &computed)
}

/// An integer key of the case's `config.yaml` that the task config keeps among its extra keys.
fn required_int(task: &TaskConfig, dir: &Path, key: &str) -> Result<i64, ParityError> {
    task.extra
        .get(key)
        .and_then(serde_yaml::Value::as_i64)
        .ok_or_else(|| ParityError::Read {
            path: dir.join("config.yaml"),
            reason: format!("missing integer key {key}"),
        })
}

/// Kind `retrieval`: evaluation (similarities, top-k ITM re-ranking, recall), one training forward with
/// image ids, and `itm_eval` on a made-up matrix.
fn run_retrieval(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
    device: Device,
) -> Result<Vec<Comparison>, ParityError> {
    let CaseModel { task, model, .. } =
        CaseModel::load(dir, weights, device, RetrievalModel::new, |m| {
            m.core.tied_aliases()
        })?;
    let batch = CaseBatch::open(dir, device)?;
    let t = |name: &str| batch.get(name);
    let mut computed: HashMap<String, Tensor> = HashMap::new();
    let mut put = |k: &str, v: Tensor| {
        computed.insert(k.to_string(), v);
    };

    let gt = GroundTruth::from_tensors(&t("eval.txt2img")?, &t("eval.img2txt")?)?;
    let mut split = SplitTensors {
        images: t("eval.image")?,
        text_ids: t("eval.text_ids")?,
        text_atts: t("eval.text_atts")?,
    };
    let cfg = RetrievalEvalConfig::from_task(&task)?;
    let ev = model.evaluate(&SingleProcess, &gt, &mut split, &cfg)?;
    let metrics = |rule| -> Result<Tensor, ParityError> {
        Ok(Tensor::from_slice(&ev.itm_metrics(&gt, rule)?.to_array()))
    };
    put("eval.metrics", metrics(TieRule::NumpySmallRows)?);
    put(
        "eval.metrics_ties_favor_gt",
        metrics(TieRule::FavorGroundTruth)?,
    );
    put(
        "eval.metrics_ties_against_gt",
        metrics(TieRule::AgainstGroundTruth)?,
    );
    let (ni, nt) = (gt.n_images(), gt.n_texts());
    put("eval.score_matrix_i2t", ev.i2t.score_matrix(nt));
    put("eval.score_matrix_t2i", ev.t2i.score_matrix(ni));
    put(
        "eval.sims_matrix",
        similarities(&ev.image_feat, &ev.text_feat),
    );
    put("eval.image_embeds", ev.local.image_embeds);
    put("eval.image_feat", ev.image_feat);
    put("eval.text_embeds", ev.local.text_embeds);
    put("eval.text_feat", ev.text_feat);
    put("eval.i2t_topk_idx", ev.i2t.idx);
    put("eval.i2t_topk_sim", ev.i2t.sim);
    put("eval.i2t_topk_itm_score", ev.i2t.itm_score);
    put("eval.t2i_topk_idx", ev.t2i.idx);
    put("eval.t2i_topk_sim", ev.t2i.sim);
    put("eval.t2i_topk_itm_score", ev.t2i.itm_score);

    let metric_gt = GroundTruth::from_tensors(&t("metric.txt2img")?, &t("metric.img2txt")?)?;
    let made_up = itm_eval(
        &t("metric.scores_i2t")?,
        &t("metric.scores_t2i")?,
        &metric_gt,
        TieRule::FavorGroundTruth,
    )?;
    put("metric.metrics", Tensor::from_slice(&made_up.to_array()));

    let mut sampler =
        ReplaySampler::new(t("train.itm_neg_image_idx")?, t("train.itm_neg_text_idx")?);
    let (image, ids, atts, idx) = (
        t("train.image")?,
        t("train.text_ids")?,
        t("train.text_atts")?,
        t("train.idx")?,
    );
    let tr = tch::no_grad(|| {
        model.train_forward(
            &image,
            &ids,
            &atts,
            &idx,
            &SingleProcess,
            &mut sampler,
            false,
        )
    })?;
    put("train.image_embeds", tr.image_embeds);
    put("train.image_feat", tr.image_feat);
    put("train.text_embeds", tr.text_embeds);
    put("train.text_feat", tr.text_feat);
    put("train.loss_itc", tr.loss_itc);
    put("train.loss_itm", tr.itm.loss);
    put("train.itm_logits", tr.itm.logits);
    put("train.itm_weights_i2t", tr.itm.weights.weights_i2t);
    put("train.itm_weights_t2i", tr.itm.weights.weights_t2i);
    put("train.sim_i2t", tr.itm.weights.sim_i2t);
    put("train.temp", model.core.temp()?.detach().copy());

    check_expected(dir, spec, &computed)
}

/// Kind `vqa`: `rank_answer` over the answer list and the weighted training loss.
fn run_vqa(
    dir: &Path,
    spec: &CaseSpec,
    weights: WeightsSource,
    device: Device,
) -> Result<Vec<Comparison>, ParityError> {
    let CaseModel { task, model, .. } =
        CaseModel::load(dir, weights, device, VqaModel::new, VqaModel::tied_aliases)?;
    let k_test = required_int(&task, dir, "k_test")?;
    let batch = CaseBatch::open(dir, device)?;
    let t = |name: &str| batch.get(name);
    let mut computed: HashMap<String, Tensor> = HashMap::new();

    let (q_ids, q_atts) = (t("eval.question_ids")?, t("eval.question_atts")?);
    let eval_image = t("eval.image")?;
    let (image_embeds, states) =
        tch::no_grad(|| model.encode_question(&eval_image, &q_ids, &q_atts, false));
    let ranking = model.rank_answer(
        &states,
        &q_atts,
        &t("eval.answer_ids")?,
        &t("eval.answer_atts")?,
        k_test,
    )?;
    computed.insert("eval.pred_answer_index".into(), ranking.pred_answer_index());
    for (name, tensor) in [
        ("eval.image_embeds", image_embeds),
        ("eval.question_states", states),
        ("eval.start_logits", ranking.start_logits),
        ("eval.prob_first_token", ranking.prob_first_token),
        ("eval.first_token_topk_ids", ranking.first_token_topk_ids),
        (
            "eval.first_token_topk_probs",
            ranking.first_token_topk_probs,
        ),
        ("eval.candidate_answer_nll", ranking.candidate_answer_nll),
        ("eval.topk_ids", ranking.topk_ids),
        ("eval.topk_probs", ranking.topk_probs),
    ] {
        computed.insert(name.into(), tensor);
    }

    let (image, ids, atts) = (
        t("train.image")?,
        t("train.question_ids")?,
        t("train.question_atts")?,
    );
    let (a_ids, a_atts, k, w) = (
        t("train.answer_ids")?,
        t("train.answer_atts")?,
        t("train.k")?,
        t("train.weights")?,
    );
    let out =
        tch::no_grad(|| model.train_loss(&image, &ids, &atts, &a_ids, &a_atts, &k, &w, false))?;
    computed.insert("train.loss".into(), out.loss);
    computed.insert("train.per_answer_loss".into(), out.per_answer);

    check_expected(dir, spec, &computed)
}

/// Kind `relpos_resize`: `wA_to_wB.src` resized to (2B−1)² rows must equal `wA_to_wB.dst`.
fn run_relpos_resize(dir: &Path, spec: &CaseSpec) -> Result<Vec<Comparison>, ParityError> {
    let batch = CaseBatch::open(dir, Device::Cpu)?;
    let mut computed = HashMap::new();
    for (name, src) in &batch.tensors {
        let Some(case) = name.strip_suffix(".src") else {
            continue;
        };
        let window = case
            .rsplit("_to_w")
            .next()
            .and_then(|w| w.parse::<i64>().ok())
            .ok_or_else(|| ParityError::Read {
                path: batch.path.clone(),
                reason: format!("cannot read the target window from {name:?}"),
            })?;
        let dst = (2 * window - 1) * (2 * window - 1);
        let out =
            checkpoint::interpolate_relative_pos_embed(src, dst, name).map_err(ModelError::from)?;
        computed.insert(format!("{case}.dst"), out);
    }
    check_expected(dir, spec, &computed)
}
