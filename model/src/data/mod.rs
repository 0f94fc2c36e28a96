//! Data pipeline: official formats, text, images, regions, sharded resumable streams.
//!
//! Layout: `caption` (text cleaning), `tokenizer`, `masking` (MLM), `pixels` (decode, PIL-exact resize,
//! normalise), `augment` (RandomResizedCrop, RandAugment), `transform` (train/test pipelines), `formats`
//! (json-lines records), `sample` / `region` (line processors: texts, images, regions, patch masks),
//! `batch` (collate into tensors), `pipeline` (loaders from the official config keys), `store` (local /
//! object_store files), `shard` (partition, shuffle, cursor), `loader` (threads, prefetch), `rng`
//! (derived seeds), `synth` (synthetic corpus), `finetune` (the fine-tuning datasets, samplers and
//! loaders). See `README.md` beside this file.

pub mod augment;
pub mod batch;
pub mod caption;
pub mod finetune;
pub mod formats;
pub mod loader;
pub mod masking;
pub mod pipeline;
pub mod pixels;
pub mod region;
pub mod rng;
pub mod sample;
pub mod shard;
pub mod store;
pub mod synth;
pub mod tokenizer;
pub mod transform;

use std::path::PathBuf;

/// Errors of the data pipeline. `Sample` errors are per-sample (skipped and counted by the loader);
/// every other variant is fatal and names the file, URL or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A bad sample: corrupt line, undecodable image, invalid box, empty caption.
    #[error("skipped sample: {0}")]
    Sample(String),
    /// A file the configuration names does not exist.
    #[error("missing data file {0}")]
    MissingFile(PathBuf),
    /// Reading a local file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// An object store request failed.
    #[error("object store {url}: {message}")]
    Store {
        /// The URL.
        url: String,
        /// The cause.
        message: String,
    },
    /// A data location that cannot be used.
    #[error("bad data location {url}: {reason}")]
    BadLocation {
        /// The URL or path.
        url: String,
        /// Why.
        reason: String,
    },
    /// A vocabulary file is missing or unusable.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The vocabulary file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// Fewer shard files than ranks: the files cannot be partitioned.
    #[error(
        "{files} shard files cannot be partitioned over {world} ranks (need at least one per rank)"
    )]
    TooFewFiles {
        /// Number of files.
        files: usize,
        /// World size.
        world: usize,
    },
    /// An invalid data configuration value.
    #[error("data config: {0}")]
    Config(String),
    /// The loader's threads stopped.
    #[error("data loader stopped: {0}")]
    Loader(String),
    /// A fine-tuning annotation file or one of its items is unusable (fatal: names file and item).
    #[error("{file}{}: {reason}", .index.map(|i| format!(" item {i}")).unwrap_or_default())]
    Annotation {
        /// The annotation file (path or URL).
        file: String,
        /// The item's position in the file's list, when one item is at fault.
        index: Option<usize>,
        /// What is wrong.
        reason: String,
    },
}
