//! A collective that measures its own all-reduce time: the trainer wraps its backend in
//! [`TimedCollective`] and reads [`TimedCollective::take_all_reduce`] around each step, so the step's
//! progress line carries the wall time its all-reduces took (the gradient buckets, the losses'
//! average), measured where the work is done rather than estimated.
//!
//! What is measured is the wall time of the calls. On the CPU ring that is the reduction itself.
//! On CUDA the NCCL backend's calls return once the reduction is *enqueued* on the device stream
//! ([`crate::comm::nccl`]), so there it is the enqueue time: the reduction runs on the stream and
//! shows in the step time (timing it would need CUDA events, which this does not add).

use std::cell::Cell;
use std::time::{Duration, Instant};

use tch::Tensor;
use xvlm_model::collective::{Collective, CollectiveError};

/// A collective that adds up the wall time of its all-reduces.
pub struct TimedCollective {
    inner: Box<dyn Collective>,
    /// All-reduce time since the last [`TimedCollective::take_all_reduce`]. A `Cell`: the trainer is
    /// one thread, and `Collective` is `Send` only.
    all_reduce: Cell<Duration>,
}

impl TimedCollective {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn Collective>) -> Self {
        TimedCollective {
            inner,
            all_reduce: Cell::new(Duration::ZERO),
        }
    }

    /// All-reduce time since the previous call (or since creation), and starts counting afresh.
    pub fn take_all_reduce(&self) -> Duration {
        self.all_reduce.replace(Duration::ZERO)
    }
}

impl Collective for TimedCollective {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let started = Instant::now();
        let result = self.inner.all_reduce_sum(tensor);
        self.all_reduce
            .set(self.all_reduce.get() + started.elapsed());
        result
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        self.inner.all_gather(tensor)
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        self.inner.broadcast(tensor, root)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend whose all-reduce takes 20 ms and whose other collectives are instant.
    struct Slow;

    impl Collective for Slow {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _tensor: &mut Tensor) -> Result<(), CollectiveError> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        }
        fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(vec![tensor.shallow_clone()])
        }
        fn broadcast(&self, _tensor: &mut Tensor, _root: usize) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn barrier(&self) -> Result<(), CollectiveError> {
            Ok(())
        }
    }

    /// Only all-reduces count, each one's whole wall time, and taking the total starts afresh.
    #[test]
    fn counts_all_reduce_time_and_resets() {
        let comm = TimedCollective::new(Box::new(Slow));
        let mut t = Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        comm.all_reduce_sum(&mut t).unwrap();
        comm.all_reduce_sum(&mut t).unwrap();
        comm.all_gather(&t).unwrap();
        let spent = comm.take_all_reduce();
        assert!(
            spent >= Duration::from_millis(40) && spent < Duration::from_millis(60),
            "{spent:?}"
        );
        assert_eq!(comm.take_all_reduce(), Duration::ZERO);
        assert_eq!((comm.rank(), comm.world_size()), (0, 2));
    }
}
