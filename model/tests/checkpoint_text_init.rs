//! Pre-training initialisation of the text encoder from a Hugging Face `*ForMaskedLM` directory: every
//! text parameter is loaded except exactly the cross-attention layers (which the official
//! `from_pretrained` also reports missing), the pooler and NSP head are dropped, and old `gamma`/`beta`
//! LayerNorm names are understood.

use std::collections::BTreeMap;

use tch::nn::VarStore;
use tch::{Device, Tensor};
use xvlm_model::checkpoint::{
    load_state_dict, text_init_state_dict, varstore_state_dict, write_safetensors, LoadOptions,
};
use xvlm_model::config::{configs_dir, TaskConfig};
use xvlm_model::tasks::PretrainModel;

fn tiny_model(seed: i64) -> VarStore {
    tch::manual_seed(seed);
    let task =
        TaskConfig::load(&configs_dir().join("Pretrain_XVLM_tiny.yaml")).expect("tiny config");
    let vs = VarStore::new(Device::Cpu);
    PretrainModel::new(&vs.root(), &task).expect("tiny model");
    vs
}

/// Writes the text side of a trained model the way a Hugging Face BERT checkpoint names it.
fn write_hf_bert_dir(source: &VarStore, dir: &std::path::Path) {
    let mut hf = BTreeMap::new();
    for (key, tensor) in varstore_state_dict(source) {
        let Some(hf_key) = key.strip_prefix("text_encoder.") else {
            continue;
        };
        if hf_key.contains("crossattention") {
            continue; // a text-only BERT has no cross-attention
        }
        let hf_key = match hf_key.strip_suffix("embeddings.LayerNorm.weight") {
            Some(stem) => format!("{stem}embeddings.LayerNorm.gamma"),
            None => hf_key.to_string(),
        };
        hf.insert(hf_key, tensor.copy());
    }
    hf.insert(
        "bert.pooler.dense.weight".into(),
        Tensor::ones([4, 4], tch::kind::FLOAT_CPU),
    );
    hf.insert(
        "cls.seq_relationship.weight".into(),
        Tensor::ones([2, 4], tch::kind::FLOAT_CPU),
    );
    write_safetensors(&hf, &dir.join("model.safetensors")).expect("write HF weights");
}

#[test]
fn text_encoder_loads_from_a_hugging_face_directory() {
    let trained = tiny_model(1);
    let tmp = tempfile::tempdir().expect("tempdir");
    write_hf_bert_dir(&trained, tmp.path());

    let fresh = tiny_model(2);
    let sd = text_init_state_dict(tmp.path()).expect("map HF keys");
    let report = load_state_dict(&fresh, &sd, &LoadOptions::default()).expect("non-strict load");

    assert!(
        report.unexpected.is_empty(),
        "unexpected: {:?}",
        report.unexpected
    );
    let text_missing: Vec<&String> = report
        .missing
        .iter()
        .filter(|k| k.starts_with("text_encoder."))
        .collect();
    assert!(
        !text_missing.is_empty(),
        "the cross-attention layers must be missing"
    );
    assert!(
        text_missing.iter().all(|k| k.contains("crossattention")),
        "only cross-attention may be missing from the text side: {text_missing:?}"
    );
    let trained_sd = varstore_state_dict(&trained);
    for key in &report.loaded {
        assert!(
            trained_sd[key].equal(&varstore_state_dict(&fresh)[key]),
            "{key} not copied"
        );
    }
    assert!(report
        .loaded
        .iter()
        .any(|k| k.ends_with("embeddings.LayerNorm.weight")));
}
