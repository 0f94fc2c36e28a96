//! The worker registry: which nodes are registered, what they offer, whether their command stream is
//! open and which generation each one serves. It knows no job's state; the lifecycle decides what a
//! worker's loss means for its job.

use std::collections::BTreeMap;

use xvlm_proto::spec::TaskKind;

use super::records::Millis;

/// A registered node.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    /// Name (its id).
    pub name: String,
    /// Host its trainers' sockets listen on.
    pub host: String,
    /// Trainer slots (GPUs or CPU slots).
    pub slots: u32,
    /// Whether the slots are CUDA devices.
    pub cuda: bool,
    /// Last report.
    pub last_seen_ms: Millis,
    /// The generation it is serving: until every one of its ranks has exited.
    pub busy: Option<(String, u64)>,
    /// Its heartbeat stream is open (commands can reach it); set by the first heartbeat.
    pub connected: bool,
    /// It is draining (preempted): the generation its leaving ends does not count as a restart.
    pub draining: bool,
    /// The tasks its build can run (what it advertised when it registered).
    pub tasks: Vec<TaskKind>,
}

impl WorkerEntry {
    /// Its build can run `task`.
    pub fn supports(&self, task: TaskKind) -> bool {
        self.tasks.contains(&task)
    }

    /// Free to take a generation of `task` needing `slots` per worker now.
    pub fn is_free_for(&self, task: TaskKind, slots: u32) -> bool {
        self.connected
            && !self.draining
            && self.busy.is_none()
            && self.slots >= slots
            && self.supports(task)
    }
}

/// Registered workers by name.
#[derive(Debug, Default)]
pub(super) struct WorkerRegistry {
    workers: BTreeMap<String, WorkerEntry>,
}

impl WorkerRegistry {
    /// Every registered worker, by name.
    pub(super) fn iter(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values()
    }

    /// No worker is registered.
    pub(super) fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Whether `name` is registered.
    pub(super) fn contains(&self, name: &str) -> bool {
        self.workers.contains_key(name)
    }

    /// The worker `name`.
    pub(super) fn get(&self, name: &str) -> Option<&WorkerEntry> {
        self.workers.get(name)
    }

    /// The worker `name`, to change.
    pub(super) fn get_mut(&mut self, name: &str) -> Option<&mut WorkerEntry> {
        self.workers.get_mut(name)
    }

    /// Adds a worker, replacing one registered under the same name.
    pub(super) fn insert(&mut self, entry: WorkerEntry) {
        self.workers.insert(entry.name.clone(), entry);
    }

    /// Forgets `name`.
    pub(super) fn remove(&mut self, name: &str) {
        self.workers.remove(name);
    }

    /// Notes a report from `name` at `now`.
    pub(super) fn touch(&mut self, name: &str, now: Millis) {
        if let Some(w) = self.workers.get_mut(name) {
            w.last_seen_ms = now;
        }
    }

    /// Workers silent for longer than `timeout_ms` at `now`.
    pub(super) fn silent(&self, now: Millis, timeout_ms: Millis) -> Vec<String> {
        self.workers
            .values()
            .filter(|w| now.saturating_sub(w.last_seen_ms) > timeout_ms)
            .map(|w| w.name.clone())
            .collect()
    }

    /// Frees `name` if it serves `generation` of `job`.
    pub(super) fn release(&mut self, name: &str, job: &str, generation: u64) {
        if let Some(w) = self.workers.get_mut(name) {
            if w.busy
                .as_ref()
                .is_some_and(|(j, g)| j == job && *g == generation)
            {
                w.busy = None;
            }
        }
    }

    /// Workers whose build can run `task`.
    pub(super) fn supporting(&self, task: TaskKind) -> impl Iterator<Item = &WorkerEntry> {
        self.workers.values().filter(move |w| w.supports(task))
    }

    /// Every task some registered worker can run, in [`TaskKind`] order, without repeats.
    pub(super) fn tasks(&self) -> Vec<TaskKind> {
        let mut tasks: Vec<TaskKind> = self
            .workers
            .values()
            .flat_map(|w| w.tasks.clone())
            .collect();
        tasks.sort_by_key(|t| t.as_str());
        tasks.dedup();
        tasks
    }

    /// Workers free to take a generation of `task` needing `slots` per worker now, by name.
    pub(super) fn free(&self, task: TaskKind, slots: u32) -> Vec<String> {
        self.workers
            .values()
            .filter(|w| w.is_free_for(task, slots))
            .map(|w| w.name.clone())
            .collect()
    }
}
