//! Trainer logs the workers collect: kept per job on disk under `{state_dir}/logs/{job}/`, bounded
//! (oldest lines dropped first), and streamed to `xvlm-coord logs` readers. Kept out of the state
//! machine and off the Core lock: reports hand their lines to [`LogStore::submit`], which never
//! blocks, and one writer thread appends them (a slow disk delays logs, never heartbeats).
//!
//! On disk a job's log is a run of segment files `{first line index:020}.log`, each line a record
//! `RANK GENERATION o|e TEXT` in arrival order (every rank's lines in one run, so each rank's order
//! and the job-wide "oldest first" both hold). A segment is closed at a quarter of the retention;
//! after each append the oldest segments go while the job holds more than its retention. A
//! restarted coordinator reopens the files as they are (a record cut by a crash is cut off).
//! Duplicate detection (sequence numbers per trainer output) is in memory: after a restart a gap or a
//! repeat across it is not noticed.

use std::collections::{HashMap, VecDeque};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::warn;
use xvlm_proto::v1;

use crate::error::CoordError;

/// Default bytes of log lines kept per job.
pub const DEFAULT_RETENTION_BYTES: u64 = 16 << 20;

/// Report batches waiting for the writer; past this they are dropped (with a warning).
const QUEUE: usize = 4096;

/// A kept line with its position in the job's log.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// Position in the job's log, from 0, increasing in arrival order.
    pub index: u64,
    /// The line.
    pub line: v1::LogLine,
}

/// One job's bounded log on disk.
pub struct JobLog {
    dir: PathBuf,
    retention: u64,
    /// (first line index, bytes) of each segment, oldest first.
    segments: VecDeque<(u64, u64)>,
    next_index: u64,
    /// Next expected sequence number per (generation, rank, stream).
    expected: HashMap<(u64, u32, i32), u64>,
    followers: broadcast::Sender<Arc<Vec<Stored>>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CoordError {
    CoordError::Logs {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

impl JobLog {
    /// Opens the log in `dir` (missing: empty; created on the first append), keeping `retention`
    /// bytes.
    pub fn open(dir: &Path, retention: u64) -> Result<JobLog, CoordError> {
        let mut segments = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| io_err(dir, e))?;
                    let name = entry.file_name();
                    let Some(first) = name
                        .to_str()
                        .and_then(|n| n.strip_suffix(".log"))
                        .and_then(|n| n.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let bytes = entry.metadata().map_err(|e| io_err(dir, e))?.len();
                    segments.push((first, bytes));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(dir, e)),
        }
        segments.sort();
        let mut log = JobLog {
            dir: dir.to_path_buf(),
            retention: retention.max(1),
            segments: segments.into(),
            next_index: 0,
            expected: HashMap::new(),
            followers: broadcast::channel(1024).0,
        };
        if let Some(&(first, _)) = log.segments.back() {
            let path = log.segment_path(first);
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
            // A record a crash left without its newline is cut off, so appends stay whole records.
            let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            if whole < bytes.len() {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io_err(&path, e))?;
                f.set_len(whole as u64).map_err(|e| io_err(&path, e))?;
                if let Some(last) = log.segments.back_mut() {
                    last.1 = whole as u64;
                }
            }
            let lines = bytes[..whole].iter().filter(|b| **b == b'\n').count() as u64;
            log.next_index = first + lines;
        }
        Ok(log)
    }

    fn segment_path(&self, first: u64) -> PathBuf {
        self.dir.join(format!("{first:020}.log"))
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }

    /// The lines of a worker's chunk to keep: repeats (by sequence number) are skipped, and a gap
    /// gets a marker line.
    pub fn accept(&mut self, c: &v1::LogChunk) -> Vec<v1::LogLine> {
        let key = (c.generation, c.rank, c.stream);
        let mut out = Vec::new();
        let line = |text: String| v1::LogLine {
            generation: c.generation,
            rank: c.rank,
            stream: c.stream,
            text,
        };
        for (i, text) in c.lines.iter().enumerate() {
            let seq = c.first_seq + i as u64;
            let expected = self.expected.get(&key).copied();
            if expected.is_some_and(|e| seq < e) {
                continue;
            }
            let from = expected.unwrap_or(0);
            if seq > from && expected.is_some() {
                out.push(line(format!(
                    "[xvlm-coord: {} lines lost in transit]",
                    seq - from
                )));
            }
            self.expected.insert(key, seq + 1);
            // One record per line: a newline in the text would split it.
            out.push(line(text.replace(['\n', '\r'], " ")));
        }
        out
    }

    /// Appends lines, then drops the oldest segments past the retention; returns them as stored.
    pub fn append(&mut self, lines: Vec<v1::LogLine>) -> Result<Vec<Stored>, CoordError> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let segment_bytes = (self.retention / 4).max(1);
        let mut stored = Vec::with_capacity(lines.len());
        let mut pending: Vec<u8> = Vec::new();
        for line in lines {
            let stream = if line.stream == v1::LogStream::Stdout as i32 {
                'o'
            } else {
                'e'
            };
            let record = format!("{} {} {stream} {}\n", line.rank, line.generation, line.text);
            let full = self.segments.back().is_none_or(|s| s.1 >= segment_bytes);
            if full {
                self.write(&pending)?;
                pending.clear();
                self.segments.push_back((self.next_index, 0));
            }
            if let Some(last) = self.segments.back_mut() {
                last.1 += record.len() as u64;
            }
            pending.extend_from_slice(record.as_bytes());
            stored.push(Stored {
                index: self.next_index,
                line,
            });
            self.next_index += 1;
        }
        self.write(&pending)?;
        while self.bytes() > self.retention && self.segments.len() > 1 {
            if let Some((first, _)) = self.segments.pop_front() {
                let path = self.segment_path(first);
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot drop an old log segment");
                }
            }
        }
        Ok(stored)
    }

    /// Appends `bytes` to the newest segment.
    fn write(&self, bytes: &[u8]) -> Result<(), CoordError> {
        let Some(&(first, _)) = self.segments.back() else {
            return Ok(());
        };
        if bytes.is_empty() {
            return Ok(());
        }
        let path = self.segment_path(first);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        f.write_all(bytes).map_err(|e| io_err(&path, e))
    }

    /// Every kept line from index `from` on, of `rank` only when given.
    pub fn read(&self, from: u64, rank: Option<u32>) -> Result<Vec<Stored>, CoordError> {
        let mut out = Vec::new();
        let starts: Vec<u64> = self.segments.iter().map(|s| s.0).collect();
        for (i, &first) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(self.next_index);
            if end <= from {
                continue;
            }
            let path = self.segment_path(first);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                // Dropped by retention meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path, e)),
            };
            let text = String::from_utf8_lossy(&bytes);
            for (n, record) in text.split_terminator('\n').enumerate() {
                let index = first + n as u64;
                if index < from {
                    continue;
                }
                let Some(line) = parse_record(record) else {
                    continue;
                };
                if rank.is_none_or(|r| r == line.rank) {
                    out.push(Stored { index, line });
                }
            }
        }
        Ok(out)
    }
}

/// `RANK GENERATION o|e TEXT` back into a line.
fn parse_record(record: &str) -> Option<v1::LogLine> {
    let mut parts = record.splitn(4, ' ');
    let rank = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    let stream = match parts.next()? {
        "o" => v1::LogStream::Stdout,
        "e" => v1::LogStream::Stderr,
        _ => return None,
    };
    Some(v1::LogLine {
        generation,
        rank,
        stream: stream as i32,
        text: parts.next().unwrap_or_default().to_string(),
    })
}

/// Whether a job id can name a directory: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn safe_job_id(job: &str) -> bool {
    !job.is_empty()
        && job.len() <= 128
        && !job.starts_with('.')
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

enum Msg {
    Append(Vec<v1::LogChunk>),
    Flush(oneshot::Sender<()>),
}

struct Shared {
    dir: PathBuf,
    retention: u64,
    jobs: Mutex<HashMap<String, Arc<Mutex<JobLog>>>>,
}

impl Shared {
    fn job(&self, job: &str) -> Result<Arc<Mutex<JobLog>>, CoordError> {
        if !safe_job_id(job) {
            return Err(CoordError::UnknownJob(job.to_string()));
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(log) = jobs.get(job) {
            return Ok(log.clone());
        }
        let log = Arc::new(Mutex::new(JobLog::open(
            &self.dir.join(job),
            self.retention,
        )?));
        jobs.insert(job.to_string(), log.clone());
        Ok(log)
    }

    fn append(&self, chunks: Vec<v1::LogChunk>) {
        let mut by_job: HashMap<String, Vec<v1::LogChunk>> = HashMap::new();
        for c in chunks {
            by_job.entry(c.job_id.clone()).or_default().push(c);
        }
        for (job, chunks) in by_job {
            let log = match self.job(&job) {
                Ok(log) => log,
                Err(e) => {
                    warn!(job, error = %e, "trainer log lines dropped");
                    continue;
                }
            };
            let mut log = lock(&log);
            let lines: Vec<v1::LogLine> = chunks.iter().flat_map(|c| log.accept(c)).collect();
            match log.append(lines) {
                Ok(stored) if !stored.is_empty() => {
                    let _ = log.followers.send(Arc::new(stored));
                }
                Ok(_) => {}
                Err(e) => warn!(job, error = %e, "trainer log lines not written"),
            }
        }
    }
}

fn lock(log: &Mutex<JobLog>) -> MutexGuard<'_, JobLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every job's trainer logs, with the writer thread that appends them.
pub struct LogStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
}

/// What a reader gets: the kept lines, the index the next line will have, and the lines that
/// arrive after them.
pub type Snapshot = (Vec<Stored>, u64, broadcast::Receiver<Arc<Vec<Stored>>>);

impl LogStore {
    /// Opens the logs under `dir`, keeping `retention` bytes per job, and starts the writer thread.
    pub fn open(dir: &Path, retention: u64) -> Result<LogStore, CoordError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            retention,
            jobs: Mutex::new(HashMap::new()),
        });
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Msg::Append(chunks) => writer.append(chunks),
                        Msg::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|e| io_err(dir, format!("cannot start the log writer: {e}")))?;
        Ok(LogStore { shared, tx })
    }

    /// Queues a report's lines for the writer; never blocks (a full queue drops them, warned).
    pub fn submit(&self, chunks: Vec<v1::LogChunk>) {
        if chunks.is_empty() {
            return;
        }
        if self.tx.try_send(Msg::Append(chunks)).is_err() {
            warn!("trainer log writer behind (slow disk?): a report's log lines dropped");
        }
    }

    /// Waits until every line submitted before is written and sent to followers.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The job's kept lines from index `from` on (of `rank` when given), and a receiver of the
    /// lines appended after them: nothing falls in between.
    pub fn snapshot(
        &self,
        job: &str,
        from: u64,
        rank: Option<u32>,
    ) -> Result<Snapshot, CoordError> {
        let log = self.shared.job(job)?;
        let log = lock(&log);
        let lines = log.read(from, rank)?;
        Ok((lines, log.next_index, log.followers.subscribe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(rank: u32, first_seq: u64, lines: &[&str]) -> v1::LogChunk {
        v1::LogChunk {
            job_id: "job-0001".into(),
            generation: 1,
            rank,
            stream: v1::LogStream::Stderr as i32,
            first_seq,
            lines: lines.iter().map(|l| l.to_string()).collect(),
        }
    }

    fn texts(lines: &[Stored]) -> Vec<String> {
        lines
            .iter()
            .map(|s| format!("{}:{}", s.line.rank, s.line.text))
            .collect()
    }

    fn add(log: &mut JobLog, c: v1::LogChunk) {
        let lines = log.accept(&c);
        log.append(lines).unwrap();
    }

    /// The job never holds more than its retention; the oldest lines go first, every rank's order
    /// is kept, and the newest line is always there.
    #[test]
    fn retention_drops_oldest_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = JobLog::open(dir.path(), 400).unwrap();
        for i in 0..100 {
            add(
                &mut log,
                chunk(i % 2, i as u64 / 2, &[&format!("line {i:03}")]),
            );
            assert!(log.bytes() <= 400, "{} bytes after line {i}", log.bytes());
        }
        let kept = log.read(0, None).unwrap();
        assert!(kept.len() >= 20 && kept.len() < 100, "{}", kept.len());
        let last = kept.last().unwrap();
        assert_eq!((last.index, last.line.text.as_str()), (99, "line 099"));
        // Contiguous newest lines: what went is the oldest.
        let first = kept[0].index;
        let numbers: Vec<u64> = kept.iter().map(|s| s.index).collect();
        assert_eq!(numbers, (first..100).collect::<Vec<_>>());
        let rank1: Vec<String> = log
            .read(0, Some(1))
            .unwrap()
            .iter()
            .map(|s| s.line.text.clone())
            .collect();
        let mut sorted = rank1.clone();
        sorted.sort();
        assert_eq!(rank1, sorted);
        assert!(rank1.iter().all(|t| {
            let n: u32 = t[5..].parse().unwrap();
            n % 2 == 1
        }));
    }

    /// A reopened log (a coordinator restart, or a crash that cut a record) has every kept line and
    /// continues the numbering.
    #[test]
    fn reopen_keeps_lines_and_numbering() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = JobLog::open(dir.path(), 1 << 20).unwrap();
        add(&mut log, chunk(0, 0, &["a", "b"]));
        add(&mut log, chunk(1, 0, &["c with spaces"]));
        let before = log.read(0, None).unwrap();
        drop(log);
        let seg = dir.path().join(format!("{:020}.log", 0));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"0 1 e half a rec").unwrap();
        let mut log = JobLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.read(0, None).unwrap(), before);
        add(&mut log, chunk(0, 2, &["d"]));
        assert_eq!(
            texts(&log.read(0, None).unwrap()),
            vec!["0:a", "0:b", "1:c with spaces", "0:d"]
        );
        assert_eq!(log.read(3, None).unwrap()[0].index, 3);
        assert!(JobLog::open(&dir.path().join("none"), 10)
            .unwrap()
            .read(0, None)
            .unwrap()
            .is_empty());
    }

    /// A chunk sent again is kept once; a gap in the sequence numbers is marked.
    #[test]
    fn repeats_are_skipped_and_gaps_marked() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = JobLog::open(dir.path(), 1 << 20).unwrap();
        add(&mut log, chunk(0, 0, &["a", "b"]));
        add(&mut log, chunk(0, 1, &["b", "c"]));
        add(&mut log, chunk(0, 6, &["g\nh"]));
        assert_eq!(
            texts(&log.read(0, None).unwrap()),
            vec![
                "0:a",
                "0:b",
                "0:c",
                "0:[xvlm-coord: 3 lines lost in transit]",
                "0:g h"
            ]
        );
    }

    /// The store's writer appends what reports submit; a snapshot after a flush has it, and its
    /// receiver gets what comes after; a job id that is not a file name is refused.
    #[tokio::test]
    async fn store_writes_in_the_background_and_follows() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::open(dir.path(), DEFAULT_RETENTION_BYTES).unwrap();
        store.submit(vec![chunk(0, 0, &["one"])]);
        store.flush().await;
        let (lines, next, mut rx) = store.snapshot("job-0001", 0, None).unwrap();
        assert_eq!((texts(&lines), next), (vec!["0:one".to_string()], 1));
        store.submit(vec![chunk(1, 0, &["two"])]);
        let batch = rx.recv().await.unwrap();
        assert_eq!(texts(&batch), vec!["1:two"]);
        assert!(store.snapshot("../x", 0, None).is_err());
    }
}
