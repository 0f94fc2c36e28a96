//! The pre-training json-lines shards (reference §3.1) as map-style datasets, for the domain
//! pre-trainings that run on the fine-tune runner (`NLVR_pretrain.py` on image-text lines,
//! `Grounding_bbox_pretrain.py` on region lines).
//!
//! Design: the official scripts stream the shards forever (`DistLineReadingDataset`); the fine-tune
//! runner reads a [`MapDataset`] by index, with a per-epoch permutation and an exact (epoch, batch)
//! cursor. [`LineIndex`] bridges the two: at start every rank lists the train entries (directories
//! non-recursively, sorted by name, as the pre-training loader does) and scans each file once for
//! the byte offset and length of every non-blank line; an item is then one line, read lazily from
//! its offset when its batch is loaded. The index holds 16 bytes per line (64 MB for 4M lines) and
//! costs one sequential read of the data at start. The lines are parsed and transformed by the
//! pre-training processors themselves ([`ImageTextProcessor`], [`RegionProcessor`]: caption choice,
//! `pre_caption`, tokenisation, the pre-training image transform, the region crop / flip / box
//! targets), and batches are collated by the pre-training collates ([`ImageTextBatch::collate`],
//! [`RegionBatch::collate`], which picks exactly `regions.batch_size` texts).
//!
//! Hostile input: a file that cannot be listed or read is a fatal error naming it; a line that does
//! not parse, lacks a field, has an undecodable image or an invalid box is skipped (as the official
//! loaders skip broken samples), counted ([`ImageTextLines::skipped`], [`RegionLines::skipped`]) and
//! logged with its file and line number; a batch in which every line was skipped is an error naming
//! them. Skips depend on the data only, so a resume sees the same batches.
//!
//! Randomness: a line's draws come from the item generator of (seed, epoch, index) the loader hands
//! to [`MapDataset::load`]; each loaded line also draws a 64-bit seed from it, and a batch's own draws
//! (the region collate's text choice, the NLVR pre-training's image pairs) come from the seeds of its
//! lines ([`batch_seed`]), so they depend on the items only, never on thread or rank count.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

use super::config::{self, one_or_many, Resolver};
use super::loader::MapDataset;
use crate::config::{ImagesSection, RegionsSection};
use crate::data::batch::{ImageTextBatch, RegionBatch};
use crate::data::loader::Processor;
use crate::data::masking::MaskConfig;
use crate::data::region::{RegionProcessor, RegionSample};
use crate::data::rng::{derive_seed, Purpose};
use crate::data::sample::{ImageTextProcessor, ImageTextSample, TextPipeline};
use crate::data::store::{list_shards, open_at, ShardFile};
use crate::data::tokenizer::TextTokenizer;
use crate::data::DataError;

fn default_patch() -> usize {
    32
}

/// The data keys of a pre-training-format task config that the domain pre-trainings read (other keys
/// are ignored), file names resolved like the config's other files.
#[derive(Debug, Clone, Deserialize)]
pub struct LinesDataConfig {
    /// Image-text json-lines entries (files or directories).
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file: Vec<String>,
    /// Region json-lines entries.
    #[serde(default, deserialize_with = "one_or_many")]
    pub train_file_regions: Vec<String>,
    /// `images:` (image-text record keys, pairs per batch, the transform's xvlm-only softening).
    #[serde(default)]
    pub images: Option<ImagesSection>,
    /// `regions:` (region record keys, texts and images per batch, the crop rule).
    #[serde(default)]
    pub regions: Option<RegionsSection>,
    /// Square image side.
    pub image_res: usize,
    /// Final vision stride.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// `pre_caption` word limit.
    #[serde(default = "config::default_max_words")]
    pub max_words: usize,
    /// Tokens per text including `[CLS]` (texts are padded to it, as in pre-training).
    #[serde(default = "config::default_max_tokens")]
    pub max_tokens: usize,
    /// MLM keys: the pre-training processors mask every text; the domain pre-trainings ignore the
    /// masks. Absent keys take the 4M config's values.
    #[serde(default)]
    pub mask_prob: Option<f64>,
    /// See `mask_prob`.
    #[serde(default)]
    pub max_masks: Option<usize>,
    /// See `mask_prob`.
    #[serde(default)]
    pub skipgram_prb: Option<f64>,
    /// See `mask_prob`.
    #[serde(default)]
    pub skipgram_size: Option<usize>,
    /// See `mask_prob`.
    #[serde(default)]
    pub mask_whole_word: Option<bool>,
}

impl LinesDataConfig {
    /// Reads the keys from a task YAML value.
    pub fn from_yaml(
        value: &serde_yaml::Value,
        resolver: &Resolver<'_>,
    ) -> Result<Self, DataError> {
        let mut cfg: Self = config::parse_keys(value, "json-lines data config")?;
        cfg.train_file = resolver.resolve_all(&cfg.train_file);
        cfg.train_file_regions = resolver.resolve_all(&cfg.train_file_regions);
        Ok(cfg)
    }

    /// Reads the keys of a loaded task config (names resolved as its other files).
    pub fn from_task_config(cfg: &crate::config::TaskConfig) -> Result<Self, DataError> {
        Self::from_yaml(&config::task_value(cfg)?, &Resolver::Task(cfg))
    }

    /// Reads a task YAML file (names relative to its folder).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_yaml(&config::read_yaml(path)?, &Resolver::Base(base))
    }

    /// The `images:` section.
    pub fn images(&self) -> Result<&ImagesSection, DataError> {
        self.images
            .as_ref()
            .ok_or_else(|| DataError::Config("the task config has no `images:` section".into()))
    }

    /// The `regions:` section.
    pub fn regions(&self) -> Result<&RegionsSection, DataError> {
        self.regions
            .as_ref()
            .ok_or_else(|| DataError::Config("the task config has no `regions:` section".into()))
    }

    fn text_pipeline(&self, tokenizer: Arc<TextTokenizer>, tokenized: bool) -> TextPipeline {
        let d = MaskConfig::default();
        TextPipeline {
            tokenizer,
            max_words: self.max_words,
            max_tokens: self.max_tokens,
            mask: MaskConfig {
                mask_prob: self.mask_prob.unwrap_or(d.mask_prob),
                max_masks: self.max_masks.unwrap_or(d.max_masks),
                skipgram_prb: self.skipgram_prb.unwrap_or(d.skipgram_prb),
                skipgram_size: self.skipgram_size.unwrap_or(d.skipgram_size),
                mask_whole_word: self.mask_whole_word.unwrap_or(d.mask_whole_word),
            },
            tokenized,
        }
    }
}

/// Where one line lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LineAt {
    /// Index into [`LineIndex::files`].
    file: u32,
    /// 1-based line number in its file.
    number: u32,
    /// Byte offset of its first byte.
    offset: u64,
    /// Bytes, without the newline.
    len: u32,
}

/// The non-blank lines of a set of json-lines shard files, read by index.
#[derive(Debug)]
pub struct LineIndex {
    files: Vec<ShardFile>,
    lines: Vec<LineAt>,
}

fn io_err(file: &ShardFile, source: std::io::Error) -> DataError {
    DataError::Io {
        path: PathBuf::from(&file.name),
        source,
    }
}

fn line_err(file: &ShardFile, number: u64, reason: impl std::fmt::Display) -> DataError {
    DataError::Annotation {
        file: file.name.clone(),
        index: None,
        reason: format!("line {number}: {reason}"),
    }
}

impl LineIndex {
    /// Lists `entries` (files or directories, local paths or URLs) and indexes every non-blank line of
    /// every file; fails naming the entry or file that cannot be listed or read, or when no line is
    /// found.
    pub fn build(entries: &[String]) -> Result<Self, DataError> {
        let files = list_shards(entries)?;
        if files.is_empty() {
            return Err(DataError::Config(format!(
                "no json-lines files in {entries:?}"
            )));
        }
        let mut lines = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let index = u32::try_from(i)
                .map_err(|_| DataError::Config(format!("more than {} files", u32::MAX)))?;
            scan(file, index, &mut lines)?;
        }
        if lines.is_empty() {
            return Err(DataError::Config(format!(
                "the json-lines files of {entries:?} hold no line"
            )));
        }
        Ok(Self { files, lines })
    }

    /// Indexed lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Whether no line is indexed (never: [`LineIndex::build`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The indexed files, in index order.
    pub fn files(&self) -> &[ShardFile] {
        &self.files
    }

    /// The file name and 1-based line number of line `i`.
    pub fn position(&self, i: usize) -> Option<(&str, u64)> {
        let at = self.lines.get(i)?;
        let file = self.files.get(at.file as usize)?;
        Some((file.name.as_str(), u64::from(at.number)))
    }

    /// `file:line` of line `i` (for messages).
    pub fn describe(&self, i: usize) -> String {
        match self.position(i) {
            Some((file, number)) => format!("{file}:{number}"),
            None => format!("line #{i} (out of range)"),
        }
    }

    /// The bytes of line `i` (without its newline), read from its file; a file that changed since it
    /// was indexed is an error naming it.
    pub fn read(&self, i: usize) -> Result<Vec<u8>, DataError> {
        let at = self.lines.get(i).copied().ok_or_else(|| {
            DataError::Config(format!("line #{i} of an index of {}", self.lines.len()))
        })?;
        let file = &self.files[at.file as usize];
        let mut reader = open_at(file, at.offset)?;
        let mut buf = vec![0u8; at.len as usize];
        reader
            .read_exact(&mut buf)
            .map_err(|e| line_err(file, u64::from(at.number), format!("unreadable ({e})")))?;
        Ok(buf)
    }
}

/// Appends the non-blank lines of `file` to `out`.
fn scan(file: &ShardFile, index: u32, out: &mut Vec<LineAt>) -> Result<(), DataError> {
    let mut reader = open_at(file, 0)?;
    let mut consumed = 0u64;
    let mut start = 0u64;
    let mut number = 1u64;
    let mut blank = true;
    let mut push = |start: u64, end: u64, number: u64| -> Result<(), DataError> {
        let len =
            u32::try_from(end - start).map_err(|_| line_err(file, number, "longer than 4 GiB"))?;
        let number = u32::try_from(number).map_err(|_| line_err(file, number, "too many lines"))?;
        out.push(LineAt {
            file: index,
            number,
            offset: start,
            len,
        });
        Ok(())
    };
    loop {
        let buf = reader.fill_buf().map_err(|e| io_err(file, e))?;
        if buf.is_empty() {
            break;
        }
        let n = buf.len();
        for (i, &byte) in buf.iter().enumerate() {
            if byte == b'\n' {
                let end = consumed + i as u64;
                if !blank {
                    push(start, end, number)?;
                }
                start = end + 1;
                number += 1;
                blank = true;
            } else if !byte.is_ascii_whitespace() {
                blank = false;
            }
        }
        consumed += n as u64;
        reader.consume(n);
    }
    if !blank {
        push(start, consumed, number)?;
    }
    Ok(())
}

/// One loaded line: its sample and the seed it drew, or why it was skipped.
#[derive(Debug)]
pub enum LineItem<S> {
    /// The line's sample.
    Loaded {
        /// The processed sample.
        sample: S,
        /// A 64-bit draw of the line's generator, after the sample's (see [`batch_seed`]).
        seed: u64,
    },
    /// The line was unusable.
    Skipped {
        /// `file:line`.
        at: String,
        /// Why.
        reason: String,
    },
}

/// The seed of a batch's own draws from the seeds of its loaded lines, in batch order.
pub fn batch_seed(seeds: &[u64]) -> u64 {
    derive_seed(seeds.len() as u64, Purpose::Collate, seeds)
}

/// Reads and processes line `i`: a per-sample error is a skip, anything else is fatal.
fn load_line<P: Processor>(
    index: &LineIndex,
    processor: &P,
    i: usize,
    rng: &mut ChaCha8Rng,
) -> Result<LineItem<P::Sample>, DataError> {
    let line = index.read(i)?;
    match processor.process(&line, rng) {
        Ok(sample) => Ok(LineItem::Loaded {
            sample,
            seed: rng.random(),
        }),
        Err(DataError::Sample(reason)) => Ok(LineItem::Skipped {
            at: index.describe(i),
            reason,
        }),
        Err(e) => Err(DataError::Annotation {
            file: index.describe(i),
            index: None,
            reason: e.to_string(),
        }),
    }
}

/// The loaded samples of a batch and its seed; counts and logs the skipped lines, fails when none
/// was loaded.
fn survivors<S>(items: Vec<LineItem<S>>, skipped: &AtomicU64) -> Result<(Vec<S>, u64), DataError> {
    let mut samples = Vec::with_capacity(items.len());
    let mut seeds = Vec::with_capacity(items.len());
    let mut bad = Vec::new();
    for item in items {
        match item {
            LineItem::Loaded { sample, seed } => {
                samples.push(sample);
                seeds.push(seed);
            }
            LineItem::Skipped { at, reason } => {
                skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(line = %at, %reason, "skipped an unusable json line");
                bad.push(format!("{at} ({reason})"));
            }
        }
    }
    if samples.is_empty() {
        return Err(DataError::Annotation {
            file: bad.first().cloned().unwrap_or_default(),
            index: None,
            reason: format!("every line of the batch is unusable: {}", bad.join("; ")),
        });
    }
    Ok((samples, batch_seed(&seeds)))
}

/// An image-text batch with the seed of its pair draws.
#[derive(Debug)]
pub struct ImageTextLinesBatch {
    /// The pre-training image-text batch (one caption per line).
    pub batch: ImageTextBatch,
    /// Seed of the batch's own draws (the NLVR pre-training's image pairs), from its lines.
    pub draw_seed: u64,
}

/// Image-text json lines (`train_file`, `images:`) as a map-style dataset: each item a line through
/// the pre-training image-text processor (`pretrain_transform`, softened by the xvlm-only keys).
pub struct ImageTextLines {
    index: Arc<LineIndex>,
    processor: ImageTextProcessor,
    skipped: AtomicU64,
}

impl ImageTextLines {
    /// Indexes `cfg.train_file` and sets up the processor of `cfg.images`.
    pub fn open(cfg: &LinesDataConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self, DataError> {
        let images = cfg.images()?;
        if cfg.train_file.is_empty() {
            return Err(DataError::Config(
                "the task config names no `train_file`".into(),
            ));
        }
        let processor = ImageTextProcessor {
            keys: images.keys.clone(),
            text: cfg.text_pipeline(tokenizer, images.keys.tokenized),
            transform: images.transform(cfg.image_res)?,
        };
        Ok(Self {
            index: Arc::new(LineIndex::build(&cfg.train_file)?),
            processor,
            skipped: AtomicU64::new(0),
        })
    }

    /// The line index.
    pub fn index(&self) -> &LineIndex {
        &self.index
    }

    /// Lines skipped so far by this process.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl MapDataset for ImageTextLines {
    type Item = LineItem<ImageTextSample>;
    type Batch = ImageTextLinesBatch;

    fn len(&self) -> usize {
        self.index.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        load_line(&self.index, &self.processor, index, rng)
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<ImageTextLinesBatch, DataError> {
        let (samples, draw_seed) = survivors(items, &self.skipped)?;
        Ok(ImageTextLinesBatch {
            batch: ImageTextBatch::collate(&samples),
            draw_seed,
        })
    }
}

/// Region json lines (`train_file_regions`, `regions:`) as a map-style dataset: each item one image
/// line through the pre-training region processor (§3.5), a batch `regions.max_images` lines collated
/// into exactly `regions.batch_size` texts.
pub struct RegionLines {
    index: Arc<LineIndex>,
    processor: RegionProcessor,
    texts_per_batch: usize,
    skipped: AtomicU64,
}

impl RegionLines {
    /// Indexes `cfg.train_file_regions` and sets up the processor of `cfg.regions`.
    pub fn open(cfg: &LinesDataConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self, DataError> {
        let regions = cfg.regions()?;
        if cfg.train_file_regions.is_empty() {
            return Err(DataError::Config(
                "the task config names no `train_file_regions`".into(),
            ));
        }
        if regions.batch_size == 0 || regions.max_images == 0 || regions.max_regions == 0 {
            return Err(DataError::Config(
                "regions: batch_size, max_images and max_regions must be positive".into(),
            ));
        }
        let processor = RegionProcessor {
            keys: regions.keys.clone(),
            text: cfg.text_pipeline(tokenizer, regions.keys.tokenized),
            cfg: regions.region_config(cfg.image_res, cfg.patch_size),
        };
        Ok(Self {
            index: Arc::new(LineIndex::build(&cfg.train_file_regions)?),
            processor,
            texts_per_batch: regions.batch_size,
            skipped: AtomicU64::new(0),
        })
    }

    /// The line index.
    pub fn index(&self) -> &LineIndex {
        &self.index
    }

    /// Lines skipped so far by this process.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

impl MapDataset for RegionLines {
    type Item = LineItem<RegionSample>;
    type Batch = RegionBatch;

    fn len(&self) -> usize {
        self.index.len()
    }

    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError> {
        load_line(&self.index, &self.processor, index, rng)
    }

    fn collate(&self, items: Vec<Self::Item>) -> Result<RegionBatch, DataError> {
        let (samples, seed) = survivors(items, &self.skipped)?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(RegionBatch::collate(
            &mut rng,
            &samples,
            self.texts_per_batch,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::finetune::loader::{load_batch, sample_rng};
    use crate::data::synth::{generate, SynthConfig};

    fn tokenizer(data: &Path) -> Arc<TextTokenizer> {
        Arc::new(TextTokenizer::from_dir(data, false).unwrap())
    }

    fn corpus(dir: &Path) -> PathBuf {
        let data = dir.join("data");
        generate(
            &data,
            &SynthConfig {
                images: 12,
                width: 64,
                height: 48,
                shards: 2,
                ..SynthConfig::default()
            },
        )
        .unwrap();
        data
    }

    fn config(data: &Path, train_file: &str, regions: &str) -> LinesDataConfig {
        let d = data.display();
        let yaml = format!(
            "train_file: ['{train_file}']
train_file_regions: ['{regions}']
images: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, batch_size: 4}}
regions: {{image_key: binary, is_image_rpath: False, caption_key: caption, tokenized: False, iter_perc: 1.0, batch_size: 5, max_images: 2, max_regions: 3, min_perc_in_image: 0.5}}
image_res: 64
max_words: 12
max_tokens: 16
text_encoder: '{d}'
"
        );
        let value: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        LinesDataConfig::from_yaml(&value, &Resolver::Base(data)).unwrap()
    }

    /// Offsets and line numbers: blank lines (also `\r\n` ones and a last line without a newline)
    /// are not items, and each line reads back exactly.
    #[test]
    fn index_finds_every_non_blank_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.jsonl");
        std::fs::write(&file, b"{\"x\": 1}\n\n  \r\n{\"x\": 22}\r\n{\"x\": 333}").unwrap();
        let index = LineIndex::build(&[file.display().to_string()]).unwrap();
        assert_eq!(index.len(), 3);
        assert_eq!(index.read(0).unwrap(), b"{\"x\": 1}");
        assert_eq!(index.read(1).unwrap(), b"{\"x\": 22}\r");
        assert_eq!(index.read(2).unwrap(), b"{\"x\": 333}");
        let name = file.display().to_string();
        assert_eq!(index.position(1), Some((name.as_str(), 4)));
        assert_eq!(index.describe(2), format!("{name}:5"));
        assert!(index.read(3).is_err());
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, b"\n\n").unwrap();
        assert!(LineIndex::build(&[empty.display().to_string()]).is_err());
        let missing = dir.path().join("missing").display().to_string();
        assert!(matches!(
            LineIndex::build(&[missing]),
            Err(DataError::MissingFile(_))
        ));
    }

    /// Bad lines (not JSON, a missing caption, a box outside the image) are counted skips named by
    /// file and line; a batch of only bad lines is an error naming them; a file truncated after
    /// indexing is an error naming it, never a panic.
    #[test]
    fn hostile_lines_are_counted_skips_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let data = corpus(dir.path());
        let good_it = std::fs::read_dir(data.join("pretrain/image_text"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        let good = std::fs::read_to_string(&good_it).unwrap();
        let first = good.lines().next().unwrap().to_string();
        let it = dir.path().join("it.jsonl");
        std::fs::write(
            &it,
            format!("{first}\n{{not json\n{{\"binary\": \"AAAA\"}}\n{first}\n"),
        )
        .unwrap();
        let cfg = config(&data, &it.display().to_string(), "unused");
        let set = ImageTextLines::open(&cfg, tokenizer(&data)).unwrap();
        assert_eq!(set.len(), 4);
        let batch = load_batch(&set, &[0, 1, 2, 3], 0, 7, 2).unwrap();
        assert_eq!(batch.batch.image.size()[0], 2);
        assert_eq!(set.skipped(), 2);
        let err = load_batch(&set, &[1, 2], 0, 7, 1).unwrap_err().to_string();
        assert!(
            err.contains("it.jsonl:2") && err.contains("it.jsonl:3"),
            "{err}"
        );

        // A region line whose boxes lie outside the image.
        let good_rg = std::fs::read_dir(data.join("pretrain/regions"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .min()
            .unwrap();
        let line = std::fs::read_to_string(&good_rg)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string();
        let mut obj: serde_json::Value = serde_json::from_str(&line).unwrap();
        for e in obj["elems"].as_array_mut().unwrap() {
            e["bb"] = serde_json::json!([5000, 5000, 10, 10]);
        }
        let rg = dir.path().join("rg.jsonl");
        std::fs::write(&rg, format!("{line}\n{obj}\n")).unwrap();
        let cfg = config(&data, "unused", &rg.display().to_string());
        let set = RegionLines::open(&cfg, tokenizer(&data)).unwrap();
        let batch = load_batch(&set, &[0, 1], 0, 7, 1).unwrap();
        assert_eq!(batch.image.size()[0], 1);
        assert_eq!(batch.text_ids.size()[0], 5);
        assert_eq!(set.skipped(), 1);

        // Truncated after indexing.
        std::fs::write(&rg, &line[..10]).unwrap();
        let err = set
            .load(0, &mut sample_rng(7, 0, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("rg.jsonl"), "{err}");
    }

    /// A line's sample and a batch's seed depend on (seed, epoch, index) only: the same at 1 and 3
    /// loader threads, another in the next epoch.
    #[test]
    fn batches_are_pure_functions_of_their_items() {
        let dir = tempfile::tempdir().unwrap();
        let data = corpus(dir.path());
        let d = data.display().to_string();
        let cfg = config(
            &data,
            &format!("{d}/pretrain/image_text"),
            &format!("{d}/pretrain/regions"),
        );
        let set = ImageTextLines::open(&cfg, tokenizer(&data)).unwrap();
        assert!(set.len() >= 8, "{}", set.len());
        let a = load_batch(&set, &[5, 0, 3], 2, 11, 1).unwrap();
        let b = load_batch(&set, &[5, 0, 3], 2, 11, 3).unwrap();
        let c = load_batch(&set, &[5, 0, 3], 3, 11, 3).unwrap();
        assert_eq!(a.draw_seed, b.draw_seed);
        assert!(a.batch.image.equal(&b.batch.image));
        assert_ne!(a.draw_seed, c.draw_seed);
        let regions = RegionLines::open(&cfg, tokenizer(&data)).unwrap();
        let a = load_batch(&regions, &[1, 4], 0, 11, 1).unwrap();
        let b = load_batch(&regions, &[1, 4], 0, 11, 2).unwrap();
        assert!(a.text_ids.equal(&b.text_ids) && a.target_bbox.equal(&b.target_bbox));
        assert!(a.idx_to_group_img.equal(&b.idx_to_group_img));
        assert_eq!(a.text_ids.size(), [5, 16]);
    }
}
