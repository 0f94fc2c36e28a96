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
//! Fixed global batch: the config's batch sizes are per rank at the job's reference world
//! (`workers.max x devices_per_worker`, [`BatchPlan`](super::batch::BatchPlan)). At a smaller world (an
//! elastic restart) each step runs [`accumulation`](super::batch::BatchPlan::accumulation)
//! micro-batches of the per-rank batch from this rank's own streams (region and image-text alike) and
//! averages their gradients before the cross-rank average, so the update is the mean over as many
//! per-rank batches as at the reference world (more when the world does not divide it: every rank runs
//! the busiest rank's count). The lr schedule's epoch length is that of the reference world, so it
//! does not change with the world. What differs from the reference world: ITC negatives and ITM hard
//! negatives come from the gathered micro-batch, not the gathered global batch, and the samples are
//! those of the new world's shard partition.
//!
//! Exact resume: a checkpoint holds the weights, the optimizer moments and step counts, the scheduler
//! step and the loss-scaler state (`checkpoint_state`), and each rank's data cursors (`checkpoint_meta`).
//! Every other random draw is derived from (seed, iteration, rank), so nothing else is carried. Exact
//! resume is promised at the same world size only.
//!
//! Elastic resume (`restore_resharded`, a checkpoint of another world size): weights and rank 0's
//! optimizer, scheduler and scaler state (identical on every data-parallel rank) restore exactly. The
//! data streams continue the saved epoch under the new world's file partition ([`reshard`]): each new
//! rank starts at the first line of its files that the saved ranks had not read, so no line unread at
//! the checkpoint is skipped in that epoch; a stream has a single cursor, so some lines the saved ranks
//! had read are read again. Chosen over "start the next epoch" (the design's first sketch) because that
//! drops the rest of the epoch, which in the last epoch of a job means samples never seen. It needs
//! each saved rank's file order of its cursor's epoch, which checkpoints record; a checkpoint without
//! it, of another meta version, or over other files is refused with an error.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use tch::nn::VarStore;
use tch::{Device, Tensor};
use xvlm_model::checkpoint::{load_state_dict, LoadOptions};
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

use super::harness::losses::mean_over_ranks;
use super::harness::setup::{
    broadcast_weights, build_seeded, load_task_config, other, read_init_checkpoint,
};
use super::task::{StepOutput, TaskContext, TaskError, TrainTask};
use reshard::{continue_stream, SavedStream};

mod reshard;

/// Names of the losses a step reports (averaged over ranks), in [`StepOutput::losses`] order.
pub const LOSS_NAMES: [&str; 6] = ["itc", "itm", "mlm", "bbox", "giou", "total"];

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
    /// The image-text files of `images.cursor.epoch` in this rank's reading order (an elastic restart
    /// tells read lines from unread with it; empty in checkpoints of older builds).
    #[serde(default)]
    image_order: Vec<String>,
    /// The region files of `regions.cursor.epoch` in this rank's reading order.
    #[serde(default)]
    region_order: Vec<String>,
}

/// The names of `plan`'s files of `epoch`, in this rank's reading order.
fn epoch_order(plan: &ShardPlan, epoch: u64) -> Vec<String> {
    plan.rank_files(epoch)
        .into_iter()
        .filter_map(|i| plan.files().get(i).map(|f| f.name.clone()))
        .collect()
}

/// The image-text shard plan of a rank and its fingerprint.
struct ImagePlan {
    plan: ShardPlan,
    fingerprint: String,
}

/// A plan fingerprint's parts: how the files are split (`split r/w` or `assigned`) and which files.
fn fingerprint_parts(fingerprint: &str) -> (&str, &str) {
    fingerprint.split_once(": ").unwrap_or((fingerprint, ""))
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
    /// The region loader's shard plan (to name its files in a checkpoint).
    region_plan: Option<ShardPlan>,
    regions_state: StreamState,
    /// Micro-batches per step (1 at the reference world).
    accumulation: usize,
    rank: usize,
    world: usize,
    seed: u64,
    device: Device,
    total_steps: u64,
    batch_size: usize,
    lr: f64,
    /// The merged task config, saved in every checkpoint's `config.json`.
    config: serde_json::Value,
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

impl PretrainTask {
    /// Builds the model (seeded by the job seed, broadcast from rank 0, optionally loaded from
    /// `init_checkpoint`), this rank's loaders and the trainer.
    pub fn new(ctx: &TaskContext<'_>) -> Result<Self, TaskError> {
        let task = load_task_config(ctx)?;
        let data = data_config(&task, &ctx.spec.data.shards)?;
        let seed = ctx.spec.seed;

        let vs = VarStore::new(ctx.device);
        let model = build_seeded(seed, || {
            PretrainModel::new(&vs.root(), &task).map_err(other)
        })?;
        if let Some(url) = &ctx.spec.init_checkpoint {
            let sd = read_init_checkpoint(url)?;
            let report = load_state_dict(&vs, &sd, &LoadOptions::default())
                .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
            tracing::info!(checkpoint = %url, %report, "loaded init_checkpoint");
        }
        broadcast_weights(&vs, ctx.comm)?;

        // The trainer borrows the model for its whole life, and the task lives until the trainer process
        // exits: one leaked model per process is the simplest owner.
        let model: &'static PretrainModel = Box::leak(Box::new(model));
        let batch_size = data.images.batch_size;
        let batch = ctx.batch_plan(batch_size);
        let accumulation = batch.accumulation();
        // The schedule's epoch is that of the reference world, whatever this generation's world.
        let reference_world = batch.global / batch.local;
        let mut settings = TrainSettings::from_task(&task);
        settings.seed = seed;
        settings.micro_batches = accumulation;
        let trainer = PretrainTrainer::from_task(model, &vs, &task, reference_world)
            .map_err(other)?
            .with_settings(settings.clone());

        let sched = task.schedular.as_ref().ok_or_else(|| {
            other(format!(
                "{}: missing key `schedular`",
                task.source.display()
            ))
        })?;
        let size = task.train_dataset_size.unwrap_or(0);
        let per_epoch = size.div_ceil((batch_size * reference_world).max(1) as u64);
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
        let (regions, region_plan) = if settings.iter_perc > 0.0
            && !data.train_file_regions.is_empty()
        {
            let files = list_shards(&data.train_file_regions).map_err(other)?;
            (
                Some(
                    RegionLoader::start(&data, ctx.rank, ctx.world, seed, StreamState::default())
                        .map_err(other)?,
                ),
                Some(ShardPlan::new(files, ctx.rank, ctx.world, seed).map_err(other)?),
            )
        } else {
            (None, None)
        };
        tracing::info!(
            rank = ctx.rank,
            world = ctx.world,
            total_steps,
            batch_size,
            accumulation,
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
            region_plan,
            regions_state: StreamState::default(),
            accumulation,
            rank: ctx.rank,
            world: ctx.world,
            seed,
            device: ctx.device,
            total_steps,
            batch_size,
            lr: 0.0,
            config: serde_json::to_value(&task).unwrap_or_default(),
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

    /// Restores the weights and the trainer's optimizer, scheduler and scaler state, which must be at
    /// `iteration`.
    fn restore_training_state(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        iteration: u64,
    ) -> Result<(), TaskError> {
        if extra.is_empty() {
            return Err(other(
                "pretrain checkpoint has no optimizer/scheduler state for this rank",
            ));
        }
        crate::trainer::harness::weights::copy_weights_into(&self.state(), weights)?;
        let extra: HashMap<String, Tensor> = extra
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect();
        self.trainer.load_state_tensors(&extra).map_err(other)?;
        if self.trainer.iteration() != iteration {
            return Err(other(format!(
                "pretrain checkpoint: scheduler step {} but task state says iteration {iteration}",
                self.trainer.iteration(),
            )));
        }
        Ok(())
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

/// Reads saved rank `rank`'s [`ResumeMeta`].
fn parse_meta(meta: &serde_json::Value, rank: usize) -> Result<ResumeMeta, TaskError> {
    let meta: ResumeMeta = serde_json::from_value(meta.clone()).map_err(|e| {
        other(format!(
            "pretrain checkpoint: rank {rank}'s task state is unreadable: {e}"
        ))
    })?;
    if meta.version != META_VERSION {
        return Err(other(format!(
            "pretrain checkpoint: rank {rank}'s task state version {} (this build reads {META_VERSION})",
            meta.version
        )));
    }
    Ok(meta)
}

/// Checks that the saved ranks' metas describe one checkpoint of `saved_world` ranks whose file orders
/// this task can place: same plan kind and, for a split plan, the same files. (A checkpoint without
/// region streams is fine: this task's region stream starts at the beginning.)
fn check_saved_metas(
    metas: &[ResumeMeta],
    saved_world: usize,
    image_fingerprint: &str,
    region_files: Option<&ShardPlan>,
) -> Result<(), TaskError> {
    let fail = |r: usize, why: String| Err(other(format!("pretrain checkpoint, rank {r}: {why}")));
    if metas.len() != saved_world {
        return Err(other(format!(
            "pretrain checkpoint of {saved_world} ranks has {} task states",
            metas.len()
        )));
    }
    let (how, files) = fingerprint_parts(image_fingerprint);
    let split = how.starts_with("split");
    for (r, m) in metas.iter().enumerate() {
        if m.rank != r || m.world != saved_world {
            return fail(r, format!("task state of rank {} of {}", m.rank, m.world));
        }
        if m.iteration != metas[0].iteration {
            return fail(
                r,
                format!(
                    "at iteration {}, rank 0 at {}",
                    m.iteration, metas[0].iteration
                ),
            );
        }
        if m.image_order.is_empty() {
            return fail(
                r,
                "no image-text file order (saved by an older build): cannot place its data cursor \
                 in another world"
                    .into(),
            );
        }
        let (saved_how, saved_files) = fingerprint_parts(&m.image_plan);
        if saved_how.starts_with("split") != split || (split && saved_files != files) {
            return fail(
                r,
                format!(
                    "it read image-text files \"{}\", this rank reads \"{image_fingerprint}\"",
                    m.image_plan
                ),
            );
        }
        if let Some(plan) = region_files.filter(|_| metas.iter().any(|m| m.regions.is_some())) {
            if m.regions.is_none() || m.region_order.is_empty() {
                return fail(r, "no region data cursor or file order".into());
            }
            let known: std::collections::HashSet<&str> =
                plan.files().iter().map(|f| f.name.as_str()).collect();
            if let Some(f) = m.region_order.iter().find(|f| !known.contains(f.as_str())) {
                return fail(
                    r,
                    format!("it read region file {f}, which this job does not list"),
                );
            }
        }
    }
    Ok(())
}

/// Where this rank's stream continues after the saved ranks' `states` (see [`reshard`]); the counts
/// are those of the saved rank of the same index (of rank 0 for ranks beyond the saved world).
fn resharded_state(
    plan: &ShardPlan,
    states: &[(StreamState, &[String])],
    rank: usize,
) -> StreamState {
    let saved: Vec<SavedStream<'_>> = states
        .iter()
        .map(|(s, order)| SavedStream {
            cursor: s.cursor,
            order,
        })
        .collect();
    let counts = states
        .get(rank)
        .or(states.first())
        .map(|(s, _)| *s)
        .unwrap_or_default();
    StreamState {
        cursor: continue_stream(&saved, |epoch| epoch_order(plan, epoch)),
        ..counts
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
        // At a world below the reference, `accumulation` micro-batches of each kind; the trainer
        // averages their gradients before the cross-rank average.
        let region = match &mut self.regions {
            Some(loader) if self.trainer.region_step_due() => {
                let mut batches = Vec::with_capacity(self.accumulation);
                for _ in 0..self.accumulation {
                    let (batch, state) = loader.next_batch().map_err(other)?;
                    self.regions_state = state;
                    batches.push(region_batch(batch, self.device));
                }
                Some(batches)
            }
            _ => None,
        };
        let mut general = Vec::with_capacity(self.accumulation);
        for _ in 0..self.accumulation {
            let (batch, state) = self.images.next_batch().map_err(other)?;
            self.images_state = state;
            general.push(image_text_batch(batch, self.device));
        }
        let region_refs: Option<Vec<&PretrainBatch>> = region.as_ref().map(|r| r.iter().collect());
        let general_refs: Vec<&PretrainBatch> = general.iter().collect();
        let log = self
            .trainer
            .run_iteration(region_refs.as_deref(), &general_refs, comm)
            .map_err(other)?;

        // Per-rank losses of both steps (box losses come from the region step, the rest from the
        // image-text step; each the mean over its micro-batches), averaged over the ranks.
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
        let named: Vec<(&str, f64)> = LOSS_NAMES.iter().copied().zip(values).collect();
        let mut losses = mean_over_ranks(comm, self.device, &named)?;
        if region.is_none() {
            losses.retain(|(n, _)| n != "bbox" && n != "giou");
        }
        Ok(StepOutput {
            losses,
            samples: self.batch_size * self.accumulation,
            metrics: Vec::new(),
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

    fn model_config(&self) -> serde_json::Value {
        self.config.clone()
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
            image_order: epoch_order(&self.image_plan.plan, self.images_state.cursor.epoch),
            region_order: self
                .region_plan
                .as_ref()
                .map(|p| epoch_order(p, self.regions_state.cursor.epoch))
                .unwrap_or_default(),
        };
        serde_json::to_value(meta).unwrap_or(serde_json::Value::Null)
    }

    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &serde_json::Value,
    ) -> Result<(), TaskError> {
        let meta = parse_meta(meta, self.rank)?;
        self.restore_training_state(weights, extra, meta.iteration)?;
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

    /// Weights and rank 0's optimizer, scheduler and scaler state restore exactly; each stream continues
    /// the saved epoch under this world's file partition (module doc, [`reshard`]).
    fn restore_resharded(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        metas: &[serde_json::Value],
        saved_world: usize,
        world: usize,
    ) -> Result<(), TaskError> {
        let metas = metas
            .iter()
            .enumerate()
            .map(|(r, m)| parse_meta(m, r))
            .collect::<Result<Vec<_>, _>>()?;
        check_saved_metas(
            &metas,
            saved_world,
            &self.image_plan.fingerprint,
            self.region_plan.as_ref(),
        )?;
        let iteration = metas[0].iteration;
        self.restore_training_state(weights, extra, iteration)?;
        let image_states: Vec<(StreamState, &[String])> = metas
            .iter()
            .map(|m| (m.images, m.image_order.as_slice()))
            .collect();
        let images = resharded_state(&self.image_plan.plan, &image_states, self.rank);
        let regions = match &self.region_plan {
            Some(plan) if metas.iter().any(|m| m.regions.is_some()) => {
                let states: Vec<(StreamState, &[String])> = metas
                    .iter()
                    .map(|m| (m.regions.unwrap_or_default(), m.region_order.as_slice()))
                    .collect();
                resharded_state(plan, &states, self.rank)
            }
            _ => StreamState::default(),
        };
        self.restart_loaders(images, regions)?;
        self.lr = metas[0].lr;
        tracing::info!(
            rank = self.rank,
            iteration,
            saved_world,
            world,
            images = ?images.cursor,
            regions = ?regions.cursor,
            "pretrain state restored from another world size: data streams continue the saved epoch"
        );
        Ok(())
    }
}
