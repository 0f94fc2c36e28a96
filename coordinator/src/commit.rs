//! Writes checkpoint commits (manifest, `latest`, retention) to job outputs for the scheduler's
//! [`crate::state::Action::Commit`]. The writes run on a thread with its own I/O runtime, so the
//! driver can wait for them while it holds the scheduler: a commit is durable before any later
//! command goes out, and a new generation never starts before the checkpoint it must resume from.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::Duration;

use xvlm_proto::checkpoint::{CheckpointDir, Manifest};
use xvlm_proto::storage::{self, Located};

use crate::error::CoordError;

/// Longest one commit may take before the driver gives up on it.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

struct Request {
    output: String,
    manifest: Manifest,
    keep_last: u32,
    reply: mpsc::SyncSender<Result<Vec<u64>, String>>,
}

/// A handle to the commit thread.
pub struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    /// Starts the commit thread.
    pub fn spawn() -> Result<Committer, CoordError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CoordError::Server(format!("cannot start the commit runtime: {e}")))?;
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("xvlm-commit".into())
            .spawn(move || {
                let mut stores: HashMap<String, Located> = HashMap::new();
                while let Ok(req) = rx.recv() {
                    let result = runtime.block_on(write(&mut stores, &req));
                    let _ = req.reply.send(result);
                }
            })
            .map_err(|e| CoordError::Server(format!("cannot start the commit thread: {e}")))?;
        Ok(Committer { tx })
    }

    /// Commits `manifest` under the job output `output` and waits for it; returns the steps
    /// retention removed.
    pub fn commit(
        &self,
        output: &str,
        manifest: &Manifest,
        keep_last: u32,
    ) -> Result<Vec<u64>, CoordError> {
        let err = |reason: String| CoordError::Commit {
            output: output.to_string(),
            step: manifest.step,
            reason,
        };
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send(Request {
                output: output.to_string(),
                manifest: manifest.clone(),
                keep_last,
                reply,
            })
            .map_err(|_| err("the commit thread is gone".into()))?;
        answer
            .recv_timeout(COMMIT_TIMEOUT + Duration::from_secs(5))
            .map_err(|_| err("no answer from the commit thread".into()))?
            .map_err(err)
    }
}

async fn write(stores: &mut HashMap<String, Located>, req: &Request) -> Result<Vec<u64>, String> {
    if !stores.contains_key(&req.output) {
        let located = storage::open(&req.output, &[]).map_err(|e| e.reason)?;
        stores.insert(req.output.clone(), located);
    }
    let located = &stores[&req.output];
    let dir = CheckpointDir {
        store: located.store.as_ref(),
        root: &located.path,
    };
    match tokio::time::timeout(COMMIT_TIMEOUT, dir.commit(&req.manifest, req.keep_last)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("timed out after {} s", COMMIT_TIMEOUT.as_secs())),
    }
}
