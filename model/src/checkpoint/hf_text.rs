//! Pre-training initialisation of the text side from a Hugging Face BERT / RoBERTa directory, as the
//! official `build_text_encoder` does with `BertForMaskedLM.from_pretrained` (XVLM-REFERENCE.md §1.8):
//! the pooler and the NSP head are dropped, old `gamma`/`beta` LayerNorm names are renamed, and the
//! cross-attention layers stay missing (they keep their fresh initialisation).

use std::path::{Path, PathBuf};

use super::{read_state_dict, CheckpointError, StateDict};

/// Weight files looked for in a Hugging Face model directory, in order of preference.
const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// The weight file of a Hugging Face model directory.
pub fn hf_weights_file(dir: &Path) -> Result<PathBuf, CheckpointError> {
    WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| CheckpointError::Open {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "no {} in this text encoder directory",
                    WEIGHT_FILES.join(" or ")
                ),
            ),
        })
}

/// Reads the directory's weights and maps them to our `text_encoder.*` keys.
pub fn text_init_state_dict(dir: &Path) -> Result<StateDict, CheckpointError> {
    let raw = read_state_dict(&hf_weights_file(dir)?)?;
    Ok(map_hf_text_keys(raw))
}

/// `bert.*` / `roberta.*` / `cls.predictions.*` / `lm_head.*` keys of a `*ForMaskedLM` checkpoint to ours.
pub fn map_hf_text_keys(raw: StateDict) -> StateDict {
    raw.into_iter()
        .filter(|(k, _)| !is_dropped(k))
        .map(|(k, v)| (format!("text_encoder.{}", rename_layer_norm(&k)), v))
        .collect()
}

fn is_dropped(key: &str) -> bool {
    key.starts_with("bert.pooler.")
        || key.starts_with("roberta.pooler.")
        || key.starts_with("cls.seq_relationship.")
}

/// Checkpoints saved by early BERT ports name LayerNorm parameters `gamma` / `beta`.
fn rename_layer_norm(key: &str) -> String {
    if let Some(stem) = key.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = key.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        key.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    #[test]
    fn maps_bert_keys_and_drops_heads_we_do_not_have() {
        let raw: StateDict = [
            "bert.embeddings.LayerNorm.gamma",
            "bert.embeddings.LayerNorm.beta",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.pooler.dense.weight",
            "cls.predictions.bias",
            "cls.seq_relationship.weight",
            "roberta.pooler.dense.bias",
            "lm_head.layer_norm.weight",
        ]
        .into_iter()
        .map(|k| (k.to_string(), Tensor::zeros([1], tch::kind::FLOAT_CPU)))
        .collect();
        let keys: Vec<String> = map_hf_text_keys(raw).into_keys().collect();
        assert_eq!(
            keys,
            [
                "text_encoder.bert.embeddings.LayerNorm.bias",
                "text_encoder.bert.embeddings.LayerNorm.weight",
                "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
                "text_encoder.cls.predictions.bias",
                "text_encoder.lm_head.layer_norm.weight",
            ]
        );
    }

    #[test]
    fn missing_weights_name_the_directory_and_the_files() {
        let dir = std::env::temp_dir().join("xvlm-no-hf-weights");
        std::fs::create_dir_all(&dir).unwrap();
        let err = text_init_state_dict(&dir).unwrap_err().to_string();
        assert!(err.contains("xvlm-no-hf-weights"), "{err}");
        assert!(err.contains("pytorch_model.bin"), "{err}");
    }
}
