//! The multi-threaded loader: one reader thread walks the rank's [`LineStream`], N worker threads turn
//! lines into samples with a generator derived from the line's identity (file name, epoch, line), and
//! an assembler thread puts them back in stream order and cuts batches. A fixed number of in-flight
//! lines (tokens) bounds memory, and finished batches wait in a bounded prefetch queue. Content depends
//! on (seed, plan, cursor) only, never on the number of threads or on timing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::rng::{rng_for, Purpose};
use super::shard::{Cursor, LineId, LineStream, ShardPlan, DEFAULT_MAX_LINE_BYTES};
use super::DataError;

/// Turns one json line into a sample.
pub trait Processor: Send + Sync + 'static {
    /// What a line becomes.
    type Sample: Send + 'static;
    /// Parse and transform; a `DataError::Sample` skips the line.
    fn process(&self, line: &[u8], rng: &mut ChaCha8Rng) -> Result<Self::Sample, DataError>;
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Samples per batch (images per region batch).
    pub batch_size: usize,
    /// Decode threads.
    pub threads: usize,
    /// Finished batches kept ready.
    pub prefetch_batches: usize,
    /// Lines in flight between the reader and the assembler (the memory bound).
    pub max_in_flight: usize,
    /// Longer lines are skipped.
    pub max_line_bytes: usize,
    /// Job seed.
    pub seed: u64,
}

impl LoaderConfig {
    /// Defaults for `batch_size` and `threads`.
    pub fn new(batch_size: usize, threads: usize, seed: u64) -> Self {
        Self {
            batch_size,
            threads: threads.max(1),
            prefetch_batches: 2,
            max_in_flight: (batch_size * 2).max(threads.max(1) * 4),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            seed,
        }
    }
}

/// Everything needed to continue the identical stream (saved with checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamState {
    /// Next line to read.
    pub cursor: Cursor,
    /// Batches produced so far.
    pub batches: u64,
    /// Lines consumed so far.
    pub lines: u64,
    /// Lines skipped (corrupt line, undecodable image, invalid boxes, empty caption, over-long line).
    pub skipped: u64,
}

/// A batch of samples and the stream state after it.
#[derive(Debug)]
pub struct LoadedBatch<S> {
    /// The samples, in stream order.
    pub samples: Vec<S>,
    /// Index of this batch in the rank's stream (0-based).
    pub index: u64,
    /// State after this batch: resuming from it yields the next batch.
    pub state: StreamState,
    /// Identity of each sample's line.
    pub lines: Vec<LineId>,
}

struct Work {
    seq: u64,
    id: LineId,
    file_key: u64,
    bytes: Result<Vec<u8>, DataError>,
    next: Cursor,
}

struct Done<S> {
    seq: u64,
    id: LineId,
    result: Result<S, DataError>,
    next: Cursor,
}

/// A running loader for one rank.
pub struct Loader<S> {
    out: Option<Receiver<Result<LoadedBatch<S>, DataError>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl<S: Send + 'static> Loader<S> {
    /// Start reading `plan` for this rank from `state`.
    pub fn start<P: Processor<Sample = S>>(
        plan: ShardPlan,
        processor: Arc<P>,
        cfg: LoaderConfig,
        state: StreamState,
    ) -> Self {
        let rank = plan.rank() as u64;
        let in_flight = cfg.max_in_flight.max(1);
        let (token_tx, token_rx) = bounded::<()>(in_flight);
        for _ in 0..in_flight {
            let _ = token_tx.send(());
        }
        let (work_tx, work_rx) = bounded::<Work>(in_flight);
        let (done_tx, done_rx) = bounded::<Done<S>>(in_flight);
        let (out_tx, out_rx) = bounded(cfg.prefetch_batches.max(1));
        let mut threads = Vec::new();

        let stop = Arc::new(AtomicBool::new(false));
        let max_line = cfg.max_line_bytes;
        let reader_done = done_tx.clone();
        let reader_stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut stream = LineStream::new(plan, state.cursor, max_line);
            let mut seq = 0u64;
            while token_rx.recv().is_ok() && !reader_stop.load(Ordering::Relaxed) {
                match stream.next_line() {
                    Ok(line) => {
                        let w = Work {
                            seq,
                            id: line.id,
                            file_key: stream.plan().file_key(line.id.file),
                            bytes: line.bytes,
                            next: line.next,
                        };
                        if work_tx.send(w).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // Fatal: hand it to the assembler in order and stop reading.
                        let _ = reader_done.send(Done {
                            seq,
                            id: LineId {
                                epoch: 0,
                                file: usize::MAX,
                                line: 0,
                            },
                            result: Err(e),
                            next: stream.cursor(),
                        });
                        return;
                    }
                }
                seq += 1;
            }
        }));

        for _ in 0..cfg.threads.max(1) {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let processor = processor.clone();
            let seed = cfg.seed;
            threads.push(std::thread::spawn(move || {
                while let Ok(w) = work_rx.recv() {
                    let result = w.bytes.and_then(|bytes| {
                        // The sample's own identity, not the rank or the file's index: see
                        // `shard::file_key`.
                        let mut rng =
                            rng_for(seed, Purpose::Sample, &[w.file_key, w.id.epoch, w.id.line]);
                        processor.process(&bytes, &mut rng)
                    });
                    let d = Done {
                        seq: w.seq,
                        id: w.id,
                        result,
                        next: w.next,
                    };
                    if done_tx.send(d).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(done_tx);

        let batch_size = cfg.batch_size.max(1);
        threads.push(std::thread::spawn(move || {
            let mut pending: BTreeMap<u64, Done<S>> = BTreeMap::new();
            let mut next_seq = 0u64;
            let mut state = state;
            let mut samples = Vec::with_capacity(batch_size);
            let mut lines = Vec::with_capacity(batch_size);
            while let Ok(d) = done_rx.recv() {
                pending.insert(d.seq, d);
                while let Some(d) = pending.remove(&next_seq) {
                    next_seq += 1;
                    let _ = token_tx.send(());
                    if d.id.file == usize::MAX {
                        if let Err(e) = d.result {
                            let _ = out_tx.send(Err(e));
                        }
                        return;
                    }
                    state.cursor = d.next;
                    state.lines += 1;
                    match d.result {
                        Ok(s) => {
                            samples.push(s);
                            lines.push(d.id);
                        }
                        Err(DataError::Sample(why)) => {
                            state.skipped += 1;
                            if state.skipped <= 10 || state.skipped.is_multiple_of(1000) {
                                tracing::warn!(
                                    rank,
                                    epoch = d.id.epoch,
                                    file = d.id.file,
                                    line = d.id.line,
                                    skipped = state.skipped,
                                    "skipped sample: {why}"
                                );
                            }
                        }
                        Err(e) => {
                            let _ = out_tx.send(Err(e));
                            return;
                        }
                    }
                    if samples.len() == batch_size {
                        let batch = LoadedBatch {
                            samples: std::mem::replace(
                                &mut samples,
                                Vec::with_capacity(batch_size),
                            ),
                            index: state.batches,
                            state: StreamState {
                                batches: state.batches + 1,
                                ..state
                            },
                            lines: std::mem::take(&mut lines),
                        };
                        state.batches += 1;
                        if out_tx.send(Ok(batch)).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
        Self {
            out: Some(out_rx),
            threads,
            stop,
        }
    }

    /// Finished batches waiting in the prefetch queue (0 once stopped): near the prefetch depth the
    /// loader keeps ahead of training, at 0 training waits for data.
    pub fn queue_depth(&self) -> usize {
        self.out.as_ref().map_or(0, Receiver::len)
    }

    /// The next batch (blocks until ready). Errors are fatal for the stream.
    pub fn next_batch(&mut self) -> Result<LoadedBatch<S>, DataError> {
        let rx = self
            .out
            .as_ref()
            .ok_or_else(|| DataError::Loader("loader already stopped".into()))?;
        match rx.recv() {
            Ok(r) => {
                if r.is_err() {
                    self.out = None;
                }
                r
            }
            Err(_) => Err(DataError::Loader("loader threads exited".into())),
        }
    }
}

impl<S> Drop for Loader<S> {
    fn drop(&mut self) {
        // Closing the output makes the assembler exit, which closes the token channel for the reader,
        // which closes the work channel for the workers.
        self.stop.store(true, Ordering::Relaxed);
        self.out = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
