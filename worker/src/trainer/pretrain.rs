//! `task: pretrain`: X-VLM pre-training (`Pretrain.py`) on this rank, a task of the runner
//! ([`Runner`](super::runner::Runner)). The model, the data loaders and the optimizer come from the
//! job's official-format task config (with the job's `overrides:` merged in); every iteration runs the
//! official region step (when the derived coin says so) and the image-text step through
//! [`PretrainTrainer`], with gradients and ITC features exchanged over the job's collective. Its
//! streams are `images` and `regions` ([`stream`]); it has no evaluation and no best checkpoint.
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
//! step and the loss-scaler state (`checkpoint_state`), and each rank's data cursors (`checkpoint_meta`,
//! the runner's meta with the two named streams).
//! Every other random draw is derived from (seed, iteration, rank), so nothing else is carried. Exact
//! resume is promised at the same world size only.
//!
//! Elastic resume (the runner's `restore_resharded`, a checkpoint of another world size): weights and rank 0's
//! optimizer, scheduler and scaler state (identical on every data-parallel rank) restore exactly. The
//! data streams continue the saved epoch under the new world's file partition ([`reshard`]): each new
//! rank starts at the first line of its files that the saved ranks had not read, so no line unread at
//! the checkpoint is skipped in that epoch; a stream has a single cursor, so some lines the saved ranks
//! had read are read again. Chosen over "start the next epoch" (the design's first sketch) because that
//! drops the rest of the epoch, which in the last epoch of a job means samples never seen. It needs
//! each saved rank's file order of its cursor's epoch, which checkpoints record; a checkpoint without
//! it, of another meta version, or over other files is refused with an error.

use std::collections::HashMap;

use tch::nn::{self, VarStore};
use tch::{Device, Tensor};
use xvlm_model::checkpoint::{load_state_dict, LoadOptions, StateDict};
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;
use xvlm_model::data::batch::{ImageTextBatch, RegionBatch};
use xvlm_model::data::pipeline::PretrainDataConfig;
use xvlm_model::optim::LinearSchedule;
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::{OptimizerEngine, PretrainTrainer, StepKind, TrainSettings};

use super::harness::setup::{other, read_init_checkpoint};
use super::runner::{Engine, Prepared, Stepped, Task};
use super::task::{TaskContext, TaskError};
use stream::PretrainStreams;

mod reshard;
pub mod stream;

/// Names of the losses a step reports (averaged over ranks), in [`Stepped::losses`] order.
pub const LOSS_NAMES: [&str; 6] = ["itc", "itm", "mlm", "bbox", "giou", "total"];

/// The pre-training task of one rank: its batch geometry.
pub struct PretrainTask {
    /// Micro-batches per step (1 at the reference world).
    accumulation: usize,
    batch_size: usize,
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

impl Engine for PretrainTrainer<'static> {
    fn optimizer_engine(&self) -> &OptimizerEngine {
        self.engine()
    }

    fn load_engine_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<(), TaskError> {
        self.load_state_tensors(tensors).map_err(other)
    }
}

impl Task for PretrainTask {
    const TASK: &'static str = "pretrain";
    const BEST_METRIC: Option<&'static str> = None;
    type Model = PretrainModel;
    type Trainer = PretrainTrainer<'static>;
    type Streams = PretrainStreams;

    fn build_model(root: &nn::Path, cfg: &TaskConfig) -> Result<PretrainModel, TaskError> {
        PretrainModel::new(root, cfg).map_err(other)
    }

    fn load_init_checkpoint(
        _model: &PretrainModel,
        vs: &VarStore,
        _cfg: &TaskConfig,
        url: &str,
    ) -> Result<(), TaskError> {
        let sd = read_init_checkpoint(url)?;
        let report = load_state_dict(vs, &sd, &LoadOptions::default())
            .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
        tracing::info!(checkpoint = %url, %report, "loaded init_checkpoint");
        Ok(())
    }

    fn state_dict(model: &PretrainModel, vs: &VarStore) -> StateDict {
        model.core.state_dict(vs)
    }

    /// This rank's streams and the trainer.
    fn prepare(
        cfg: &TaskConfig,
        ctx: &TaskContext<'_>,
        model: &'static PretrainModel,
        vs: &VarStore,
    ) -> Result<Prepared<Self>, TaskError> {
        let data = data_config(cfg, &ctx.spec.data.shards)?;
        let seed = ctx.spec.seed;
        let batch_size = data.images.batch_size;
        let batch = ctx.batch_plan(batch_size);
        let accumulation = batch.accumulation();
        // The schedule's epoch is that of the reference world, whatever this generation's world.
        let reference_world = batch.global / batch.local;
        let mut settings = TrainSettings::from_task(cfg);
        settings.seed = seed;
        settings.micro_batches = accumulation;
        let trainer = PretrainTrainer::from_task(model, vs, cfg, reference_world)
            .map_err(other)?
            .with_settings(settings.clone());

        let sched = cfg
            .schedular
            .as_ref()
            .ok_or_else(|| other(format!("{}: missing key `schedular`", cfg.source.display())))?;
        let size = cfg.train_dataset_size.unwrap_or(0);
        let per_epoch = size.div_ceil((batch_size * reference_world).max(1) as u64);
        let schedule = LinearSchedule::from_config(sched, per_epoch).map_err(other)?;

        let with_regions = settings.iter_perc > 0.0 && !data.train_file_regions.is_empty();
        let streams =
            PretrainStreams::start(&data, ctx.shards, ctx.rank, ctx.world, seed, with_regions)?;
        tracing::info!(
            rank = ctx.rank,
            world = ctx.world,
            batch_size,
            accumulation,
            iter_perc = settings.iter_perc,
            image_files = %streams.image_plan(),
            "pretrain task ready"
        );
        Ok(Prepared {
            task: Self {
                accumulation,
                batch_size,
            },
            trainer,
            streams,
            steps_per_epoch: per_epoch,
            planned_steps: schedule.total,
        })
    }

    fn step(
        &mut self,
        trainer: &mut PretrainTrainer<'static>,
        streams: &mut PretrainStreams,
        device: Device,
        comm: &dyn Collective,
    ) -> Result<Stepped, TaskError> {
        // At a world below the reference, `accumulation` micro-batches of each kind; the trainer
        // averages their gradients before the cross-rank average.
        let region = match &mut streams.regions {
            Some(stream) if trainer.region_step_due() => {
                let mut batches = Vec::with_capacity(self.accumulation);
                for _ in 0..self.accumulation {
                    batches.push(region_batch(stream.next_batch()?, device));
                }
                Some(batches)
            }
            _ => None,
        };
        let mut general = Vec::with_capacity(self.accumulation);
        for _ in 0..self.accumulation {
            general.push(image_text_batch(streams.images.next_batch()?, device));
        }
        let region_refs: Option<Vec<&PretrainBatch>> = region.as_ref().map(|r| r.iter().collect());
        let general_refs: Vec<&PretrainBatch> = general.iter().collect();
        let log = trainer
            .run_iteration(region_refs.as_deref(), &general_refs, comm)
            .map_err(other)?;

        // Per-rank losses of both steps (box losses come from the region step, the rest from the
        // image-text step; each the mean over its micro-batches); the runner averages them over the
        // ranks. Without a region step the box losses are not reported.
        let mut values = [None; 6];
        let mut lr = 0.0;
        let mut lrs = Vec::new();
        // The image-text update's norm: every iteration has one (a region update only some).
        let mut grad_norm = None;
        for s in &log.steps {
            match s.kind {
                StepKind::Region => {
                    values[3] = Some(s.loss_bbox);
                    values[4] = Some(s.loss_giou);
                }
                StepKind::General => {
                    values[0] = Some(s.loss_itc);
                    values[1] = Some(s.loss_itm);
                    values[2] = Some(s.loss_mlm);
                    values[5] = Some(s.loss_total);
                    lr = s.lrs.first().copied().unwrap_or(0.0);
                    lrs = s.lrs.clone();
                    grad_norm = Some(s.grad_norm);
                }
            }
        }
        Ok(Stepped {
            losses: LOSS_NAMES
                .iter()
                .map(|n| n.to_string())
                .zip(values)
                .collect(),
            lr,
            lrs,
            grad_norm,
            samples: self.batch_size * self.accumulation,
        })
    }
}
