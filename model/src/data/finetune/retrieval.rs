//! Image-text retrieval data (`re_train_dataset`, `re_eval_dataset`, Retrieval.py): the train set with
//! `idx` = dense index of `image_id` by first appearance over the train files, its threaded loader, and
//! the evaluation split (captions in order, `txt2img`, `img2txt`, images and texts loaded by range).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tch::Tensor;

use super::annotations::{self, item_err};
use super::config::{self, one_or_many, Resolver};
use super::images::{self, check_all_exist, ImageAt, ImageTransform};
use super::loader::{parallel_map, Loaded, MapDataset, MapLoader, MapLoaderConfig};
use super::sampler::{TrainCursor, TrainSampler};
use super::source::ImageRoot;
use super::text::{encode_batch, Padding, TextBatch};
use crate::config::TaskConfig;
use crate::data::augment::OpArithmetic;
use crate::data::caption::pre_caption;
use crate::data::tokenizer::TextTokenizer;
use crate::data::transform::TrainTransform;
use crate::data::DataError;

/// The data keys of a retrieval task YAML (`Retrieval_coco.yaml`, ...), file names resolved.
#[derive(Debug, Clone, Deserialize)]
pub struct RetrievalDataConfig {
    /// Train annotation files, read in order.
    #[serde(deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Validation file.
    #[serde(default)]
    pub val_file: Option<String>,
    /// Test file.
    #[serde(default)]
    pub test_file: Option<String>,
    /// Folder (or URL prefix) the `image` paths are relative to.
    pub image_root: String,
    /// Square image side.
    pub image_res: usize,
    /// Token limit (eval padding length; train truncation by default, DESIGN fix 16).
    #[serde(default = "config::default_max_tokens")]
    pub max_tokens: usize,
    /// `pre_caption` word limit.
    #[serde(default = "config::default_max_words")]
    pub max_words: usize,
    /// xvlm-only softening of the training transform (absent: the official `train_transform`).
    #[serde(default)]
    pub finetune_transform: FinetuneTransformSection,
}

/// xvlm-only `finetune_transform:` keys of a fine-tune config: the official `train_transform`
/// (RandomResizedCrop 0.5-1, flip, RandAugment) unless these soften it (e.g. the demo's synthetic
/// captions name left and right, so it turns the flip off).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneTransformSection {
    /// RandomResizedCrop area range (official 0.5-1).
    #[serde(default = "finetune_crop_scale")]
    pub crop_scale: (f64, f64),
    /// Random horizontal flip (official: on).
    #[serde(default = "yes")]
    pub hflip: bool,
    /// RandAugment(2, 7) (official: on).
    #[serde(default = "yes")]
    pub rand_augment: bool,
    /// AutoContrast and Sharpness without the official uint8 wraps (official: wraps).
    #[serde(default)]
    pub exact_ops: bool,
}

impl Default for FinetuneTransformSection {
    fn default() -> Self {
        Self {
            crop_scale: finetune_crop_scale(),
            hflip: true,
            rand_augment: true,
            exact_ops: false,
        }
    }
}

fn finetune_crop_scale() -> (f64, f64) {
    (0.5, 1.0)
}

fn yes() -> bool {
    true
}

impl FinetuneTransformSection {
    /// The training transform at side `res`.
    pub fn transform(&self, res: usize) -> Result<ImageTransform, DataError> {
        Ok(ImageTransform::Train(
            TrainTransform::finetune(res)
                .softened(
                    "finetune_transform",
                    self.crop_scale,
                    self.hflip,
                    self.rand_augment,
                )?
                .with_arithmetic(OpArithmetic::from_exact_ops(self.exact_ops)),
        ))
    }
}

impl RetrievalDataConfig {
    /// Reads the keys from a task YAML value, resolving file names with `resolver`.
    pub fn from_yaml(
        value: &serde_yaml::Value,
        resolver: &Resolver<'_>,
    ) -> Result<Self, DataError> {
        let mut cfg: Self = config::parse_keys(value, "retrieval data config")?;
        cfg.train_file = resolver.resolve_all(&cfg.train_file);
        cfg.val_file = cfg.val_file.map(|f| resolver.resolve(&f));
        cfg.test_file = cfg.test_file.map(|f| resolver.resolve(&f));
        cfg.image_root = resolver.resolve(&cfg.image_root);
        Ok(cfg)
    }

    /// The keys of a parsed task config (names resolved as [`TaskConfig::resolve`] does).
    pub fn from_task_config(cfg: &TaskConfig) -> Result<Self, DataError> {
        Self::from_yaml(&config::task_value(cfg)?, &Resolver::Task(cfg))
    }

    /// Reads a task YAML file (names relative to its folder).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&config::read_yaml(path)?, &Resolver::Base(base))
    }
}

/// The training pairs of all train files: one item per caption.
#[derive(Debug, Clone)]
pub struct RetrievalTrainSet {
    /// The image of each item.
    pub images: Vec<ImageAt>,
    /// `pre_caption(caption, max_words)` of each item.
    pub captions: Vec<String>,
    /// Dense image id of each item (equal = same image: ITC positives).
    pub idx: Vec<i64>,
    /// Number of distinct `image_id`s.
    pub num_image_ids: usize,
}

impl RetrievalTrainSet {
    /// Reads `files` in order; captions are cleaned now (an empty result is an error naming the item)
    /// and local images must exist.
    pub fn load(files: &[String], root: &ImageRoot, max_words: usize) -> Result<Self, DataError> {
        let mut set = Self {
            images: Vec::new(),
            captions: Vec::new(),
            idx: Vec::new(),
            num_image_ids: 0,
        };
        let mut ids: HashMap<String, i64> = HashMap::new();
        for file in files {
            for (i, ann) in annotations::retrieval_train(file)?.into_iter().enumerate() {
                let caption = pre_caption(&ann.caption, max_words)
                    .map_err(|_| item_err(file, i, "caption is empty after pre_caption"))?;
                let next = ids.len() as i64;
                set.idx.push(*ids.entry(ann.image_id).or_insert(next));
                set.images.push(ImageAt::new(root, &ann.image, file, i)?);
                set.captions.push(caption);
            }
        }
        set.num_image_ids = ids.len();
        check_all_exist(&set.images)?;
        Ok(set)
    }

    /// Number of (image, caption) items.
    pub fn len(&self) -> usize {
        self.captions.len()
    }

    /// Whether there are no items.
    pub fn is_empty(&self) -> bool {
        self.captions.is_empty()
    }
}

/// One collated retrieval training batch.
#[derive(Debug)]
pub struct RetrievalTrainBatch {
    /// `[B, 3, R, R]` float32.
    pub image: Tensor,
    /// `[B, L]` int64: `[CLS]` + pieces, no `[SEP]`, padded to the longest.
    pub text_ids: Tensor,
    /// `[B, L]` int64 attention mask.
    pub text_atts: Tensor,
    /// `[B]` int64 dense image ids.
    pub idx: Tensor,
}

/// How training texts are tokenized and images transformed.
#[derive(Clone)]
pub struct RetrievalTrainData {
    /// The items.
    pub set: Arc<RetrievalTrainSet>,
    /// The tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// The image transform (the official `train_transform`; `test_transform` for checks).
    pub transform: ImageTransform,
    /// Token limit per text (`Some(max_tokens)`, DESIGN fix 16), or `None`: the official call
    /// (`padding='longest', max_length=40` without truncation).
    pub truncate_to: Option<usize>,
}

impl MapDataset for RetrievalTrainData {
    type Item = (usize, Vec<f32>);
    type Batch = RetrievalTrainBatch;

    fn len(&self) -> usize {
        self.set.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        Ok((index, self.transform.load(rng, &self.set.images[index])?))
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<RetrievalTrainBatch, DataError> {
        let (indices, images): (Vec<usize>, Vec<Vec<f32>>) = items.into_iter().unzip();
        let texts: Vec<&str> = indices
            .iter()
            .map(|&i| self.set.captions[i].as_str())
            .collect();
        let text = encode_batch(&self.tokenizer, &texts, Padding::Longest, self.truncate_to)?;
        let idx: Vec<i64> = indices.iter().map(|&i| self.set.idx[i]).collect();
        Ok(RetrievalTrainBatch {
            image: images::stack(&images, self.transform.res()),
            text_ids: text.ids,
            text_atts: text.atts,
            idx: Tensor::from_slice(&idx),
        })
    }
}

/// Loader settings of one rank.
#[derive(Debug, Clone, Copy)]
pub struct RetrievalLoaderOptions {
    /// Pairs per rank per step.
    pub batch_per_rank: usize,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Job seed (permutation and augmentation).
    pub seed: u64,
    /// Image loading threads.
    pub threads: usize,
    /// Batches prepared ahead.
    pub prefetch_batches: usize,
}

impl RetrievalLoaderOptions {
    /// Rank `rank` of `world` with `batch_per_rank` pairs, 4 loading threads and 2 batches prefetched.
    pub fn new(batch_per_rank: usize, rank: usize, world: usize, seed: u64) -> Self {
        Self {
            batch_per_rank,
            rank,
            world,
            seed,
            threads: 4,
            prefetch_batches: 2,
        }
    }
}

/// The threaded, prefetching retrieval train loader of one rank.
pub struct RetrievalTrainLoader {
    inner: MapLoader<RetrievalTrainBatch>,
    sampler: TrainSampler,
}

impl RetrievalTrainLoader {
    /// Starts at `cursor` (`TrainCursor::default()` = the beginning).
    pub fn start(
        data: RetrievalTrainData,
        opts: RetrievalLoaderOptions,
        cursor: TrainCursor,
    ) -> Result<Self, DataError> {
        let sampler = TrainSampler::new(
            data.len(),
            opts.batch_per_rank,
            opts.rank,
            opts.world,
            opts.seed,
        )?;
        let cfg = MapLoaderConfig {
            threads: opts.threads,
            prefetch_batches: opts.prefetch_batches,
            seed: opts.seed,
        };
        let inner = MapLoader::start(Arc::new(data), sampler.clone(), cursor, cfg)?;
        Ok(Self { inner, sampler })
    }

    /// The next batch with the cursor it was read at and the cursor after it.
    pub fn next_batch(&mut self) -> Result<Loaded<RetrievalTrainBatch>, DataError> {
        self.inner.next_batch()
    }

    /// The sampler (steps per epoch, schedule steps per epoch).
    pub fn sampler(&self) -> &TrainSampler {
        &self.sampler
    }
}

/// An evaluation split (`re_eval_dataset`): images in file order, their captions numbered image by
/// image.
#[derive(Clone)]
pub struct RetrievalEvalSet {
    /// The annotation file.
    pub file: String,
    /// The images, in file order.
    pub images: Vec<ImageAt>,
    /// `pre_caption(c, max_words)` of every caption, image by image.
    pub texts: Vec<String>,
    /// The image of each text.
    pub txt2img: Vec<usize>,
    /// The texts of each image.
    pub img2txt: Vec<Vec<usize>>,
    transform: ImageTransform,
    tokenizer: Arc<TextTokenizer>,
    max_tokens: usize,
}

impl RetrievalEvalSet {
    /// Reads `file`; an empty cleaned caption is an error naming the item (it would shift `txt2img`).
    pub fn load(
        file: &str,
        root: &ImageRoot,
        cfg: &RetrievalDataConfig,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<Self, DataError> {
        let mut set = Self {
            file: file.to_string(),
            images: Vec::new(),
            texts: Vec::new(),
            txt2img: Vec::new(),
            img2txt: Vec::new(),
            transform: ImageTransform::test(cfg.image_res),
            tokenizer,
            max_tokens: cfg.max_tokens,
        };
        for (i, ann) in annotations::retrieval_eval(file)?.into_iter().enumerate() {
            set.images.push(ImageAt::new(root, &ann.image, file, i)?);
            let mut of_image = Vec::with_capacity(ann.captions.len());
            for (c, caption) in ann.captions.iter().enumerate() {
                let cleaned = pre_caption(caption, cfg.max_words).map_err(|_| {
                    item_err(file, i, format!("caption {c} is empty after pre_caption"))
                })?;
                of_image.push(set.texts.len());
                set.txt2img.push(i);
                set.texts.push(cleaned);
            }
            set.img2txt.push(of_image);
        }
        check_all_exist(&set.images)?;
        Ok(set)
    }

    /// Number of images.
    pub fn num_images(&self) -> usize {
        self.images.len()
    }

    /// Number of texts.
    pub fn num_texts(&self) -> usize {
        self.texts.len()
    }

    /// The test-transformed images `indices` as `[n, 3, R, R]` (load a rank's slice batch by batch).
    pub fn load_images(&self, indices: &[usize], threads: usize) -> Result<Tensor, DataError> {
        let out = parallel_map(indices.len(), threads, |p| {
            let at = self.images.get(indices[p]).ok_or_else(|| {
                DataError::Config(format!(
                    "image {} of {} is past its {} images",
                    indices[p],
                    self.file,
                    self.images.len()
                ))
            })?;
            self.transform
                .load(&mut super::loader::sample_rng(0, 0, 0), at)
        })?;
        Ok(images::stack(&out, self.transform.res()))
    }

    /// The images of a contiguous range.
    pub fn load_image_range(
        &self,
        range: Range<usize>,
        threads: usize,
    ) -> Result<Tensor, DataError> {
        self.load_images(&range.collect::<Vec<_>>(), threads)
    }

    /// Texts `range` tokenized as Retrieval.evaluation: `padding='max_length', truncation=True,
    /// max_length=max_tokens`.
    pub fn tokenize_texts(&self, range: Range<usize>) -> Result<TextBatch, DataError> {
        let texts = self.texts.get(range.clone()).ok_or_else(|| {
            DataError::Config(format!(
                "texts {range:?} of {} are past its {} texts",
                self.file,
                self.texts.len()
            ))
        })?;
        encode_batch(
            &self.tokenizer,
            texts,
            Padding::MaxLength(self.max_tokens),
            Some(self.max_tokens),
        )
    }

    /// `img2txt` as `[n_images, max captions]` int64, -1 padded (the fixture's layout).
    pub fn img2txt_padded(&self) -> Tensor {
        let width = self.img2txt.iter().map(Vec::len).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(self.img2txt.len() * width);
        for texts in &self.img2txt {
            flat.extend(texts.iter().map(|&t| t as i64));
            flat.extend(std::iter::repeat_n(-1i64, width - texts.len()));
        }
        Tensor::from_slice(&flat).view([self.img2txt.len() as i64, width as i64])
    }
}

/// The retrieval data of a task config: train set plus the val and test splits it names.
pub struct RetrievalData {
    /// The keys it was built from.
    pub config: RetrievalDataConfig,
    /// Training pairs.
    pub train: Arc<RetrievalTrainSet>,
    /// `val_file`, if configured.
    pub val: Option<RetrievalEvalSet>,
    /// `test_file`, if configured.
    pub test: Option<RetrievalEvalSet>,
}

impl RetrievalData {
    /// Reads every file the config names.
    pub fn load(
        cfg: &RetrievalDataConfig,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<Self, DataError> {
        let root = ImageRoot(cfg.image_root.clone());
        let train = Arc::new(RetrievalTrainSet::load(
            &cfg.train_file,
            &root,
            cfg.max_words,
        )?);
        let eval = |f: &Option<String>| {
            f.as_deref()
                .map(|f| RetrievalEvalSet::load(f, &root, cfg, tokenizer.clone()))
                .transpose()
        };
        Ok(Self {
            config: cfg.clone(),
            val: eval(&cfg.val_file)?,
            test: eval(&cfg.test_file)?,
            train,
        })
    }

    /// The train data with the official `train_transform` (or the config's `finetune_transform`) and
    /// the default truncation to `max_tokens`.
    pub fn train_data(
        &self,
        tokenizer: Arc<TextTokenizer>,
    ) -> Result<RetrievalTrainData, DataError> {
        Ok(RetrievalTrainData {
            set: self.train.clone(),
            tokenizer,
            transform: self
                .config
                .finetune_transform
                .transform(self.config.image_res)?,
            truncate_to: Some(self.config.max_tokens),
        })
    }
}
