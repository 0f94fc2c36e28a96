//! Per-job runtime state: what the scheduler tracks about a live job beyond its persisted record
//! (rank clocks, checkpoint parts in flight, commit and persist bookkeeping). It is not persisted: a
//! coordinator restart starts every job's runtime afresh, and a job's entry is dropped when the job
//! ends (see `Scheduler::prune_runtime`).

use std::collections::BTreeMap;

use xvlm_proto::checkpoint::Part;

use super::hang::RankClock;
use super::records::Millis;

/// Everything the scheduler keeps about one live job outside its [`super::JobRecord`].
#[derive(Clone, Debug, Default)]
pub(super) struct JobRuntime {
    /// Step clocks of the running generation's ranks (empty unless the job is RUNNING).
    pub(super) clocks: BTreeMap<u32, RankClock>,
    /// Checkpoint parts of the current generation by step, until every rank's is in.
    pub(super) parts: BTreeMap<u64, Vec<Part>>,
    /// The last (generation, step) issued for commit (committed or not), so parts sent again are
    /// not committed twice; the job record keeps the last one committed across restarts.
    pub(super) last_commit: Option<(u64, u64)>,
    /// When rank 0's progress was last persisted (progress is persisted at most every few seconds).
    pub(super) last_progress_persist: Millis,
    /// Since when workers are registered but none can run this never-started job's task.
    pub(super) unrunnable_since: Option<Millis>,
}
