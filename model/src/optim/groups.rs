//! Which of the four official param groups a parameter belongs to, decided by its name alone
//! (optim.py:create_optimizer; XVLM-REFERENCE.md §4, quirks §8.10).

use std::collections::HashMap;

use tch::{nn::VarStore, Tensor};

/// The official no-decay list. The test is a substring match, so everything containing `bias` is in it
/// (Swin's `relative_position_bias_table` included) while `itm_head.1.weight` (a LayerNorm) is not.
pub const NO_DECAY: [&str; 9] = [
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
];

/// True when the official optimizer puts `name` in a group without weight decay.
pub fn is_no_decay(name: &str) -> bool {
    NO_DECAY.iter().any(|nd| name.contains(nd))
}

/// The official group index: 0 decay, 1 no decay, 2 decay × lr_mult, 3 no decay × lr_mult.
pub fn group_index(name: &str, is_new_param: bool) -> usize {
    match (is_no_decay(name), is_new_param) {
        (false, false) => 0,
        (true, false) => 1,
        (false, true) => 2,
        (true, true) => 3,
    }
}

/// `init_params` of the pre-training model (XVLM-REFERENCE.md §1.8): the parameters that do not come
/// from the pretrained BERT/RoBERTa and Swin/ViT weights (the text encoder's cross-attention blocks,
/// which HF reports missing, the projections, `temp` and the ITM/box heads). They train at lr × lr_mult.
pub fn is_pretrain_init_param(name: &str) -> bool {
    const NEW_HEADS: [&str; 4] = ["vision_proj.", "text_proj.", "itm_head.", "bbox_head."];
    name == "temp"
        || (name.starts_with("text_encoder.") && name.contains(".crossattention."))
        || NEW_HEADS.iter().any(|h| name.starts_with(h))
}

/// A trainable parameter under its state-dict name (a tied tensor appears once, under its first name).
#[derive(Debug)]
pub struct NamedParam {
    /// Dotted state-dict name.
    pub name: String,
    /// The variable itself (shares storage with the model).
    pub tensor: Tensor,
}

/// One param group: its members (indices into the optimizer's parameter list) and hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The lr the schedule scales (`lr` or `lr × lr_mult`).
    pub initial_lr: f64,
    /// The lr the next step uses.
    pub lr: f64,
    /// Member parameter indices, in parameter order.
    pub params: Vec<usize>,
}

/// The trainable variables of `vs` in creation order (the order `named_parameters()` gives when a model
/// builds its modules in the official order), each under its VarStore name.
pub fn named_trainable_params(vs: &VarStore) -> Vec<NamedParam> {
    // A tensor registered under two names (a tie) keeps the smaller name, which is the official first
    // name for both BERT ties (`…word_embeddings.weight`, `…cls.predictions.bias`).
    let mut by_ptr: HashMap<usize, String> = HashMap::new();
    for (name, t) in vs.variables() {
        let entry = by_ptr
            .entry(t.data_ptr() as usize)
            .or_insert_with(|| name.clone());
        if name < *entry {
            *entry = name;
        }
    }
    let mut seen = std::collections::HashSet::new();
    vs.trainable_variables()
        .into_iter()
        .filter_map(|tensor| {
            let ptr = tensor.data_ptr() as usize;
            if !seen.insert(ptr) {
                return None;
            }
            let name = by_ptr.get(&ptr)?.clone();
            Some(NamedParam { name, tensor })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_rule_matches_official_quirks() {
        assert!(is_no_decay(
            "vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"
        ));
        assert!(is_no_decay("vision_encoder.patch_embed.norm.weight"));
        assert!(is_no_decay("vision_encoder.pre_layrnorm.weight"));
        assert!(is_no_decay(
            "vision_encoder.encoder.layers.0.layer_norm1.weight"
        ));
        assert!(!is_no_decay("itm_head.1.weight"));
        assert!(!is_no_decay("temp"));
        assert!(!is_no_decay(
            "text_encoder.bert.embeddings.word_embeddings.weight"
        ));
        assert_eq!(group_index("temp", true), 2);
        assert_eq!(group_index("itm_head.1.bias", true), 3);
        assert_eq!(group_index("vision_encoder.norm.bias", false), 1);
    }
}
