//! `xvlm-worker bench-allreduce`: N local ranks (threads, each with its own ring sockets, channels and
//! segment mapping, as separate processes would have) all-reduce an M MiB float32 buffer repeatedly;
//! reports the median time, algbw and busbw.

use std::time::Instant;

use tch::{Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};

use crate::comm::ring::{local_ring_with, Transport};

/// Benchmark outcome.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// `segment` (shared segment), `shm` (ring over shared-memory channels) or `tcp`.
    pub transport: &'static str,
    /// Ranks.
    pub world: usize,
    /// Buffer size in bytes.
    pub bytes: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Median seconds per all-reduce (slowest rank per iteration).
    pub median_s: f64,
}

impl BenchResult {
    /// Buffer bytes / time, GB/s (1e9).
    pub fn algbw(&self) -> f64 {
        self.bytes as f64 / self.median_s / 1e9
    }

    /// algbw x 2(N-1)/N: the per-link traffic of a ring, comparable across world sizes.
    pub fn busbw(&self) -> f64 {
        self.algbw() * 2.0 * (self.world as f64 - 1.0) / self.world as f64
    }
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "allreduce transport={} world={} size={}MiB iters={} median={:.2}ms algbw={:.3}GB/s busbw={:.3}GB/s",
            self.transport,
            self.world,
            self.bytes >> 20,
            self.iters,
            self.median_s * 1e3,
            self.algbw(),
            self.busbw()
        )
    }
}

/// Runs the benchmark (`allow_shm`: shared memory as `XVLM_RING_TRANSPORT` allows, else TCP only); the
/// first all-reduce is checked for the right sum and not timed.
pub fn run(
    world: usize,
    mib: usize,
    iters: usize,
    allow_shm: bool,
) -> Result<BenchResult, CollectiveError> {
    let comms = local_ring_with(
        world,
        if allow_shm {
            Transport::from_env()
        } else {
            Transport::Tcp
        },
    )?;
    let transport = if comms.iter().any(|c| c.uses_local_group()) {
        "segment"
    } else if comms.iter().any(|c| c.uses_shared_memory().0) {
        "shm"
    } else {
        "tcp"
    };
    let n = (mib << 20) / 4;
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || -> Result<Vec<f64>, CollectiveError> {
                let rank = comm.rank();
                let mut t = Tensor::full(
                    [n as i64],
                    (rank + 1) as f64,
                    (Kind::Float, tch::Device::Cpu),
                );
                comm.all_reduce_sum(&mut t)?;
                let expect = (world * (world + 1) / 2) as f64;
                let got = t.double_value(&[(n as i64 - 1).max(0)]);
                if got != expect {
                    return Err(CollectiveError::Failed {
                        op: "bench",
                        rank,
                        reason: format!("sum {got}, expected {expect}"),
                    });
                }
                let mut times = Vec::with_capacity(iters);
                for _ in 0..iters {
                    comm.barrier()?;
                    let start = Instant::now();
                    comm.all_reduce_sum(&mut t)?;
                    times.push(start.elapsed().as_secs_f64());
                }
                Ok(times)
            })
        })
        .collect();
    let mut per_rank = Vec::new();
    for (rank, h) in handles.into_iter().enumerate() {
        per_rank.push(h.join().map_err(|_| CollectiveError::Failed {
            op: "bench",
            rank,
            reason: "thread panicked".into(),
        })??);
    }
    let mut slowest: Vec<f64> = (0..iters)
        .map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    slowest.sort_by(f64::total_cmp);
    Ok(BenchResult {
        transport,
        world,
        bytes: n * 4,
        iters,
        median_s: slowest.get(iters / 2).copied().unwrap_or(f64::NAN),
    })
}
