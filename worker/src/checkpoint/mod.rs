//! Checkpoints: saving (host copy in the step, upload in the background), committing (a `MANIFEST.json`
//! with sizes and sha256 written last, then the `latest` pointer, then retention), and resuming from the
//! newest committed checkpoint whose files verify.
//!
//! Resume at the same world size restores each rank's own part (exact). At another world size (an
//! elastic restart) the per-rank parts do not map onto the new ranks: every rank gets the weights,
//! rank 0's tensor state (identical on every data-parallel rank) and all saved ranks' JSON states, and
//! the task re-derives its data cursors for the new world ([`TrainTask::restore_resharded`]); a task
//! that cannot is resumed from an older checkpoint of its own world size, or from scratch.
//!
//! Layout under `{output}/checkpoints/step-{S}/`: `model.safetensors` (rank 0, the task's named
//! weights), `config.json` (rank 0: job spec and model config), `rank-{r}.state.safetensors` (optimizer,
//! scheduler, scaler tensors of rank r, when the task has any), `rank-{r}.json` (rank r's part record:
//! step, its files with sizes and sha256, and the task's JSON state such as data cursors and RNG),
//! and last `MANIFEST.json`. A step directory without a manifest is never resumed.
//!
//! Commit: ranks agree at step boundaries (one all-reduce of an "uploaded" flag while a save is in
//! flight); when every part is in, rank 0 writes the manifest from the part records. The design puts
//! that write in the coordinator; here rank 0 does it, which keeps the same guarantee (the manifest is
//! written only after every part is durable).

pub mod format;
pub mod storage;

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};
use xvlm_model::collective::{Collective, CollectiveError};
use xvlm_proto::spec::CheckpointSpec;

use crate::trainer::task::{TaskError, TrainTask};
use format::{from_safetensors, HostTensors};
pub use storage::Storage;

/// A checkpoint could not be saved, committed or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The output URL cannot hold checkpoints.
    #[error("checkpoint location {url}: {reason}")]
    Location {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A store request failed.
    #[error("checkpoint store {url}: {message}")]
    Store {
        /// The object's URL.
        url: String,
        /// The store's error.
        message: String,
    },
    /// Bytes that are not a valid checkpoint file.
    #[error("checkpoint format: {0}")]
    Format(String),
    /// Ranks could not agree (a peer died).
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    /// The task refused the restored state.
    #[error("restoring the task: {0}")]
    Task(String),
    /// A background upload failed or panicked.
    #[error("checkpoint upload of step {step} failed: {message}")]
    Upload {
        /// The step.
        step: u64,
        /// Why.
        message: String,
    },
}

/// Directory (relative to the output) holding every checkpoint.
pub const CHECKPOINTS: &str = "checkpoints";

/// One file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name relative to the step directory.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
}

impl FileEntry {
    fn of(path: &str, data: &[u8]) -> FileEntry {
        FileEntry {
            path: path.to_string(),
            size: data.len() as u64,
            sha256: sha256_hex(data),
        }
    }
}

/// What rank r wrote for one checkpoint (`rank-{r}.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PartRecord {
    /// Global step the state is taken after.
    pub step: u64,
    /// Rank.
    pub rank: usize,
    /// World size.
    pub world: usize,
    /// Generation that saved it.
    pub generation: u64,
    /// The rank's tensor files.
    pub files: Vec<FileEntry>,
    /// The task's JSON state (data cursors, RNG).
    pub task_state: serde_json::Value,
}

/// `MANIFEST.json`: the commit record of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Global step.
    pub step: u64,
    /// World size that saved it.
    pub world: usize,
    /// Generation that saved it.
    pub generation: u64,
    /// Every file of the checkpoint but the manifest itself.
    pub files: Vec<FileEntry>,
}

/// Hex sha256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The directory name of step `s`.
pub fn step_dir(step: u64) -> String {
    format!("{CHECKPOINTS}/step-{step}")
}

fn parse_step(dir: &str) -> Option<u64> {
    dir.strip_prefix("step-")?.parse().ok()
}

/// A checkpoint this trainer saw committed (reported on its progress line).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// Global step of the checkpoint.
    pub step: u64,
    /// The on-demand request it served; 0 for a periodic checkpoint.
    pub request: u64,
}

/// How long the last save held the step, and how its upload went.
#[derive(Clone, Debug, Default)]
pub struct SaveTiming {
    /// Time the step waited (host copy).
    pub blocking: Duration,
    /// Bytes uploaded by this rank.
    pub bytes: u64,
    /// Serialise + hash + upload time in the background.
    pub upload: Duration,
}

struct InFlight {
    step: u64,
    /// On-demand request id it serves (0: periodic).
    request: u64,
    done: mpsc::Receiver<Result<SaveTiming, CheckpointError>>,
    handle: JoinHandle<()>,
    result: Option<Result<SaveTiming, CheckpointError>>,
}

impl InFlight {
    /// Whether the upload finished (successfully or not); never blocks.
    fn poll(&mut self) -> bool {
        if self.result.is_none() {
            if let Ok(r) = self.done.try_recv() {
                self.result = Some(r);
            } else if self.handle.is_finished() {
                // The thread ended without sending: it panicked.
                self.result = Some(Err(CheckpointError::Upload {
                    step: self.step,
                    message: "upload thread panicked".into(),
                }));
            }
        }
        self.result.is_some()
    }

    fn wait(&mut self) -> Result<SaveTiming, CheckpointError> {
        if self.result.is_none() {
            self.result = Some(self.done.recv().unwrap_or_else(|_| {
                Err(CheckpointError::Upload {
                    step: self.step,
                    message: "upload thread panicked".into(),
                })
            }));
        }
        match self.result.take() {
            Some(r) => r,
            None => unreachable!("result was just set"),
        }
    }
}

/// Per-trainer checkpoint driver.
pub struct Checkpointer {
    storage: Storage,
    spec: CheckpointSpec,
    rank: usize,
    world: usize,
    generation: u64,
    device: Device,
    config_json: serde_json::Value,
    in_flight: Option<InFlight>,
    /// On-demand request to serve at the next step boundary.
    pending_request: Option<u64>,
    /// Timings of completed saves of this rank, oldest first.
    pub timings: Vec<SaveTiming>,
    /// Test hook: the background upload sleeps this long before writing anything.
    pub upload_delay: Duration,
}

impl Checkpointer {
    /// A checkpointer for rank `rank` of `world`; `config_json` goes into `config.json` (rank 0).
    pub fn new(
        storage: Storage,
        spec: CheckpointSpec,
        rank: usize,
        world: usize,
        generation: u64,
        device: Device,
        config_json: serde_json::Value,
    ) -> Checkpointer {
        Checkpointer {
            storage,
            spec,
            rank,
            world,
            generation,
            device,
            config_json,
            in_flight: None,
            pending_request: None,
            timings: Vec::new(),
            upload_delay: Duration::ZERO,
        }
    }

    /// The storage.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Makes the next [`Checkpointer::after_step`] save (on-demand request `id`, which every rank
    /// must pass at the same step boundary).
    pub fn request(&mut self, id: u64) {
        self.pending_request = Some(id);
    }

    /// Called after step `done` (steps completed so far) of `total`: commits a finished save once
    /// every rank's part is in, and starts a new save on the cadence or on request. Every rank calls
    /// it with the same arguments, so the collectives line up. Returns, on rank 0, the checkpoint
    /// committed in this call.
    pub fn after_step(
        &mut self,
        done: u64,
        total: u64,
        task: &dyn TrainTask,
        comm: &dyn Collective,
    ) -> Result<Option<Committed>, CheckpointError> {
        let mut committed = None;
        if self.in_flight.is_some() {
            committed = self.try_commit(comm, false)?;
        }
        let every = self.spec.every_steps;
        let request = self.pending_request.take();
        // An on-demand request is served even after the last step (`finish` commits it).
        if request.is_some() || (every > 0 && done.is_multiple_of(every) && done < total) {
            if self.in_flight.is_some() {
                // The previous upload is still running: wait for it rather than pile up host copies.
                committed = self.try_commit(comm, true)?.or(committed);
            }
            self.save(done, task);
            if let Some(flight) = self.in_flight.as_mut() {
                flight.request = request.unwrap_or(0);
            }
        }
        Ok(committed)
    }

    /// Waits for the save in flight and commits it (end of training); returns it on rank 0.
    pub fn finish(&mut self, comm: &dyn Collective) -> Result<Option<Committed>, CheckpointError> {
        if self.in_flight.is_some() {
            return self.try_commit(comm, true);
        }
        Ok(None)
    }

    /// Saves the state after step `step` and commits it before returning (a requested checkpoint:
    /// preemption, on demand). Every rank calls it at the same step.
    pub fn save_now(
        &mut self,
        step: u64,
        task: &dyn TrainTask,
        comm: &dyn Collective,
    ) -> Result<Option<Committed>, CheckpointError> {
        let earlier = if self.in_flight.is_some() {
            self.try_commit(comm, true)?
        } else {
            None
        };
        self.save(step, task);
        Ok(self.try_commit(comm, true)?.or(earlier))
    }

    /// Starts saving the state after step `step`: copies tensors to host memory now, serialises,
    /// hashes and uploads on a background thread.
    pub fn save(&mut self, step: u64, task: &dyn TrainTask) {
        let started = Instant::now();
        let model = (self.rank == 0).then(|| HostTensors::copy_of(&task.state()));
        let extra = HostTensors::copy_of(&task.checkpoint_state());
        let task_state = task.checkpoint_meta();
        let blocking = started.elapsed();
        let config = (self.rank == 0).then(|| self.config_json.clone());
        let (tx, rx) = mpsc::channel();
        let storage = self.storage.clone();
        let (rank, world, generation) = (self.rank, self.world, self.generation);
        let delay = self.upload_delay;
        let handle = std::thread::spawn(move || {
            let up = Instant::now();
            std::thread::sleep(delay);
            let part = Part {
                storage: &storage,
                step,
                rank,
                world,
                generation,
            };
            let result = part
                .write(model, extra, config, task_state)
                .map(|bytes| SaveTiming {
                    blocking,
                    bytes,
                    upload: up.elapsed(),
                });
            let _ = tx.send(result);
        });
        self.in_flight = Some(InFlight {
            step,
            request: 0,
            done: rx,
            handle,
            result: None,
        });
    }

    /// One all-reduce of "my part is uploaded"; when all are, rank 0 commits. With `wait`, this rank
    /// first waits for its own upload (so the commit happens now).
    fn try_commit(
        &mut self,
        comm: &dyn Collective,
        wait: bool,
    ) -> Result<Option<Committed>, CheckpointError> {
        let Some(flight) = self.in_flight.as_mut() else {
            return Ok(None);
        };
        let step = flight.step;
        let request = flight.request;
        let ready = if wait {
            let r = flight.wait();
            flight.result = Some(r);
            true
        } else {
            flight.poll()
        };
        if let Some(Err(_)) = &flight.result {
            let Some(Err(e)) = flight.result.take() else {
                unreachable!("matched above")
            };
            return Err(e);
        }
        let mut flag = Tensor::from_slice(&[if ready { 1f32 } else { 0f32 }])
            .to_kind(Kind::Float)
            .to_device(self.device);
        comm.all_reduce_sum(&mut flag)?;
        let all = flag.double_value(&[0]).round() as usize == self.world;
        if !all {
            return Ok(None);
        }
        let mut flight = self.in_flight.take().unwrap_or_else(|| unreachable!());
        let timing = flight.wait()?;
        let _ = flight.handle.join();
        self.timings.push(timing);
        if self.rank != 0 {
            return Ok(None);
        }
        self.commit(step)?;
        Ok(Some(Committed { step, request }))
    }

    /// Writes `MANIFEST.json` from every rank's part record, moves `latest`, applies retention.
    fn commit(&self, step: u64) -> Result<(), CheckpointError> {
        let dir = step_dir(step);
        let mut files = Vec::new();
        for r in 0..self.world {
            let name = format!("{dir}/rank-{r}.json");
            let data = self
                .storage
                .get(&name)?
                .ok_or_else(|| CheckpointError::Format(format!("{name} is missing at commit")))?;
            let record: PartRecord = serde_json::from_slice(&data)
                .map_err(|e| CheckpointError::Format(format!("{name}: {e}")))?;
            files.extend(record.files);
            files.push(FileEntry::of(&format!("rank-{r}.json"), &data));
        }
        let manifest = Manifest {
            step,
            world: self.world,
            generation: self.generation,
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| CheckpointError::Format(e.to_string()))?;
        self.storage
            .put(&format!("{dir}/MANIFEST.json"), Bytes::from(json))?;
        self.storage.put(
            &format!("{CHECKPOINTS}/latest"),
            Bytes::from(format!("step-{step}\n")),
        )?;
        info!(
            step,
            url = self.storage.url_of(&dir),
            "checkpoint committed"
        );
        self.retain(step)
    }

    /// Keeps the newest `keep_last` committed checkpoints; drops older ones and abandoned parts older
    /// than the newest commit. The manifest goes first, so a half-deleted checkpoint is never resumed.
    fn retain(&self, newest: u64) -> Result<(), CheckpointError> {
        let mut committed = Vec::new();
        let mut abandoned = Vec::new();
        for dir in self.storage.list_dirs(CHECKPOINTS)? {
            let Some(s) = parse_step(&dir) else { continue };
            if self
                .storage
                .get(&format!("{CHECKPOINTS}/{dir}/MANIFEST.json"))?
                .is_some()
            {
                committed.push(s);
            } else if s < newest {
                abandoned.push(s);
            }
        }
        committed.sort_unstable();
        let keep = (self.spec.keep_last.max(1)) as usize;
        let drop_n = committed.len().saturating_sub(keep);
        for &s in committed[..drop_n].iter().chain(&abandoned) {
            let dir = step_dir(s);
            self.storage.delete(&format!("{dir}/MANIFEST.json"))?;
            self.storage.delete_dir(&dir)?;
            info!(step = s, "checkpoint removed (retention)");
        }
        Ok(())
    }

    /// Restores `task` from the newest committed checkpoint whose files all verify; returns its step.
    /// A checkpoint that fails verification is skipped with a warning naming the bad file.
    pub fn resume(&self, task: &mut dyn TrainTask) -> Result<Option<u64>, CheckpointError> {
        let mut steps: Vec<u64> = self
            .storage
            .list_dirs(CHECKPOINTS)?
            .iter()
            .filter_map(|d| parse_step(d))
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for step in steps {
            let dir = step_dir(step);
            let Some(manifest) = self.storage.get(&format!("{dir}/MANIFEST.json"))? else {
                continue;
            };
            let manifest: Manifest = match serde_json::from_slice(&manifest) {
                Ok(m) => m,
                Err(e) => {
                    warn!("checkpoint step-{step}: unreadable MANIFEST.json ({e}); trying the previous checkpoint");
                    continue;
                }
            };
            match self.verified(&dir, &manifest)? {
                Err(why) => {
                    warn!("checkpoint step-{step} is corrupted: {why}; trying the previous checkpoint");
                }
                Ok(files) if manifest.world != self.world => {
                    if !self.restore_resharded(task, &dir, &files, manifest.world)? {
                        warn!(
                            "checkpoint step-{step} was saved by {} ranks, this generation has {}, and the task cannot re-derive its state for another world size; trying the previous checkpoint",
                            manifest.world, self.world
                        );
                        continue;
                    }
                    info!(
                        "generation {} resuming from committed checkpoint step-{step} ({}), saved by {} ranks, re-derived for {}",
                        self.generation,
                        self.storage.url_of(&dir),
                        manifest.world,
                        self.world
                    );
                    return Ok(Some(step));
                }
                Ok(files) => {
                    self.restore(task, &dir, &files)?;
                    info!(
                        "generation {} resuming from committed checkpoint step-{step} ({})",
                        self.generation,
                        self.storage.url_of(&dir)
                    );
                    return Ok(Some(step));
                }
            }
        }
        Ok(None)
    }

    /// Reads every file of the manifest and checks size and sha256; `Ok(Err(why))` on a mismatch.
    #[allow(clippy::type_complexity)]
    fn verified(
        &self,
        dir: &str,
        manifest: &Manifest,
    ) -> Result<Result<Vec<(String, Bytes)>, String>, CheckpointError> {
        let mut out = Vec::new();
        for f in &manifest.files {
            let name = format!("{dir}/{}", f.path);
            let Some(data) = self.storage.get(&name)? else {
                return Ok(Err(format!("{} is missing", self.storage.url_of(&name))));
            };
            let sha = sha256_hex(&data);
            if data.len() as u64 != f.size || sha != f.sha256 {
                return Ok(Err(format!(
                    "{}: size {} sha256 {sha}, manifest says size {} sha256 {}",
                    self.storage.url_of(&name),
                    data.len(),
                    f.size,
                    f.sha256
                )));
            }
            out.push((f.path.clone(), data));
        }
        Ok(Ok(out))
    }

    /// Restores a checkpoint of `saved_world` ranks into this world: the weights, rank 0's tensor
    /// state and every rank's JSON state go to [`TrainTask::restore_resharded`]. `Ok(false)` when the
    /// task cannot re-derive its state for another world size.
    fn restore_resharded(
        &self,
        task: &mut dyn TrainTask,
        dir: &str,
        files: &[(String, Bytes)],
        saved_world: usize,
    ) -> Result<bool, CheckpointError> {
        let file = |name: &str| files.iter().find(|(p, _)| p == name).map(|(_, d)| d);
        let model = file("model.safetensors").ok_or_else(|| {
            CheckpointError::Format(format!("{dir}: no model.safetensors in the manifest"))
        })?;
        let weights = from_safetensors(model, &format!("{dir}/model.safetensors"))?;
        let extra = match file("rank-0.state.safetensors") {
            Some(d) => from_safetensors(d, &format!("{dir}/rank-0.state.safetensors"))?,
            None => Vec::new(),
        };
        let mut metas = Vec::with_capacity(saved_world);
        for r in 0..saved_world {
            let name = format!("rank-{r}.json");
            let record =
                file(&name).ok_or_else(|| CheckpointError::Format(format!("{dir}: no {name}")))?;
            let record: PartRecord = serde_json::from_slice(record)
                .map_err(|e| CheckpointError::Format(format!("{dir}/{name}: {e}")))?;
            metas.push(record.task_state);
        }
        match task.restore_resharded(&weights, &extra, &metas, saved_world, self.world) {
            Ok(()) => Ok(true),
            Err(TaskError::WorldChanged { .. }) => Ok(false),
            Err(e) => Err(CheckpointError::Task(e.to_string())),
        }
    }

    fn restore(
        &self,
        task: &mut dyn TrainTask,
        dir: &str,
        files: &[(String, Bytes)],
    ) -> Result<(), CheckpointError> {
        let file = |name: &str| files.iter().find(|(p, _)| p == name).map(|(_, d)| d);
        let model = file("model.safetensors").ok_or_else(|| {
            CheckpointError::Format(format!("{dir}: no model.safetensors in the manifest"))
        })?;
        let weights = from_safetensors(model, &format!("{dir}/model.safetensors"))?;
        let state_name = format!("rank-{}.state.safetensors", self.rank);
        let extra = match file(&state_name) {
            Some(d) => from_safetensors(d, &format!("{dir}/{state_name}"))?,
            None => Vec::new(),
        };
        let record_name = format!("rank-{}.json", self.rank);
        let record = file(&record_name)
            .ok_or_else(|| CheckpointError::Format(format!("{dir}: no {record_name}")))?;
        let record: PartRecord = serde_json::from_slice(record)
            .map_err(|e| CheckpointError::Format(format!("{dir}/{record_name}: {e}")))?;
        task.restore(&weights, &extra, &record.task_state)
            .map_err(|e| CheckpointError::Task(e.to_string()))
    }
}

/// Writes one rank's part of a checkpoint (runs on the upload thread).
struct Part<'a> {
    storage: &'a Storage,
    step: u64,
    rank: usize,
    world: usize,
    generation: u64,
}

impl Part<'_> {
    /// Uploads the tensor files, then the part record; returns the bytes written.
    fn write(
        &self,
        model: Option<HostTensors>,
        extra: HostTensors,
        config: Option<serde_json::Value>,
        task_state: serde_json::Value,
    ) -> Result<u64, CheckpointError> {
        let dir = step_dir(self.step);
        let mut files = Vec::new();
        let mut put = |name: &str, data: Vec<u8>| -> Result<(), CheckpointError> {
            files.push(FileEntry::of(name, &data));
            self.storage
                .put(&format!("{dir}/{name}"), Bytes::from(data))
        };
        if let Some(model) = model {
            put("model.safetensors", model.to_safetensors("model")?)?;
        }
        if let Some(config) = config {
            let json = serde_json::to_vec_pretty(&config)
                .map_err(|e| CheckpointError::Format(e.to_string()))?;
            put("config.json", json)?;
        }
        if !extra.is_empty() {
            let name = format!("rank-{}.state.safetensors", self.rank);
            put(&name, extra.to_safetensors(&name)?)?;
        }
        let record = PartRecord {
            step: self.step,
            rank: self.rank,
            world: self.world,
            generation: self.generation,
            files,
            task_state,
        };
        let bytes: u64 = record.files.iter().map(|f| f.size).sum();
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| CheckpointError::Format(e.to_string()))?;
        self.storage
            .put(&format!("{dir}/rank-{}.json", self.rank), Bytes::from(json))?;
        Ok(bytes)
    }
}

/// Restores named weights into the tensors `task.state()` returns (they share storage with the
/// model's variables). Every saved name must exist with the same shape.
pub fn copy_weights_into(
    targets: &[(String, Tensor)],
    weights: &[(String, Tensor)],
) -> Result<(), TaskError> {
    for (name, target) in targets {
        let Some((_, src)) = weights.iter().find(|(k, _)| k == name) else {
            return Err(TaskError::Other(format!("checkpoint has no tensor {name}")));
        };
        if src.size() != target.size() {
            return Err(TaskError::Other(format!(
                "checkpoint tensor {name} has shape {:?}, the model {:?}",
                src.size(),
                target.size()
            )));
        }
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.copy_(src));
    }
    Ok(())
}
