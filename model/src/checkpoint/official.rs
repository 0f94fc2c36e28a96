//! The official loaders' key handling, in one place:
//! - `models/xvlm.py:load_pretrained` (fine-tuning from an X-VLM checkpoint, `is_eval` False): vision
//!   position information resized for the new resolution, Swin index/mask buffers dropped, and with
//!   `load_text` every `text_encoder.*bert.*` key renamed without `bert.` (XVLM-REFERENCE.md §1.5, §5);
//! - `models/xvlm.py:build_vision_encoder(load_params=True)` (pre-training initialisation, §1.8): the
//!   ImageNet Swin / HF CLIP / DeiT weights mapped to our `vision_encoder.*` names.
//! - `models/model_vqa.py:XVLM.load_pretrained`: the text layers split between the VQA encoder and
//!   its answer decoder ([`vqa_init_state_dict`], §5.2).

use crate::vision::{SwinConfig, VisionConfig};

use super::resize::{interpolate_pos_embed, interpolate_relative_pos_embed};
use super::{CheckpointError, StateDict};

/// Number of final-stage patches of the task config: `(image_res // patch_size)²` with the task patch
/// size (32 for Swin, the JSON patch for CLIP, 16 for DeiT).
fn num_patches(cfg: &VisionConfig) -> i64 {
    let side = cfg.grid_side();
    side * side
}

/// The window a block of stage `stage` really uses: the config window, clamped to the stage resolution
/// when that is not larger (`SwinTransformerBlock.__init__`).
fn stage_window(c: &SwinConfig, stage: usize) -> i64 {
    let res = (c.image_res / 4) >> stage;
    if res <= c.window_size {
        res
    } else {
        c.window_size
    }
}

/// The stage index of a key containing `layers.{s}.`.
fn stage_of(key: &str) -> Option<usize> {
    let rest = &key[key.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// Resizes every `relative_position_bias_table` to its block's window and drops the index/mask
/// buffers, for keys in `sd` (any prefix).
///
/// Deliberate difference: the official code resizes every table to the config window; for a stage
/// whose window is clamped (resolution < window) that makes a table the model cannot load (or fails in
/// the spline fit). We resize to the clamped window, which is identical wherever the official works.
fn adapt_swin_tables(sd: &mut StateDict, c: &SwinConfig) -> Result<(), CheckpointError> {
    let keys: Vec<String> = sd.keys().cloned().collect();
    for k in keys {
        if k.contains("relative_position_bias_table") {
            let w = stage_of(&k).map_or(c.window_size, |s| stage_window(c, s));
            let resized = interpolate_relative_pos_embed(&sd[&k], (2 * w - 1) * (2 * w - 1), &k)?;
            sd.insert(k, resized);
        } else if k.contains("relative_position_index") || k.contains("attn_mask") {
            sd.remove(&k);
        }
    }
    Ok(())
}

/// `load_pretrained(ckpt, config, is_eval=False, load_text)` applied to an already read state dict.
pub fn adapt_for_finetune(
    sd: &mut StateDict,
    vision: &VisionConfig,
    load_text: bool,
) -> Result<(), CheckpointError> {
    match vision {
        VisionConfig::ClipVit(_) => {
            sd.remove("vision_encoder.position_ids");
            let key = "vision_encoder.pos_embed.weight";
            let pos = sd
                .get(key)
                .ok_or_else(|| CheckpointError::MissingKey(key.into()))?;
            let resized = interpolate_pos_embed(&pos.unsqueeze(0), num_patches(vision), 1, key)?;
            sd.insert(key.into(), resized.squeeze_dim(0));
        }
        VisionConfig::Swin(c) => adapt_swin_tables(sd, c)?,
        VisionConfig::Deit(_) => {
            let key = "vision_encoder.pos_embed";
            let pos = sd
                .get(key)
                .ok_or_else(|| CheckpointError::MissingKey(key.into()))?;
            let resized = interpolate_pos_embed(pos, num_patches(vision), 1, key)?;
            sd.insert(key.into(), resized);
        }
    }
    if load_text {
        let keys: Vec<String> = sd
            .keys()
            .filter(|k| k.contains("text_encoder.") && k.contains("bert."))
            .cloned()
            .collect();
        for k in keys {
            if let Some(t) = sd.remove(&k) {
                sd.insert(k.replace("bert.", ""), t);
            }
        }
    }
    Ok(())
}

/// Maps a backbone checkpoint (`torch.load(ckpt)` flattened; Swin/DeiT take its `model` dict) to our
/// `vision_encoder.*` keys as `build_vision_encoder(load_params=True)` does before its non-strict load:
/// - Swin: tables resized to the config window, `relative_position_index` / `attn_mask` dropped
///   (the 22k `head.*` stays and is reported unexpected on load, as officially);
/// - CLIP: only `vision_model.*`, with `embeddings.` stripped, `patch_embedding` → `patch_embed`,
///   `position_embedding` → `pos_embed`, `position_ids` dropped, `pos_embed.weight` interpolated;
/// - DeiT: `pos_embed` interpolated.
pub fn vision_init_state_dict(
    raw: StateDict,
    cfg: &VisionConfig,
) -> Result<StateDict, CheckpointError> {
    let strip_model = |raw: StateDict| -> StateDict {
        if raw.keys().any(|k| k.starts_with("model.")) {
            raw.into_iter()
                .filter_map(|(k, v)| k.strip_prefix("model.").map(|s| (s.to_string(), v)))
                .collect()
        } else {
            raw
        }
    };
    let mut sd: StateDict = match cfg {
        VisionConfig::Swin(c) => {
            let mut sd = strip_model(raw);
            adapt_swin_tables(&mut sd, c)?;
            sd
        }
        VisionConfig::ClipVit(_) => {
            let mut sd = StateDict::new();
            for (k, v) in raw {
                let Some(k) = k.strip_prefix("vision_model.") else {
                    continue;
                };
                let k = match k.strip_prefix("embeddings.") {
                    Some(e) => e
                        .replace("patch_embedding.weight", "patch_embed.weight")
                        .replace("position_embedding.weight", "pos_embed.weight"),
                    None => k.to_string(),
                };
                if k != "position_ids" {
                    sd.insert(k, v);
                }
            }
            let key = "pos_embed.weight";
            let pos = sd.get(key).ok_or_else(|| {
                CheckpointError::MissingKey(format!(
                    "vision_model.embeddings.position_embedding.weight ({key})"
                ))
            })?;
            let resized = interpolate_pos_embed(&pos.unsqueeze(0), num_patches(cfg), 1, key)?;
            sd.insert(key.into(), resized.squeeze_dim(0));
            sd
        }
        VisionConfig::Deit(_) => {
            let mut sd = strip_model(raw);
            let key = "pos_embed";
            let pos = sd
                .get(key)
                .ok_or_else(|| CheckpointError::MissingKey(key.into()))?;
            let resized = interpolate_pos_embed(pos, num_patches(cfg), 1, key)?;
            sd.insert(key.into(), resized);
            sd
        }
    };
    sd = sd
        .into_iter()
        .map(|(k, v)| (format!("vision_encoder.{k}"), v))
        .collect();
    Ok(sd)
}

/// `model_vqa.py: XVLM.load_pretrained` (not eval), applied to a pre-training state dict already
/// adapted by [`adapt_for_finetune`] with `load_text = false`. For every original key: one holding
/// `bert.` gets a stripped copy (the text encoder keeps all its layers); under `text_encoder.`, layer
/// keys below `num_text_layers` are dropped, layers `num_text_layers..` move to the decoder as layers
/// `0..` (`text_decoder.bert.encoder.layer.{l - num_text_layers}.*`) except the cross-attention
/// key/value when `fresh_cross_kv` (the decoder attends to the text width, not the vision width, so
/// they stay freshly initialised), and every other key (embeddings, `cls.*`) moves to `text_decoder.*`.
pub fn vqa_init_state_dict(
    sd: &mut StateDict,
    num_text_layers: usize,
    fresh_cross_kv: bool,
) -> Result<(), CheckpointError> {
    // The official loop walks a snapshot of the keys: the copies it adds are not visited again.
    let keys: Vec<String> = sd.keys().cloned().collect();
    for key in keys {
        let Some(tensor) = sd.get(&key).map(|t| t.shallow_clone()) else {
            continue;
        };
        if key.contains("bert.") {
            sd.insert(key.replace("bert.", ""), tensor.shallow_clone());
        }
        if !key.contains("text_encoder.") {
            continue;
        }
        let encoder_key = if key.contains("layer.") {
            // `text_encoder.bert.encoder.layer.{l}.…`: the layer number is the fifth segment.
            let mut parts: Vec<&str> = key.split('.').collect();
            let layer: usize = parts.get(4).and_then(|s| s.parse().ok()).ok_or_else(|| {
                CheckpointError::Format {
                    path: "init_checkpoint".into(),
                    reason: format!(
                        "key {key} has no layer number in its fifth segment (the VQA loader \
                         reads `text_encoder.bert.encoder.layer.<l>.…`)"
                    ),
                }
            })?;
            if layer < num_text_layers
                || (fresh_cross_kv
                    && (key.contains("crossattention.self.key")
                        || key.contains("crossattention.self.value")))
            {
                sd.remove(&key);
                continue;
            }
            let decoder_layer = (layer - num_text_layers).to_string();
            parts[4] = &decoder_layer;
            parts.join(".")
        } else {
            key.clone()
        };
        sd.remove(&key);
        sd.insert(encoder_key.replace("text_encoder", "text_decoder"), tensor);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::vqa_init_state_dict;
    use crate::checkpoint::StateDict;

    fn sd(keys: &[&str]) -> StateDict {
        keys.iter()
            .enumerate()
            .map(|(i, k)| (k.to_string(), tch::Tensor::from(i as f32)))
            .collect()
    }

    fn value(sd: &StateDict, key: &str) -> f32 {
        sd.get(key)
            .unwrap_or_else(|| panic!("no {key} in {:?}", sd.keys().collect::<Vec<_>>()))
            .double_value(&[]) as f32
    }

    /// Layers below the split stay encoder-only, later ones are copied into the decoder (cross K/V
    /// left out when the widths differ), embeddings and the MLM head move to the decoder, other keys
    /// are untouched.
    #[test]
    fn vqa_keys_follow_the_official_loader() {
        let mut d = sd(&[
            "text_encoder.bert.encoder.layer.1.attention.self.query.weight",
            "text_encoder.bert.encoder.layer.2.attention.self.query.weight",
            "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
            "text_encoder.bert.encoder.layer.3.crossattention.self.query.weight",
            "text_encoder.bert.embeddings.LayerNorm.weight",
            "text_encoder.cls.predictions.bias",
            "vision_encoder.norm.weight",
            "itm_head.weight",
        ]);
        vqa_init_state_dict(&mut d, 2, true).unwrap();
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "itm_head.weight",
                "text_decoder.bert.embeddings.LayerNorm.weight",
                "text_decoder.bert.encoder.layer.0.attention.self.query.weight",
                "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight",
                "text_decoder.cls.predictions.bias",
                "text_encoder.embeddings.LayerNorm.weight",
                "text_encoder.encoder.layer.1.attention.self.query.weight",
                "text_encoder.encoder.layer.2.attention.self.query.weight",
                "text_encoder.encoder.layer.3.crossattention.self.key.weight",
                "text_encoder.encoder.layer.3.crossattention.self.query.weight",
                "vision_encoder.norm.weight",
            ]
        );
        assert_eq!(
            value(
                &d,
                "text_decoder.bert.encoder.layer.0.attention.self.query.weight"
            ),
            1.0
        );
        assert_eq!(
            value(
                &d,
                "text_decoder.bert.encoder.layer.1.crossattention.self.query.weight"
            ),
            3.0
        );
        assert_eq!(
            value(
                &d,
                "text_encoder.encoder.layer.2.attention.self.query.weight"
            ),
            1.0
        );
        assert_eq!(value(&d, "text_decoder.cls.predictions.bias"), 5.0);

        // Equal widths: the cross key/value move too.
        let mut d = sd(&["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"]);
        vqa_init_state_dict(&mut d, 2, false).unwrap();
        assert!(d.contains_key("text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"));

        // A layer key without a layer number is refused, naming the key.
        let mut d = sd(&["text_encoder.encoder.layer.3.output.dense.weight"]);
        let err = vqa_init_state_dict(&mut d, 2, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_encoder.encoder.layer.3.output.dense.weight"),
            "{err}"
        );
    }
}
