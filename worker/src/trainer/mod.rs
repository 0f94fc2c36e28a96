//! The trainer process (`xvlm-worker train --assignment FILE`): one per rank. It builds the collective,
//! the task, runs the steps and prints one JSON progress line per step on stdout (logs go to stderr);
//! the worker daemon reads those lines and forwards them to the coordinator.

pub mod batch;
pub mod finetune;
pub mod harness;
pub mod pretrain;
pub mod runner;
pub mod save_request;
pub mod smoke;
pub mod task;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::Device;
use tracing::{info, warn};
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::{Backend, JobSpec};

use crate::checkpoint::format::{BufferPool, HostFile};
use crate::checkpoint::{Checkpointer, Part, Storage};
use crate::comm::nccl::NcclCollective;
use crate::comm::ring::RingCollective;
use crate::comm::timed::TimedCollective;
use crate::error::WorkerError;
use task::{TaskContext, TrainTask};

/// What the worker hands a trainer process (written as JSON next to its logs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Assignment {
    /// Job id.
    pub job_id: String,
    /// Generation.
    pub generation: u64,
    /// Global rank.
    pub rank: usize,
    /// Rank on this node.
    pub local_rank: usize,
    /// World size.
    pub world: usize,
    /// CUDA ordinal (or CPU slot index).
    pub device: u32,
    /// Whether `device` is a CUDA device.
    pub cuda: bool,
    /// `ring` or `nccl`.
    pub backend: Backend,
    /// Ring addresses in rank order.
    pub peers: Vec<String>,
    /// Rank 0's NCCL id.
    pub nccl_id: Vec<u8>,
    /// The generation's ring secret (empty from a coordinator that sends none).
    #[serde(default)]
    pub ring_secret: Vec<u8>,
    /// The job spec.
    pub spec: JobSpec,
    /// Output URL.
    pub output: String,
    /// This rank's shard files.
    pub shards: Vec<String>,
    /// First step to run.
    pub start_step: u64,
    /// CPU threads for libtorch.
    pub threads: usize,
    /// Where the daemon writes on-demand checkpoint request ids (see [`control`]).
    #[serde(default)]
    pub checkpoint_request_file: Option<PathBuf>,
}

/// One progress line on the trainer's stdout.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProgressLine {
    /// Steps done.
    pub step: u64,
    /// Named losses.
    pub losses: Vec<(String, f64)>,
    /// Learning rate.
    pub lr: f64,
    /// The lr of every param group, in the optimizer's group order (official: decay, no decay,
    /// decay × lr_mult, no decay × lr_mult).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lrs: Vec<f64>,
    /// The update's total gradient norm (cross-rank averaged, before clipping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Global samples per second over the last step.
    pub samples_per_sec: f64,
    /// This rank's checkpoint parts uploaded since the previous line (the coordinator commits a
    /// checkpoint once every rank's part is in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    /// Evaluation results measured at this step (`val.r_mean`, `test.txt_r1`, ...), with the epoch
    /// they belong to as `val.epoch` / `test.epoch`; the coordinator shows rank 0's latest in `status`
    /// and `watch`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<(String, f64)>,
    /// Steps the job runs (the task's schedule), so `status` knows the total without `steps:`.
    #[serde(default)]
    pub total_steps: u64,
    /// Wall seconds of this step on this rank (forward, backward, all-reduce, update); 0 on lines
    /// that are not a step's (the closing evaluation).
    #[serde(default)]
    pub step_time_s: f64,
    /// Seconds of this step spent in all-reduce calls ([`crate::comm::timed`]).
    #[serde(default)]
    pub allreduce_s: f64,
    /// Batches waiting in this rank's data-loader prefetch queue after the step; none for a task
    /// without a prefetching loader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loader_queue_depth: Option<u64>,
    /// How the upload of each of `parts` went, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uploads: Vec<PartUpload>,
}

/// The upload of one checkpoint part, as the rank measured it ([`crate::checkpoint::SaveTiming`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartUpload {
    /// The step of the part.
    pub step: u64,
    /// Bytes this rank uploaded.
    pub bytes: u64,
    /// Background seconds: serialise, hash and upload.
    pub seconds: f64,
}

/// The uploads of `parts`, the newest saves of `c`: each part comes with the timing its save
/// recorded last ([`Checkpointer::timings`] grows by one per part returned).
fn uploads_of(c: &Checkpointer, parts: &[Part]) -> Vec<PartUpload> {
    let timings = &c.timings[c.timings.len().saturating_sub(parts.len())..];
    parts
        .iter()
        .zip(timings)
        .map(|(p, t)| PartUpload {
            step: p.step,
            bytes: t.bytes,
            seconds: t.upload.as_secs_f64(),
        })
        .collect()
}

/// Runs an assignment read from `path`; `listen_fd` is the ring socket the worker bound for this rank.
/// Ends with [`WorkerError::Preempted`] when asked to leave ([`save_request`]).
pub fn run_file(path: &Path, listen_fd: Option<i32>) -> Result<(), WorkerError> {
    save_request::install().map_err(|e| WorkerError::io(path, e))?;
    let text = std::fs::read_to_string(path).map_err(|e| WorkerError::io(path, e))?;
    let assignment: Assignment = serde_json::from_str(&text)
        .map_err(|e| WorkerError::Assignment(format!("{}: {e}", path.display())))?;
    // SAFETY: the worker passes the fd of a listening TCP socket it bound for this rank, and nothing
    // else in this process owns it.
    let listener =
        listen_fd.map(|fd| unsafe { <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    run(&assignment, listener)
}

fn collective(
    a: &Assignment,
    listener: Option<TcpListener>,
) -> Result<Box<dyn Collective>, WorkerError> {
    if a.world == 1 {
        return Ok(Box::new(SingleProcess));
    }
    Ok(match a.backend {
        Backend::Nccl => Box::new(NcclCollective::new(
            a.rank,
            a.world,
            a.device as usize,
            &a.nccl_id,
        )?),
        Backend::Ring | Backend::Auto => Box::new(RingCollective::connect(
            a.rank,
            listener,
            &a.peers,
            a.generation,
            &a.ring_secret,
            Duration::from_secs(120),
        )?),
    })
}

/// Trains the assignment to its last step.
pub fn run(a: &Assignment, listener: Option<TcpListener>) -> Result<(), WorkerError> {
    if a.cuda {
        let _ = xvlm_model::runtime::load_cuda_backend();
    }
    tch::set_num_threads(a.threads.max(1) as i32);
    let device = if a.cuda {
        Device::Cuda(a.device as usize)
    } else {
        Device::Cpu
    };
    // Timed, so each progress line says how long its step spent in all-reduces.
    let comm = TimedCollective::new(collective(a, listener)?);
    info!(
        job = a.job_id,
        generation = a.generation,
        rank = a.rank,
        world = a.world,
        ?device,
        "trainer connected"
    );
    let ctx = TaskContext {
        spec: &a.spec,
        rank: a.rank,
        world: a.world,
        device,
        shards: &a.shards,
        output: &a.output,
        comm: &comm,
    };
    let mut task = task::build(&ctx)?;
    let total = task.total_steps();
    let mut ckpt = checkpointer(a, task.as_ref())?;
    let mut start = a.start_step;
    if let Some(c) = ckpt.as_ref().filter(|_| a.generation > 1) {
        start = c.resume(task.as_mut())?.unwrap_or(start);
    }
    let mut requests =
        save_request::StepRequests::new(a.checkpoint_request_file.clone(), a.rank, device);
    let mut last: Option<ProgressLine> = None;
    for step in start..total {
        // Whatever ran since the last step (the request agreement, a save) is not this step's.
        comm.take_all_reduce();
        let started = Instant::now();
        let out = task.step(step, &comm)?;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let allreduce = comm.take_all_reduce();
        let mut line = ProgressLine {
            step: step + 1,
            losses: out.losses,
            lr: task.lr(),
            lrs: out.lrs,
            grad_norm: out.grad_norm,
            samples_per_sec: (out.samples * a.world) as f64 / secs,
            parts: Vec::new(),
            metrics: out.metrics,
            total_steps: total,
            step_time_s: secs,
            allreduce_s: allreduce.as_secs_f64(),
            loader_queue_depth: task.loader_queue_depth().map(|d| d as u64),
            uploads: Vec::new(),
        };
        let done = step + 1;
        let request = requests.agree(&comm)?;
        match ckpt.as_mut() {
            Some(c) if request.leave && done < total => {
                info!(
                    step = done,
                    "checkpoint and leave requested at this step boundary"
                );
                line.parts = c.save_now(done, task.as_ref())?;
            }
            Some(c) => {
                if request.checkpoint() {
                    info!(request = request.id, step = done, "checkpoint requested");
                    c.request(request.id);
                }
                line.parts = c.after_step(done, total, task.as_ref())?;
            }
            None if request.checkpoint() => warn!(
                request = request.id,
                "checkpoint request ignored: output {} cannot hold checkpoints", a.output
            ),
            None => {}
        }
        if let Some(c) = ckpt.as_ref() {
            line.uploads = uploads_of(c, &line.parts);
        }
        println!("{}", serde_json::to_string(&line).unwrap_or_default());
        if request.leave && done < total {
            if let Err(e) = save_request::ignore_stop_signal() {
                warn!(error = %e, "cannot ignore SIGTERM while leaving");
            }
            if let Some(c) = ckpt.as_ref() {
                // Leaving before the commit would let the next generation start from an older step.
                c.wait_committed(done, COMMIT_WAIT)?;
            }
            return Err(WorkerError::Preempted { step: done });
        }
        last = Some(line);
    }
    if let Some(c) = ckpt.as_mut() {
        let parts = c.finish()?;
        // The last save's part is news for the coordinator too.
        if let (false, Some(mut line)) = (parts.is_empty(), last.take()) {
            line.uploads = uploads_of(c, &parts);
            line.parts = parts;
            // The step was reported already: its time must not count twice.
            line.step_time_s = 0.0;
            line.allreduce_s = 0.0;
            println!("{}", serde_json::to_string(&line).unwrap_or_default());
        }
    }
    comm.barrier()?;
    if a.rank == 0 && total > 0 {
        save_final(a, task.as_ref())?;
    }
    // The closing evaluation (a fine-tune's test split with its best weights) runs after the final
    // weights are safe; a restart that finds every step done runs only this.
    let metrics = task.finish(&comm)?;
    if !metrics.is_empty() {
        let line = ProgressLine {
            step: total,
            losses: Vec::new(),
            lr: task.lr(),
            lrs: Vec::new(),
            grad_norm: None,
            samples_per_sec: 0.0,
            parts: Vec::new(),
            metrics,
            total_steps: total,
            step_time_s: 0.0,
            allreduce_s: 0.0,
            loader_queue_depth: None,
            uploads: Vec::new(),
        };
        println!("{}", serde_json::to_string(&line).unwrap_or_default());
    }
    info!(
        job = a.job_id,
        rank = a.rank,
        steps = total,
        "trainer finished"
    );
    Ok(())
}

/// How long a leaving rank waits for the coordinator to commit its last checkpoint.
const COMMIT_WAIT: Duration = Duration::from_secs(60);

/// The checkpoint driver when the job saves checkpoints or this generation may resume one.
fn checkpointer(a: &Assignment, task: &dyn TrainTask) -> Result<Option<Checkpointer>, WorkerError> {
    // Even without periodic saves, a requested checkpoint (preemption, on demand) needs one.
    let storage = match Storage::open(&a.output) {
        Ok(s) => s,
        // Nothing was ever saved to an output checkpoints cannot use: start from scratch.
        Err(_) if a.spec.checkpoint.every_steps == 0 => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let config = serde_json::json!({ "job": &a.spec, "model": task.model_config() });
    let mut c = Checkpointer::new(
        storage,
        a.spec.checkpoint.clone(),
        a.rank,
        a.world,
        a.generation,
        config,
    );
    // Test hook: hold every upload this long, so a test can kill a trainer mid-upload.
    if let Some(ms) = std::env::var("XVLM_TEST_UPLOAD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.upload_delay = Duration::from_millis(ms);
    }
    Ok(Some(c))
}

/// Where the final weights go, relative to the job output.
pub const FINAL_WEIGHTS: &str = "final/model.safetensors";

/// Rank 0 writes the final weights as `{output}/final/model.safetensors` on the output's backend
/// (`file://`, `s3://`); an output no backend can open gets a warning and no final file.
fn save_final(a: &Assignment, task: &dyn TrainTask) -> Result<(), WorkerError> {
    let storage = match Storage::open(&a.output) {
        Ok(s) => s,
        Err(e) => {
            warn!("final weights not written: {e}");
            return Ok(());
        }
    };
    let data =
        HostFile::copy_of(&task.state(), FINAL_WEIGHTS, &BufferPool::default())?.into_bytes();
    storage.put(FINAL_WEIGHTS, data)?;
    info!(url = storage.url_of(FINAL_WEIGHTS), "final weights written");
    Ok(())
}
