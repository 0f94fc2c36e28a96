//! The linear warm-up/decay `LambdaLR` of scheduler.py:create_scheduler.

use super::{OptimError, SchedulerConfig, Warmup};

/// Factor of every group's initial lr at a scheduler step: `step / warmup` during warm-up, then linear
/// decay to 0 at `total`. Step 0 gives factor 0 when `warmup > 0`: the first update uses lr 0 (§8.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearSchedule {
    /// Warm-up steps.
    pub warmup: u64,
    /// Total training steps.
    pub total: u64,
}

impl LinearSchedule {
    /// The schedule of `cfg` for `step_per_epoch` iterations per epoch (official `create_scheduler`).
    pub fn from_config(cfg: &SchedulerConfig, step_per_epoch: u64) -> Result<Self, OptimError> {
        if cfg.sched != "linear" {
            return Err(OptimError::UnknownSchedule(cfg.sched.clone()));
        }
        let total = match (cfg.num_training_steps, cfg.epochs) {
            (Some(total), _) => total,
            (None, Some(epochs)) => epochs * step_per_epoch,
            (None, None) => {
                return Err(OptimError::BadSchedule(
                    "neither num_training_steps nor epochs is set".into(),
                ))
            }
        };
        let warmup = match cfg.num_warmup_steps {
            Warmup::Steps(steps) => steps,
            Warmup::Fraction(f) if (0.0..1.0).contains(&f) => (total as f64 * f) as u64,
            Warmup::Fraction(f) => return Err(OptimError::BadWarmup(f)),
        };
        Ok(Self { warmup, total })
    }

    /// The lr factor at scheduler step `step` (python floats, as `lr_lambda` computes it).
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return step as f64 / self.warmup.max(1) as f64;
        }
        let remaining = self.total as f64 - step as f64;
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        (remaining / span).max(0.0)
    }
}

/// A [`LinearSchedule`] with its position: the number of `step()` calls so far (LambdaLR `last_epoch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduler {
    /// The schedule.
    pub schedule: LinearSchedule,
    /// Scheduler steps taken; the current factor is `schedule.factor(step)`.
    pub step: u64,
}

impl Scheduler {
    /// A scheduler at step 0.
    pub fn new(schedule: LinearSchedule) -> Self {
        Self { schedule, step: 0 }
    }

    /// The factor for the optimizer steps taken now.
    pub fn factor(&self) -> f64 {
        self.schedule.factor(self.step)
    }

    /// Advances one step (once per training iteration, after its last optimizer step).
    pub fn advance(&mut self) {
        self.step += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(warmup: Warmup, epochs: Option<u64>, total: Option<u64>) -> SchedulerConfig {
        SchedulerConfig {
            sched: "linear".into(),
            lr: None,
            epochs,
            num_warmup_steps: warmup,
            num_training_steps: total,
        }
    }

    #[test]
    fn fractional_warmup_truncates_like_python_int() {
        let s =
            LinearSchedule::from_config(&cfg(Warmup::Fraction(0.1), Some(3), None), 333).unwrap();
        assert_eq!(
            s,
            LinearSchedule {
                warmup: 99,
                total: 999
            }
        );
        let err = LinearSchedule::from_config(&cfg(Warmup::Fraction(1.5), Some(3), None), 10);
        assert!(matches!(err, Err(OptimError::BadWarmup(_))));
    }

    #[test]
    fn explicit_total_wins_over_epochs() {
        let s =
            LinearSchedule::from_config(&cfg(Warmup::Steps(5), Some(3), Some(40)), 100).unwrap();
        assert_eq!(s.total, 40);
    }
}
