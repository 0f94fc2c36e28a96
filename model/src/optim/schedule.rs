//! The linear warm-up/decay `LambdaLR` of scheduler.py:create_scheduler.

use super::OptimError;
use crate::config::SchedulerConfig;

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
        let whole = |v: f64, key: &str| {
            if v >= 0.0 && v.fract() == 0.0 {
                Ok(v as u64)
            } else {
                Err(OptimError::BadSchedule(format!(
                    "{key} = {v} is not a whole number"
                )))
            }
        };
        let total = match cfg.num_training_steps {
            Some(total) => whole(total, "num_training_steps")?,
            None => whole(cfg.epochs, "epochs")? * step_per_epoch,
        };
        // scheduler.py: an int is a step count, a float in [0, 1) a fraction (int(total * f)). YAML
        // numbers arrive as f64 here, so a whole number counts as a step count.
        let w = cfg.num_warmup_steps;
        let warmup = if w >= 0.0 && w.fract() == 0.0 {
            w as u64
        } else if (0.0..1.0).contains(&w) {
            (total as f64 * w) as u64
        } else {
            return Err(OptimError::BadWarmup(w));
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

    fn cfg(warmup: f64, epochs: f64, total: Option<f64>) -> SchedulerConfig {
        SchedulerConfig {
            sched: "linear".into(),
            lr: 1e-4,
            epochs,
            num_warmup_steps: warmup,
            num_training_steps: total,
        }
    }

    #[test]
    fn fractional_warmup_truncates_like_python_int() {
        let s = LinearSchedule::from_config(&cfg(0.1, 3.0, None), 333).unwrap();
        assert_eq!(
            s,
            LinearSchedule {
                warmup: 99,
                total: 999
            }
        );
        let err = LinearSchedule::from_config(&cfg(1.5, 3.0, None), 10);
        assert!(matches!(err, Err(OptimError::BadWarmup(_))));
        let s = LinearSchedule::from_config(&cfg(2500.0, 41.0, None), 4995).unwrap();
        assert_eq!(
            s,
            LinearSchedule {
                warmup: 2500,
                total: 204_795
            }
        );
    }

    #[test]
    fn explicit_total_wins_over_epochs() {
        let s = LinearSchedule::from_config(&cfg(5.0, 3.0, Some(40.0)), 100).unwrap();
        assert_eq!(s.total, 40);
        assert!(LinearSchedule::from_config(&cfg(5.0, 2.5, None), 100).is_err());
    }
}
