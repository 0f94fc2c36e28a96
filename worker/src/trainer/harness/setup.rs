//! What every task does before its first step: read the job's task config (overrides merged), build
//! the model from the job seed under a process-wide lock, load `init_checkpoint`, and make every rank
//! start from rank 0's weights.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tch::nn::VarStore;
use tch::Tensor;
use xvlm_model::checkpoint::{read_state_dict, StateDict};
use xvlm_model::collective::Collective;
use xvlm_model::config::TaskConfig;

use crate::checkpoint::Storage;
use crate::trainer::task::{TaskContext, TaskError};

/// libtorch's generator is process-global: a seeded model initialisation holds this lock, so tasks
/// built concurrently in one process (in-process ranks, tests) each get the weights of their seed.
static INIT: Mutex<()> = Mutex::new(());

/// Distinguishes the temporary copies of remote checkpoints one process makes.
static DOWNLOADS: AtomicU64 = AtomicU64::new(0);

pub(crate) fn other(e: impl std::fmt::Display) -> TaskError {
    TaskError::Other(e.to_string())
}

/// The task config of the job: the `config:` file with `overrides:` merged in.
pub fn load_task_config(ctx: &TaskContext<'_>) -> Result<TaskConfig, TaskError> {
    let task = ctx.spec.task.as_str();
    let path = ctx.spec.config.as_deref().ok_or_else(|| {
        other(format!(
            "task {task} needs `config:` (an official task config)"
        ))
    })?;
    let path = Path::new(path.strip_prefix("file://").unwrap_or(path));
    let overrides = serde_yaml::to_value(&ctx.spec.overrides)
        .map_err(|e| other(format!("job overrides: {e}")))?;
    TaskConfig::load_with_overrides(path, &overrides)
        .map_err(|e| other(format!("task config {}: {e}", path.display())))
}

/// Builds a model with `build` while libtorch's generator is seeded with `seed` (under the process-wide
/// initialisation lock).
pub fn build_seeded<M>(
    seed: u64,
    build: impl FnOnce() -> Result<M, TaskError>,
) -> Result<M, TaskError> {
    let _init = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed as i64);
    build()
}

/// Overwrites every variable of `vs` with rank 0's (in name order, so every rank sends the same
/// sequence), so ranks start identical whatever their initialisation.
pub fn broadcast_weights(vs: &VarStore, comm: &dyn Collective) -> Result<(), TaskError> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| -> Result<(), TaskError> {
        for (_, var) in &mut vars {
            comm.broadcast(var, 0)?;
        }
        Ok(())
    })
}

/// Reads `init_checkpoint`: an official `torch.save` file (`.th`) or safetensors, at a plain path, a
/// `file://` URL or any URL the checkpoint storage opens (`s3://bucket/key`). A remote object is read
/// into a private temporary file (the readers take files) that is removed afterwards.
pub fn read_init_checkpoint(url: &str) -> Result<StateDict, TaskError> {
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
