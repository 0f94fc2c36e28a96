//! Fine-tuning data (reference §5): the official annotation layouts, map-style datasets with the
//! official per-item outputs and collate functions, a per-epoch sampler with a resumable cursor and
//! exact rank slicing, and a threaded prefetching loader.
//!
//! Layout: `source` (paths / URLs, reading files), `config` (task YAML data keys), `annotations` (JSON
//! layouts), `refer` (RefCOCO+ boxes from the REFER files), `text` (tokenization: padding, truncation),
//! `images` (transforms, stacking), `sampler` (permutation, cursor, slices), `loader` (threads), and the
//! tasks `retrieval`, `vqa`, `nlvr`, `grounding` (training) and `grounding_eval` (the
//! evaluation expressions with their boxes, image sizes and proposals). See the fine-tuning section of `../README.md`.

pub mod annotations;
pub mod config;
pub mod grounding;
pub mod grounding_eval;
pub mod images;
pub mod jsonl;
pub mod loader;
pub mod nlvr;
pub mod refer;
pub mod retrieval;
pub mod sampler;
pub mod source;
pub mod text;
pub mod vqa;

pub use loader::{Loaded, MapDataset, MapLoader, MapLoaderConfig};
pub use retrieval::{
    RetrievalData, RetrievalDataConfig, RetrievalEvalSet, RetrievalLoaderOptions,
    RetrievalTrainBatch, RetrievalTrainData, RetrievalTrainLoader, RetrievalTrainSet,
};
pub use sampler::{eval_slice, TrainCursor, TrainSampler};
