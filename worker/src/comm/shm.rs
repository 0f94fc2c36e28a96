//! A one-directional byte channel through shared memory, for ring neighbours on the same host: the
//! sender copies into a mapped ring buffer and the receiver reduces straight out of it, one copy per
//! hop instead of TCP's two, and no system call while data flows. Waiting uses a futex on a sequence
//! word, so an idle side sleeps instead of spinning on a shared machine.
//!
//! Every message is padded to 8 bytes so element boundaries never straddle the buffer's wrap point,
//! and each `write_all` of n bytes is consumed by exactly one receive of n bytes on the other side.

use std::fs::OpenOptions;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default data capacity of one channel; `XVLM_RING_SHM_BYTES` overrides it (tests use a small one so
/// messages wrap around the buffer).
const DEFAULT_CAPACITY: usize = 32 << 20;
/// Header: head, tail, data sequence, space sequence, waiting flags, each on its own cache line.
const HEADER: usize = 4096;

/// A shared file mapping (under /dev/shm), unmapped on drop.
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all cross-process accesses go through atomics or through
// ranges a synchronisation protocol hands to exactly one writer at a time.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out raw pointers and atomics.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates the file with `len` zeroed bytes (`Some`), or opens an existing one (`None`, its whole
    /// length), and maps it shared.
    pub(crate) fn open(path: &Path, len: Option<usize>) -> io::Result<Mapping> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(len.is_some())
            .open(path)?;
        if let Some(len) = len {
            file.set_len(len as u64)?;
            // Reserve the pages now: a /dev/shm too small for the mapping is an error here (and the
            // caller falls back to TCP) instead of a SIGBUS on first touch.
            // SAFETY: plain syscall on a file descriptor we own.
            let err = unsafe {
                libc::posix_fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                    len as libc::off_t,
                )
            };
            if err != 0 {
                let _ = std::fs::remove_file(path);
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::other("shared memory file is empty"));
        }
        // SAFETY: mapping a regular file we opened read-write, shared between processes.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr as *mut u8,
            len,
        })
    }

    /// Mapped bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The start of the mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The atomic u32 at `offset` (4-byte aligned, inside the mapping).
    pub(crate) fn u32_at(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset & 3 == 0 && offset + 4 <= self.len);
        // SAFETY: aligned and in bounds; the file starts zeroed and is only accessed atomically here.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU32) }
    }

    /// The atomic u64 at `offset` (8-byte aligned, inside the mapping).
    pub(crate) fn u64_at(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset & 7 == 0 && offset + 8 <= self.len);
        // SAFETY: as above.
        unsafe { &*(self.ptr.add(offset) as *const AtomicU64) }
    }
}

/// One channel's mapping: the header words, then `capacity` data bytes.
struct Channel {
    map: Mapping,
    capacity: usize,
}

impl Channel {
    fn open(path: &Path, capacity: Option<usize>) -> io::Result<Channel> {
        let map = Mapping::open(path, capacity.map(|c| HEADER + c))?;
        let capacity = map.len().saturating_sub(HEADER);
        if capacity < 4096 || capacity & 7 != 0 {
            return Err(io::Error::other("shared memory file has a bad size"));
        }
        Ok(Channel { map, capacity })
    }

    fn head(&self) -> &AtomicU64 {
        self.map.u64_at(0)
    }
    fn tail(&self) -> &AtomicU64 {
        self.map.u64_at(64)
    }
    fn data_seq(&self) -> &AtomicU32 {
        self.map.u32_at(128)
    }
    fn space_seq(&self) -> &AtomicU32 {
        self.map.u32_at(192)
    }
    fn reader_waiting(&self) -> &AtomicU32 {
        self.map.u32_at(256)
    }
    fn writer_waiting(&self) -> &AtomicU32 {
        self.map.u32_at(320)
    }
    fn data(&self, pos: u64) -> *mut u8 {
        // SAFETY: pos % capacity is inside the data area.
        unsafe { self.map.ptr().add(HEADER + (pos as usize % self.capacity)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// Sleeps while `word` holds `expected`, at most `timeout` (spurious wake-ups possible).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT on a shared (non-private) word; spurious wake-ups are handled by callers.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

/// Wakes every waiter on `word`.
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a shared word.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

fn round8(n: usize) -> usize {
    (n + 7) & !7
}

/// Blocks until `ready()` returns a non-zero amount; checks the peer's TCP socket for EOF on every
/// timeout so a dead peer is an error, not a hang.
fn wait_for(
    seq: &AtomicU32,
    waiting: &AtomicU32,
    peer: &TcpStream,
    deadline: Instant,
    mut ready: impl FnMut() -> usize,
) -> io::Result<usize> {
    for _ in 0..64 {
        let n = ready();
        if n > 0 {
            return Ok(n);
        }
        std::hint::spin_loop();
    }
    loop {
        waiting.store(1, Ordering::SeqCst);
        let s = seq.load(Ordering::SeqCst);
        let n = ready();
        if n > 0 {
            waiting.store(0, Ordering::SeqCst);
            return Ok(n);
        }
        futex_wait(seq, s, Duration::from_millis(50));
        waiting.store(0, Ordering::SeqCst);
        let n = ready();
        if n > 0 {
            return Ok(n);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "peer stalled"));
        }
        peer.set_nonblocking(true)?;
        let mut probe = [0u8; 1];
        let closed = matches!(peer.peek(&mut probe), Ok(0));
        peer.set_nonblocking(false)?;
        if closed {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed its connection",
            ));
        }
    }
}

/// The sending end (this rank -> next rank).
pub struct ShmSender {
    map: Channel,
    peer: TcpStream,
    timeout: Duration,
}

impl ShmSender {
    /// Creates the channel file at `path`; the receiver opens (and unlinks) it.
    pub fn create(path: &Path, peer: TcpStream, timeout: Duration) -> io::Result<ShmSender> {
        let capacity = std::env::var("XVLM_RING_SHM_BYTES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(DEFAULT_CAPACITY, |c| c.max(4096) & !7);
        Ok(ShmSender {
            map: Channel::open(path, Some(capacity))?,
            peer,
            timeout,
        })
    }

    /// Sends one message.
    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let m = &self.map;
        let total = round8(bytes.len());
        let deadline = Instant::now() + self.timeout;
        let mut head = m.head().load(Ordering::Relaxed);
        let mut sent = 0usize;
        while sent < total {
            let space = wait_for(
                m.space_seq(),
                m.writer_waiting(),
                &self.peer,
                deadline,
                || m.capacity - (head - m.tail().load(Ordering::Acquire)) as usize,
            )?;
            let to_wrap = m.capacity - head as usize % m.capacity;
            let n = space.min(to_wrap).min(total - sent);
            let copy = n.min(bytes.len().saturating_sub(sent));
            // SAFETY: [head, head+n) is free space owned by the writer until head is published.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr().add(sent), m.data(head), copy) };
            head += n as u64;
            sent += n;
            m.head().store(head, Ordering::Release);
            m.data_seq().fetch_add(1, Ordering::SeqCst);
            if m.reader_waiting().load(Ordering::SeqCst) != 0 {
                futex_wake(m.data_seq());
            }
        }
        Ok(())
    }
}

/// The receiving end (previous rank -> this rank).
pub struct ShmReceiver {
    map: Channel,
    peer: TcpStream,
    timeout: Duration,
}

impl ShmReceiver {
    /// Opens the channel the sender created at `path` and unlinks the file (the mappings keep it).
    pub fn open(path: &Path, peer: TcpStream, timeout: Duration) -> io::Result<ShmReceiver> {
        let map = Channel::open(path, None)?;
        let _ = std::fs::remove_file(path);
        Ok(ShmReceiver { map, peer, timeout })
    }

    /// Receives one message of `len` bytes, handing each arriving piece (a multiple of 8 bytes except
    /// the last, which is `len`'s remainder) to `sink` at its offset.
    pub fn receive(&mut self, len: usize, mut sink: impl FnMut(usize, &[u8])) -> io::Result<()> {
        let m = &self.map;
        let total = round8(len);
        let deadline = Instant::now() + self.timeout;
        let mut tail = m.tail().load(Ordering::Relaxed);
        let mut got = 0usize;
        while got < total {
            let avail = wait_for(
                m.data_seq(),
                m.reader_waiting(),
                &self.peer,
                deadline,
                || (m.head().load(Ordering::Acquire) - tail) as usize,
            )?;
            let to_wrap = m.capacity - tail as usize % m.capacity;
            let n = avail.min(to_wrap).min(total - got);
            let useful = n.min(len.saturating_sub(got));
            if useful > 0 {
                // SAFETY: [tail, tail+n) was published by the writer and is ours until tail moves.
                let piece = unsafe { std::slice::from_raw_parts(m.data(tail), useful) };
                sink(got, piece);
            }
            tail += n as u64;
            got += n;
            m.tail().store(tail, Ordering::Release);
            m.space_seq().fetch_add(1, Ordering::SeqCst);
            if m.writer_waiting().load(Ordering::SeqCst) != 0 {
                futex_wake(m.space_seq());
            }
        }
        Ok(())
    }
}

/// A fresh channel path under /dev/shm.
pub fn channel_path(tag: u64, rank: usize) -> PathBuf {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    PathBuf::from(format!(
        "/dev/shm/xvlm-ring-{}-{tag}-{rank}-{nonce}",
        std::process::id()
    ))
}
