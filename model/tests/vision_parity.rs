//! The vision encoders built from the fixture weights reproduce the official outputs recorded in
//! `pretrain_swin_bert` (Swin: CLS = mean / `image_atts`-weighted mean of the patch tokens) and
//! `pretrain_clipvit_roberta` (CLIP-ViT with local attention for regions), at the case tolerance.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Tensor};
use xvlm_model::checkpoint::{load_state_dict, read_state_dict, LoadOptions, StateDict};
use xvlm_model::parity::{compare, Tolerance};
use xvlm_model::vision::{Backbone, VisionConfig, VisionEncoder};

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn task_value(case: &Path, key: &str) -> serde_yaml::Value {
    let text = std::fs::read_to_string(case.join("config.yaml")).unwrap();
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    yaml[key].clone()
}

/// Builds the case's vision encoder and loads its `vision_encoder.*` weights from model.safetensors.
fn build(case: &Path) -> (nn::VarStore, VisionEncoder) {
    let flag = |k: &str| task_value(case, k).as_bool().unwrap_or(false);
    let backbone = Backbone::from_flags(flag("use_clip_vit"), flag("use_swin"));
    let cfg = VisionConfig::from_task(
        backbone,
        Some(&case.join("vision_config.json")),
        task_value(case, "image_res").as_i64().unwrap(),
        task_value(case, "patch_size").as_i64().unwrap(),
    )
    .unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "vision_encoder"), &cfg).unwrap();
    let sd: StateDict = read_state_dict(&case.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("vision_encoder."))
        .collect();
    let report = load_state_dict(&vs, &sd, &LoadOptions::default()).unwrap();
    assert!(report.missing.is_empty(), "missing {:?}", report.missing);
    assert!(
        report.unexpected.is_empty(),
        "unexpected {:?}",
        report.unexpected
    );
    (vs, enc)
}

fn check(results: &mut Vec<String>, name: &str, got: &Tensor, expected: &HashMap<String, Tensor>) {
    let tol = Tolerance {
        rtol: 1e-5,
        atol: 1e-6,
    };
    let c = compare(name, got, &expected[name], tol);
    println!("{c}");
    if !c.passed {
        results.push(c.to_string());
    }
}

fn run_case(case_name: &str) {
    tch::set_num_threads(1);
    let case = xvlm_model::fixtures_dir().join(case_name);
    let (_vs, enc) = build(&case);
    let batch = tensors(&case.join("batch.safetensors"));
    let expected = tensors(&case.join("expected.safetensors"));
    let mut failures = Vec::new();
    tch::no_grad(|| {
        let general = enc.forward(&batch["general.image"], None, None);
        check(&mut failures, "general.image_embeds", &general, &expected);
        let idx = &batch["region.idx_to_group_img"];
        let (region, full) = enc.forward_t(
            &batch["region.image"],
            Some(idx),
            Some(&batch["region.image_atts"]),
            false,
        );
        let full = full.expect("full-image output with regions");
        check(&mut failures, "region.image_embeds", &region, &expected);
        check(
            &mut failures,
            "region.vision_encoder_out_full",
            &full,
            &expected,
        );
        // get_vision_embeds: the full-image outputs gathered per text.
        let gathered = full.index_select(0, idx);
        check(
            &mut failures,
            "region.image_embeds_fullatts",
            &gathered,
            &expected,
        );
    });
    assert_eq!(
        enc.num_patch_tokens() + 1,
        expected["general.image_embeds"].size()[1]
    );
    assert_eq!(enc.width(), expected["general.image_embeds"].size()[2]);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Window 4 at 64 px: stage 2 (4x4 map) and stage 3 (2x2 map) are clamped, unshifted windows.
#[test]
fn swin_with_clamped_windows_matches_the_finetune_fixtures() {
    tch::set_num_threads(1);
    for (case_name, pairs) in [
        (
            "retrieval",
            vec![
                ("eval.image", "eval.image_embeds"),
                ("train.image", "train.image_embeds"),
            ],
        ),
        ("grounding_bbox", vec![("image", "image_embeds")]),
        ("nlvr", vec![("image", "image_embeds")]),
        ("vqa", vec![("eval.image", "eval.image_embeds")]),
    ] {
        let case = xvlm_model::fixtures_dir().join(case_name);
        let (_vs, enc) = build(&case);
        let batch = tensors(&case.join("batch.safetensors"));
        let expected = tensors(&case.join("expected.safetensors"));
        let mut failures = Vec::new();
        tch::no_grad(|| {
            for (input, output) in pairs {
                let got = enc.forward(&batch[input], None, None);
                check(&mut failures, output, &got, &expected);
            }
        });
        assert!(failures.is_empty(), "{case_name}: {failures:#?}");
    }
}

#[test]
fn swin_matches_pretrain_swin_bert_fixture() {
    run_case("pretrain_swin_bert");
}

#[test]
fn clip_vit_matches_pretrain_clipvit_roberta_fixture() {
    run_case("pretrain_clipvit_roberta");
}
