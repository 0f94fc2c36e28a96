//! The rank's deterministic, infinite, resumable line stream (DESIGN "Data stream", fix 7).
//!
//! Every epoch the global (sorted) file list is shuffled with a generator seeded by (seed, epoch) — the
//! same on every rank — and cut into contiguous slices `[n*r/W, n*(r+1)/W)`, so the ranks' files are an
//! exact partition and every line is read once per epoch across the job. A rank reads its files in that
//! order, line by line; the position of the next line is a [`Cursor`] that can be saved and restored.
//! Loader threads do not take part in sharding (they only decode), so the stream does not depend on them.

use std::io::BufRead;

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::rng::{rng_for, Purpose};
use super::store::{open_at, ShardFile};
use super::DataError;

/// Default limit on one line's length; longer lines are skipped (and counted).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// The position of the next line a rank reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch (pass over the rank's files).
    pub epoch: u64,
    /// Index into the rank's file order of this epoch.
    pub file: usize,
    /// Line number within that file.
    pub line: u64,
    /// Byte offset of that line (lets a resume seek instead of re-reading).
    pub byte: u64,
}

/// How the shard files are split across ranks.
#[derive(Debug, Clone)]
pub struct ShardPlan {
    files: Vec<ShardFile>,
    keys: Vec<u64>,
    rank: usize,
    world: usize,
    seed: u64,
    /// The files are this rank's alone (partitioned by the coordinator): read all of them.
    assigned: bool,
}

impl ShardPlan {
    /// Plan for `rank` of `world`; needs at least one file per rank.
    pub fn new(
        files: Vec<ShardFile>,
        rank: usize,
        world: usize,
        seed: u64,
    ) -> Result<Self, DataError> {
        if world == 0 || rank >= world {
            return Err(DataError::Config(format!(
                "rank {rank} is not in a world of {world}"
            )));
        }
        if files.len() < world {
            return Err(DataError::TooFewFiles {
                files: files.len(),
                world,
            });
        }
        let keys = files.iter().map(|f| file_key(&f.name)).collect();
        Ok(Self {
            files,
            keys,
            rank,
            world,
            seed,
            assigned: false,
        })
    }

    /// Plan for `rank` when `files` were already partitioned for it (the coordinator's shard plan): the
    /// rank reads all of them, in an order shuffled per epoch. Needs at least one file.
    pub fn assigned(files: Vec<ShardFile>, rank: usize, seed: u64) -> Result<Self, DataError> {
        if files.is_empty() {
            return Err(DataError::TooFewFiles { files: 0, world: 1 });
        }
        let keys = files.iter().map(|f| file_key(&f.name)).collect();
        Ok(Self {
            files,
            keys,
            rank,
            world: 1,
            seed,
            assigned: true,
        })
    }

    /// All shard files (sorted): the job's, or this rank's alone for an [`ShardPlan::assigned`] plan.
    pub fn files(&self) -> &[ShardFile] {
        &self.files
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The stable identity of file `file` (see [`file_key`]).
    pub fn file_key(&self, file: usize) -> u64 {
        self.keys.get(file).copied().unwrap_or(u64::MAX)
    }

    /// Global file indices this rank reads in `epoch`, in reading order.
    pub fn rank_files(&self, epoch: u64) -> Vec<usize> {
        let n = self.files.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng_for(self.seed, Purpose::FileShuffle, &[epoch]));
        if self.assigned {
            return order;
        }
        let (lo, hi) = (n * self.rank / self.world, n * (self.rank + 1) / self.world);
        order[lo..hi].to_vec()
    }
}

/// A 64-bit identity of a shard file from its file name without the directory (SHA-256, first 8
/// bytes). Per-sample randomness is derived from it rather than from the file's index or the reading
/// rank, so a sample is augmented and masked the same way whichever rank reads it and however the
/// files are split (coordinator plan, own split, any world size), and wherever the data is stored.
pub fn file_key(name: &str) -> u64 {
    let base = name.rsplit('/').next().unwrap_or(name);
    let digest = Sha256::digest(base.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// Identity of one line in the job: (epoch, global file index, line number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LineId {
    /// Epoch.
    pub epoch: u64,
    /// Index of the file in the sorted global list.
    pub file: usize,
    /// Line number within the file.
    pub line: u64,
}

/// One line read from the stream.
#[derive(Debug)]
pub struct StreamLine {
    /// Which line.
    pub id: LineId,
    /// Its bytes (without the newline), or why it was skipped (over-long).
    pub bytes: Result<Vec<u8>, DataError>,
    /// The cursor after this line.
    pub next: Cursor,
}

/// A rank's infinite stream of lines, starting at a cursor.
pub struct LineStream {
    plan: ShardPlan,
    cursor: Cursor,
    order: Vec<usize>,
    reader: Option<Box<dyn BufRead + Send>>,
    max_line: usize,
    lines_this_epoch: u64,
    empty_epochs: u64,
}

/// Consecutive epochs without a single line after which a rank's stream gives up (all files empty).
const MAX_EMPTY_EPOCHS: u64 = 1000;

impl LineStream {
    /// Start reading at `cursor`.
    pub fn new(plan: ShardPlan, cursor: Cursor, max_line: usize) -> Self {
        let order = plan.rank_files(cursor.epoch);
        Self {
            plan,
            cursor,
            order,
            reader: None,
            max_line,
            lines_this_epoch: u64::from(cursor.line > 0 || cursor.file > 0),
            empty_epochs: 0,
        }
    }

    /// The position of the next line.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The plan this stream reads.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The next line (never `None`: the stream rolls over epochs). Errors are fatal (missing file, I/O).
    pub fn next_line(&mut self) -> Result<StreamLine, DataError> {
        loop {
            if self.cursor.file >= self.order.len() {
                // A rank may draw only empty files in some epoch; only a long run of empty epochs
                // (every file empty) is an error.
                self.empty_epochs = if self.lines_this_epoch == 0 {
                    self.empty_epochs + 1
                } else {
                    0
                };
                if self.empty_epochs >= MAX_EMPTY_EPOCHS {
                    return Err(DataError::Config(format!(
                        "the shard files of rank {} hold no lines",
                        self.plan.rank
                    )));
                }
                self.cursor = Cursor {
                    epoch: self.cursor.epoch + 1,
                    ..Cursor::default()
                };
                self.order = self.plan.rank_files(self.cursor.epoch);
                self.lines_this_epoch = 0;
                continue;
            }
            let file_idx = self.order[self.cursor.file];
            let file = &self.plan.files[file_idx];
            if self.reader.is_none() {
                self.reader = Some(open_at(file, self.cursor.byte)?);
            }
            let reader = self.reader.as_mut().expect("reader opened above");
            let read = read_line_limited(reader.as_mut(), self.max_line).map_err(|e| {
                DataError::Store {
                    url: file.name.clone(),
                    message: e.to_string(),
                }
            })?;
            match read {
                None => {
                    self.reader = None;
                    self.cursor = Cursor {
                        epoch: self.cursor.epoch,
                        file: self.cursor.file + 1,
                        line: 0,
                        byte: 0,
                    };
                }
                Some((consumed, bytes)) => {
                    let id = LineId {
                        epoch: self.cursor.epoch,
                        file: file_idx,
                        line: self.cursor.line,
                    };
                    self.cursor.line += 1;
                    self.cursor.byte += consumed as u64;
                    self.lines_this_epoch += 1;
                    let bytes = bytes.ok_or_else(|| {
                        DataError::Sample(format!(
                            "line {} of {} is longer than {} bytes",
                            id.line, file.name, self.max_line
                        ))
                    });
                    return Ok(StreamLine {
                        id,
                        bytes,
                        next: self.cursor,
                    });
                }
            }
        }
    }
}

/// Read one line (up to '\n' or EOF). Returns the bytes consumed and the line without its newline, or
/// `None` for the line when it exceeds `max` bytes (it is consumed without being kept). `None` at EOF.
pub fn read_line_limited(
    reader: &mut dyn BufRead,
    max: usize,
) -> std::io::Result<Option<(usize, Option<Vec<u8>>)>> {
    let mut line = Vec::new();
    let mut consumed = 0usize;
    let mut too_long = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            if consumed == 0 {
                return Ok(None);
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i + 1], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if line.len() + n > max.saturating_add(1) {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(n);
        consumed += n;
        if done {
            break;
        }
    }
    if too_long {
        return Ok(Some((consumed, None)));
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some((consumed, Some(line))))
}
