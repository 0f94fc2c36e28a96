//! `task: pretrain`: X-VLM pre-training (`Pretrain.py`) on this rank. The model, the data loaders and the
//! optimizer come from the job's official-format task config (with the job's `overrides:` merged in);
//! every iteration runs the official region step (when the derived coin says so) and the image-text
//! step through [`PretrainTrainer`], with gradients and ITC features exchanged over the job's collective.
//!
//! Determinism: the job `seed` replaces the config's `RNG_SEED`; the initial weights come from it (and
//! are broadcast from rank 0), the data stream of each rank and every random draw of the trainer derive
//! from it. Image-text shards: the coordinator's plan for this rank (`TaskContext::shards`) when given;
//! otherwise the job's `data.shards` or the config's `train_file`, split over the ranks by the loader
//! every epoch. Region shards (`train_file_regions`) are always split by the loader.
//!
//! Exact resume: a checkpoint holds the weights, the optimizer moments and step counts, the scheduler
//! step and the loss-scaler state (`checkpoint_state`), and each rank's data cursors (`checkpoint_meta`).
//! Every other random draw is derived from (seed, iteration, rank), so nothing else is carried.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::checkpoint::{load_state_dict, read_state_dict, LoadOptions, StateDict};
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::batch::{ImageTextBatch, RegionBatch};
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{ImageTextLoader, PretrainDataConfig, RegionLoader};
use xvlm_model::data::shard::{Cursor, ShardPlan};
use xvlm_model::data::store::list_shards;
use xvlm_model::optim::LinearSchedule;
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::{PretrainTrainer, StepKind, TrainSettings};

use super::task::{StepOutput, TaskContext, TaskError, TrainTask};
use crate::checkpoint::Storage;

/// Names of the losses a step reports (averaged over ranks), in [`StepOutput::losses`] order.
pub const LOSS_NAMES: [&str; 6] = ["itc", "itm", "mlm", "bbox", "giou", "total"];

/// libtorch's generator is process-global: the seeded model initialisation holds this lock, so tasks
/// built concurrently in one process (in-process ranks, tests) each get the weights of their seed.
static INIT: Mutex<()> = Mutex::new(());

/// Version of [`ResumeMeta`]'s layout.
const META_VERSION: u32 = 1;

/// This rank's JSON checkpoint state (`rank-{r}.json`'s `task_state`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ResumeMeta {
    version: u32,
    /// Iterations done (= the scheduler step saved beside it).
    iteration: u64,
    rank: usize,
    world: usize,
    /// Fingerprint of the image-text files this rank's plan reads and how they are split.
    image_plan: String,
    /// The image-text stream after the last batch used.
    images: StreamState,
    /// The region stream after the last batch used (none without region data).
    regions: Option<StreamState>,
    /// The lr of the last step (reported until the next step).
    lr: f64,
}

/// The image-text shard plan of a rank and its fingerprint.
struct ImagePlan {
    plan: ShardPlan,
    fingerprint: String,
}

impl ImagePlan {
    /// The coordinator's files for this rank when given, else `train_file` split over the ranks.
    fn new(
        data: &PretrainDataConfig,
        assigned: &[String],
        rank: usize,
        world: usize,
        seed: u64,
    ) -> Result<Self, TaskError> {
        let (plan, how) = if assigned.is_empty() {
            let files = list_shards(&data.train_file).map_err(other)?;
            (
                ShardPlan::new(files, rank, world, seed).map_err(other)?,
                format!("split {rank}/{world}"),
            )
        } else {
            let files = list_shards(assigned).map_err(other)?;
            (
                ShardPlan::assigned(files, rank, seed).map_err(other)?,
                "assigned".to_string(),
            )
        };
        let names: Vec<&str> = plan.files().iter().map(|f| f.name.as_str()).collect();
        let fingerprint = format!(
            "{how}: {} files, sha256 {}",
            names.len(),
            &crate::checkpoint::sha256_hex(names.join("\n").as_bytes())[..16]
        );
        Ok(Self { plan, fingerprint })
    }
}

/// The pre-training task of one rank.
pub struct PretrainTask {
    vs: VarStore,
    model: &'static PretrainModel,
    trainer: PretrainTrainer<'static>,
    data: PretrainDataConfig,
    image_plan: ImagePlan,
    images: ImageTextLoader,
    images_state: StreamState,
    regions: Option<RegionLoader>,
    regions_state: StreamState,
    rank: usize,
    world: usize,
    seed: u64,
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

/// Distinguishes the temporary copies of remote checkpoints one process makes.
static DOWNLOADS: AtomicU64 = AtomicU64::new(0);

/// Reads `init_checkpoint`: an official `torch.save` file (`.th`) or safetensors, at a plain path, a
/// `file://` URL or any URL the checkpoint storage opens (`s3://bucket/key`). A remote object is read
/// into a private temporary file (the readers take files) that is removed afterwards.
fn read_init_checkpoint(url: &str) -> Result<StateDict, TaskError> {
    let fail = |e: &dyn std::fmt::Display| other(format!("init_checkpoint {url}: {e}"));
    let local = url
        .strip_prefix("file://")
        .or((!url.contains("://")).then_some(url));
    if let Some(path) = local {
        return read_state_dict(Path::new(path)).map_err(|e| fail(&e));
    }
    let (parent, name) = url
        .rsplit_once('/')
        .filter(|(p, n)| !n.is_empty() && p.contains("://"))
        .ok_or_else(|| fail(&"not the URL of an object"))?;
    let bytes = Storage::open(parent)
        .and_then(|s| s.get(name))
        .map_err(|e| fail(&e))?
        .ok_or_else(|| fail(&"no such object"))?;
    let tmp = std::env::temp_dir().join(format!(
        "xvlm-init-{}-{}-{name}",
        std::process::id(),
        DOWNLOADS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&tmp, &bytes).map_err(|e| fail(&format!("{}: {e}", tmp.display())))?;
    let sd = read_state_dict(&tmp);
    let _ = std::fs::remove_file(&tmp);
    tracing::info!(url, bytes = bytes.len(), "downloaded init_checkpoint");
    sd.map_err(|e| fail(&e))
}

impl PretrainTask {
    /// Builds the model (seeded by the job seed, broadcast from rank 0, optionally loaded from
    /// `init_checkpoint`), this rank's loaders and the trainer.
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let task = load_task_config(ctx)?;
        let data = data_config(&task, &ctx.spec.data.shards)?;
        let seed = ctx.spec.seed;

        let vs = VarStore::new(ctx.device);
        let model = {
            let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
            tch::manual_seed(seed as i64);
            PretrainModel::new(&vs.root(), &task).map_err(other)?
        };
        if let Some(url) = &ctx.spec.init_checkpoint {
            let sd = read_init_checkpoint(url)?;
            let report = load_state_dict(&vs, &sd, &LoadOptions::default())
                .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
            tracing::info!(checkpoint = %url, %report, "loaded init_checkpoint");
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

        let image_plan = ImagePlan::new(&data, ctx.shards, ctx.rank, ctx.world, seed)?;
        let images = ImageTextLoader::start_plan(
            &data,
            image_plan.plan.clone(),
            seed,
            StreamState::default(),
        )
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
            image_files = %image_plan.fingerprint,
            "pretrain task ready"
        );
        Ok(Self {
            vs,
            model,
            trainer,
            data,
            image_plan,
            images,
            images_state: StreamState::default(),
            regions,
            regions_state: StreamState::default(),
            rank: ctx.rank,
            world: ctx.world,
            seed,
            device: ctx.device,
            total_steps,
            batch_size,
            lr: 0.0,
        })
    }

    /// Names of the image-text shard files this rank reads (its coordinator-assigned files, or every
    /// file of the job when the loader splits them itself).
    pub fn image_files(&self) -> Vec<String> {
        self.image_plan
            .plan
            .files()
            .iter()
            .map(|f| f.name.clone())
            .collect()
    }

    /// Restarts both loaders at the given stream states.
    fn restart_loaders(
        &mut self,
        images: StreamState,
        regions: StreamState,
    ) -> Result<(), TaskError> {
        self.images = ImageTextLoader::start_plan(
            &self.data,
            self.image_plan.plan.clone(),
            self.seed,
            images,
        )
        .map_err(other)?;
        self.images_state = images;
        if self.regions.is_some() {
            // Drop the running loader (joins its threads) before starting the new one.
            self.regions = None;
            self.regions = Some(
                RegionLoader::start(&self.data, self.rank, self.world, self.seed, regions)
                    .map_err(other)?,
            );
            self.regions_state = regions;
        }
        Ok(())
    }
}

/// The state at the start of the epoch after `state`'s: where a stream resumes when its shard plan
/// changed (DESIGN: the plan is recomputed from the next epoch boundary).
fn next_epoch(state: StreamState) -> StreamState {
    StreamState {
        cursor: Cursor {
            epoch: state.cursor.epoch + 1,
            ..Cursor::default()
        },
        ..state
    }
}

impl TrainTask for PretrainTask {
    fn total_steps(&self) -> u64 {
        self.total_steps
    }

    fn step(&mut self, step: u64, comm: &dyn Collective) -> Result<StepOutput, TaskError> {
        if step != self.trainer.iteration() {
            return Err(other(format!(
                "task pretrain asked for step {step} but is at iteration {} (resume restores the \
                 iteration from a checkpoint)",
                self.trainer.iteration()
            )));
        }
        let region = match &mut self.regions {
            Some(loader) if self.trainer.region_step_due() => {
                let (batch, state) = loader.next_batch().map_err(other)?;
                self.regions_state = state;
                Some(region_batch(batch, self.device))
            }
            _ => None,
        };
        let (batch, state) = self.images.next_batch().map_err(other)?;
        self.images_state = state;
        let general = image_text_batch(batch, self.device);
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

    fn checkpoint_state(&self) -> Vec<(String, Tensor)> {
        self.trainer.state_tensors()
    }

    fn checkpoint_meta(&self) -> serde_json::Value {
        let meta = ResumeMeta {
            version: META_VERSION,
            iteration: self.trainer.iteration(),
            rank: self.rank,
            world: self.world,
            image_plan: self.image_plan.fingerprint.clone(),
            images: self.images_state,
            regions: self.regions.as_ref().map(|_| self.regions_state),
            lr: self.lr,
        };
        serde_json::to_value(meta).unwrap_or(serde_json::Value::Null)
    }

    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &serde_json::Value,
    ) -> Result<(), TaskError> {
        let meta: ResumeMeta = serde_json::from_value(meta.clone()).map_err(|e| {
            other(format!(
                "pretrain checkpoint: rank {}'s task state is unreadable: {e}",
                self.rank
            ))
        })?;
        if meta.version != META_VERSION {
            return Err(other(format!(
                "pretrain checkpoint: task state version {} (this build reads {META_VERSION})",
                meta.version
            )));
        }
        if extra.is_empty() {
            return Err(other(
                "pretrain checkpoint has no optimizer/scheduler state for this rank",
            ));
        }
        crate::checkpoint::copy_weights_into(&self.state(), weights)?;
        let extra: HashMap<String, Tensor> = extra
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        self.trainer.load_state_tensors(&extra).map_err(other)?;
        if self.trainer.iteration() != meta.iteration {
            return Err(other(format!(
                "pretrain checkpoint: scheduler step {} but task state says iteration {}",
                self.trainer.iteration(),
                meta.iteration
            )));
        }
        // Same plan: continue each stream exactly. A different plan (world or files changed): its
        // cursor means nothing here, start the next epoch (counts are kept).
        let same_plan = meta.world == self.world && meta.image_plan == self.image_plan.fingerprint;
        let (images, regions) = if same_plan {
            (meta.images, meta.regions.unwrap_or_default())
        } else {
            tracing::warn!(
                saved = %meta.image_plan,
                saved_world = meta.world,
                now = %self.image_plan.fingerprint,
                world = self.world,
                "the shard plan changed since the checkpoint: data streams restart at the next epoch"
            );
            (
                next_epoch(meta.images),
                next_epoch(meta.regions.unwrap_or_default()),
            )
        };
        self.restart_loaders(images, regions)?;
        self.lr = meta.lr;
        tracing::info!(
            rank = self.rank,
            iteration = meta.iteration,
            images = ?images.cursor,
            regions = ?regions.cursor,
            "pretrain state restored"
        );
        Ok(())
    }
}
