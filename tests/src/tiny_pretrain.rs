//! The tiny pre-training task config the end-to-end tests train (Swin 128 px and the demo BERT of
//! `configs/`, official keys only), on a `synth-data` corpus.

use std::path::Path;

/// What differs between the tests that train it.
pub struct TinyPretrain {
    /// With the region stream (`iter_perc` 1.0: both optimizer steps of an official iteration run).
    pub regions: bool,
    /// `schedular.epochs` (the lr schedule's length; the job's `steps` ends the run).
    pub epochs: u32,
}

impl TinyPretrain {
    /// The config as YAML, reading the corpus under `data` and the model configs in `configs` (the
    /// repository's `configs/`, `xvlm_model::config::configs_dir`).
    pub fn yaml(&self, data: &Path, configs: &Path) -> String {
        let configs = std::fs::canonicalize(configs).unwrap_or_else(|_| configs.to_path_buf());
        let (d, c) = (data.display(), configs.display());
        let regions = if self.regions {
            format!(
                "train_file_regions: ['{d}/pretrain/regions']
regions: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, iter_perc: 1.0, batch_size: 6, max_images: 2, max_regions: 3, min_perc_in_image: 0.5, num_workers: 1}}
"
            )
        } else {
            String::new()
        };
        let epochs = self.epochs;
        format!(
            "train_file: ['{d}/pretrain/image_text']
train_dataset_size: 16
images: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, batch_size: 4, num_workers: 1}}
{regions}use_clip_vit: False
use_swin: True
vision_config: '{c}/config_swin_tiny_128.json'
image_res: 128
patch_size: 32
use_roberta: False
text_config: '{c}/config_bert_demo.json'
text_encoder: '{d}'
load_bertL_by_sep: False
calc_image_bbox_loss: False
embed_dim: 16
temp: 0.07
max_words: 12
max_tokens: 16
mask_prob: 0.25
max_masks: 3
mask_whole_word: True
skipgram_prb: 0.2
skipgram_size: 3
optimizer: {{opt: adamW, lr: 1e-4, weight_decay: 0.01, lr_mult: 2}}
schedular: {{sched: linear, lr: 1e-4, epochs: {epochs}, num_warmup_steps: 2}}
accelerator: {{SYNCBN: false, FP16_OPT_LEVEL: O0, FP16_LOSS_SCALE: dynamic, RNG_SEED: 42, GRAD_ACCUMULATE_STEPS: 1, CLIP_GRAD_NORM: 5.0}}
"
        )
    }
}
