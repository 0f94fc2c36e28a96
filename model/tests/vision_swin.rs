//! Swin structure and train-mode behaviour (XVLM-REFERENCE.md §1.3): window clamping and shifts per
//! stage, shift masks only on shifted blocks, stochastic depth active only in train mode.

use tch::{nn, Device, Kind, Tensor};
use xvlm_model::vision::{SwinConfig, VisionConfig, VisionEncoder};

fn tiny(drop_path_rate: f64) -> SwinConfig {
    // §7 tiny config: grids 32, 16, 8, 4 with window 4 -> the last stage is one unshifted window.
    SwinConfig {
        ckpt: None,
        vision_width: 128,
        image_res: 128,
        window_size: 4,
        embed_dim: 16,
        depths: vec![2, 2, 2, 2],
        num_heads: vec![1, 2, 4, 8],
        drop_path_rate,
    }
}

/// (window, shift, attn_mask shape) of a block.
type BlockShape = (i64, i64, Option<Vec<i64>>);

#[test]
fn windows_shifts_and_masks_follow_the_stage_resolution() {
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(
        &(vs.root() / "vision_encoder"),
        &VisionConfig::Swin(tiny(0.1)),
    )
    .unwrap();
    let VisionEncoder::Swin(swin) = &enc else {
        panic!("expected Swin");
    };
    let got: Vec<Vec<BlockShape>> = swin
        .stages()
        .iter()
        .map(|s| {
            s.blocks()
                .iter()
                .map(|b| (b.window(), b.shift(), b.attn_mask().map(|m| m.size())))
                .collect()
        })
        .collect();
    let m = |nw: i64| Some(vec![nw, 16, 16]);
    assert_eq!(
        got,
        vec![
            vec![(4, 0, None), (4, 2, m(64))],
            vec![(4, 0, None), (4, 2, m(16))],
            vec![(4, 0, None), (4, 2, m(4))],
            vec![(4, 0, None), (4, 0, None)],
        ]
    );
    assert_eq!(enc.num_patch_tokens(), 16);
    // a window larger than the last map (8 > 4) is clamped to it: table (2*4-1)^2 rows there
    let vs = nn::VarStore::new(Device::Cpu);
    let mut cfg = tiny(0.0);
    cfg.window_size = 8;
    let _ = VisionEncoder::new(&(vs.root() / "v"), &VisionConfig::Swin(cfg)).unwrap();
    let vars = vs.variables();
    assert_eq!(
        vars["v.layers.2.blocks.1.attn.relative_position_bias_table"].size(),
        vec![225, 4]
    );
    assert_eq!(
        vars["v.layers.3.blocks.1.attn.relative_position_bias_table"].size(),
        vec![49, 8]
    );
}

#[test]
fn drop_path_only_acts_in_train_mode() {
    let image = Tensor::randn([2, 3, 128, 128], (Kind::Float, Device::Cpu));
    let build = |rate: f64| {
        let vs = nn::VarStore::new(Device::Cpu);
        let enc = VisionEncoder::new(
            &(vs.root() / "vision_encoder"),
            &VisionConfig::Swin(tiny(rate)),
        )
        .unwrap();
        (vs, enc)
    };
    let (vs0, no_drop) = build(0.0);
    let (mut vs1, drop) = build(0.5);
    vs1.copy(&vs0).unwrap();
    tch::no_grad(|| {
        let eval = drop.forward(&image, None, None);
        assert!(
            eval.equal(&no_drop.forward(&image, None, None)),
            "same weights, eval"
        );
        assert!(
            eval.equal(&no_drop.forward_t(&image, None, None, true).0),
            "rate 0 in train"
        );
        let train = drop.forward_t(&image, None, None, true).0;
        assert_eq!(train.size(), vec![2, 17, 128]);
        let diff = (&train - &eval).abs().max().double_value(&[]);
        assert!(diff > 1e-3, "stochastic depth changed nothing");
    });
}

#[test]
fn invalid_configs_are_rejected_with_the_field() {
    let mut cfg = tiny(0.0);
    cfg.num_heads = vec![1, 2, 4];
    let err = VisionConfig::Swin(cfg).validate().unwrap_err().to_string();
    assert!(err.contains("num_heads"), "{err}");
    let mut cfg = tiny(0.0);
    cfg.vision_width = 64;
    let err = VisionConfig::Swin(cfg).validate().unwrap_err().to_string();
    assert!(err.contains("vision_width"), "{err}");
    let err = VisionConfig::from_task_json(
        xvlm_model::vision::Backbone::Swin,
        Some(r#"{"vision_width": 128, "image_res": 96, "window_size": 4, "embed_dim": 16, "depths": [2,2,2,2], "num_heads": [1,2,4,8]}"#),
        "cfg.json",
        128,
        32,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("image_res"), "{err}");
    let err = VisionConfig::from_task_json(
        xvlm_model::vision::Backbone::Swin,
        Some(r#"{"vision_width": 128}"#),
        "cfg.json",
        128,
        32,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cfg.json") && err.contains("image_res"),
        "{err}"
    );
}

#[test]
fn the_shipped_vision_jsons_parse_unchanged() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    for (file, backbone, res, patch) in [
        (
            "config_swinB_224.json",
            xvlm_model::vision::Backbone::Swin,
            224,
            32,
        ),
        (
            "config_swinB_384.json",
            xvlm_model::vision::Backbone::Swin,
            384,
            32,
        ),
        (
            "config_swinB_480.json",
            xvlm_model::vision::Backbone::Swin,
            480,
            32,
        ),
        (
            "config_clipvitB.json",
            xvlm_model::vision::Backbone::ClipVit,
            224,
            16,
        ),
    ] {
        let path = dir.join(file);
        if !path.exists() {
            println!("skip {file}: not shipped in configs/");
            continue;
        }
        let cfg = VisionConfig::from_task(backbone, Some(&path), res, patch).unwrap();
        let preset = match file {
            "config_swinB_224.json" => VisionConfig::swin_b_224(),
            "config_swinB_384.json" => VisionConfig::swin_b_384(),
            "config_swinB_480.json" => VisionConfig::swin_b_480(),
            _ => VisionConfig::clip_vit_b16(224),
        };
        assert_eq!(cfg, preset, "{file}");
    }
}
