//! Hang detection: a step-progress clock per rank of a running generation, and the rule that names
//! the rank that stalls it. Pure functions of the clocks and the time; the lifecycle acts on the verdict.

use std::collections::{BTreeMap, VecDeque};

use xvlm_proto::spec::HangSpec;

use super::records::{JobRecord, Millis};

/// A running rank as hang detection sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct RankHealth {
    /// Global rank.
    pub rank: u32,
    /// Last reported step.
    pub step: u64,
    /// When that step was reached (or the generation started running).
    pub since_ms: Millis,
    /// p99 of its recent step times, ms (0 before enough steps).
    pub p99_step_ms: u64,
    /// Its process state letter in its worker's last heartbeat (`R`, `S`, `D`, `T`, ...).
    pub process: Option<char>,
}

/// Step-progress clock of one rank of a running generation, for hang detection.
#[derive(Clone, Debug)]
pub(super) struct RankClock {
    /// Last reported step (0 before the first report).
    step: u64,
    /// When the step last advanced (or the generation started running).
    at_ms: Millis,
    /// Whether the rank reported any step yet.
    stepped: bool,
    /// Recent per-step times, ms (newest last).
    step_ms: VecDeque<u64>,
    /// p99 of `step_ms`.
    p99_ms: u64,
    /// The trainer's process state letter in its worker's last heartbeat.
    pub(super) process: Option<char>,
}

/// Step times kept per rank for the p99.
const STEP_TIME_WINDOW: usize = 256;

impl RankClock {
    /// A clock of a rank that starts running at `now`.
    pub(super) fn new(now: Millis) -> Self {
        RankClock {
            step: 0,
            at_ms: now,
            stepped: false,
            step_ms: VecDeque::new(),
            p99_ms: 0,
            process: None,
        }
    }

    /// What the clock says about its rank.
    pub(super) fn health(&self, rank: u32) -> RankHealth {
        RankHealth {
            rank,
            step: self.step,
            since_ms: self.at_ms,
            p99_step_ms: self.p99_ms,
            process: self.process,
        }
    }

    /// Records that the rank reported `step` at `now` (older or repeated steps change nothing).
    pub(super) fn advance(&mut self, step: u64, now: Millis) {
        if step <= self.step && self.stepped {
            return;
        }
        if self.stepped {
            // Reports may be coalesced: the time per step over the gap.
            let per_step = now.saturating_sub(self.at_ms) / (step - self.step);
            if self.step_ms.len() == STEP_TIME_WINDOW {
                self.step_ms.pop_front();
            }
            self.step_ms.push_back(per_step);
            let mut sorted: Vec<u64> = self.step_ms.iter().copied().collect();
            sorted.sort_unstable();
            let idx = (sorted.len() * 99).div_ceil(100).saturating_sub(1);
            self.p99_ms = sorted[idx];
        }
        self.step = step;
        self.at_ms = now;
        self.stepped = true;
    }

    /// How long the rank may go without a step before it is hung.
    fn bound_ms(&self, hang: &HangSpec) -> u64 {
        if !self.stepped {
            return (hang.startup_secs * 1000.0) as u64;
        }
        let floor = (hang.min_secs * 1000.0) as u64;
        floor.max((hang.p99_factor * self.p99_ms as f64) as u64)
    }
}

/// Why the running generation of `job` is hung, naming one rank, or `None` while every live rank is
/// within its bound.
pub(super) fn hung_rank(
    job: &JobRecord,
    clocks: &BTreeMap<u32, RankClock>,
    now: Millis,
) -> Option<String> {
    let total = job.total_steps();
    // Peers of a stuck rank block in its collectives and stall too. Name the rank whose
    // process is stopped, else one that is busy (its peers sleep in collectives), else the
    // one that fell behind first (lowest step, then oldest progress).
    let (r, clock, idle, bound) = job
        .ranks
        .iter()
        .filter(|r| r.exit.is_none())
        .filter_map(|r| Some((r, clocks.get(&r.rank)?)))
        // A rank past its last step is saving and exiting, not stepping.
        .filter(|(_, clock)| total == 0 || clock.step < total)
        .map(|(r, clock)| {
            (
                r,
                clock,
                now.saturating_sub(clock.at_ms),
                clock.bound_ms(&job.spec.hang),
            )
        })
        .filter(|(_, _, idle, bound)| idle > bound)
        .min_by_key(|(r, clock, _, _)| {
            (suspicion(clock.process), clock.step, clock.at_ms, r.rank)
        })?;
    Some(format!(
        "rank {} on {} hung{}: no step progress for {:.1} s after step {} (bound {:.1} s)",
        r.rank,
        r.worker,
        process_note(clock.process),
        idle as f64 / 1000.0,
        clock.step,
        bound as f64 / 1000.0
    ))
}

/// How likely a stalled rank's process state makes it the cause: stopped, then busy or in I/O,
/// then anything else (sleeping ranks usually wait for a peer).
fn suspicion(process: Option<char>) -> u8 {
    match process {
        Some('T' | 't') => 0,
        Some('R' | 'D') => 1,
        _ => 2,
    }
}

/// The hang message's note on the named rank's process state.
fn process_note(process: Option<char>) -> &'static str {
    match process {
        Some('T' | 't') => " (its process is stopped)",
        Some('R') => " (its process is busy while its peers wait)",
        Some('D') => " (its process is in uninterruptible I/O)",
        Some('Z') => " (its process has exited)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;

    /// Two ranks step every 100 ms, then stop: hung once the floor (3 s) passes, not before; the
    /// generation restarts and every worker is told to stop.
    #[test]
    fn hang_after_min_secs_restarts_generation() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=20 {
            for rank in 0..2 {
                progress(&mut s, &job, rank, step, step * 100);
            }
        }
        s.apply(2_000 + 3_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        let a = s.apply(2_000 + 3_001, Event::Tick).unwrap();
        let rec = s.job(&job).unwrap();
        assert_eq!((rec.state, rec.restarts), (JobState::Restarting, 1));
        assert!(rec.message.contains("hung"), "{}", rec.message);
        let stops = sends(&a.actions)
            .iter()
            .filter(|(_, c)| matches!(c, Command::Stop { .. }))
            .count();
        assert_eq!(stops, 2);
    }

    /// Slow steps raise the bound to p99_factor x p99: 2 s steps with factor 3 allow 6 s.
    #[test]
    fn hang_bound_follows_p99_step_time() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=10 {
            for rank in 0..2 {
                progress(&mut s, &job, rank, step, step * 2_000);
            }
        }
        s.apply(20_000 + 5_900, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        s.apply(20_000 + 6_001, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Restarting);
    }

    /// Only one rank stalls while the other keeps reporting: that rank is named as hung.
    #[test]
    fn hang_is_per_rank() {
        let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
        for step in 1..=60 {
            progress(&mut s, &job, 0, step, step * 100);
            if step <= 10 {
                progress(&mut s, &job, 1, step, step * 100);
            }
            s.apply(step * 100, Event::Tick).unwrap();
        }
        let rec = s.job(&job).unwrap();
        assert_eq!(rec.state, JobState::Restarting);
        assert!(rec.message.contains("rank 1 on b hung"), "{}", rec.message);
    }

    /// Before its first step a rank gets `startup_secs`; a rank done with its steps is never hung.
    #[test]
    fn hang_startup_bound_and_finished_ranks() {
        let mut s = Scheduler::new(1_000_000);
        register(&mut s, "a", 1);
        register(&mut s, "b", 1);
        let mut sp = hang_spec(3.0, 3.0);
        sp.steps = Some(5);
        let job = submit(&mut s, sp);
        ready_all(&mut s, &job);
        s.apply(19_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);
        for rank in 0..2 {
            progress(&mut s, &job, rank, 5, 19_500);
        }
        // Both are past the last step (saving, exiting): no bound applies.
        s.apply(100_000, Event::Tick).unwrap();
        assert_eq!(s.job(&job).unwrap().state, JobState::Running);

        let job2 = {
            exit_all(&mut s, &job, 0);
            submit(&mut s, hang_spec(3.0, 3.0))
        };
        ready_all(&mut s, &job2);
        s.apply(200_000, Event::Tick).unwrap();
        let rec = s.job(&job2).unwrap();
        assert_eq!(rec.state, JobState::Restarting);
        assert!(rec.message.contains("after step 0"), "{}", rec.message);
    }

    /// Of two ranks stalled at the same step, the one whose worker reports its process stopped is
    /// named, with that state; without process states the lowest rank is.
    #[test]
    fn hang_names_the_stopped_process() {
        for stopped in [None, Some(1u32)] {
            let (mut s, job) = running_on_a_and_b(hang_spec(3.0, 3.0));
            for step in 1..=20 {
                for rank in 0..2 {
                    progress(&mut s, &job, rank, step, step * 100);
                }
            }
            let rec = s.job(&job).unwrap().clone();
            for r in &rec.ranks {
                let state = if Some(r.rank) == stopped { 'T' } else { 'S' };
                s.apply(
                    2_500,
                    Event::Heartbeat {
                        worker: r.worker.clone(),
                        draining: false,
                        running: vec![RunningGeneration {
                            job: job.clone(),
                            generation: rec.generation,
                            processes: vec![(r.rank, state)],
                        }],
                    },
                )
                .unwrap();
            }
            s.apply(6_000, Event::Tick).unwrap();
            let message = &s.job(&job).unwrap().message;
            match stopped {
                Some(rank) => assert!(
                    message.contains(&format!("rank {rank} on b hung (its process is stopped)")),
                    "{message}"
                ),
                None => assert!(message.contains("rank 0 on a hung:"), "{message}"),
            }
        }
    }
}
