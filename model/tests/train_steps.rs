//! The official `Pretrain.train` loop, replayed: 5 iterations (region + image-text steps) of the tiny
//! model must reproduce the fixture's per-step losses, learning rates and grad norms (1e-5 relative),
//! the official param groups, and the final weights (1e-4 relative; attention key biases absolute).

use std::collections::HashMap;
use std::sync::{Arc, Barrier, Mutex};

use tch::nn::VarStore;
use tch::{Device, Tensor};
use xvlm_model::collective::{Collective, CollectiveError, SingleProcess};
use xvlm_model::config::TaskConfig;
use xvlm_model::loss::ReplaySampler;
use xvlm_model::optim::DynamicLossScaler;
use xvlm_model::parity::{load_case_weights, WeightsSource};
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
use xvlm_model::train::{
    run_train_steps_case, IterationLog, PretrainTrainer, StepKind, TrainSettings,
};

#[test]
fn pretrain_train_steps_fixture() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = xvlm_model::fixtures_dir().join("pretrain_train_steps");
    let rows = run_train_steps_case(&dir, WeightsSource::Safetensors).unwrap();
    let mut worst_final: (f64, String) = (0.0, String::new());
    let mut worst_key_bias: (f64, String) = (0.0, String::new());
    for row in &rows {
        if !row.name.starts_with("final.") {
            println!("{row}");
        } else if row.name.ends_with("(abs)") {
            if row.max_abs > worst_key_bias.0 {
                worst_key_bias = (row.max_abs, row.name.clone());
            }
        } else if row.max_rel > worst_final.0 {
            worst_final = (row.max_rel, row.name.clone());
        }
    }
    println!(
        "worst final weight (relative): {:.3e} {}",
        worst_final.0, worst_final.1
    );
    println!(
        "worst key bias (absolute): {:.3e} {}",
        worst_key_bias.0, worst_key_bias.1
    );
    println!("{} rows", rows.len());
    let failures: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed)
        .map(ToString::to_string)
        .collect();
    assert!(rows.len() > 200, "only {} rows", rows.len());
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// libtorch's global generator (dropout, drop-path) is process-wide: tests that train run one at a time
/// so that the seeds each iteration derives are not interleaved with another test's draws.
static SERIAL: Mutex<()> = Mutex::new(());

/// The fixture's task config and its (image-text, region) batches.
fn fixture() -> (TaskConfig, PretrainBatch, PretrainBatch) {
    let dir = xvlm_model::fixtures_dir().join("pretrain_train_steps");
    let task = TaskConfig::load(&dir.join("config.yaml")).unwrap();
    let batch: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("batch.safetensors"))
        .unwrap()
        .into_iter()
        .collect();
    let t = |n: &str| batch[n].shallow_clone();
    let make = |p: &str, region: bool| PretrainBatch {
        image: t(&format!("{p}.image")),
        text_ids: t(&format!("{p}.text_ids")),
        text_atts: t(&format!("{p}.text_atts")),
        text_ids_masked: t(&format!("{p}.text_ids_masked")),
        masked_pos: t(&format!("{p}.masked_pos")),
        masked_ids: t(&format!("{p}.masked_ids")),
        region: region.then(|| RegionInputs {
            idx_to_group_img: t(&format!("{p}.idx_to_group_img")),
            image_atts: t(&format!("{p}.image_atts")),
            target_bbox: t(&format!("{p}.target_bbox")),
            is_image: t(&format!("{p}.is_image")),
        }),
    };
    (task, make("general", false), make("region", true))
}

/// A model with the fixture's starting weights.
fn fixture_model(task: &TaskConfig) -> (VarStore, PretrainModel) {
    let dir = xvlm_model::fixtures_dir().join("pretrain_train_steps");
    let vs = VarStore::new(Device::Cpu);
    let model = PretrainModel::new(&vs.root(), task).unwrap();
    load_case_weights(
        &vs,
        &dir,
        WeightsSource::Safetensors,
        &model.core.tied_aliases(),
    )
    .unwrap();
    (vs, model)
}

/// One live iteration: a region step when the derived coin says so, then the image-text step.
fn iterate(
    trainer: &mut PretrainTrainer,
    general: &PretrainBatch,
    region: &PretrainBatch,
    collective: &dyn Collective,
) -> IterationLog {
    let due = trainer.region_step_due();
    let r = [region];
    trainer
        .run_iteration(due.then_some(&r[..]), &[general], collective)
        .unwrap()
}

/// Live iterations use only derived randomness (region coin, ITM negatives, dropout/drop-path seeds):
/// 2 iterations straight equal 1 iteration, a state export/restore into a fresh model, and 1 more,
/// bit for bit.
#[test]
fn resume_from_exported_state_is_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (task, general, region) = fixture();
    let (vs_a, model_a) = fixture_model(&task);
    let (vs_b, model_b) = fixture_model(&task);
    let mut a = PretrainTrainer::from_task(&model_a, &vs_a, &task, 1).unwrap();
    let logs_a: Vec<IterationLog> = (0..2)
        .map(|_| iterate(&mut a, &general, &region, &SingleProcess))
        .collect();
    assert!(
        logs_a.iter().all(|l| l.steps.len() == 2),
        "iter_perc 1.0 runs region steps"
    );

    let mut b = PretrainTrainer::from_task(&model_b, &vs_b, &task, 1).unwrap();
    iterate(&mut b, &general, &region, &SingleProcess);
    let state: HashMap<String, Tensor> = b.state_tensors().into_iter().collect();
    let (mut vs_c, model_c) = fixture_model(&task);
    vs_c.copy(&vs_b).unwrap();
    let mut c = PretrainTrainer::from_task(&model_c, &vs_c, &task, 1).unwrap();
    c.load_state_tensors(&state).unwrap();
    assert_eq!(c.iteration(), 1);
    let log_c = iterate(&mut c, &general, &region, &SingleProcess);
    assert_eq!(log_c, logs_a[1]);
    let (wa, wc) = (vs_a.variables(), vs_c.variables());
    for (name, ta) in &wa {
        assert!(ta.equal(&wc[name]), "{name} differs after resume");
    }
}

/// An in-process collective for `world` threads: every operation exchanges one tensor per rank through
/// shared slots between two barriers.
struct ThreadCollective {
    rank: usize,
    world: usize,
    shared: Arc<(Barrier, Mutex<Vec<Option<Tensor>>>)>,
}

impl ThreadCollective {
    fn group(world: usize) -> Vec<ThreadCollective> {
        let shared = Arc::new((
            Barrier::new(world),
            Mutex::new((0..world).map(|_| None).collect()),
        ));
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }

    fn exchange(&self, t: &Tensor) -> Vec<Tensor> {
        let (barrier, slots) = &*self.shared;
        slots.lock().unwrap()[self.rank] = Some(t.detach().copy());
        barrier.wait();
        let all = slots
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.as_ref().unwrap().copy())
            .collect();
        barrier.wait();
        all
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        let all = self.exchange(tensor);
        // Same summation order on every rank, so every rank gets bit-identical sums.
        let mut sum = all[0].copy();
        for t in &all[1..] {
            sum += t;
        }
        tensor.copy_(&sum);
        Ok(())
    }
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        Ok(self.exchange(tensor))
    }
    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        let all = self.exchange(tensor);
        tensor.copy_(&all[root]);
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.shared.0.wait();
        Ok(())
    }
}

/// Two ranks on different data (rank 1 sees mirrored images) apply the same averaged update: after two
/// iterations their weights are bit-identical, and differ from a single rank's.
#[test]
fn two_ranks_stay_in_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ranks: Vec<Vec<(String, Tensor)>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadCollective::group(2)
            .into_iter()
            .map(|collective| {
                s.spawn(move || {
                    let (task, mut general, mut region) = fixture();
                    if collective.rank() == 1 {
                        general.image = general.image.flip([3]);
                        region.image = region.image.flip([3]);
                    }
                    let (vs, model) = fixture_model(&task);
                    let mut trainer = PretrainTrainer::from_task(&model, &vs, &task, 2).unwrap();
                    for _ in 0..2 {
                        let log = iterate(&mut trainer, &general, &region, &collective);
                        assert_eq!(log.steps.len(), 2);
                    }
                    let mut w: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
                    w.sort_by(|a, b| a.0.cmp(&b.0));
                    w
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (task, general, region) = fixture();
    let (vs, model) = fixture_model(&task);
    let mut single = PretrainTrainer::from_task(&model, &vs, &task, 1).unwrap();
    for _ in 0..2 {
        iterate(&mut single, &general, &region, &SingleProcess);
    }
    let single = vs.variables();
    let mut differs_from_single = false;
    for ((name, w0), (_, w1)) in ranks[0].iter().zip(&ranks[1]) {
        assert!(w0.equal(w1), "{name} differs between ranks");
        differs_from_single |= !w0.equal(&single[name]);
    }
    assert!(
        differs_from_single,
        "averaging over a second rank changed nothing"
    );
}

/// Mixed-precision bookkeeping (here on CPU, where autocast is a no-op): scaling the loss by a power of
/// two and unscaling the gradients gives bit-identical steps; a scale that overflows the loss skips the
/// update (weights untouched, scale halved) without stopping training.
#[test]
fn loss_scaling_is_exact_and_overflow_skips_the_update() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (task, general, _) = fixture();
    let run = |mixed: bool, scale: Option<f64>| {
        let (vs, model) = fixture_model(&task);
        let trainer = PretrainTrainer::from_task(&model, &vs, &task, 1).unwrap();
        let settings = TrainSettings {
            dropout: false,
            mixed_precision: mixed,
            ..trainer.settings().clone()
        };
        let mut trainer = trainer.with_settings(settings);
        if let Some(scale) = scale {
            let mut scaler = DynamicLossScaler::official();
            scaler.scale = scale;
            trainer.set_scaler(scaler);
        }
        let mut logs = Vec::new();
        for k in 0..2 {
            let mut sampler = ReplaySampler::new(
                Tensor::from_slice(&[1i64, 0, 3, 2]),
                Tensor::from_slice(&[2i64, 3, 0, 1]),
            );
            let log = trainer
                .step(StepKind::General, &[&general], &SingleProcess, &mut sampler)
                .unwrap();
            logs.push(log);
            if k == 0 {
                trainer.finish_iteration();
                trainer.finish_iteration();
            }
        }
        let scale = trainer.scaler().map(|s| s.scale);
        let mut w: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        (logs, w, scale)
    };
    let (fp32_logs, fp32_w, _) = run(false, None);
    let (amp_logs, amp_w, scale) = run(true, None);
    assert_eq!(scale, Some(1024.0));
    assert_eq!(fp32_logs, amp_logs);
    for ((name, a), (_, b)) in fp32_w.iter().zip(&amp_w) {
        assert!(a.equal(b), "{name} differs under loss scaling");
    }
    let (initial_w, _) = {
        let (vs, _model) = fixture_model(&task);
        let mut w: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        (w, ())
    };
    let (over_logs, over_w, scale) = run(true, Some(1e300));
    assert!(over_logs.iter().all(|l| l.skipped));
    assert_eq!(scale, Some(1e300 / 4.0));
    for ((name, a), (_, b)) in initial_w.iter().zip(&over_w) {
        assert!(a.equal(b), "{name} moved although every step overflowed");
    }
}

/// Gradient accumulation: a step over two identical micro-batches averages their gradients, so it
/// equals the step over one of them bit for bit (weights and logged values).
#[test]
fn accumulated_micro_batches_average_their_gradients() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (task, general, _) = fixture();
    let run = |micro: usize| {
        let (vs, model) = fixture_model(&task);
        let trainer = PretrainTrainer::from_task(&model, &vs, &task, 1).unwrap();
        assert_eq!(
            trainer.settings().micro_batches,
            1,
            "GRAD_ACCUMULATE_STEPS: 1"
        );
        let settings = TrainSettings {
            dropout: false,
            ..trainer.settings().clone()
        };
        let mut trainer = trainer.with_settings(settings);
        trainer.finish_iteration();
        trainer.finish_iteration();
        let mut sampler = ReplaySampler::new(
            Tensor::from_slice(&[1i64, 0, 3, 2]),
            Tensor::from_slice(&[2i64, 3, 0, 1]),
        );
        let batches = vec![&general; micro];
        let log = trainer
            .step(StepKind::General, &batches, &SingleProcess, &mut sampler)
            .unwrap();
        let mut w: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        w.sort_by(|a, b| a.0.cmp(&b.0));
        (log, w)
    };
    let (one, w1) = run(1);
    let (two, w2) = run(2);
    assert_eq!(one, two);
    for ((name, a), (_, b)) in w1.iter().zip(&w2) {
        assert!(a.equal(b), "{name} differs with two micro-batches");
    }
}
