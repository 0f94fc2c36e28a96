//! The pre-training model on the tiny config (configs/Pretrain_XVLM_tiny.yaml, XVLM-REFERENCE.md §7): the
//! parameter count the reference derives, a general and a region step forward + backward with the real
//! sampler, fix 6b on a region batch of whole-image captions only, and the tied MLM decoder (one tensor in
//! memory, saved under both official keys).

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};
use xvlm_model::collective::SingleProcess;
use xvlm_model::config::{configs_dir, TaskConfig};
use xvlm_model::loss::MultinomialSampler;
use xvlm_model::tasks::{PretrainBatch, PretrainModel, RegionInputs};

fn tiny() -> (VarStore, PretrainModel) {
    tch::manual_seed(0);
    let task = TaskConfig::load(&configs_dir().join("Pretrain_XVLM_tiny.yaml")).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = PretrainModel::new(&vs.root(), &task).unwrap();
    (vs, model)
}

fn ids(b: i64, l: i64, real: i64) -> (Tensor, Tensor) {
    let ids = Tensor::randint_low(1000, 2000, [b, l], (Kind::Int64, Device::Cpu));
    let _ = ids.narrow(1, 0, 1).fill_(101);
    let atts = Tensor::zeros([b, l], (Kind::Int64, Device::Cpu));
    let _ = atts.narrow(1, 0, real).fill_(1);
    let ids = ids * &atts;
    (ids, atts)
}

fn batch(b: i64, images: i64, region: Option<RegionInputs>) -> PretrainBatch {
    let (text_ids, text_atts) = ids(b, 16, 10);
    let masked_pos = Tensor::from_slice(&[1i64, 3, 0]).repeat([b, 1]);
    let masked_ids = text_ids.gather(1, &masked_pos, false);
    let _ = masked_ids.narrow(1, 2, 1).fill_(-100);
    let text_ids_masked = text_ids.scatter_value(1, &masked_pos.narrow(1, 0, 2), 103);
    PretrainBatch {
        image: Tensor::randn([images, 3, 128, 128], (Kind::Float, Device::Cpu)),
        text_ids,
        text_atts,
        text_ids_masked,
        masked_pos,
        masked_ids,
        region,
    }
}

fn region_inputs(is_image: &[i64]) -> RegionInputs {
    let b = is_image.len() as i64;
    // P = (128 / 32)² = 16 patches; region texts see token 0 and the top-left 2x2 patches.
    let atts = Tensor::zeros([b, 17], (Kind::Int64, Device::Cpu));
    for (r, &whole) in is_image.iter().enumerate() {
        let mut row = atts.get(r as i64);
        if whole == 1 {
            let _ = row.fill_(1);
        } else {
            for k in [0i64, 1, 2, 5, 6] {
                let _ = row.get(k).fill_(1);
            }
        }
    }
    RegionInputs {
        idx_to_group_img: Tensor::from_slice(&[0i64, 0, 0, 1, 1, 1][..is_image.len()]),
        image_atts: atts,
        target_bbox: Tensor::from_slice(&[0.3f32, 0.4, 0.2, 0.3]).repeat([b, 1]),
        is_image: Tensor::from_slice(is_image),
    }
}

/// The reference's count for the tiny config: Swin 574,926 + text 1,065,562 + heads 7,463.
#[test]
fn tiny_parameter_count_matches_reference() {
    let (vs, _model) = tiny();
    let total: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    assert_eq!(total, 1_647_951);
}

/// A general step and a region step run forward and backward with finite losses and gradients where the
/// official model has them (no bbox_head gradient on the general batch).
#[test]
fn general_and_region_steps_train() {
    let (vs, model) = tiny();
    let mut sampler = MultinomialSampler::new(1);

    let out = model
        .forward(&batch(4, 4, None), &SingleProcess, &mut sampler, true)
        .unwrap();
    assert!(out.loss_bbox.is_none());
    for (name, l) in [
        ("itc", &out.loss_itc),
        ("itm", &out.loss_itm),
        ("mlm", &out.loss_mlm),
    ] {
        assert!(l.double_value(&[]).is_finite(), "{name}");
    }
    out.loss_total.backward();
    let vars = vs.variables();
    assert!(!vars["bbox_head.3.weight"].grad().defined());
    let g = vars["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"].grad();
    assert!(g.defined() && g.abs().sum(Kind::Double).double_value(&[]) > 0.0);
    for t in vs.trainable_variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }

    let out = model
        .forward(
            &batch(6, 2, Some(region_inputs(&[1, 0, 0, 0, 0, 0]))),
            &SingleProcess,
            &mut sampler,
            true,
        )
        .unwrap();
    let bbox = out.loss_bbox.as_ref().unwrap().double_value(&[]);
    assert!(bbox.is_finite() && bbox > 0.0);
    out.loss_total.backward();
    let g = vars["bbox_head.3.weight"].grad();
    assert!(g.defined() && g.isfinite().all().int64_value(&[]) == 1);
}

/// Fix 6b: a region batch whose texts are all whole-image captions gives bbox losses 0 (not NaN) and a
/// finite total.
#[test]
fn region_batch_without_boxes_has_zero_bbox_loss() {
    let (_vs, model) = tiny();
    let mut sampler = MultinomialSampler::new(2);
    let out = model
        .forward(
            &batch(3, 2, Some(region_inputs(&[1, 1, 1]))),
            &SingleProcess,
            &mut sampler,
            false,
        )
        .unwrap();
    assert_eq!(out.loss_bbox.unwrap().double_value(&[]), 0.0);
    assert_eq!(out.loss_giou.unwrap().double_value(&[]), 0.0);
    assert!(out.loss_total.double_value(&[]).is_finite());
}

/// The MLM decoder is the word-embedding tensor itself (an update to one is seen by the other), and it is
/// written under both official keys.
#[test]
fn mlm_decoder_is_tied_to_word_embeddings() {
    let (vs, model) = tiny();
    let aliases = model.core.tied_aliases();
    assert!(aliases.contains(&(
        "text_encoder.cls.predictions.decoder.weight".to_string(),
        "text_encoder.bert.embeddings.word_embeddings.weight".to_string()
    )));
    let sd = model.core.state_dict(&vs);
    let word = &sd["text_encoder.bert.embeddings.word_embeddings.weight"];
    let decoder = &sd["text_encoder.cls.predictions.decoder.weight"];
    assert_eq!(word.data_ptr(), decoder.data_ptr(), "one tensor in memory");
    assert!(sd.contains_key("text_encoder.cls.predictions.decoder.bias"));

    let hidden = Tensor::randn([2, 32], (Kind::Float, Device::Cpu));
    let before = model.core.text.mlm_logits(&hidden).unwrap();
    tch::no_grad(|| {
        let _ = vs.variables()["text_encoder.bert.embeddings.word_embeddings.weight"]
            .shallow_clone()
            .get(7)
            .fill_(0.0);
    });
    let after = model.core.text.mlm_logits(&hidden).unwrap();
    let bias = &vs.variables()["text_encoder.cls.predictions.bias"];
    assert!(after
        .select(1, 7)
        .allclose(&bias.get(7).expand([2], false), 1e-6, 1e-6, false));
    assert!(!before
        .select(1, 7)
        .allclose(&after.select(1, 7), 1e-6, 1e-6, false));
}

/// A batch with inconsistent shapes is refused with the input named, not a libtorch panic.
#[test]
fn malformed_batch_is_an_error() {
    let (_vs, model) = tiny();
    let mut b = batch(4, 4, None);
    b.text_atts = b.text_atts.narrow(1, 0, 10);
    let err = model
        .forward(&b, &SingleProcess, &mut MultinomialSampler::new(0), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("text_atts"), "{err}");
}

/// The train flag reaches the text dropouts (0.1 in the tiny config) and Swin's drop-path: two train-mode
/// forwards differ, two eval-mode forwards are identical.
#[test]
fn train_flag_enables_dropout() {
    use xvlm_model::loss::ReplaySampler;
    let (_vs, model) = tiny();
    let b = batch(4, 4, None);
    let run = |train: bool| {
        let mut sampler = ReplaySampler::new(
            Tensor::from_slice(&[1i64, 2, 3, 0]),
            Tensor::from_slice(&[3i64, 0, 1, 2]),
        );
        model
            .forward(&b, &SingleProcess, &mut sampler, train)
            .unwrap()
            .loss_total
            .double_value(&[])
    };
    assert_eq!(run(false), run(false));
    assert_ne!(run(true), run(true));
}
