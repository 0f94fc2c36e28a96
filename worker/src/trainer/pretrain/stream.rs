//! Pre-training's two named streams, `images` (image-text) and `regions` (absent without region data):
//! shard-file streams whose state is the loader's [`StreamState`], the fingerprint of how this rank's
//! files were chosen (`plan`) and this rank's file order of the cursor's epoch (`order`, which an
//! elastic restart needs to tell read lines from unread).
//!
//! Same world size: when every stream's plan is the saved one, each continues exactly; otherwise (the
//! files changed) their cursors mean nothing here and every stream starts the epoch after its saved
//! one (counts are kept). Another world size: each stream continues the saved epoch under the new
//! world's file partition ([`reshard`](super::reshard)).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use xvlm_model::data::batch::{ImageTextBatch, RegionBatch};
use xvlm_model::data::loader::StreamState;
use xvlm_model::data::pipeline::{ImageTextLoader, PretrainDataConfig, RegionLoader};
use xvlm_model::data::shard::{Cursor, ShardPlan};
use xvlm_model::data::store::list_shards;

use super::reshard::{continue_stream, SavedStream};
use crate::trainer::harness::setup::other;
use crate::trainer::runner::meta::stream_state;
use crate::trainer::runner::Streams;
use crate::trainer::task::TaskError;

/// The image-text stream's name in the resume meta.
pub const IMAGES: &str = "images";
/// The region stream's name.
pub const REGIONS: &str = "regions";

/// A shard stream's state in the resume meta.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardEntry {
    /// The stream after the last batch used.
    #[serde(flatten)]
    state: StreamState,
    /// Fingerprint of the files this rank's plan reads and how they are split.
    plan: String,
    /// The files of `state.cursor.epoch` in this rank's reading order.
    #[serde(default)]
    order: Vec<String>,
}

/// A loader over a rank's shard plan.
pub trait ShardLoader: Sized {
    /// What it yields.
    type Batch;
    /// Starts at `state` reading `plan`, the plan of `rank` of `world`.
    fn open(
        data: &PretrainDataConfig,
        plan: &ShardPlan,
        rank: usize,
        world: usize,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, TaskError>;
    /// The next batch and the state after it.
    fn next(&mut self) -> Result<(Self::Batch, StreamState), TaskError>;
    /// Finished batches waiting in its prefetch queue.
    fn queue_depth(&self) -> usize;
}

impl ShardLoader for ImageTextLoader {
    type Batch = ImageTextBatch;

    fn open(
        data: &PretrainDataConfig,
        plan: &ShardPlan,
        _rank: usize,
        _world: usize,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, TaskError> {
        ImageTextLoader::start_plan(data, plan.clone(), seed, state).map_err(other)
    }

    fn next(&mut self) -> Result<(ImageTextBatch, StreamState), TaskError> {
        self.next_batch().map_err(other)
    }

    fn queue_depth(&self) -> usize {
        ImageTextLoader::queue_depth(self)
    }
}

impl ShardLoader for RegionLoader {
    type Batch = RegionBatch;

    /// The region loader splits `train_file_regions` itself, as `plan` does.
    fn open(
        data: &PretrainDataConfig,
        _plan: &ShardPlan,
        rank: usize,
        world: usize,
        seed: u64,
        state: StreamState,
    ) -> Result<Self, TaskError> {
        RegionLoader::start(data, rank, world, seed, state).map_err(other)
    }

    fn next(&mut self) -> Result<(RegionBatch, StreamState), TaskError> {
        self.next_batch().map_err(other)
    }

    fn queue_depth(&self) -> usize {
        RegionLoader::queue_depth(self)
    }
}

/// How a saved plan must relate to this rank's for an elastic restart to place its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placing {
    /// The same kind of plan and, for a split plan, the same files (image-text).
    SamePlan,
    /// Every file the saved order names is one of this job's (regions).
    KnownFiles,
}

/// One shard-file stream of a rank.
pub struct ShardStream<L: ShardLoader> {
    /// `None` only while restarting.
    loader: Option<L>,
    data: PretrainDataConfig,
    plan: ShardPlan,
    fingerprint: String,
    state: StreamState,
    rank: usize,
    world: usize,
    seed: u64,
    /// What the stream reads, in messages (`image-text`, `region`).
    what: &'static str,
    placing: Placing,
}

/// The names of `plan`'s files of `epoch`, in this rank's reading order.
fn epoch_order(plan: &ShardPlan, epoch: u64) -> Vec<String> {
    plan.rank_files(epoch)
        .into_iter()
        .filter_map(|i| plan.files().get(i).map(|f| f.name.clone()))
        .collect()
}

/// A plan fingerprint's parts: how the files are split (`split r/w` or `assigned`) and which files.
fn fingerprint_parts(fingerprint: &str) -> (&str, &str) {
    fingerprint.split_once(": ").unwrap_or((fingerprint, ""))
}

/// The state at the start of the epoch after `state`'s: where a stream resumes when its shard plan
/// changed (DESIGN: the plan is recomputed from the next epoch boundary).
fn next_epoch(state: StreamState) -> StreamState {
    StreamState {
        cursor: Cursor {
            epoch: state.cursor.epoch + 1,
            ..Cursor::default()
        },
        ..state
    }
}

impl<L: ShardLoader> ShardStream<L> {
    /// The stream over `plan` (described as `how` in its fingerprint) at its beginning.
    #[allow(clippy::too_many_arguments)]
    fn start(
        data: &PretrainDataConfig,
        plan: ShardPlan,
        how: String,
        rank: usize,
        world: usize,
        seed: u64,
        what: &'static str,
        placing: Placing,
    ) -> Result<Self, TaskError> {
        let names: Vec<&str> = plan.files().iter().map(|f| f.name.as_str()).collect();
        let fingerprint = format!(
            "{how}: {} files, sha256 {}",
            names.len(),
            &crate::checkpoint::sha256_hex(names.join("\n").as_bytes())[..16]
        );
        let state = StreamState::default();
        let loader = L::open(data, &plan, rank, world, seed, state)?;
        Ok(Self {
            loader: Some(loader),
            data: data.clone(),
            plan,
            fingerprint,
            state,
            rank,
            world,
            seed,
            what,
            placing,
        })
    }

    /// The next batch.
    pub fn next_batch(&mut self) -> Result<L::Batch, TaskError> {
        let loader = self
            .loader
            .as_mut()
            .ok_or_else(|| other(format!("the {} stream is not running", self.what)))?;
        let (batch, state) = loader.next()?;
        self.state = state;
        Ok(batch)
    }

    /// Finished batches waiting in its loader's prefetch queue (0 while restarting).
    pub fn queue_depth(&self) -> usize {
        self.loader.as_ref().map_or(0, L::queue_depth)
    }

    /// Names of the files this rank's plan reads.
    pub fn files(&self) -> Vec<String> {
        self.plan.files().iter().map(|f| f.name.clone()).collect()
    }

    fn entry(&self) -> ShardEntry {
        ShardEntry {
            state: self.state,
            plan: self.fingerprint.clone(),
            order: epoch_order(&self.plan, self.state.cursor.epoch),
        }
    }

    fn restart(&mut self, state: StreamState) -> Result<(), TaskError> {
        // Drop the running loader (joins its threads) before starting the new one.
        self.loader = None;
        self.loader = Some(L::open(
            &self.data, &self.plan, self.rank, self.world, self.seed, state,
        )?);
        self.state = state;
        Ok(())
    }

    /// Checks that saved rank `r`'s entry can be placed in this rank's plan.
    fn check_saved(&self, r: usize, saved: &ShardEntry) -> Result<(), TaskError> {
        let fail = |why: String| Err(other(format!("rank {r}: {why}")));
        if saved.order.is_empty() {
            return fail(format!(
                "no {} file order (saved by an older build): cannot place its data cursor in \
                 another world",
                self.what
            ));
        }
        match self.placing {
            Placing::SamePlan => {
                let (how, files) = fingerprint_parts(&self.fingerprint);
                let split = how.starts_with("split");
                let (saved_how, saved_files) = fingerprint_parts(&saved.plan);
                if saved_how.starts_with("split") != split || (split && saved_files != files) {
                    return fail(format!(
                        "it read {} files \"{}\", this rank reads \"{}\"",
                        self.what, saved.plan, self.fingerprint
                    ));
                }
            }
            Placing::KnownFiles => {
                let known: HashSet<&str> =
                    self.plan.files().iter().map(|f| f.name.as_str()).collect();
                if let Some(f) = saved.order.iter().find(|f| !known.contains(f.as_str())) {
                    return fail(format!(
                        "it read {} file {f}, which this job does not list",
                        self.what
                    ));
                }
            }
        }
        Ok(())
    }

    /// Where this rank's stream continues after the saved ranks' `entries` (see
    /// [`reshard`](super::reshard)); the counts are those of the saved rank of the same index (of rank
    /// 0 for ranks beyond the saved world).
    fn resharded(&self, entries: &[ShardEntry]) -> StreamState {
        let saved: Vec<SavedStream<'_>> = entries
            .iter()
            .map(|e| SavedStream {
                cursor: e.state.cursor,
                order: &e.order,
            })
            .collect();
        let counts = entries
            .get(self.rank)
            .or(entries.first())
            .map(|e| e.state)
            .unwrap_or_default();
        StreamState {
            cursor: continue_stream(&saved, |epoch| epoch_order(&self.plan, epoch)),
            ..counts
        }
    }
}

/// The streams of a pre-training rank.
pub struct PretrainStreams {
    /// Image-text pairs.
    pub images: ShardStream<ImageTextLoader>,
    /// Region batches (none without region data or region steps).
    pub regions: Option<ShardStream<RegionLoader>>,
}

/// Where both streams restart.
#[derive(Debug, Clone, Copy)]
pub struct PretrainPosition {
    images: StreamState,
    regions: StreamState,
}

impl PretrainStreams {
    /// This rank's streams: image-text over the coordinator's files for this rank when given, else
    /// over `train_file` split over the ranks; regions (when `with_regions`) over
    /// `train_file_regions` split over the ranks.
    pub fn start(
        data: &PretrainDataConfig,
        assigned: &[String],
        rank: usize,
        world: usize,
        seed: u64,
        with_regions: bool,
    ) -> Result<Self, TaskError> {
        let (plan, how) = if assigned.is_empty() {
            let files = list_shards(&data.train_file).map_err(other)?;
            (
                ShardPlan::new(files, rank, world, seed).map_err(other)?,
                format!("split {rank}/{world}"),
            )
        } else {
            let files = list_shards(assigned).map_err(other)?;
            (
                ShardPlan::assigned(files, rank, seed).map_err(other)?,
                "assigned".to_string(),
            )
        };
        let images = ShardStream::start(
            data,
            plan,
            how,
            rank,
            world,
            seed,
            "image-text",
            Placing::SamePlan,
        )?;
        let regions = if with_regions {
            let files = list_shards(&data.train_file_regions).map_err(other)?;
            let plan = ShardPlan::new(files, rank, world, seed).map_err(other)?;
            Some(ShardStream::start(
                data,
                plan,
                format!("split {rank}/{world}"),
                rank,
                world,
                seed,
                "region",
                Placing::KnownFiles,
            )?)
        } else {
            None
        };
        Ok(Self { images, regions })
    }

    /// Names of the image-text shard files this rank reads (its coordinator-assigned files, or every
    /// file of the job when the loader splits them itself).
    pub fn image_files(&self) -> Vec<String> {
        self.images.files()
    }

    /// The image-text plan's fingerprint.
    pub fn image_plan(&self) -> &str {
        &self.images.fingerprint
    }
}

impl Streams for PretrainStreams {
    type Position = PretrainPosition;

    /// The image-text stream's queue: the one every step reads (region steps interleave).
    fn queue_depth(&self) -> Option<usize> {
        Some(self.images.queue_depth())
    }

    fn save(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        out.insert(
            IMAGES.to_string(),
            serde_json::to_value(self.images.entry()).unwrap_or_default(),
        );
        if let Some(regions) = &self.regions {
            out.insert(
                REGIONS.to_string(),
                serde_json::to_value(regions.entry()).unwrap_or_default(),
            );
        }
        out
    }

    fn resumed(
        &self,
        saved: &BTreeMap<String, serde_json::Value>,
    ) -> Result<PretrainPosition, TaskError> {
        let images: ShardEntry = stream_state(saved, IMAGES)?
            .ok_or_else(|| other(format!("no state of stream {IMAGES:?}")))?;
        let regions: Option<ShardEntry> = stream_state(saved, REGIONS)?;
        let same_plan = images.plan == self.images.fingerprint
            && match (&self.regions, &regions) {
                (Some(now), Some(saved)) => now.fingerprint == saved.plan,
                _ => true,
            };
        let region_state = regions.as_ref().map(|e| e.state).unwrap_or_default();
        if same_plan {
            return Ok(PretrainPosition {
                images: images.state,
                regions: region_state,
            });
        }
        tracing::warn!(
            saved = %images.plan,
            now = %self.images.fingerprint,
            "the shard plan changed since the checkpoint: data streams restart at the next epoch"
        );
        Ok(PretrainPosition {
            images: next_epoch(images.state),
            regions: next_epoch(region_state),
        })
    }

    fn resharded(
        &self,
        saved: &[&BTreeMap<String, serde_json::Value>],
    ) -> Result<PretrainPosition, TaskError> {
        let mut images = Vec::with_capacity(saved.len());
        let mut regions = Vec::with_capacity(saved.len());
        for (r, s) in saved.iter().enumerate() {
            let at = |e: TaskError| other(format!("rank {r}: {e}"));
            let image: ShardEntry = stream_state(s, IMAGES)
                .map_err(at)?
                .ok_or_else(|| at(other(format!("no state of stream {IMAGES:?}"))))?;
            self.images.check_saved(r, &image)?;
            images.push(image);
            regions.push(stream_state::<ShardEntry>(s, REGIONS).map_err(at)?);
        }
        // A checkpoint without region streams is fine: this rank's region stream starts at the
        // beginning.
        let region_state = match &self.regions {
            Some(stream) if regions.iter().any(Option::is_some) => {
                let mut entries = Vec::with_capacity(regions.len());
                for (r, e) in regions.into_iter().enumerate() {
                    let e = e.ok_or_else(|| {
                        other(format!("rank {r}: no region data cursor or file order"))
                    })?;
                    stream.check_saved(r, &e)?;
                    entries.push(e);
                }
                stream.resharded(&entries)
            }
            _ => StreamState::default(),
        };
        Ok(PretrainPosition {
            images: self.images.resharded(&images),
            regions: region_state,
        })
    }

    fn restart(&mut self, position: PretrainPosition) -> Result<(), TaskError> {
        self.images.restart(position.images)?;
        if let Some(regions) = &mut self.regions {
            regions.restart(position.regions)?;
        }
        Ok(())
    }
}
