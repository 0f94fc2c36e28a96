//! Trainer log capture: each trainer's stderr (and the stdout lines that are not progress JSON) cut
//! into lines, numbered per (job, generation, rank, stream), and held in one bounded buffer until a
//! report takes them to the coordinator.
//!
//! Delivery: lines taken into a report count as delivered (there is no acknowledgement); lines in a
//! report that a breaking heartbeat stream loses are gone, and the coordinator marks the gap their
//! sequence numbers leave. While the coordinator is unreachable lines wait here; past
//! [`BUFFER_BYTES`] the oldest are dropped and one marker line per trainer output says how many bytes
//! went. A line longer than [`MAX_LINE_BYTES`] is cut with a marker; bytes that are not UTF-8 are
//! replaced (U+FFFD). Nothing here panics on what a trainer writes.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use xvlm_proto::v1;

/// Bytes of log lines (plus [`LINE_OVERHEAD`] each) the worker holds for the coordinator.
pub const BUFFER_BYTES: usize = 4 << 20;
/// Bytes of log lines one report carries at most (the rest goes in the next ones), well under
/// gRPC's 4 MiB message limit.
pub const REPORT_BYTES: usize = 256 << 10;
/// Longest line kept whole; longer lines are cut and marked.
pub const MAX_LINE_BYTES: usize = 16 << 10;
/// What each held line costs beyond its text, so a flood of empty lines is bounded too.
const LINE_OVERHEAD: usize = 64;

/// Which trainer output a line came from, and whose.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogKey {
    /// Job id.
    pub job: String,
    /// Generation.
    pub generation: u64,
    /// Rank.
    pub rank: u32,
    /// Stdout or stderr.
    pub stream: v1::LogStream,
}

/// One output's lines not yet reported.
#[derive(Default)]
struct Queue {
    /// (sequence number, text, global arrival order).
    lines: VecDeque<(u64, String, u64)>,
    /// Sequence number of the next line read.
    next_seq: u64,
    /// Lines dropped since the last report: (bytes, sequence number of the last one); reported as
    /// one marker line that takes that sequence number, so the numbers stay consecutive.
    dropped: Option<(u64, u64)>,
}

/// The bounded buffer of every trainer's unreported lines.
#[derive(Default)]
pub struct LogBuffer {
    queues: BTreeMap<LogKey, Queue>,
    bytes: usize,
    next_order: u64,
    capacity: usize,
}

impl LogBuffer {
    /// An empty buffer holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        LogBuffer {
            capacity,
            ..LogBuffer::default()
        }
    }

    /// Adds a line read from `key`'s output, dropping the oldest held lines past the capacity.
    pub fn push(&mut self, key: &LogKey, text: String) {
        let order = self.next_order;
        self.next_order += 1;
        let q = self.queues.entry(key.clone()).or_default();
        let seq = q.next_seq;
        q.next_seq += 1;
        self.bytes += text.len() + LINE_OVERHEAD;
        q.lines.push_back((seq, text, order));
        while self.bytes > self.capacity {
            let Some(oldest) = self
                .queues
                .values_mut()
                .filter(|q| !q.lines.is_empty())
                .min_by_key(|q| q.lines.front().map(|l| l.2))
            else {
                break;
            };
            let Some((seq, text, _)) = oldest.lines.pop_front() else {
                break;
            };
            self.bytes -= text.len() + LINE_OVERHEAD;
            let bytes = oldest.dropped.map_or(0, |d| d.0) + text.len() as u64 + 1;
            oldest.dropped = Some((bytes, seq));
        }
    }

    /// Whether nothing waits to be reported.
    pub fn is_empty(&self) -> bool {
        self.queues
            .values()
            .all(|q| q.lines.is_empty() && q.dropped.is_none())
    }

    /// Whether lines (or a drop marker) of this rank of this generation wait to be reported.
    pub fn pending(&self, job: &str, generation: u64, rank: u32) -> bool {
        self.queues.iter().any(|(k, q)| {
            k.job == job
                && k.generation == generation
                && k.rank == rank
                && (!q.lines.is_empty() || q.dropped.is_some())
        })
    }

    /// Takes up to about `budget` bytes of lines, oldest first, as one chunk per output; drop
    /// markers first. Empty queues are forgotten unless their trainer may still write
    /// (`open(key)`), so the buffer does not grow with finished generations.
    pub fn take(&mut self, budget: usize, open: impl Fn(&LogKey) -> bool) -> Vec<v1::LogChunk> {
        let mut chunks: BTreeMap<LogKey, v1::LogChunk> = BTreeMap::new();
        let mut spent = 0;
        for (key, q) in self.queues.iter_mut() {
            if let Some((bytes, seq)) = q.dropped.take() {
                chunks.insert(key.clone(), chunk_of(key, seq, drop_marker(bytes)));
            }
        }
        while spent < budget {
            let Some((key, q)) = self
                .queues
                .iter_mut()
                .filter(|(_, q)| !q.lines.is_empty())
                .min_by_key(|(_, q)| q.lines.front().map(|l| l.2))
            else {
                break;
            };
            let Some((seq, text, _)) = q.lines.pop_front() else {
                break;
            };
            spent += text.len() + LINE_OVERHEAD;
            self.bytes -= text.len() + LINE_OVERHEAD;
            match chunks.get_mut(key) {
                Some(c) => c.lines.push(text),
                None => {
                    chunks.insert(key.clone(), chunk_of(key, seq, text));
                }
            }
        }
        self.queues
            .retain(|k, q| !q.lines.is_empty() || q.dropped.is_some() || open(k));
        chunks.into_values().collect()
    }
}

fn chunk_of(key: &LogKey, first_seq: u64, line: String) -> v1::LogChunk {
    v1::LogChunk {
        job_id: key.job.clone(),
        generation: key.generation,
        rank: key.rank,
        stream: key.stream as i32,
        first_seq,
        lines: vec![line],
    }
}

/// The line that stands for dropped ones.
fn drop_marker(bytes: u64) -> String {
    format!("[xvlm-worker: {bytes} bytes of log dropped: the coordinator was unreachable and the worker's buffer full]")
}

/// The buffer shared by the capture tasks and the daemon.
#[derive(Clone)]
pub struct TrainerLogs(Arc<Mutex<LogBuffer>>);

impl Default for TrainerLogs {
    fn default() -> Self {
        TrainerLogs(Arc::new(Mutex::new(LogBuffer::new(BUFFER_BYTES))))
    }
}

impl TrainerLogs {
    /// The buffer; a capture task that panicked holding it leaves it usable.
    pub fn lock(&self) -> MutexGuard<'_, LogBuffer> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Splits bytes into lines of at most `max` bytes (cut lines are marked), replacing bytes that are not
/// UTF-8; a character split between two reads is kept whole.
pub struct LineSplitter {
    max: usize,
    line: Vec<u8>,
    /// Bytes of the current line beyond `max`, not kept.
    cut: u64,
}

impl LineSplitter {
    /// A splitter keeping lines of up to `max` bytes.
    pub fn new(max: usize) -> Self {
        LineSplitter {
            max,
            line: Vec::new(),
            cut: 0,
        }
    }

    /// The complete lines in `bytes` (with what came before).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for part in bytes.split_inclusive(|b| *b == b'\n') {
            let (body, complete) = match part.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (part, false),
            };
            let room = self.max.saturating_sub(self.line.len());
            let keep = body.len().min(room);
            self.line.extend_from_slice(&body[..keep]);
            self.cut += (body.len() - keep) as u64;
            if complete {
                out.push(self.finish_line());
            }
        }
        out
    }

    /// The last line when the output ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        (!self.line.is_empty() || self.cut > 0).then(|| self.finish_line())
    }

    fn finish_line(&mut self) -> String {
        let mut bytes = std::mem::take(&mut self.line);
        let mut cut = std::mem::take(&mut self.cut);
        if cut > 0 {
            // Cut at a character boundary rather than leave half a character.
            if let Err(e) = std::str::from_utf8(&bytes) {
                if e.error_len().is_none() {
                    cut += (bytes.len() - e.valid_up_to()) as u64;
                    bytes.truncate(e.valid_up_to());
                }
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if text.ends_with('\r') {
            text.pop();
        }
        if cut > 0 {
            text.push_str(&format!(" [xvlm-worker: line cut, {cut} more bytes]"));
        }
        text
    }
}

/// Copies a trainer's stderr to its log file as it comes and into `logs` line by line, until the
/// trainer (and whatever shares its stderr) closed it.
pub async fn capture_stderr(
    mut stderr: impl AsyncRead + Unpin,
    log_file: PathBuf,
    logs: TrainerLogs,
    key: LogKey,
) {
    let mut file = match tokio::fs::File::create(&log_file).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %log_file.display(), error = %e, "cannot write the trainer log");
            None
        }
    };
    let mut split = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = file.as_mut() {
            if f.write_all(&buf[..n]).await.is_err() {
                file = None;
            }
        }
        let lines = split.push(&buf[..n]);
        let mut logs = logs.lock();
        for line in lines {
            logs.push(&key, line);
        }
    }
    if let Some(line) = split.finish() {
        logs.lock().push(&key, line);
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
}

/// A stdout line that is not progress JSON, cut to [`MAX_LINE_BYTES`] (stdout lines are read whole
/// up to a larger limit, since progress lines with checkpoint file lists can be long).
pub fn stdout_line(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_string();
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{} [xvlm-worker: line cut, {} more bytes]",
        &line[..end],
        line.len() - end
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rank: u32) -> LogKey {
        LogKey {
            job: "job-0001".into(),
            generation: 1,
            rank,
            stream: v1::LogStream::Stderr,
        }
    }

    /// Lines split across reads come out whole; a long line is cut at a character boundary with a
    /// marker counting the rest; invalid UTF-8 is replaced, a character split between reads is not.
    #[test]
    fn splitter_cuts_long_lines_and_replaces_bad_utf8() {
        let mut s = LineSplitter::new(8);
        assert_eq!(s.push(b"ab"), Vec::<String>::new());
        assert_eq!(s.push(b"c\nde\r\n"), vec!["abc", "de"]);
        // "é" is two bytes: split between reads it still decodes.
        assert_eq!(s.push(&[b'x', 0xc3]), Vec::<String>::new());
        assert_eq!(s.push(&[0xa9, b'\n']), vec!["xé"]);
        assert_eq!(s.push(&[b'a', 0xff, b'b', b'\n']), vec!["a\u{fffd}b"]);
        // 7 ASCII bytes then "é": the cut falls inside it, so it goes whole to the cut count.
        let long = "abcdefgé and more\n";
        assert_eq!(
            s.push(long.as_bytes()),
            vec!["abcdefg [xvlm-worker: line cut, 11 more bytes]"]
        );
        assert_eq!(s.push(b"tail"), Vec::<String>::new());
        assert_eq!(s.finish().as_deref(), Some("tail"));
        assert_eq!(s.finish(), None);
        assert!(stdout_line(&"y".repeat(MAX_LINE_BYTES + 5)).ends_with("line cut, 5 more bytes]"));
    }

    /// Past the capacity the oldest lines go, and the next report starts that output with one marker
    /// counting their bytes, numbered so the sequence stays consecutive; other outputs keep theirs.
    #[test]
    fn full_buffer_drops_oldest_with_one_marker() {
        let line = "x".repeat(100);
        let cost = line.len() + LINE_OVERHEAD;
        let capacity = cost * 2 + 70;
        let mut b = LogBuffer::new(capacity);
        b.push(&key(0), line.clone()); // seq 0, dropped
        b.push(&key(0), line.clone()); // seq 1, dropped
        b.push(&key(1), "r1".into());
        b.push(&key(0), line.clone());
        b.push(&key(0), "last".into());
        assert!(b.bytes <= capacity);
        assert!(b.pending("job-0001", 1, 0));
        let chunks = b.take(REPORT_BYTES, |_| false);
        let r0 = chunks.iter().find(|c| c.rank == 0).unwrap();
        assert_eq!(r0.first_seq, 1);
        assert_eq!(r0.lines.len(), 3);
        assert!(r0.lines[0].contains("202 bytes of log dropped"), "{r0:?}");
        assert_eq!(r0.lines[2], "last");
        let r1 = chunks.iter().find(|c| c.rank == 1).unwrap();
        assert_eq!(
            (r1.first_seq, r1.lines.clone()),
            (0, vec!["r1".to_string()])
        );
        assert!(!b.pending("job-0001", 1, 0));
        assert!(b.queues.is_empty(), "closed outputs are forgotten");
    }

    /// A report takes at most its budget, oldest first; the rest follows with the next numbers.
    #[test]
    fn reports_are_bounded_and_numbered() {
        let mut b = LogBuffer::new(BUFFER_BYTES);
        for i in 0..10 {
            b.push(&key(0), format!("line {i}"));
        }
        let first = b.take(3 * (6 + LINE_OVERHEAD), |_| true);
        assert_eq!(first[0].lines, vec!["line 0", "line 1", "line 2"]);
        let rest = b.take(REPORT_BYTES, |_| true);
        assert_eq!(rest[0].first_seq, 3);
        assert_eq!(rest[0].lines.len(), 7);
        b.push(&key(0), "again".into());
        assert_eq!(b.take(REPORT_BYTES, |_| true)[0].first_seq, 10);
    }
}
