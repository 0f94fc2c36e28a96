//! A threaded, prefetching loader over a map-style dataset: one producer thread walks the rank's
//! [`TrainSampler`] from a cursor, loads each batch's items on `threads` scoped threads and collates
//! them; finished batches wait in a bounded queue. A sample's random draws come from (seed, epoch, item
//! index), so the content depends on (seed, sampler, cursor) only — never on thread count or rank.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand_chacha::ChaCha8Rng;

use super::sampler::{TrainCursor, TrainSampler};
use crate::data::rng::{rng_for, Purpose};
use crate::data::DataError;

/// Part of every fine-tuning sample seed, so its draws never coincide with a pre-training line's.
const FINETUNE_SAMPLE_DOMAIN: u64 = 0xF1_7E;

/// The generator of item `index` in `epoch` (augmentation and every other per-sample draw).
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> ChaCha8Rng {
    rng_for(
        seed,
        Purpose::Sample,
        &[FINETUNE_SAMPLE_DOMAIN, epoch, index as u64],
    )
}

/// A dataset read by index.
pub trait MapDataset: Send + Sync + 'static {
    /// One loaded item.
    type Item: Send;
    /// A collated batch.
    type Batch: Send + 'static;
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether there are no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads item `index` with its own generator; errors name the annotation file and index.
    fn load(&self, index: usize, rng: &mut ChaCha8Rng) -> Result<Self::Item, DataError>;
    /// Collates items (in batch order) into tensors.
    fn collate(&self, items: Vec<Self::Item>) -> Result<Self::Batch, DataError>;
}

/// `f(0..n)` on up to `threads` threads, results in order; the first error wins.
pub fn parallel_map<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> Result<T, DataError> + Sync,
) -> Result<Vec<T>, DataError> {
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return (0..n).map(f).collect();
    }
    let f = &f;
    let parts: Vec<Vec<(usize, Result<T, DataError>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| s.spawn(move || (t..n).step_by(threads).map(|i| (i, f(i))).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut slots: Vec<Option<Result<T, DataError>>> = (0..n).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        slots[i] = Some(r);
    }
    slots
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Err(DataError::Loader("a loader thread panicked".into()))))
        .collect()
}

/// Loads and collates the items `indices` of `epoch`.
pub fn load_batch<D: MapDataset>(
    dataset: &D,
    indices: &[usize],
    epoch: u64,
    seed: u64,
    threads: usize,
) -> Result<D::Batch, DataError> {
    let items = parallel_map(indices.len(), threads, |p| {
        let index = indices[p];
        dataset.load(index, &mut sample_rng(seed, epoch, index))
    })?;
    dataset.collate(items)
}

/// Loader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLoaderConfig {
    /// Threads loading the items of a batch.
    pub threads: usize,
    /// Finished batches kept ready.
    pub prefetch_batches: usize,
    /// Job seed (sample draws; the sampler has its own).
    pub seed: u64,
}

/// A batch with its position: the cursor it was read at and the cursor to save after it.
#[derive(Debug)]
pub struct Loaded<B> {
    /// The collated batch.
    pub batch: B,
    /// Where it was read.
    pub cursor: TrainCursor,
    /// The next batch's cursor (record this in a checkpoint to resume after this batch).
    pub next: TrainCursor,
    /// The dataset indices of its items, in batch order.
    pub indices: Vec<usize>,
}

/// A running loader for one rank; dropping it stops its threads.
pub struct MapLoader<B> {
    rx: Option<Receiver<Result<Loaded<B>, DataError>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<B: Send + 'static> MapLoader<B> {
    /// Starts reading `dataset` in `sampler` order at `cursor`; the stream never ends (epochs roll over).
    pub fn start<D: MapDataset<Batch = B>>(
        dataset: Arc<D>,
        sampler: TrainSampler,
        cursor: TrainCursor,
        cfg: MapLoaderConfig,
    ) -> Result<Self, DataError> {
        if dataset.len() != sampler.len() {
            return Err(DataError::Config(format!(
                "sampler over {} items for a dataset of {}",
                sampler.len(),
                dataset.len()
            )));
        }
        sampler.check(cursor)?;
        let (tx, rx) = bounded(cfg.prefetch_batches.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut cursor = cursor;
            let mut perm_epoch = cursor.epoch;
            let mut perm = sampler.permutation(perm_epoch);
            while !stop_flag.load(Ordering::Relaxed) {
                if perm_epoch != cursor.epoch {
                    perm_epoch = cursor.epoch;
                    perm = sampler.permutation(perm_epoch);
                }
                let indices = sampler.indices_in(&perm, cursor.batch);
                let result = load_batch(
                    dataset.as_ref(),
                    &indices,
                    cursor.epoch,
                    cfg.seed,
                    cfg.threads,
                );
                let next = sampler.next(cursor);
                let failed = result.is_err();
                let msg = result.map(|batch| Loaded {
                    batch,
                    cursor,
                    next,
                    indices,
                });
                if tx.send(msg).is_err() || failed {
                    return;
                }
                cursor = next;
            }
        });
        Ok(Self {
            rx: Some(rx),
            stop,
            thread: Some(thread),
        })
    }

    /// Finished batches waiting in the prefetch queue (0 once stopped).
    pub fn queue_depth(&self) -> usize {
        self.rx.as_ref().map_or(0, Receiver::len)
    }

    /// The next batch (blocks until ready); an error is fatal for the stream.
    pub fn next_batch(&mut self) -> Result<Loaded<B>, DataError> {
        let rx = self
            .rx
            .as_ref()
            .ok_or_else(|| DataError::Loader("loader already stopped".into()))?;
        match rx.recv() {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => {
                self.rx = None;
                Err(e)
            }
            Err(_) => Err(DataError::Loader("loader thread exited".into())),
        }
    }
}

impl<B> Drop for MapLoader<B> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
