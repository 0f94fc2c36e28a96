//! `xvlm-worker bench-allreduce`: N local ranks (threads, each with its own ring sockets, channels and
//! segment mapping, as separate processes would have) all-reduce an M MiB float32 buffer repeatedly;
//! reports the median time, algbw and busbw. With `--rank R --peers A,B,..` it runs one rank of a TCP
//! ring whose ranks run wherever the addresses say (one per host, or per network namespace).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};

use crate::comm::ring::{local_ring_with, RingCollective, Transport};

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
        .map(|comm| std::thread::spawn(move || time_rank(&comm, n, iters)))
        .collect();
    let mut per_rank = Vec::new();
    for (rank, h) in handles.into_iter().enumerate() {
        per_rank.push(h.join().map_err(|_| CollectiveError::Failed {
            op: "bench",
            rank,
            reason: "thread panicked".into(),
        })??);
    }
    Ok(summarize(transport, world, n * 4, iters, &per_rank))
}

/// One rank of a TCP ring across `peers` (`host:port` per rank, this rank's own at `rank`, where it
/// listens): the same measurement as [`run`], every rank learning every rank's times. Each process
/// of the ring runs this with its own `rank`; all must start within `connect_timeout`.
pub fn run_rank(
    rank: usize,
    peers: &[String],
    mib: usize,
    iters: usize,
    connect_timeout: Duration,
) -> Result<BenchResult, CollectiveError> {
    let fail = |reason: String| CollectiveError::Failed {
        op: "bench",
        rank,
        reason,
    };
    let own = peers
        .get(rank)
        .ok_or_else(|| fail(format!("rank {rank} of {} peers", peers.len())))?;
    let listener =
        TcpListener::bind(own.as_str()).map_err(|e| fail(format!("listen on {own}: {e}")))?;
    let comm = RingCollective::connect_with(
        rank,
        Some(listener),
        peers,
        7,
        b"bench ring",
        connect_timeout,
        Transport::Tcp,
    )?;
    let n = (mib << 20) / 4;
    let times = time_rank(&comm, n, iters)?;
    // Every rank's times, so the slowest rank per iteration is known (as in [`run`]).
    let gathered = comm.all_gather(&Tensor::from_slice(&times))?;
    let per_rank: Vec<Vec<f64>> = gathered
        .iter()
        .map(|t| Vec::<f64>::try_from(t).map_err(|e| fail(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(summarize("tcp", peers.len(), n * 4, iters, &per_rank))
}

/// One rank's part: checks the first all-reduce's sum (untimed), then times `iters` all-reduces of
/// `n` floats, each after a barrier.
fn time_rank(comm: &RingCollective, n: usize, iters: usize) -> Result<Vec<f64>, CollectiveError> {
    let (rank, world) = (comm.rank(), comm.world_size());
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
}

/// The median over iterations of the slowest rank's time.
fn summarize(
    transport: &'static str,
    world: usize,
    bytes: usize,
    iters: usize,
    per_rank: &[Vec<f64>],
) -> BenchResult {
    let mut slowest: Vec<f64> = (0..iters)
        .map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    slowest.sort_by(f64::total_cmp);
    BenchResult {
        transport,
        world,
        bytes,
        iters,
        median_s: slowest.get(iters / 2).copied().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks started separately on their own addresses (threads here, processes on hosts in
    /// scripts/bench_allreduce_netns.sh) form one ring, check the sum and agree on one result: the
    /// median of the slowest rank's times, which every rank learns.
    #[test]
    fn ranks_on_separate_addresses_measure_together() {
        let peers: Vec<String> = (0..3)
            .map(|_| {
                let free = TcpListener::bind("127.0.0.1:0").expect("free port");
                free.local_addr().expect("address").to_string()
            })
            .collect();
        let ranks: Vec<_> = (0..3)
            .map(|rank| {
                let peers = peers.clone();
                std::thread::spawn(move || run_rank(rank, &peers, 1, 3, Duration::from_secs(30)))
            })
            .collect();
        let results: Vec<BenchResult> = ranks
            .into_iter()
            .map(|h| h.join().expect("rank thread").expect("bench rank"))
            .collect();
        for r in &results {
            assert_eq!(
                (r.transport, r.world, r.bytes, r.iters),
                ("tcp", 3, 1 << 20, 3)
            );
            assert!(r.median_s > 0.0);
            assert_eq!(r.median_s.to_bits(), results[0].median_s.to_bits());
        }
    }
}
