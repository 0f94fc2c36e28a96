//! `task: pretrain` through the real coordinator and two workers: the X-VLM pre-training model trains
//! data-parallel on a small synthetic corpus to SUCCEEDED, every reported loss is finite, and the final
//! checkpoint rank 0 wrote loads strictly into the pre-training model under the official key names.

use xvlm_e2e::tiny_pretrain::TinyPretrain;
use xvlm_e2e::{write, Cluster};
use xvlm_model::checkpoint::{load_state_dict, read_state_dict, LoadOptions};
use xvlm_model::config::{configs_dir, TaskConfig};
use xvlm_model::data::synth::{generate, SynthConfig};
use xvlm_model::tasks::PretrainModel;

const STEPS: u64 = 6;

/// Losses `name=value` of a `watch` line.
fn losses(line: &str) -> Vec<(String, f64)> {
    let Some(rest) = line.split("losses: ").nth(1) else {
        return Vec::new();
    };
    rest.split_whitespace()
        .take_while(|kv| !kv.starts_with("lr="))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.parse().unwrap_or(f64::NAN)))
        })
        .collect()
}

/// Two CPU workers pre-train for a few iterations; the checkpoint is an official pre-training state dict.
#[test]
fn pretrain_job_trains_and_saves_an_official_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    generate(
        &data,
        &SynthConfig {
            images: 30,
            width: 64,
            height: 48,
            shards: 2,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let config = write(
        dir.path(),
        "task.yaml",
        &TinyPretrain {
            regions: true,
            epochs: 3,
        }
        .yaml(&data, &configs_dir()),
    );
    let job = format!(
        "name: e2e-pretrain\ntask: pretrain\nconfig: {}\nsteps: {STEPS}\nseed: 7\nworkers: {{min: 2}}\n",
        config.display()
    );
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let id = c.submit(&write(dir.path(), "job.yaml", &job));
    let out = c.watch_succeeded(&id);
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "{id} SUCCEEDED gen=1 world=2 step={STEPS}/{STEPS}"
        )),
        "{out}"
    );

    // Every step reported finite ITC/ITM/MLM/total losses, and (iter_perc 1) the box losses.
    let steps: Vec<Vec<(String, f64)>> = out
        .lines()
        .filter(|l| l.contains(" step=") && !l.contains("losses: -"))
        .map(losses)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!steps.is_empty(), "no losses reported:\n{out}");
    for l in &steps {
        for name in ["itc", "itm", "mlm", "bbox", "giou", "total"] {
            let v = l.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
            assert!(
                v.is_some_and(f64::is_finite),
                "loss {name} missing or not finite in {l:?}\n{out}"
            );
        }
    }

    // The checkpoint loads strictly into a fresh pre-training model (every variable from the file; only
    // tied aliases and computed buffers are extra), and the weights moved away from the seed-7 init.
    let ckpt = dir
        .path()
        .join(format!("runs/{id}/final/model.safetensors"));
    let sd = read_state_dict(&ckpt).unwrap();
    for key in [
        "vision_encoder.patch_embed.proj.weight",
        "text_encoder.bert.embeddings.word_embeddings.weight",
        "text_encoder.cls.predictions.decoder.weight",
        "vision_proj.weight",
        "text_proj.weight",
        "itm_head.0.weight",
        "bbox_head.0.weight",
        "temp",
    ] {
        assert!(sd.contains_key(key), "checkpoint lacks {key}");
    }
    let task = TaskConfig::load(&config).unwrap();
    tch::manual_seed(7);
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let model = PretrainModel::new(&vs.root(), &task).unwrap();
    let init = vs.variables().get("vision_proj.weight").map(|t| t.copy());
    let opts = LoadOptions {
        strict: true,
        ignore: model
            .core
            .tied_aliases()
            .into_iter()
            .map(|(a, _)| a)
            .collect(),
    };
    let report = load_state_dict(&vs, &sd, &opts).unwrap();
    assert_eq!(report.loaded.len(), vs.variables().len(), "{report}");
    let init = init.expect("vision_proj.weight variable");
    let trained = &sd["vision_proj.weight"];
    let moved = (trained - &init).abs().max().double_value(&[]);
    assert!(moved > 0.0, "vision_proj.weight did not change in training");
}
