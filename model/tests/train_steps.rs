//! The official `Pretrain.train` loop, replayed: 5 iterations (region + image-text steps) of the tiny
//! model must reproduce the fixture's per-step losses, learning rates and grad norms (1e-5 relative),
//! the official param groups, and the final weights (1e-4 relative; attention key biases absolute).

use xvlm_model::parity::WeightsSource;
use xvlm_model::train::run_train_steps_case;

#[test]
fn pretrain_train_steps_fixture() {
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

/// Live iterations use only derived randomness (region coin, ITM negatives, dropout/drop-path seeds):
/// 3 iterations straight equal 2 iterations, a state export/restore into a fresh model, and 1 more,
/// bit for bit.
#[test]
fn resume_from_exported_state_is_exact() {
    use std::collections::HashMap;
    use tch::nn::VarStore;
    use tch::{Device, Tensor};
    use xvlm_model::collective::SingleProcess;
    use xvlm_model::config::TaskConfig;
    use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};
    use xvlm_model::train::PretrainTrainer;

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
    let (general, region) = (make("general", false), make("region", true));
    let build = || {
        let vs = VarStore::new(Device::Cpu);
        let model = PretrainModel::new(&vs.root(), &task).unwrap();
        (vs, model)
    };
    let iterate = |trainer: &mut PretrainTrainer| {
        let due = trainer.region_step_due();
        let r = [&region];
        trainer
            .run_iteration(due.then_some(&r[..]), &[&general], &SingleProcess)
            .unwrap()
    };

    let (vs_a, model_a) = build();
    let (mut vs_b, model_b) = build();
    vs_b.copy(&vs_a).unwrap();
    let mut a = PretrainTrainer::from_task(&model_a, &vs_a, &task, 1).unwrap();
    let mut logs_a = Vec::new();
    for _ in 0..3 {
        logs_a.push(iterate(&mut a));
    }
    assert!(
        logs_a.iter().any(|l| l.steps.len() == 2),
        "iter_perc 1.0 runs region steps"
    );

    let mut b = PretrainTrainer::from_task(&model_b, &vs_b, &task, 1).unwrap();
    for _ in 0..2 {
        iterate(&mut b);
    }
    let state: HashMap<String, Tensor> = b.state_tensors().into_iter().collect();
    let (mut vs_c, model_c) = build();
    vs_c.copy(&vs_b).unwrap();
    let mut c = PretrainTrainer::from_task(&model_c, &vs_c, &task, 1).unwrap();
    c.load_state_tensors(&state).unwrap();
    assert_eq!(c.iteration(), 2);
    let log_c = iterate(&mut c);
    assert_eq!(log_c, logs_a[2]);
    let (wa, wc) = (vs_a.variables(), vs_c.variables());
    for (name, ta) in &wa {
        assert!(ta.equal(&wc[name]), "{name} differs after resume");
    }
}
