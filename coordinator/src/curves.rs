//! Each job's curve for the dashboard: rank 0's losses and lr over the steps, and its evaluations,
//! from the same progress reports as the TensorBoard files. Held in memory and bounded: past
//! [`MAX_POINTS`] points the curve keeps every other one and records only every `stride`-th step
//! from then on (the newest step is always shown). A generation that resumed from an older
//! checkpoint drops the points of the steps it runs again. A restarted coordinator restores each
//! job's curve from its TensorBoard files ([`Curves::restore`]), which keep the whole history.

use std::collections::HashMap;
use std::sync::Mutex;

use xvlm_proto::v1;

/// Points kept per job.
pub const MAX_POINTS: usize = 2048;

/// One reported step.
#[derive(Clone, Debug, PartialEq)]
pub struct CurvePoint {
    /// Steps done.
    pub step: u64,
    /// Named losses.
    pub losses: Vec<(String, f64)>,
    /// Learning rate (the first param group's).
    pub lr: f64,
}

/// Evaluation results reported at a step.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaluationPoint {
    /// The step.
    pub step: u64,
    /// `split.metric` names and values, in the trainer's order.
    pub metrics: Vec<(String, f64)>,
}

/// One job's curve.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobCurve {
    /// Points in step order.
    pub points: Vec<CurvePoint>,
    /// Evaluations in step order.
    pub evaluations: Vec<EvaluationPoint>,
    /// Steps between recorded points (1 until the curve first filled up).
    pub stride: u64,
    generation: u64,
}

impl JobCurve {
    fn add(&mut self, p: &v1::RankProgress) {
        if p.generation != self.generation {
            self.generation = p.generation;
            self.points.retain(|q| q.step < p.step);
            self.evaluations.retain(|e| e.step < p.step);
        }
        self.stride = self.stride.max(1);
        if !p.metrics.is_empty() {
            self.evaluations.push(EvaluationPoint {
                step: p.step,
                metrics: p
                    .metrics
                    .iter()
                    .map(|m| (m.name.clone(), m.value))
                    .collect(),
            });
        }
        if p.losses.is_empty() {
            return;
        }
        let point = CurvePoint {
            step: p.step,
            losses: p.losses.iter().map(|l| (l.name.clone(), l.value)).collect(),
            lr: p.lrs.first().copied().unwrap_or(p.lr),
        };
        // The newest point stands in for the steps since the last kept one until the next one
        // on the stride replaces it.
        if let Some(last) = self.points.last() {
            if !last.step.is_multiple_of(self.stride) && self.points.len() > 1 {
                self.points.pop();
            }
        }
        self.points.push(point);
        self.thin();
    }

    /// Past [`MAX_POINTS`], doubles the stride and keeps the points on it (and the first and newest).
    fn thin(&mut self) {
        while self.points.len() > MAX_POINTS {
            self.stride *= 2;
            let stride = self.stride;
            let newest = self.points.len() - 1;
            let mut i = 0;
            self.points.retain(|q| {
                let keep = q.step.is_multiple_of(stride) || i == newest || i == 0;
                i += 1;
                keep
            });
        }
    }
}

/// Every job's curve.
#[derive(Default)]
pub struct Curves {
    jobs: Mutex<HashMap<String, JobCurve>>,
}

impl Curves {
    /// Adds rank 0's report of the job's running generation.
    pub fn add(&self, p: &v1::RankProgress) {
        self.lock().entry(p.job_id.clone()).or_default().add(p);
    }

    /// Puts the curve read from the job's files (its reports in order) before what was reported
    /// since this coordinator started: the history's points from the first live step on are
    /// replaced by the live ones.
    pub fn restore(&self, job: &str, history: Vec<v1::RankProgress>) {
        let mut restored = JobCurve::default();
        for p in &history {
            restored.add(p);
        }
        let mut jobs = self.lock();
        let live = jobs.remove(job).unwrap_or_default();
        if let Some(first) = live.points.first().map(|p| p.step) {
            restored.points.retain(|p| p.step < first);
            restored.evaluations.retain(|e| e.step < first);
        }
        restored.points.extend(live.points);
        restored.evaluations.extend(live.evaluations);
        restored.evaluations.sort_by_key(|e| e.step);
        restored.stride = restored.stride.max(live.stride).max(1);
        // The live generation carries on; with no live report yet, the next one's generation (they
        // start at 1) differs from 0 and drops the restored steps it runs again.
        restored.generation = live.generation;
        restored.thin();
        jobs.insert(job.to_string(), restored);
    }

    /// A copy of one job's curve (empty when it reported nothing yet).
    pub fn of(&self, job: &str) -> JobCurve {
        self.lock().get(job).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobCurve>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(generation: u64, step: u64) -> v1::RankProgress {
        v1::RankProgress {
            job_id: "job-0001".into(),
            generation,
            step,
            losses: vec![v1::Loss {
                name: "itc".into(),
                value: step as f64,
            }],
            lr: 0.1,
            ..Default::default()
        }
    }

    fn steps(c: &JobCurve) -> Vec<u64> {
        c.points.iter().map(|p| p.step).collect()
    }

    /// Every step is a point; a resumed generation replaces the steps it runs again; evaluations
    /// are kept with their step.
    #[test]
    fn points_follow_the_reports_across_a_resume() {
        let curves = Curves::default();
        for step in 1..=6 {
            curves.add(&report(1, step));
        }
        let mut eval = report(1, 6);
        eval.losses.clear();
        eval.metrics = vec![v1::Metric {
            name: "val.r_mean".into(),
            value: 40.0,
        }];
        curves.add(&eval);
        for step in 5..=8 {
            curves.add(&report(2, step));
        }
        let c = curves.of("job-0001");
        assert_eq!(steps(&c), (1..=8).collect::<Vec<_>>());
        assert!(
            c.evaluations.is_empty(),
            "step 6's evaluation was run again"
        );
        assert!(curves.of("job-0002").points.is_empty());
    }

    /// A long run keeps at most MAX_POINTS points, evenly strided, the first and newest included.
    #[test]
    fn long_runs_are_thinned_evenly() {
        let curves = Curves::default();
        let total = 5 * MAX_POINTS as u64 + 3;
        for step in 1..=total {
            curves.add(&report(1, step));
        }
        let c = curves.of("job-0001");
        assert!(c.points.len() <= MAX_POINTS + 1, "{}", c.points.len());
        assert!(c.points.len() > MAX_POINTS / 4, "{}", c.points.len());
        assert_eq!(c.points.first().map(|p| p.step), Some(1));
        assert_eq!(c.points.last().map(|p| p.step), Some(total));
        let inner = &c.points[1..c.points.len() - 1];
        assert!(
            inner.iter().all(|p| p.step.is_multiple_of(c.stride)),
            "stride {}",
            c.stride
        );
        assert!(inner.windows(2).all(|w| w[1].step - w[0].step == c.stride));
    }
}
