//! DeiT (no official fixture): shapes, and the local-attention region path behaves as the official
//! `VisionTransformer.forward`: with an all-ones `image_atts` the region outputs equal the gathered
//! full-image outputs; with a partial mask the region CLS differs while the full outputs don't change.

use tch::{nn, Device, Kind, Tensor};
use xvlm_model::vision::{DeitConfig, VisionConfig, VisionEncoder};

fn tiny() -> VisionConfig {
    VisionConfig::Deit(DeitConfig {
        image_res: 32,
        patch_size: 16,
        embed_dim: 8,
        depth: 3,
        num_heads: 2,
        mlp_ratio: 4,
        local_attn_depth: 1,
    })
}

#[test]
fn deit_region_path_follows_the_local_attention_rule() {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let enc = VisionEncoder::new(&(vs.root() / "vision_encoder"), &tiny()).unwrap();
    let names: Vec<String> = vs.variables().into_keys().collect();
    for k in [
        "vision_encoder.cls_token",
        "vision_encoder.pos_embed",
        "vision_encoder.patch_embed.proj.bias",
        "vision_encoder.blocks.2.attn.qkv.weight",
        "vision_encoder.blocks.0.mlp.fc2.bias",
        "vision_encoder.norm.weight",
    ] {
        assert!(names.iter().any(|n| n == k), "missing {k}");
    }
    assert_eq!(enc.num_patch_tokens(), 4);
    let image = Tensor::randn([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let plain = enc.forward(&image, None, None);
    assert_eq!(plain.size(), vec![2, 5, 8]);

    let idx = Tensor::from_slice(&[1i64, 0, 1]);
    let ones = Tensor::ones([3, 5], (Kind::Int64, Device::Cpu));
    let (region, full) = enc.forward_t(&image, Some(&idx), Some(&ones), false);
    let full = full.unwrap();
    assert!(full.allclose(&plain, 1e-6, 1e-6, false));
    assert!(region.allclose(&plain.index_select(0, &idx), 1e-5, 1e-5, false));

    let partial =
        Tensor::from_slice(&[1i64, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1]).view([3, 5]);
    let (region2, full2) = enc.forward_t(&image, Some(&idx), Some(&partial), false);
    assert!(full2.unwrap().allclose(&plain, 1e-6, 1e-6, false));
    let diff0 = (region2.get(0) - plain.get(1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff0 > 1e-4, "masked region must change the outputs");
    assert!(region2.get(1).allclose(&plain.get(0), 1e-5, 1e-5, false));
}
