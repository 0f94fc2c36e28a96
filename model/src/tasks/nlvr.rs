//! NLVR2 (models/model_nlvr.py: XVLM): the text encoder gets every cross layer twice (layer
//! `fusion_layer + 2i` attends to the left image, `fusion_layer + 2i + 1` to the right one, the pair
//! sharing its cross-attention key/value), and `cls_head` classifies token 0 (XVLM-REFERENCE.md §5.3).

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::checkpoint::StateDict;
use crate::config::TaskConfig;
use crate::text::CrossContext;
use crate::xvlm::{vision_config, Heads, Mlp, ModelError, XvlmCore};

/// The outcome of an NLVR2 forward.
#[derive(Debug)]
pub struct NlvrOutput {
    /// Vision tokens of all 2B images (left images first) [2B, 1+P, Dv].
    pub image_embeds: Tensor,
    /// Token 0 after every text layer [B, D] (input of `cls_head`).
    pub cross_cls: Tensor,
    /// `cls_head` output [B, 2].
    pub logits: Tensor,
}

impl NlvrOutput {
    /// Cross-entropy against `targets` [B] (1 = True).
    pub fn loss(&self, targets: &Tensor) -> Tensor {
        self.logits.cross_entropy_for_logits(targets)
    }

    /// Predicted class per pair [B] (argmax of the logits).
    pub fn pred_class(&self) -> Tensor {
        self.logits.argmax(1, false)
    }
}

/// `models/model_nlvr.py:XVLM`.
pub struct NlvrModel {
    /// Encoders (no ITC/ITM/bbox heads).
    pub core: XvlmCore,
    /// `cls_head` (D → 2).
    pub cls_head: Mlp,
}

impl NlvrModel {
    /// Builds under `p` from a task config; the text JSON's cross layers are doubled.
    pub fn new(p: &nn::Path, task: &TaskConfig) -> Result<Self, ModelError> {
        let mut text_cfg = task.load_text_config()?;
        let cross_layers = text_cfg.num_hidden_layers - text_cfg.fusion_layer;
        text_cfg.num_hidden_layers = text_cfg.fusion_layer + 2 * cross_layers;
        let core = XvlmCore::with_shared_cross_kv(
            p,
            &vision_config(task)?,
            &text_cfg,
            Heads::default(),
            0,
            0.0,
            2,
        )?;
        let cls_head = Mlp::new(p / "cls_head", core.text.hidden_size(), 2);
        Ok(NlvrModel { core, cls_head })
    }

    /// `image` [2B, 3, R, R] (left images, then right images), `text_ids`/`text_atts` [B, L].
    pub fn forward(
        &self,
        image: &Tensor,
        text_ids: &Tensor,
        text_atts: &Tensor,
        train: bool,
    ) -> Result<NlvrOutput, ModelError> {
        let b = text_ids.size()[0];
        if image.size().first() != Some(&(2 * b)) {
            return Err(ModelError::Input(format!(
                "NLVR2 needs 2 x {b} images (left then right), got {:?}",
                image.size()
            )));
        }
        let vision = self.core.get_vision_embeds(image, train);
        let halves = vision.embeds.split(b, 0);
        let atts = vision.atts.split(b, 0);
        let cross = [
            CrossContext::new(&halves[0], &atts[0]),
            CrossContext::new(&halves[1], &atts[1]),
        ];
        let hidden = self
            .core
            .text
            .forward_multimodal(text_ids, text_atts, &cross, train);
        let cross_cls = hidden.select(1, 0);
        let logits = self.cls_head.forward(&cross_cls);
        Ok(NlvrOutput {
            image_embeds: vision.embeds,
            cross_cls,
            logits,
        })
    }

    /// Accuracy of `pred` against `targets` as a float32 scalar.
    pub fn accuracy(pred: &Tensor, targets: &Tensor) -> Tensor {
        pred.eq_tensor(targets)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
    }
}

/// The text layer index of a `text_encoder.encoder.layer.{l}.…` key, with the rest of the key.
fn text_layer(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("text_encoder.encoder.layer.")?;
    let (index, tail) = rest.split_once('.')?;
    Some((index.parse().ok()?, tail))
}

/// `model_nlvr.py:load_pretrained` (`load_nlvr_pretrain=False`) after the general key handling: text
/// layers below `fusion_layer` keep their index and every layer `l >= fusion_layer` is copied to
/// `fusion + 2(l - fusion)` and the one after it. A checkpoint already holding a layer of the doubled
/// layout beyond the general one (an NLVR2 domain pre-training or an NLVR2 fine-tune: the official
/// `--load_nlvr_pretrain`) is left as it is. `num_layers` is the general text config's layer count.
pub fn double_cross_layers(sd: &mut StateDict, fusion_layer: usize, num_layers: usize) {
    let doubled_layout = sd
        .keys()
        .any(|k| text_layer(k).is_some_and(|(l, _)| l >= num_layers));
    if doubled_layout {
        return;
    }
    // Every cross layer is taken out before any is written back: a copy lands on an index a later
    // original still has.
    let cross: Vec<(usize, String, Tensor)> = sd
        .keys()
        .filter(|k| text_layer(k).is_some_and(|(l, _)| l >= fusion_layer))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|key| {
            let (l, tail) = text_layer(&key)?;
            let tail = tail.to_string();
            Some((l, tail, sd.remove(&key)?))
        })
        .collect();
    for (l, tail, tensor) in cross {
        let first = fusion_layer + 2 * (l - fusion_layer);
        for target in [first, first + 1] {
            sd.insert(
                format!("text_encoder.encoder.layer.{target}.{tail}"),
                tensor.shallow_clone(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parity::{run_case, WeightsSource};
    use tch::nn::VarStore;
    use tch::Device;

    /// The `nlvr` fixture (logits, loss, prediction, accuracy) from both weight files.
    #[test]
    fn nlvr_fixture_parity() {
        let dir = crate::fixtures_dir().join("nlvr");
        for source in [WeightsSource::TorchSave, WeightsSource::Safetensors] {
            let report = run_case(&dir, source).unwrap();
            assert_eq!(report.rows.len(), 6);
            assert!(report.passed(), "{source:?}: {:#?}", report.failures());
        }
    }

    /// A general 4-layer checkpoint (fusion 2) fills the 6-layer layout: layer 3 lands at 4 and 5; an
    /// already doubled checkpoint is kept.
    #[test]
    fn general_checkpoint_layers_are_doubled_once() {
        let key = |l: usize| format!("text_encoder.encoder.layer.{l}.output.dense.bias");
        let mut sd = StateDict::new();
        for l in 0..4 {
            sd.insert(key(l), Tensor::from_slice(&[l as f32]));
        }
        sd.insert("vision_encoder.x".into(), Tensor::from_slice(&[9f32]));
        double_cross_layers(&mut sd, 2, 4);
        let value = |sd: &StateDict, l: usize| sd[&key(l)].double_value(&[0]);
        let got: Vec<f64> = (0..6).map(|l| value(&sd, l)).collect();
        assert_eq!(got, [0.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        assert_eq!(sd.len(), 7);
        let before: Vec<f64> = (0..6).map(|l| value(&sd, l)).collect();
        double_cross_layers(&mut sd, 2, 4);
        assert_eq!((0..6).map(|l| value(&sd, l)).collect::<Vec<_>>(), before);
    }

    /// Each pair of duplicated cross layers holds ONE key/value tensor (listed under both keys).
    #[test]
    fn paired_cross_layers_share_key_and_value() {
        let task = TaskConfig::load(&crate::fixtures_dir().join("nlvr/config.yaml")).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = NlvrModel::new(&vs.root(), &task).unwrap();
        let sd = model.core.state_dict(&vs);
        // Tiny text config: fusion_layer 2, 2 cross layers → 6 layers, pairs (2, 3) and (4, 5).
        for (a, b) in [(2, 3), (4, 5)] {
            for name in ["key.weight", "key.bias", "value.weight", "value.bias"] {
                let key = |l| format!("text_encoder.encoder.layer.{l}.crossattention.self.{name}");
                assert_eq!(
                    sd[&key(a)].data_ptr(),
                    sd[&key(b)].data_ptr(),
                    "{name} of {a}/{b}"
                );
            }
            let q = |l| format!("text_encoder.encoder.layer.{l}.crossattention.self.query.weight");
            assert_ne!(sd[&q(a)].data_ptr(), sd[&q(b)].data_ptr());
        }
        assert!(!vs
            .variables()
            .contains_key("text_encoder.encoder.layer.3.crossattention.self.key.weight"));
    }
}
