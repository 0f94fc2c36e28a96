//! Checkpoints: saving (host copy in the step, upload in the background), reporting each rank's part
//! for the coordinator to commit, and resuming from the newest committed checkpoint whose files verify.
//!
//! Resume at the same world size restores each rank's own part (exact). At another world size (an
//! elastic restart) the per-rank parts do not map onto the new ranks: every rank gets the weights,
//! rank 0's tensor state (identical on every data-parallel rank) and all saved ranks' JSON states, and
//! the task re-derives its data cursors for the new world ([`Checkpointable::restore_resharded`]); a task
//! that cannot is resumed from an older checkpoint of its own world size, or from scratch.
//!
//! Layout under `{output}/checkpoints/step-{S}/` ([`xvlm_proto::checkpoint`]): `model.safetensors`
//! (rank 0, the task's named weights), `config.json` (rank 0: job spec and model config),
//! `state.safetensors` (rank 0: optimizer, scheduler, scaler tensors, when the task has any),
//! `rank-{r}.json` (rank r's part record: step, its files with sizes and sha256, and the task's
//! JSON state such as data cursors and RNG), and last `MANIFEST.json`, which the coordinator writes
//! once every rank has reported its [`Part`]. A step directory without a manifest is never resumed.
//!
//! Size: O(model), not O(world x model). Weights and optimizer state are identical on every
//! data-parallel rank (each applies the same all-reduced gradients), so rank 0 alone writes them; the
//! other ranks write only their small JSON record. A resume reads the weights, the state and every
//! rank's record (each verified against the manifest), so all ranks agree on which checkpoint
//! verifies. Checkpoints of the earlier layout (`rank-{r}.state.safetensors` on every rank) still
//! resume.

pub mod format;
pub mod storage;

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;
use tracing::{info, warn};
use xvlm_model::collective::CollectiveError;
use xvlm_proto::spec::CheckpointSpec;

use format::{from_safetensors, BufferPool, HostFile};
pub use storage::Storage;
pub use xvlm_proto::checkpoint::{
    parse_step, step_dir, FileEntry, Manifest, Part, CHECKPOINTS, MANIFEST,
};

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
    /// The coordinator did not commit a checkpoint in time.
    #[error("checkpoint step-{step} was not committed within {secs} s (is the coordinator up?)")]
    NotCommitted {
        /// The step.
        step: u64,
        /// How long this rank waited.
        secs: u64,
    },
}

fn file_entry(path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        path: path.to_string(),
        size: data.len() as u64,
        sha256: sha256_hex(data),
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

/// What the checkpointer saves and restores. The trainer's tasks implement it (through
/// `TrainTask`); this module knows no trainer type.
pub trait Checkpointable {
    /// Named tensors that make up the model state (`model.safetensors`, rank 0).
    fn state(&self) -> Vec<(String, Tensor)>;
    /// The other tensors: optimizer, scheduler, loss-scaler state. Identical on every rank (rank 0
    /// saves them for all).
    fn checkpoint_state(&self) -> Vec<(String, Tensor)>;
    /// This rank's JSON state: data cursors and the like.
    fn checkpoint_meta(&self) -> serde_json::Value;
    /// Restores this rank's own part of a checkpoint of this world size.
    fn restore(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        meta: &serde_json::Value,
    ) -> Result<(), RestoreError>;
    /// Restores a checkpoint of `saved_world` ranks into a world of `world`: the weights, rank 0's
    /// tensor state and every saved rank's JSON state in rank order.
    fn restore_resharded(
        &mut self,
        weights: &[(String, Tensor)],
        extra: &[(String, Tensor)],
        metas: &[serde_json::Value],
        saved_world: usize,
        world: usize,
    ) -> Result<(), RestoreError>;
}

/// Why a checkpoint could not be restored into the task.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The task cannot re-derive its state for another world size (an older checkpoint of this
    /// world size may still do).
    #[error("a checkpoint of {saved} ranks cannot be restored at world size {now}")]
    WorldChanged {
        /// World size that saved the checkpoint.
        saved: usize,
        /// This generation's world size.
        now: usize,
    },
    /// The task refused the checkpoint.
    #[error("{0}")]
    Refused(String),
}

/// Hex sha256 of bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
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

type Uploaded = Result<(SaveTiming, Part), CheckpointError>;

struct InFlight {
    step: u64,
    done: mpsc::Receiver<Uploaded>,
    handle: JoinHandle<()>,
}

impl InFlight {
    /// The upload's outcome once it finished; with `wait`, blocks until it has.
    fn outcome(&self, wait: bool) -> Option<Uploaded> {
        let panicked = || {
            Err(CheckpointError::Upload {
                step: self.step,
                message: "upload thread panicked".into(),
            })
        };
        if wait {
            return Some(self.done.recv().unwrap_or_else(|_| panicked()));
        }
        match self.done.try_recv() {
            Ok(r) => Some(r),
            // The thread ended without sending: it panicked.
            Err(_) if self.handle.is_finished() => {
                Some(self.done.try_recv().unwrap_or_else(|_| panicked()))
            }
            Err(_) => None,
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
    config_json: serde_json::Value,
    in_flight: Option<InFlight>,
    /// On-demand request to serve at the next step boundary.
    pending_request: Option<u64>,
    /// Timings of completed saves of this rank, oldest first.
    pub timings: Vec<SaveTiming>,
    /// Test hook: the background upload sleeps this long before writing anything.
    pub upload_delay: Duration,
    /// Host buffers reused from one save to the next.
    buffers: BufferPool,
}

impl Checkpointer {
    /// A checkpointer for rank `rank` of `world`; `config_json` goes into `config.json` (rank 0).
    pub fn new(
        storage: Storage,
        spec: CheckpointSpec,
        rank: usize,
        world: usize,
        generation: u64,
        config_json: serde_json::Value,
    ) -> Checkpointer {
        Checkpointer {
            storage,
            spec,
            rank,
            world,
            generation,
            config_json,
            in_flight: None,
            pending_request: None,
            timings: Vec::new(),
            upload_delay: Duration::ZERO,
            buffers: BufferPool::default(),
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

    /// Called after step `done` (steps completed so far) of `total`: reports this rank's part once
    /// its upload finished, and starts a new save on the cadence or on request. Every rank calls it
    /// with the same arguments, so every rank saves the same steps.
    pub fn after_step(
        &mut self,
        done: u64,
        total: u64,
        task: &(impl Checkpointable + ?Sized),
    ) -> Result<Vec<Part>, CheckpointError> {
        let mut parts = self.uploaded(false)?;
        let every = self.spec.every_steps;
        let request = self.pending_request.take();
        // An on-demand request is served even after the last step (`finish` waits for it).
        if request.is_some() || (every > 0 && done.is_multiple_of(every) && done < total) {
            // The previous upload may still run: wait for it rather than pile up host copies.
            parts.extend(self.uploaded(true)?);
            self.save(done, request.unwrap_or(0), task)?;
        }
        Ok(parts)
    }

    /// Waits for the save in flight (end of training); returns its part.
    pub fn finish(&mut self) -> Result<Vec<Part>, CheckpointError> {
        self.uploaded(true)
    }

    /// Saves the state after step `step` and waits for its upload (a drain: the rank leaves next).
    /// Every rank calls it at the same step.
    pub fn save_now(
        &mut self,
        step: u64,
        task: &(impl Checkpointable + ?Sized),
    ) -> Result<Vec<Part>, CheckpointError> {
        let mut parts = self.uploaded(true)?;
        self.save(step, 0, task)?;
        parts.extend(self.uploaded(true)?);
        Ok(parts)
    }

    /// Starts saving the state after step `step`: copies the tensors into host-memory safetensors
    /// files now, hashes and uploads them on a background thread. `request` is the on-demand
    /// request it serves.
    pub fn save(
        &mut self,
        step: u64,
        request: u64,
        task: &(impl Checkpointable + ?Sized),
    ) -> Result<(), CheckpointError> {
        let started = Instant::now();
        let model = match self.rank {
            0 => Some(HostFile::copy_of(
                &task.state(),
                "model.safetensors",
                &self.buffers,
            )?),
            _ => None,
        };
        let extra = match self.rank {
            0 => Some(HostFile::copy_of(
                &task.checkpoint_state(),
                STATE_FILE,
                &self.buffers,
            )?),
            _ => None,
        };
        let task_state = task.checkpoint_meta();
        let blocking = started.elapsed();
        let config = (self.rank == 0).then(|| self.config_json.clone());
        let (tx, rx) = mpsc::channel();
        let storage = self.storage.clone();
        let part = Part {
            step,
            rank: self.rank,
            world: self.world,
            generation: self.generation,
            request,
            files: Vec::new(),
        };
        let delay = self.upload_delay;
        let handle = std::thread::spawn(move || {
            let up = Instant::now();
            std::thread::sleep(delay);
            let result = write_part(&storage, part, model, extra, config, task_state).map(|part| {
                let timing = SaveTiming {
                    blocking,
                    bytes: part.files.iter().map(|f| f.size).sum(),
                    upload: up.elapsed(),
                };
                (timing, part)
            });
            let _ = tx.send(result);
        });
        self.in_flight = Some(InFlight {
            step,
            done: rx,
            handle,
        });
        Ok(())
    }

    /// This rank's part of the save in flight once its upload finished (with `wait`: blocks until
    /// it has); an upload error is returned.
    fn uploaded(&mut self, wait: bool) -> Result<Vec<Part>, CheckpointError> {
        let Some(flight) = self.in_flight.as_ref() else {
            return Ok(Vec::new());
        };
        let Some(outcome) = flight.outcome(wait) else {
            return Ok(Vec::new());
        };
        if let Some(flight) = self.in_flight.take() {
            let _ = flight.handle.join();
        }
        let (timing, part) = outcome?;
        self.timings.push(timing);
        Ok(vec![part])
    }

    /// Waits until the coordinator committed step `step` (its manifest exists), polling the store.
    pub fn wait_committed(&self, step: u64, timeout: Duration) -> Result<(), CheckpointError> {
        let started = Instant::now();
        let manifest = format!("{}/{MANIFEST}", step_dir(step));
        while self.storage.get(&manifest)?.is_none() {
            if started.elapsed() > timeout {
                return Err(CheckpointError::NotCommitted {
                    step,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Restores `task` from the newest committed checkpoint whose files all verify; returns its step.
    /// A checkpoint that fails verification is skipped with a warning naming the bad file.
    pub fn resume(
        &self,
        task: &mut (impl Checkpointable + ?Sized),
    ) -> Result<Option<u64>, CheckpointError> {
        let mut steps: Vec<u64> = self
            .storage
            .list_dirs(CHECKPOINTS)?
            .iter()
            .filter_map(|d| parse_step(d))
            .collect();
        steps.sort_unstable_by(|a, b| b.cmp(a));
        for step in steps {
            let dir = step_dir(step);
            let Some(manifest) = self.storage.get(&format!("{dir}/{MANIFEST}"))? else {
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
    /// state and every rank's JSON state go to [`Checkpointable::restore_resharded`]. `Ok(false)` when the
    /// task cannot re-derive its state for another world size.
    fn restore_resharded(
        &self,
        task: &mut (impl Checkpointable + ?Sized),
        dir: &str,
        files: &[(String, Bytes)],
        saved_world: usize,
    ) -> Result<bool, CheckpointError> {
        let file = |name: &str| files.iter().find(|(p, _)| p == name).map(|(_, d)| d);
        let model = file("model.safetensors").ok_or_else(|| {
            CheckpointError::Format(format!("{dir}: no model.safetensors in the manifest"))
        })?;
        let weights = from_safetensors(model, &format!("{dir}/model.safetensors"))?;
        let extra = replicated_state(dir, files, 0)?;
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
            Err(RestoreError::WorldChanged { .. }) => Ok(false),
            Err(RestoreError::Refused(why)) => Err(CheckpointError::Task(why)),
        }
    }

    fn restore(
        &self,
        task: &mut (impl Checkpointable + ?Sized),
        dir: &str,
        files: &[(String, Bytes)],
    ) -> Result<(), CheckpointError> {
        let file = |name: &str| files.iter().find(|(p, _)| p == name).map(|(_, d)| d);
        let model = file("model.safetensors").ok_or_else(|| {
            CheckpointError::Format(format!("{dir}: no model.safetensors in the manifest"))
        })?;
        let weights = from_safetensors(model, &format!("{dir}/model.safetensors"))?;
        let extra = replicated_state(dir, files, self.rank)?;
        let record_name = format!("rank-{}.json", self.rank);
        let record = file(&record_name)
            .ok_or_else(|| CheckpointError::Format(format!("{dir}: no {record_name}")))?;
        let record: PartRecord = serde_json::from_slice(record)
            .map_err(|e| CheckpointError::Format(format!("{dir}/{record_name}: {e}")))?;
        task.restore(&weights, &extra, &record.task_state)
            .map_err(|e| CheckpointError::Task(e.to_string()))
    }
}

/// The file rank 0 writes the replicated tensor state to.
pub const STATE_FILE: &str = "state.safetensors";

/// The replicated tensor state of a checkpoint: [`STATE_FILE`], or in a checkpoint of the earlier
/// layout rank `rank`'s own copy; empty when the task has none.
fn replicated_state(
    dir: &str,
    files: &[(String, Bytes)],
    rank: usize,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let legacy = format!("rank-{rank}.state.safetensors");
    let found = [STATE_FILE, legacy.as_str()]
        .into_iter()
        .find_map(|name| Some((name, files.iter().find(|(p, _)| p == name)?)));
    match found {
        Some((name, (_, data))) => from_safetensors(data, &format!("{dir}/{name}")),
        None => Ok(Vec::new()),
    }
}

/// Uploads one rank's tensor files, then its part record (runs on the upload thread); returns the
/// part with every file written, the record last.
fn write_part(
    storage: &Storage,
    mut part: Part,
    model: Option<HostFile>,
    extra: Option<HostFile>,
    config: Option<serde_json::Value>,
    task_state: serde_json::Value,
) -> Result<Part, CheckpointError> {
    let dir = step_dir(part.step);
    let mut files = Vec::new();
    let mut put = |name: &str, data: Bytes| -> Result<(), CheckpointError> {
        // Hashing a big file takes about as long as writing it: do both at once.
        let hashing = {
            let data = data.clone();
            let name = name.to_string();
            std::thread::spawn(move || file_entry(&name, &data))
        };
        storage.put(&format!("{dir}/{name}"), data)?;
        let entry = hashing.join().map_err(|_| CheckpointError::Upload {
            step: part.step,
            message: format!("hashing {name} panicked"),
        })?;
        files.push(entry);
        Ok(())
    };
    if let Some(model) = model {
        put("model.safetensors", model.into_bytes())?;
    }
    if let Some(config) = config {
        let json = serde_json::to_vec_pretty(&config)
            .map_err(|e| CheckpointError::Format(e.to_string()))?;
        put("config.json", Bytes::from(json))?;
    }
    if let Some(extra) = extra.filter(|e| !e.is_empty()) {
        put(STATE_FILE, extra.into_bytes())?;
    }
    let record = PartRecord {
        step: part.step,
        rank: part.rank,
        world: part.world,
        generation: part.generation,
        files,
        task_state,
    };
    let json =
        serde_json::to_vec_pretty(&record).map_err(|e| CheckpointError::Format(e.to_string()))?;
    let name = format!("rank-{}.json", part.rank);
    storage.put(&format!("{dir}/{name}"), Bytes::from(json.clone()))?;
    part.files = record.files;
    part.files.push(file_entry(&name, &json));
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(name: &str, value: f64) -> (String, Bytes) {
        let tensors = vec![("optimizer.m".to_string(), Tensor::from_slice(&[value]))];
        let host = HostFile::copy_of(&tensors, name, &BufferPool::default()).unwrap();
        (name.to_string(), host.into_bytes())
    }

    fn value(state: &[(String, Tensor)]) -> f64 {
        state[0].1.double_value(&[0])
    }

    /// The replicated state comes from `state.safetensors`; a checkpoint of the earlier layout gives
    /// each rank its own `rank-{r}.state.safetensors`; a task without tensor state gets none.
    #[test]
    fn replicated_state_reads_both_layouts() {
        let now = [file_of(STATE_FILE, 1.0), file_of("rank-0.json", 0.0)];
        assert_eq!(value(&replicated_state("d", &now, 3).unwrap()), 1.0);
        let legacy = [
            file_of("rank-0.state.safetensors", 2.0),
            file_of("rank-1.state.safetensors", 3.0),
        ];
        assert_eq!(value(&replicated_state("d", &legacy, 1).unwrap()), 3.0);
        assert_eq!(value(&replicated_state("d", &legacy, 0).unwrap()), 2.0);
        assert!(replicated_state("d", &[], 0).unwrap().is_empty());
    }
}
