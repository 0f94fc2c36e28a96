//! The ring collective, over TCP, over same-host shared-memory channels and with the all-local shared
//! segment, gives the exact sums, gathers and broadcasts for world sizes 1 to 4, for buffers smaller
//! than the world, not divisible by it, and larger than one pipeline chunk, one shared-memory buffer or
//! many segment slices.

use tch::{Kind, Tensor};
use xvlm_model::collective::Collective;
use xvlm_worker::comm::ring::{local_ring_with, RingCollective, Transport};

const TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::ShmRing, Transport::Auto];

/// Runs `f` on every rank of a loopback ring, once per transport; results are the ranks' in
/// [`TRANSPORTS`] order.
fn on_ring<T: Send + 'static>(
    world: usize,
    f: impl Fn(RingCollective) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    TRANSPORTS
        .iter()
        .flat_map(|t| on_ring_with(world, *t, f))
        .collect()
}

fn on_ring_with<T: Send + 'static>(
    world: usize,
    transport: Transport,
    f: impl Fn(RingCollective) -> T + Send + Sync + Copy + 'static,
) -> Vec<T> {
    // Small shared-memory buffers and segment slices, so every large message wraps around the ring
    // buffer and the segment's slots many times.
    std::env::set_var("XVLM_RING_SHM_BYTES", "1048576");
    std::env::set_var("XVLM_SHM_SLICE_BYTES", "65536");
    let comms = local_ring_with(world, transport).expect("ring connects");
    if world > 1 {
        let shm = transport != Transport::Tcp;
        assert!(
            comms.iter().all(|c| c.uses_shared_memory() == (shm, shm)),
            "shared-memory channels with {transport:?}"
        );
        assert!(
            comms
                .iter()
                .all(|c| c.uses_local_group() == (transport == Transport::Auto)),
            "shared segment with {transport:?}"
        );
    }
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| std::thread::spawn(move || f(c)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

fn input(rank: usize, n: i64, kind: Kind) -> Tensor {
    // Values stay small so float sums are exact whatever the summation order.
    (Tensor::arange(n, (Kind::Double, tch::Device::Cpu)).remainder(1013) * (rank as f64 + 1.0)
        + rank as f64)
        .to_kind(kind)
}

/// all_reduce_sum equals the sum of every rank's input, in f32, f64 and i64, and via the converting
/// path for f16 and non-contiguous tensors.
#[test]
fn all_reduce_sums_exactly() {
    for world in 1..=4usize {
        for n in [1i64, 3, 1001, (3 << 20) + 7] {
            for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::Half] {
                let n = if matches!(kind, Kind::Half | Kind::Int64) {
                    n.min(1001)
                } else {
                    n
                };
                let results = on_ring(world, move |c| {
                    let mut t = input(c.rank(), n, kind);
                    c.all_reduce_sum(&mut t).unwrap();
                    t
                });
                let expect = (0..world)
                    .map(|r| input(r, n, kind).to_kind(Kind::Double))
                    .fold(
                        Tensor::zeros([n], (Kind::Double, tch::Device::Cpu)),
                        |a, b| a + b,
                    );
                assert_eq!(results.len(), TRANSPORTS.len() * world);
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got.kind(), kind);
                    let diff = (got.to_kind(Kind::Double) - &expect)
                        .abs()
                        .max()
                        .double_value(&[]);
                    let tol = if kind == Kind::Half { 4.0 } else { 1e-3 };
                    assert!(
                        diff <= tol,
                        "world {world} n {n} {kind:?} rank {rank}: max diff {diff}"
                    );
                }
            }
        }
    }
    // A transposed (non-contiguous) view is reduced through a copy and written back.
    let results = on_ring(2, |c| {
        let mut t = input(c.rank(), 12, Kind::Float)
            .view([3, 4])
            .transpose(0, 1);
        c.all_reduce_sum(&mut t).unwrap();
        t.contiguous()
    });
    let expect = (input(0, 12, Kind::Float) + input(1, 12, Kind::Float))
        .view([3, 4])
        .transpose(0, 1);
    assert!(results[0].allclose(&expect, 0.0, 0.0, false));
}

/// all_gather returns every rank's tensor in rank order; broadcast copies the root's; barrier passes.
#[test]
fn gather_broadcast_barrier() {
    for world in 1..=4usize {
        let results = on_ring(world, move |c| {
            let rank = c.rank();
            let local = input(rank, 5, Kind::Float).view([5, 1]);
            let gathered = c.all_gather(&local).unwrap();
            let mut b = input(rank, 300_000, Kind::Float);
            c.broadcast(&mut b, world - 1).unwrap();
            c.barrier().unwrap();
            (gathered, b)
        });
        assert_eq!(results.len(), TRANSPORTS.len() * world);
        for (gathered, b) in &results {
            assert_eq!(gathered.len(), world);
            for (r, g) in gathered.iter().enumerate() {
                assert_eq!(g.size(), vec![5, 1]);
                assert!(
                    g.equal(&input(r, 5, Kind::Float).view([5, 1])),
                    "world {world} block {r}"
                );
            }
            assert!(
                b.equal(&input(world - 1, 300_000, Kind::Float)),
                "broadcast world {world}"
            );
        }
    }
}

/// Ranks that call different operations get an error instead of silently mixing data; with four
/// ranks where only the last one differs, its neighbours notice and the others fail instead of hanging.
#[test]
fn mismatched_calls_fail() {
    let results = on_ring(2, |c| {
        let mut t = Tensor::ones([10 + c.rank() as i64], (Kind::Float, tch::Device::Cpu));
        c.all_reduce_sum(&mut t).map_err(|e| e.to_string())
    });
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    let results = on_ring(4, |c| {
        let n = if c.rank() == 3 { 100_001 } else { 100_000 };
        let mut t = Tensor::ones([n], (Kind::Float, tch::Device::Cpu));
        c.all_reduce_sum(&mut t).map_err(|e| e.to_string())
    });
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
}

/// Consecutive all-reduces of different sizes and kinds through one segment stay in step (slot reuse
/// across calls), and every rank ends with the same exact sums.
#[test]
fn segment_back_to_back_calls() {
    for world in [2usize, 3, 4] {
        let results = on_ring_with(world, Transport::Auto, move |c| {
            let rank = c.rank();
            let mut outs = Vec::new();
            for (i, n) in [70_001i64, 1, 0, 16_384, 5, 200_003]
                .into_iter()
                .enumerate()
            {
                let kind = if i % 2 == 0 { Kind::Float } else { Kind::Int };
                let mut t = input(rank, n, kind);
                c.all_reduce_sum(&mut t).unwrap();
                outs.push(t);
            }
            c.barrier().unwrap();
            outs
        });
        for outs in &results {
            for (i, (got, n)) in outs
                .iter()
                .zip([70_001i64, 1, 0, 16_384, 5, 200_003])
                .enumerate()
            {
                let kind = if i % 2 == 0 { Kind::Float } else { Kind::Int };
                let expect = (0..world)
                    .map(|r| input(r, n, Kind::Double))
                    .fold(
                        Tensor::zeros([n], (Kind::Double, tch::Device::Cpu)),
                        |a, b| a + b,
                    )
                    .to_kind(kind);
                assert!(got.equal(&expect), "world {world} call {i} n {n}");
            }
        }
    }
}

/// Ranks of one generation whose ring secrets differ (a stray or foreign process posing as a rank)
/// do not connect: each refuses the other's hello and fails naming the wrong secret, while the same
/// listeners with one secret connect.
#[test]
fn peer_with_wrong_ring_secret_is_refused() {
    let connect = |secrets: [&'static [u8]; 2]| {
        let listeners: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("addr").to_string())
            .collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let peers = peers.clone();
                std::thread::spawn(move || {
                    RingCollective::connect_with(
                        rank,
                        Some(l),
                        &peers,
                        3,
                        secrets[rank],
                        std::time::Duration::from_secs(2),
                        Transport::Tcp,
                    )
                    .map(|_| ())
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect::<Vec<_>>()
    };
    let refused = connect([b"generation-3", b"guessed"]);
    for r in &refused {
        let e = r.as_ref().expect_err("a wrong secret must not connect");
        assert!(e.contains("wrong ring secret"), "{e}");
    }
    assert!(connect([b"generation-3", b"generation-3"])
        .iter()
        .all(Result::is_ok));
}
