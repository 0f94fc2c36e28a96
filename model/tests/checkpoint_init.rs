//! Pre-training initialisation (XVLM-REFERENCE.md §1.8) and fine-tune loading (§1.5): synthetic backbone
//! checkpoints with the official key names map onto our `vision_encoder.*` variables, with the position
//! information resized for the target resolution and the resolution-specific buffers dropped.

use tch::{nn, Device, Kind, Tensor};
use xvlm_model::checkpoint::{
    adapt_for_finetune, interpolate_pos_embed, interpolate_relative_pos_embed, load_state_dict,
    vision_init_state_dict, LoadOptions, StateDict,
};
use xvlm_model::vision::{ClipVitConfig, SwinConfig, VisionConfig, VisionEncoder};

fn swin(image_res: i64, window_size: i64) -> VisionConfig {
    VisionConfig::Swin(SwinConfig {
        ckpt: None,
        vision_width: 128,
        image_res,
        window_size,
        embed_dim: 16,
        depths: vec![2, 2, 2, 2],
        num_heads: vec![1, 2, 4, 8],
        drop_path_rate: 0.0,
    })
}

fn build(cfg: &VisionConfig) -> (nn::VarStore, VisionEncoder) {
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "vision_encoder"), cfg).unwrap();
    (vs, enc)
}

/// A 22k-style Swin checkpoint: `{'model': {...}}` flattened, window 4, with buffers and a `head`.
fn swin_22k_checkpoint() -> StateDict {
    let (vs, enc) = build(&swin(128, 4));
    let mut raw = StateDict::new();
    for (k, t) in vs.variables() {
        let k = k.strip_prefix("vision_encoder.").unwrap().to_string();
        raw.insert(format!("model.{k}"), t.detach().copy());
    }
    for (k, t) in enc.buffers() {
        raw.insert(format!("model.{k}"), t);
    }
    raw.insert(
        "model.head.weight".into(),
        Tensor::zeros([10, 128], (Kind::Float, Device::Cpu)),
    );
    raw.insert(
        "model.head.bias".into(),
        Tensor::zeros([10], (Kind::Float, Device::Cpu)),
    );
    raw
}

#[test]
fn swin_22k_weights_initialise_a_window5_encoder() {
    let raw = swin_22k_checkpoint();
    let table_key = "model.layers.1.blocks.1.attn.relative_position_bias_table";
    let src_table = raw[table_key].shallow_clone();
    assert_eq!(src_table.size(), vec![49, 2]);
    let cfg = swin(160, 5);
    let sd = vision_init_state_dict(raw, &cfg).unwrap();
    assert!(sd.keys().all(|k| k.starts_with("vision_encoder.")));
    assert!(!sd
        .keys()
        .any(|k| k.contains("relative_position_index") || k.contains("attn_mask")));
    let (vs, _) = build(&cfg);
    let report = load_state_dict(&vs, &sd, &LoadOptions::default()).unwrap();
    assert!(report.missing.is_empty(), "{report}");
    assert_eq!(
        report.unexpected,
        vec!["vision_encoder.head.bias", "vision_encoder.head.weight"]
    );
    let got = &vs.variables()["vision_encoder.layers.1.blocks.1.attn.relative_position_bias_table"];
    assert_eq!(got.size(), vec![81, 2]);
    let want = interpolate_relative_pos_embed(&src_table, 81, "t").unwrap();
    assert!(got.equal(&want));
    // the last stage (5x5 map, window 5) keeps its own size: (2*5-1)^2 rows
    assert_eq!(
        vs.variables()["vision_encoder.layers.3.blocks.0.attn.relative_position_bias_table"].size(),
        vec![81, 8]
    );
}

#[test]
fn finetune_load_resizes_swin_tables_drops_buffers_and_strips_bert() {
    let mut sd: StateDict = swin_22k_checkpoint()
        .into_iter()
        .map(|(k, v)| {
            (
                format!("vision_encoder.{}", k.strip_prefix("model.").unwrap()),
                v,
            )
        })
        .collect();
    let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
    sd.insert(
        "text_encoder.bert.encoder.layer.0.output.dense.bias".into(),
        zeros(4),
    );
    sd.insert("text_encoder.cls.predictions.bias".into(), zeros(4));
    sd.insert("vision_proj.bias".into(), zeros(4));
    adapt_for_finetune(&mut sd, &swin(160, 5), true).unwrap();
    assert!(sd.contains_key("text_encoder.encoder.layer.0.output.dense.bias"));
    assert!(!sd.keys().any(|k| k.contains("bert.")));
    assert!(sd.contains_key("text_encoder.cls.predictions.bias"));
    assert!(sd.contains_key("vision_proj.bias"));
    assert!(!sd
        .keys()
        .any(|k| k.contains("attn_mask") || k.contains("relative_position_index")));
    assert_eq!(
        sd["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"].size(),
        vec![81, 1]
    );
}

fn clip_cfg(image_res: i64) -> VisionConfig {
    VisionConfig::ClipVit(ClipVitConfig {
        ckpt: None,
        vision_width: 8,
        patch_size: 8,
        hidden_act: "quick_gelu".into(),
        num_attention_heads: 2,
        attention_dropout: 0.0,
        intermediate_size: 16,
        num_hidden_layers: 1,
        local_attn_depth: 1,
        image_res,
    })
}

#[test]
fn hf_clip_weights_initialise_the_clip_encoder() {
    let f = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let mut raw = StateDict::new();
    // The HF CLIPModel key names (vision tower of a 1-layer model at 24 px = 3x3 patches, text tower bits).
    let v = "vision_model.";
    raw.insert(format!("{v}embeddings.class_embedding"), f(&[8]));
    raw.insert(
        format!("{v}embeddings.patch_embedding.weight"),
        f(&[8, 3, 8, 8]),
    );
    raw.insert(
        format!("{v}embeddings.position_embedding.weight"),
        f(&[10, 8]),
    );
    raw.insert(
        format!("{v}embeddings.position_ids"),
        Tensor::arange(10, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    );
    for ln in [
        "pre_layrnorm",
        "post_layernorm",
        "encoder.layers.0.layer_norm1",
        "encoder.layers.0.layer_norm2",
    ] {
        raw.insert(format!("{v}{ln}.weight"), f(&[8]));
        raw.insert(format!("{v}{ln}.bias"), f(&[8]));
    }
    for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        raw.insert(
            format!("{v}encoder.layers.0.self_attn.{p}.weight"),
            f(&[8, 8]),
        );
        raw.insert(format!("{v}encoder.layers.0.self_attn.{p}.bias"), f(&[8]));
    }
    raw.insert(format!("{v}encoder.layers.0.mlp.fc1.weight"), f(&[16, 8]));
    raw.insert(format!("{v}encoder.layers.0.mlp.fc1.bias"), f(&[16]));
    raw.insert(format!("{v}encoder.layers.0.mlp.fc2.weight"), f(&[8, 16]));
    raw.insert(format!("{v}encoder.layers.0.mlp.fc2.bias"), f(&[8]));
    raw.insert(
        "text_model.embeddings.token_embedding.weight".into(),
        f(&[5, 8]),
    );
    raw.insert("logit_scale".into(), f(&[]));
    raw.insert("visual_projection.weight".into(), f(&[4, 8]));
    let src_pos = raw[&format!("{v}embeddings.position_embedding.weight")].shallow_clone();

    // target 32 px = 4x4 patches: the 3x3 position grid is interpolated to 4x4
    let cfg = clip_cfg(32);
    let sd = vision_init_state_dict(raw, &cfg).unwrap();
    let (vs, _) = build(&cfg);
    let strict = LoadOptions {
        strict: true,
        ..Default::default()
    };
    let report = load_state_dict(&vs, &sd, &strict).unwrap();
    assert_eq!(report.loaded.len(), vs.variables().len());
    let pos = &vs.variables()["vision_encoder.pos_embed.weight"];
    assert_eq!(pos.size(), vec![17, 8]);
    assert!(pos.get(0).equal(&src_pos.get(0)), "class position kept");
    let want = interpolate_pos_embed(&src_pos.unsqueeze(0), 16, 1, "p")
        .unwrap()
        .squeeze_dim(0);
    assert!(pos.equal(&want));
}

#[test]
fn pos_embed_interpolation_keeps_constants_and_extra_tokens() {
    let d = 3;
    let pos = Tensor::full([1, 10, d], 0.25, (Kind::Float, Device::Cpu));
    let _ = pos.get(0).get(0).fill_(7.0);
    let out = interpolate_pos_embed(&pos, 25, 1, "pos").unwrap();
    assert_eq!(out.size(), vec![1, 26, d]);
    assert_eq!(out.double_value(&[0, 0, 0]), 7.0);
    let grid = out.slice(1, 1, None, 1);
    assert!(grid.allclose(
        &Tensor::full([1, 25, d], 0.25, (Kind::Float, Device::Cpu)),
        1e-6,
        1e-6,
        false
    ));
    // same grid: untouched
    assert!(interpolate_pos_embed(&pos, 9, 1, "pos")
        .unwrap()
        .equal(&pos));
}

#[test]
fn deit_weights_initialise_a_larger_deit_with_interpolated_positions() {
    use xvlm_model::vision::DeitConfig;
    let deit = |image_res| {
        VisionConfig::Deit(DeitConfig {
            image_res,
            patch_size: 16,
            embed_dim: 8,
            depth: 2,
            num_heads: 2,
            mlp_ratio: 4,
            local_attn_depth: 1,
        })
    };
    // a timm checkpoint `{'model': {...}}` at 32 px (2x2 patches) with its classifier head
    let (src_vs, _) = build(&deit(32));
    let mut raw = StateDict::new();
    for (k, t) in src_vs.variables() {
        let k = k.strip_prefix("vision_encoder.").unwrap().to_string();
        raw.insert(format!("model.{k}"), t.detach().copy());
    }
    raw.insert(
        "model.head.weight".into(),
        Tensor::zeros([3, 8], (Kind::Float, Device::Cpu)),
    );
    let src_pos = raw["model.pos_embed"].shallow_clone();
    let cfg = deit(48);
    let sd = vision_init_state_dict(raw, &cfg).unwrap();
    let (vs, _) = build(&cfg);
    let report = load_state_dict(&vs, &sd, &LoadOptions::default()).unwrap();
    assert!(report.missing.is_empty(), "{report}");
    assert_eq!(report.unexpected, vec!["vision_encoder.head.weight"]);
    let pos = &vs.variables()["vision_encoder.pos_embed"];
    assert_eq!(pos.size(), vec![1, 10, 8]);
    assert!(pos.equal(&interpolate_pos_embed(&src_pos, 9, 1, "p").unwrap()));
}

/// Fine-tuning from a checkpoint whose last stages have clamped windows (fixture `retrieval`: window 4
/// at 64 px, stage 3 is 2x2) keeps those tables as they are and loads completely.
#[test]
fn finetune_load_of_a_clamped_window_checkpoint_loads_completely() {
    let case = xvlm_model::fixtures_dir().join("retrieval");
    let mut sd: StateDict = xvlm_model::checkpoint::read_state_dict(&case.join("model.th"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("vision_encoder."))
        .collect();
    let before = sd["vision_encoder.layers.3.blocks.0.attn.relative_position_bias_table"].copy();
    assert_eq!(before.size()[0], 9);
    let cfg = VisionConfig::from_task(
        xvlm_model::vision::Backbone::Swin,
        Some(&case.join("vision_config.json")),
        64,
        32,
    )
    .unwrap();
    adapt_for_finetune(&mut sd, &cfg, true).unwrap();
    assert!(
        sd["vision_encoder.layers.3.blocks.0.attn.relative_position_bias_table"].equal(&before)
    );
    let (vs, _) = build(&cfg);
    let strict = LoadOptions {
        strict: true,
        ..Default::default()
    };
    load_state_dict(&vs, &sd, &strict).unwrap();
}
