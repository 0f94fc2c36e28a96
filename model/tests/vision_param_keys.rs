//! The vision encoders of the real base configs have exactly the official `vision_encoder.*` state-dict
//! keys, shapes and dtypes (fixture `param_keys`), apart from the computed buffers
//! (`relative_position_index`, `attn_mask`, `position_ids`), which must be the only ones absent.

use std::collections::BTreeMap;

use tch::{nn, Device, Kind};
use xvlm_model::checkpoint::load::is_computed_buffer;
use xvlm_model::vision::{VisionConfig, VisionEncoder};

/// key → (shape, dtype) of the `vision_encoder.*` rows of a param_keys TSV.
fn official(tsv: &str) -> BTreeMap<String, (Vec<i64>, String)> {
    let path = xvlm_model::fixtures_dir().join("param_keys").join(tsv);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| l.starts_with("vision_encoder."))
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let shape = cols[1]
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse().unwrap())
                .collect();
            (cols[0].to_string(), (shape, cols[2].to_string()))
        })
        .collect()
}

fn dtype_name(k: Kind) -> &'static str {
    match k {
        Kind::Float => "float32",
        Kind::Int64 => "int64",
        _ => "other",
    }
}

fn check(cfg: VisionConfig, tsv: &str) {
    let want = official(tsv);
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "vision_encoder"), &cfg).unwrap();
    let got: BTreeMap<String, (Vec<i64>, String)> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, (t.size(), dtype_name(t.kind()).to_string())))
        .collect();
    let unexpected: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        unexpected.is_empty(),
        "{tsv}: keys not in the official model: {unexpected:?}"
    );
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k) && !is_computed_buffer(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{tsv}: official keys we lack: {missing:?}"
    );
    for (k, v) in &got {
        assert_eq!(v, &want[k], "{tsv}: shape/dtype of {k}");
    }
    let buffers = want.keys().filter(|k| is_computed_buffer(k)).count();
    assert_eq!(got.len() + buffers, want.len());
    assert_eq!(enc.width(), cfg.width());
    println!(
        "{tsv}: {} parameters match, {buffers} computed buffers",
        got.len()
    );
}

#[test]
fn swin_b_224_vision_keys_match_the_official_pretrain_model() {
    check(VisionConfig::swin_b_224(), "param_keys_pretrain.tsv");
}

#[test]
fn swin_b_384_vision_keys_match_the_official_retrieval_model() {
    check(VisionConfig::swin_b_384(), "param_keys_retrieval.tsv");
}

#[test]
fn clip_vit_b16_vision_keys_match_the_official_clipvit_model() {
    check(
        VisionConfig::clip_vit_b16(224),
        "param_keys_pretrain_clipvit_roberta.tsv",
    );
}

/// The computed buffers equal the official ones saved in the fixture checkpoints (Swin index tables and
/// shift masks incl. the clamped last stage; CLIP position ids), name for name.
#[test]
fn computed_buffers_equal_the_fixture_buffers() {
    use xvlm_model::checkpoint::read_state_dict;
    use xvlm_model::vision::Backbone;
    for (case, backbone, res, patch) in [
        ("pretrain_swin_bert", Backbone::Swin, 64, 32),
        ("pretrain_clipvit_roberta", Backbone::ClipVit, 24, 8),
    ] {
        let dir = xvlm_model::fixtures_dir().join(case);
        let cfg =
            VisionConfig::from_task(backbone, Some(&dir.join("vision_config.json")), res, patch)
                .unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = VisionEncoder::new(&(vs.root() / "vision_encoder"), &cfg).unwrap();
        let sd = read_state_dict(&dir.join("model.safetensors")).unwrap();
        let official: Vec<&String> = sd
            .keys()
            .filter(|k| k.starts_with("vision_encoder.") && is_computed_buffer(k))
            .collect();
        let ours = enc.buffers();
        assert_eq!(ours.len(), official.len(), "{case}: number of buffers");
        for (name, t) in ours {
            let key = format!("vision_encoder.{name}");
            let want = sd.get(&key).unwrap_or_else(|| panic!("{case}: no {key}"));
            assert_eq!(t.kind(), want.kind(), "{key}");
            assert!(t.equal(want), "{case}: {key} differs");
        }
    }
}
