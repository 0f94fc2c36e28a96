//! Elastic global batch: a job declared for up to 2 workers keeps its global batch (local batch x 2)
//! when it runs on 1 rank, by accumulating 2 micro-batches. 1 rank x accumulation 2 must end with the
//! same parameters and losses as 2 ranks x 1 micro-batch on the same samples. Tolerance 1e-5 (float32;
//! only the summation order differs).

mod common;

use common::max_diff;
use tch::{Device, Tensor};
use xvlm_model::collective::{Collective, SingleProcess};
use xvlm_proto::spec::JobSpec;
use xvlm_worker::comm::ring::local_ring;
use xvlm_worker::trainer::smoke::SmokeTask;
use xvlm_worker::trainer::task::{TaskContext, TrainTask};

const STEPS: u64 = 8;

fn spec(max_workers: u32) -> JobSpec {
    JobSpec::from_json(&format!(
        r#"{{"name":"acc","task":"smoke","steps":{STEPS},"seed":9,"workers":{{"min":1,"max":{max_workers}}},"smoke":{{"batch_size":4,"lr":0.2}}}}"#
    ))
    .unwrap()
}

fn train(spec: &JobSpec, comm: &dyn Collective) -> (Vec<(String, Tensor)>, Vec<f64>, usize) {
    tch::set_num_threads(1);
    let ctx = TaskContext {
        spec,
        rank: comm.rank(),
        world: comm.world_size(),
        device: Device::Cpu,
        shards: &[],
        output: "file:///nonexistent",
        comm,
    };
    let accumulation = ctx.batch_plan(4).accumulation();
    let mut task = SmokeTask::new(&ctx).unwrap();
    let losses = (0..task.total_steps())
        .map(|s| task.step(s, comm).unwrap().losses[0].1)
        .collect();
    (task.state(), losses, accumulation)
}

#[test]
fn one_rank_accumulating_two_matches_two_ranks() {
    let (single, single_losses, accumulation) = train(&spec(2), &SingleProcess);
    assert_eq!(
        accumulation, 2,
        "1 of max 2 ranks accumulates 2 micro-batches"
    );
    let comms = local_ring(2).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|c| std::thread::spawn(move || train(&spec(2), &c)))
        .collect();
    let ranks: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(ranks[0].2, 1, "2 of max 2 ranks: no accumulation");
    assert!(max_diff(&ranks[0].0, &ranks[1].0) == 0.0, "ranks diverged");
    let diff = max_diff(&ranks[0].0, &single);
    eprintln!(
        "1 rank x accumulation 2 vs 2 ranks after {STEPS} steps: max |param diff| = {diff:e}"
    );
    assert!(diff < 1e-5, "max parameter difference {diff}");
    for (a, b) in ranks[0].1.iter().zip(&single_losses) {
        assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
    }
    // Meaningful: without accumulation (a job declared for 1 worker) one rank sees only half the
    // global batch and ends elsewhere.
    let (half, _, accumulation) = train(&spec(1), &SingleProcess);
    assert_eq!(accumulation, 1);
    let apart = max_diff(&half, &single);
    assert!(apart > 1e-4, "half batch matched the full batch ({apart})");
}
