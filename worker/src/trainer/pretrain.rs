//! `task: pretrain`: X-VLM pre-training (`Pretrain.py`) on this rank. The model, the data loaders and the
//! optimizer come from the job's official-format task config (with the job's `overrides:` merged in);
//! every iteration runs the official region step (when the derived coin says so) and the image-text
//! step through [`PretrainTrainer`], with gradients and ITC features exchanged over the job's collective.
//!
//! Determinism: the job `seed` replaces the config's `RNG_SEED`; the initial weights come from it (and
//! are broadcast from rank 0), the data stream of each rank and every random draw of the trainer derive
//! from it. The job's `data.shards`, when given, replace the config's `train_file` (the loader partitions
//! the full list over the ranks every epoch, as the official loader does; `ctx.shards` is not used).

use std::path::{Path, PathBuf};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::checkpoint::{load_state_dict, read_state_dict, LoadOptions};
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::batch::{ImageTextBatch, RegionBatch};
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{ImageTextLoader, PretrainDataConfig, RegionLoader};
use xvlm_model::optim::LinearSchedule;
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::{PretrainTrainer, StepKind, TrainSettings};

use super::task::{StepOutput, TaskContext, TaskError, TrainTask};

/// Names of the losses a step reports (averaged over ranks), in [`StepOutput::losses`] order.
pub const LOSS_NAMES: [&str; 6] = ["itc", "itm", "mlm", "bbox", "giou", "total"];

/// The pre-training task of one rank.
pub struct PretrainTask {
    vs: VarStore,
    model: &'static PretrainModel,
    trainer: PretrainTrainer<'static>,
    images: ImageTextLoader,
    regions: Option<RegionLoader>,
    device: Device,
    total_steps: u64,
    batch_size: usize,
    lr: f64,
}

fn other(e: impl std::fmt::Display) -> TaskError {
    TaskError::Other(e.to_string())
}

/// The task config of the job: the `config:` file with `overrides:` merged in.
pub fn load_task_config(ctx: &TaskContext<'_>) -> Result<TaskConfig, TaskError> {
    let path = ctx
        .spec
        .config
        .as_deref()
        .ok_or_else(|| other("task pretrain needs `config:` (an official task config)"))?;
    let path = Path::new(path.strip_prefix("file://").unwrap_or(path));
    let overrides = serde_yaml::to_value(&ctx.spec.overrides)
        .map_err(|e| other(format!("job overrides: {e}")))?;
    TaskConfig::load_with_overrides(path, &overrides)
        .map_err(|e| other(format!("task config {}: {e}", path.display())))
}

/// The data keys of `task` with every file name resolved like the config's other files (relative to the
/// config's folder first), `train_file` replaced by the job's shards when it names any.
pub fn data_config(
    task: &TaskConfig,
    job_shards: &[String],
) -> Result<PretrainDataConfig, TaskError> {
    let value = serde_yaml::to_value(task).map_err(other)?;
    let mut cfg: PretrainDataConfig = serde_yaml::from_value(value)
        .map_err(|e| other(format!("{}: data keys: {e}", task.source.display())))?;
    let resolve = |entries: &[String]| -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    task.resolve(e).display().to_string()
                }
            })
            .collect()
    };
    cfg.train_file = if job_shards.is_empty() {
        resolve(&cfg.train_file)
    } else {
        job_shards.to_vec()
    };
    cfg.train_file_regions = resolve(&cfg.train_file_regions);
    let vocab = task.vocab_dir().ok_or_else(|| {
        other(format!(
            "{}: missing key `text_encoder`",
            task.source.display()
        ))
    })?;
    cfg.text_encoder = vocab.display().to_string();
    Ok(cfg)
}

fn image_text_batch(b: ImageTextBatch, device: Device) -> PretrainBatch {
    PretrainBatch {
        image: b.image.to_device(device),
        text_ids: b.text_ids.to_device(device),
        text_atts: b.text_atts.to_device(device),
        text_ids_masked: b.text_ids_masked.to_device(device),
        masked_pos: b.masked_pos.to_device(device),
        masked_ids: b.masked_ids.to_device(device),
        region: None,
    }
}

fn region_batch(b: RegionBatch, device: Device) -> PretrainBatch {
    PretrainBatch {
        image: b.image.to_device(device),
        text_ids: b.text_ids.to_device(device),
        text_atts: b.text_atts.to_device(device),
        text_ids_masked: b.text_ids_masked.to_device(device),
        masked_pos: b.masked_pos.to_device(device),
        masked_ids: b.masked_ids.to_device(device),
        region: Some(RegionInputs {
            idx_to_group_img: b.idx_to_group_img.to_device(device),
            image_atts: b.image_atts.to_device(device),
            target_bbox: b.target_bbox.to_device(device),
            is_image: b.is_image.to_device(device),
        }),
    }
}

/// A local path for a `file://` URL or a plain path; other schemes are not read here yet.
fn local_path(url: &str) -> Result<PathBuf, TaskError> {
    if let Some(p) = url.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if url.contains("://") {
        return Err(other(format!(
            "init_checkpoint {url}: only local files are supported by task pretrain"
        )));
    }
    Ok(PathBuf::from(url))
}

impl PretrainTask {
    /// Builds the model (seeded by the job seed, broadcast from rank 0, optionally loaded from
    /// `init_checkpoint`), this rank's loaders and the trainer.
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let task = load_task_config(ctx)?;
        let data = data_config(&task, &ctx.spec.data.shards)?;
        let seed = ctx.spec.seed;

        tch::manual_seed(seed as i64);
        let vs = VarStore::new(ctx.device);
        let model = PretrainModel::new(&vs.root(), &task).map_err(other)?;
        if let Some(url) = &ctx.spec.init_checkpoint {
            let path = local_path(url)?;
            let sd =
                read_state_dict(&path).map_err(|e| other(format!("{}: {e}", path.display())))?;
            let report = load_state_dict(&vs, &sd, &LoadOptions::default())
                .map_err(|e| other(format!("{}: {e}", path.display())))?;
            tracing::info!(checkpoint = %path.display(), %report, "loaded init_checkpoint");
        }
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        tch::no_grad(|| -> Result<(), TaskError> {
            for (_, var) in &mut vars {
                ctx.comm.broadcast(var, 0)?;
            }
            Ok(())
        })?;

        // The trainer borrows the model for its whole life, and the task lives until the trainer process
        // exits: one leaked model per process is the simplest owner.
        let model: &'static PretrainModel = Box::leak(Box::new(model));
        let mut settings = TrainSettings::from_task(&task);
        settings.seed = seed;
        let trainer = PretrainTrainer::from_task(model, &vs, &task, ctx.world)
            .map_err(other)?
            .with_settings(settings.clone());

        let batch_size = data.images.batch_size;
        let sched = task.schedular.as_ref().ok_or_else(|| {
            other(format!(
                "{}: missing key `schedular`",
                task.source.display()
            ))
        })?;
        let size = task.train_dataset_size.unwrap_or(0);
        let per_epoch = size.div_ceil((batch_size * ctx.world).max(1) as u64);
        let schedule = LinearSchedule::from_config(sched, per_epoch).map_err(other)?;
        let total_steps = ctx.spec.steps.unwrap_or(schedule.total);

        let images =
            ImageTextLoader::start(&data, ctx.rank, ctx.world, seed, StreamState::default())
                .map_err(other)?;
        let regions = if settings.iter_perc > 0.0 && !data.train_file_regions.is_empty() {
            Some(
                RegionLoader::start(&data, ctx.rank, ctx.world, seed, StreamState::default())
                    .map_err(other)?,
            )
        } else {
            None
        };
        tracing::info!(
            rank = ctx.rank,
            world = ctx.world,
            total_steps,
            batch_size,
            iter_perc = settings.iter_perc,
            "pretrain task ready"
        );
        Ok(Self {
            vs,
            model,
            trainer,
            images,
            regions,
            device: ctx.device,
            total_steps,
            batch_size,
            lr: 0.0,
        })
    }
}

impl TrainTask for PretrainTask {
    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError> {
        if step != self.trainer.iteration() {
            return Err(other(format!(
                "task pretrain cannot start at step {step} (it is at iteration {}; resuming from a \
                 checkpoint is not implemented)",
                self.trainer.iteration()
            )));
        }
        let region = match &mut self.regions {
            Some(loader) if self.trainer.region_step_due() => Some(region_batch(
                loader.next_batch().map_err(other)?.0,
                self.device,
            )),
            _ => None,
        };
        let general = image_text_batch(self.images.next_batch().map_err(other)?.0, self.device);
        let region_refs = region.as_ref().map(|r| [r]);
        let log = self
            .trainer
            .run_iteration(region_refs.as_ref().map(|r| &r[..]), &[&general], comm)
            .map_err(other)?;

        // Per-rank losses of both steps (box losses come from the region step, the rest from the
        // image-text step), averaged over the ranks for the report.
        let mut values = [0.0f64; 6];
        for s in &log.steps {
            match s.kind {
                StepKind::Region => {
                    values[3] = s.loss_bbox;
                    values[4] = s.loss_giou;
                }
                StepKind::General => {
                    values[0] = s.loss_itc;
                    values[1] = s.loss_itm;
                    values[2] = s.loss_mlm;
                    values[5] = s.loss_total;
                    self.lr = s.lrs.first().copied().unwrap_or(0.0);
                }
            }
        }
        let mut sum = Tensor::from_slice(&values)
            .to_kind(Kind::Float)
            .to_device(self.device);
        comm.all_reduce_sum(&mut sum)?;
        let sum: Vec<f64> =
            Vec::try_from(sum.to_device(Device::Cpu).to_kind(Kind::Double)).map_err(other)?;
        let world = comm.world_size().max(1) as f64;
        let mut losses: Vec<(String, f64)> = LOSS_NAMES
            .iter()
            .zip(sum)
            .map(|(n, v)| (n.to_string(), v / world))
            .collect();
        if region.is_none() {
            losses.retain(|(n, _)| n != "bbox" && n != "giou");
        }
        Ok(StepOutput {
            losses,
            samples: self.batch_size,
        })
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.model.core.state_dict(&self.vs).into_iter().collect()
    }
}
