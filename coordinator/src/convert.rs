//! Wire types <-> domain types, in one place: the state machine never sees prost structs.

use xvlm_proto::spec::TaskKind;
use xvlm_proto::v1;

use crate::state::{Command, Evaluation, JobRecord, JobState, ProgressInfo, Slot};

/// What a worker that advertises no tasks runs: it predates the field, and every such build ran these.
pub const TASKS_OF_UNLISTED_WORKERS: [TaskKind; 2] = [TaskKind::Smoke, TaskKind::Pretrain];

/// The tasks a registering worker advertises (`RegisterRequest.tasks`); names this coordinator does
/// not know (a newer worker's) are left out, and an empty list means [`TASKS_OF_UNLISTED_WORKERS`].
pub fn worker_tasks(names: &[String]) -> Vec<TaskKind> {
    if names.is_empty() {
        return TASKS_OF_UNLISTED_WORKERS.to_vec();
    }
    names
        .iter()
        .filter_map(|name| TaskKind::from_name(name))
        .collect()
}

/// Named metrics as the state machine takes them.
pub fn metrics(metrics: &[v1::Metric]) -> Vec<(String, f64)> {
    metrics.iter().map(|m| (m.name.clone(), m.value)).collect()
}

fn evaluation(e: &Evaluation) -> v1::Evaluation {
    v1::Evaluation {
        step: e.step,
        metrics: e
            .metrics
            .iter()
            .map(|(name, value)| v1::Metric {
                name: name.clone(),
                value: *value,
            })
            .collect(),
    }
}

impl From<JobState> for v1::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => v1::JobState::Pending,
            JobState::Rendezvous => v1::JobState::Rendezvous,
            JobState::Running => v1::JobState::Running,
            JobState::Restarting => v1::JobState::Restarting,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
            JobState::Cancelled => v1::JobState::Cancelled,
        }
    }
}

/// The wire status of a job.
pub fn job_status(rec: &JobRecord) -> v1::JobStatus {
    let mut workers: Vec<String> = rec.ranks.iter().map(|r| r.worker.clone()).collect();
    workers.dedup();
    v1::JobStatus {
        job_id: rec.id.clone(),
        name: rec.spec.name.clone(),
        task: rec.spec.task.as_str().to_string(),
        state: v1::JobState::from(rec.state) as i32,
        generation: rec.generation,
        world_size: rec.world_size(),
        progress: Some(progress(rec)),
        restarts: rec.restarts,
        message: rec.message.clone(),
        submitted_at_ms: rec.submitted_at_ms,
        updated_at_ms: rec.updated_at_ms,
        workers,
        output: rec.output.clone(),
        checkpoint_step: rec.checkpoint_step,
        checkpoint_requests_served: rec.checkpoint_requests_served,
        evaluation: rec.evaluation.as_ref().map(evaluation),
    }
}

fn progress(rec: &JobRecord) -> v1::Progress {
    let p = rec.progress.clone().unwrap_or_default();
    v1::Progress {
        step: p.step,
        total_steps: rec.total_steps(),
        losses: p
            .losses
            .iter()
            .map(|(name, value)| v1::Loss {
                name: name.clone(),
                value: *value,
            })
            .collect(),
        lr: p.lr,
        samples_per_sec: p.samples_per_sec,
        eta_seconds: rec.eta_seconds().unwrap_or(0.0),
    }
}

/// A progress report as the state machine takes it.
pub fn progress_info(p: &v1::RankProgress) -> ProgressInfo {
    ProgressInfo {
        step: p.step,
        losses: p.losses.iter().map(|l| (l.name.clone(), l.value)).collect(),
        lr: p.lr,
        samples_per_sec: p.samples_per_sec,
        at_ms: 0,
        first: None,
        total_steps: p.total_steps,
    }
}

fn slots(slots: &[Slot]) -> Vec<v1::RankSlot> {
    slots
        .iter()
        .map(|s| v1::RankSlot {
            rank: s.rank,
            local_rank: s.local_rank,
            device: s.device,
        })
        .collect()
}

/// The wire form of a worker command.
pub fn command(c: Command) -> v1::CoordinatorCommand {
    use v1::coordinator_command::Command as C;
    let command = match c {
        Command::Prepare {
            job,
            generation,
            world,
            slots: s,
            backend,
        } => C::Prepare(v1::PrepareRanks {
            job_id: job,
            generation,
            world_size: world,
            slots: slots(&s),
            backend: backend.as_str().into(),
        }),
        Command::Start {
            job,
            generation,
            world,
            slots: s,
            peers,
            nccl_id,
            spec,
            output,
            shards,
            backend,
        } => C::Start(v1::StartGeneration {
            job_id: job,
            generation,
            world_size: world,
            slots: slots(&s),
            peers,
            nccl_unique_id: nccl_id,
            spec_json: spec.to_json(),
            output,
            shards: shards
                .into_iter()
                .map(|files| v1::ShardList { files })
                .collect(),
            backend: backend.as_str().into(),
            start_step: 0,
            // Filled in per generation by the server (ring_secret.rs), outside the state machine.
            ring_secret: Vec::new(),
        }),
        Command::Checkpoint {
            job,
            generation,
            request,
            leave,
        } => C::Checkpoint(v1::SaveCheckpoint {
            job_id: job,
            generation,
            request_id: request,
            leave,
        }),
        Command::Stop {
            job,
            generation,
            reason,
        } => C::Stop(v1::StopGeneration {
            job_id: job,
            generation,
            reason,
        }),
    };
    v1::CoordinatorCommand {
        command: Some(command),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker that lists no tasks predates the field and runs smoke and pretrain; names this
    /// coordinator does not know are dropped, the rest kept.
    #[test]
    fn advertised_task_names() {
        assert_eq!(worker_tasks(&[]), vec![TaskKind::Smoke, TaskKind::Pretrain]);
        let names = ["retrieval".to_string(), "teleport".to_string()];
        assert_eq!(worker_tasks(&names), vec![TaskKind::Retrieval]);
    }
}
