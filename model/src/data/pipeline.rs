//! The pre-training data of one rank, assembled from the official config keys: an image-text loader and
//! a region loader that yield collated tensor batches and the stream state to checkpoint.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::augment::OpArithmetic;
use super::batch::{ImageTextBatch, RegionBatch};
use super::loader::{Loader, LoaderConfig, StreamState};
use super::masking::MaskConfig;
use super::region::{RegionConfig, RegionProcessor, RegionSample};
use super::rng::{rng_for, Purpose};
use super::sample::{ImageTextProcessor, ImageTextSample, TextPipeline};
use super::shard::ShardPlan;
use super::store::list_shards;
use super::tokenizer::TextTokenizer;
use super::transform::TrainTransform;
use super::DataError;
use crate::config::{ImagesSection, RegionsSection};

impl ImagesSection {
    /// The image-text training transform: the official `pretrain_transform` unless the xvlm-only keys
    /// soften it.
    pub fn transform(&self, res: usize) -> Result<TrainTransform, DataError> {
        TrainTransform::pretrain(res)
            .softened("images", self.crop_scale, self.hflip, self.rand_augment)
            .map(|t| t.with_arithmetic(OpArithmetic::from_exact_ops(self.exact_ops)))
    }
}

impl RegionsSection {
    /// The region sampling settings at side `image_res` with final stride `patch_size`.
    pub fn region_config(&self, image_res: usize, patch_size: usize) -> RegionConfig {
        RegionConfig {
            image_res,
            patch_size,
            max_regions: self.max_regions,
            min_perc_in_image: self.min_perc_in_image,
            careful_hflip: self.careful_hflip,
            arithmetic: OpArithmetic::from_exact_ops(self.exact_ops),
        }
    }
}

fn default_patch() -> usize {
    32
}

/// The data keys of an official pre-training config (unknown keys are ignored here).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainDataConfig {
    /// Image-text shard entries (files or directories).
    pub train_file: Vec<String>,
    /// Region shard entries.
    #[serde(default)]
    pub train_file_regions: Vec<String>,
    /// Image-text settings.
    pub images: ImagesSection,
    /// Region settings.
    pub regions: Option<RegionsSection>,
    /// Square image side.
    pub image_res: usize,
    /// Final vision stride.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// `pre_caption` word limit.
    pub max_words: usize,
    /// Tokens per text including `[CLS]`.
    pub max_tokens: usize,
    /// MLM probability.
    pub mask_prob: f64,
    /// MLM positions per text.
    pub max_masks: usize,
    /// Span probability.
    pub skipgram_prb: f64,
    /// Longest span.
    pub skipgram_size: usize,
    /// `##` whole-word rule.
    pub mask_whole_word: bool,
    /// Folder of the vocabulary.
    pub text_encoder: String,
    /// RoBERTa BPE vocabulary.
    #[serde(default)]
    pub use_roberta: bool,
}

impl PretrainDataConfig {
    fn text_pipeline(&self, tokenized: bool) -> Result<TextPipeline, DataError> {
        let tok = TextTokenizer::from_dir(&PathBuf::from(&self.text_encoder), self.use_roberta)?;
        Ok(TextPipeline {
            tokenizer: Arc::new(tok),
            max_words: self.max_words,
            max_tokens: self.max_tokens,
            mask: MaskConfig {
                mask_prob: self.mask_prob,
                max_masks: self.max_masks,
                skipgram_prb: self.skipgram_prb,
                skipgram_size: self.skipgram_size,
                mask_whole_word: self.mask_whole_word,
            },
            tokenized,
        })
    }
}

/// The image-text batches of one rank.
pub struct ImageTextLoader {
    inner: Loader<ImageTextSample>,
}

impl ImageTextLoader {
    /// Start at `state` (default = the beginning) for `rank` of `world`, splitting `train_file` itself.
    pub fn start(
        cfg: &PretrainDataConfig,
        rank: usize,
        world: usize,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, DataError> {
        let plan = ShardPlan::new(list_shards(&cfg.train_file)?, rank, world, seed)?;
        Self::start_plan(cfg, plan, seed, state)
    }

    /// Start at `state` reading `plan` (e.g. [`ShardPlan::assigned`] over the coordinator's files for
    /// this rank); `train_file` is not read.
    pub fn start_plan(
        cfg: &PretrainDataConfig,
        plan: ShardPlan,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, DataError> {
        let processor = ImageTextProcessor {
            keys: cfg.images.keys.clone(),
            text: cfg.text_pipeline(cfg.images.keys.tokenized)?,
            transform: cfg.images.transform(cfg.image_res)?,
        };
        let lc = LoaderConfig::new(cfg.images.batch_size, cfg.images.num_workers, seed);
        Ok(Self {
            inner: Loader::start(plan, Arc::new(processor), lc, state),
        })
    }

    /// Finished batches waiting in the loader's prefetch queue.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    /// The next batch and the state after it.
    pub fn next_batch(&mut self) -> Result<(ImageTextBatch, StreamState), DataError> {
        let b = self.inner.next_batch()?;
        Ok((ImageTextBatch::collate(&b.samples), b.state))
    }
}

/// The region batches of one rank.
pub struct RegionLoader {
    inner: Loader<RegionSample>,
    texts_per_batch: usize,
    seed: u64,
    rank: u64,
}

impl RegionLoader {
    /// Start at `state` for `rank` of `world`; fails if the config has no `regions:` section.
    pub fn start(
        cfg: &PretrainDataConfig,
        rank: usize,
        world: usize,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, DataError> {
        let rc = cfg
            .regions
            .as_ref()
            .ok_or_else(|| DataError::Config("no `regions:` section".into()))?;
        let plan = ShardPlan::new(list_shards(&cfg.train_file_regions)?, rank, world, seed)?;
        let processor = RegionProcessor {
            keys: rc.keys.clone(),
            text: cfg.text_pipeline(rc.keys.tokenized)?,
            cfg: rc.region_config(cfg.image_res, cfg.patch_size),
        };
        let lc = LoaderConfig::new(rc.max_images, rc.num_workers, seed);
        Ok(Self {
            inner: Loader::start(plan, Arc::new(processor), lc, state),
            texts_per_batch: rc.batch_size,
            seed,
            rank: rank as u64,
        })
    }

    /// Finished batches waiting in the loader's prefetch queue.
    pub fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    /// The next batch (exactly `batch_size` texts) and the state after it.
    pub fn next_batch(&mut self) -> Result<(RegionBatch, StreamState), DataError> {
        let b = self.inner.next_batch()?;
        let mut rng = rng_for(self.seed, Purpose::Collate, &[self.rank, b.index]);
        Ok((
            RegionBatch::collate(&mut rng, &b.samples, self.texts_per_batch),
            b.state,
        ))
    }
}
