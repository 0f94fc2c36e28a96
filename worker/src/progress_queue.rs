//! Which trainer progress lines the next heartbeat report carries. Rank 0's lines are the job's
//! curve (the coordinator's TensorBoard files, the dashboard): every one of them is sent, in order.
//! The other ranks' lines only tell the coordinator how far each rank got (hang detection), so only
//! the newest of each is sent.

use std::collections::BTreeMap;

use tracing::warn;
use xvlm_proto::v1;

/// Rank 0 lines held for one report at most; a coordinator that is away longer than this many steps
/// loses the oldest (the newest line, and the latest evaluation, always go out).
pub const MAX_HELD_LINES: usize = 4096;

/// Progress lines waiting for the next report.
#[derive(Default)]
pub struct ProgressQueue {
    /// The newest line of every (job, generation, rank).
    newest: BTreeMap<(String, u64, u32), v1::RankProgress>,
    /// Rank 0's lines that a newer line replaced in `newest`, oldest first.
    earlier: Vec<v1::RankProgress>,
    /// Lines dropped since the last warning.
    dropped: u64,
}

impl ProgressQueue {
    /// Takes a trainer's line.
    pub fn push(&mut self, line: v1::RankProgress) {
        let key = (line.job_id.clone(), line.generation, line.rank);
        let pending = self.newest.remove(&key);
        let line = match pending {
            Some(pending) if line.rank == 0 => {
                self.hold(pending);
                line
            }
            pending => newest_progress(pending, line),
        };
        self.newest.insert(key, line);
    }

    /// True when no line waits.
    pub fn is_empty(&self) -> bool {
        self.newest.is_empty()
    }

    /// Every waiting line for a report: each rank's lines in step order, rank 0's all of them.
    pub fn take(&mut self) -> Vec<v1::RankProgress> {
        if self.dropped > 0 {
            warn!(
                lines = self.dropped,
                "rank 0 progress lines dropped: the coordinator was away too long"
            );
            self.dropped = 0;
        }
        let mut lines = std::mem::take(&mut self.earlier);
        lines.extend(std::mem::take(&mut self.newest).into_values());
        lines
    }

    fn hold(&mut self, line: v1::RankProgress) {
        if self.earlier.len() >= MAX_HELD_LINES {
            let oldest = self.earlier.remove(0);
            self.dropped += 1;
            // An evaluation comes once an epoch: it rides on the next held line rather than vanish.
            if let Some(next) = self.earlier.first_mut().filter(|n| n.metrics.is_empty()) {
                next.metrics = oldest.metrics;
            }
        }
        self.earlier.push(line);
    }
}

/// What a report sends for a rank whose `pending` progress is replaced by `newest` before the
/// report went out: the newest line, with the pending evaluation metrics if it has none (results
/// come once an epoch and must not be lost to the next step's line).
fn newest_progress(
    pending: Option<v1::RankProgress>,
    mut newest: v1::RankProgress,
) -> v1::RankProgress {
    if newest.metrics.is_empty() {
        if let Some(pending) = pending {
            newest.metrics = pending.metrics;
        }
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(rank: u32, step: u64, metrics: &[(&str, f64)]) -> v1::RankProgress {
        v1::RankProgress {
            job_id: "job-0001".into(),
            generation: 1,
            rank,
            step,
            metrics: metrics
                .iter()
                .map(|(n, v)| v1::Metric {
                    name: n.to_string(),
                    value: *v,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn steps(lines: &[v1::RankProgress]) -> Vec<(u32, u64)> {
        lines.iter().map(|l| (l.rank, l.step)).collect()
    }

    /// Rank 0's every line goes out in order; another rank's only newest, keeping a pending
    /// evaluation that a later line without one would replace.
    #[test]
    fn rank_zero_lines_all_go_out_other_ranks_only_the_newest() {
        let mut q = ProgressQueue::default();
        for step in 1..=3 {
            q.push(line(0, step, &[]));
        }
        q.push(line(1, 1, &[("val.r_mean", 41.5)]));
        q.push(line(1, 2, &[]));
        let sent = q.take();
        assert_eq!(steps(&sent), vec![(0, 1), (0, 2), (0, 3), (1, 2)]);
        assert_eq!(sent[3].metrics[0].name, "val.r_mean");
        assert!(q.is_empty() && q.take().is_empty());
    }

    /// Beyond the bound the oldest rank 0 lines go, but not the evaluation one of them carried.
    #[test]
    fn held_lines_are_bounded_and_keep_their_evaluation() {
        let mut q = ProgressQueue::default();
        q.push(line(0, 1, &[("val.r_mean", 50.0)]));
        let total = MAX_HELD_LINES as u64 + 10;
        for step in 2..=total {
            q.push(line(0, step, &[]));
        }
        let sent = q.take();
        assert_eq!(sent.len(), MAX_HELD_LINES + 1);
        assert_eq!(sent.last().map(|l| l.step), Some(total));
        let evaluated: Vec<u64> = sent
            .iter()
            .filter(|l| !l.metrics.is_empty())
            .map(|l| l.step)
            .collect();
        assert_eq!(
            evaluated,
            vec![sent[0].step],
            "the evaluation survives, once"
        );
        assert!(sent.windows(2).all(|w| w[0].step < w[1].step));
    }
}
