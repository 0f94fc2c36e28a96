//! All-reduce among ranks that all run on one host, through one shared segment instead of a ring.
//!
//! Each rank owns `BUFFERS` slots of `slice` bytes in the segment. The buffer is summed slice by slice:
//! every rank copies its slice into its slot (all but its own chunk), sums its own 1/N chunk of the slice
//! by reading the peers' slots directly and publishes the sum in its slot, then copies the peers' sums
//! out. Per rank that is one read and one write of its buffer from memory; the slots stay in the cache.
//! There are no barriers: each rank publishes monotonic counters (slices copied, reduced, gathered) and
//! waits only for the counters it depends on, so with more ranks than cores whichever rank is scheduled
//! makes progress, and a rank may run `BUFFERS - 1` slices ahead. Waiting spins briefly, then sleeps on
//! a futex, so ranks never burn a core another rank needs.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use super::element::Element;
use super::shm::{futex_wait, futex_wake, Mapping};

/// Default bytes of the buffer summed per step; `XVLM_SHM_SLICE_BYTES` overrides it (tests use small
/// ones so buffers span many slices and wrap the slots).
const DEFAULT_SLICE_BYTES: usize = 1 << 20;
/// Slots per rank: how far (in slices) a fast rank may run ahead of a slow one, plus one.
const BUFFERS: usize = 2;
/// Checks of a counter before a waiting rank sleeps.
const SPINS: usize = 200;
/// Longest sleep between checks for a dead peer.
const POLL: Duration = Duration::from_millis(100);

/// Header offsets (each word on its own cache line).
const EPOCH: usize = 0;
const WAITERS: usize = 64;
const ABANDONED: usize = 128;
const WORLD: usize = 192;
const SLICE: usize = 200;
const COUNTERS: usize = 256;

/// Per-rank progress counters, in slices (global sequence numbers, one past the last one done).
#[derive(Clone, Copy)]
enum Progress {
    Copied = 0,
    Reduced = 1,
    Gathered = 2,
}

/// One rank's view of the shared segment.
pub(crate) struct LocalGroup {
    rank: usize,
    world: usize,
    map: Mapping,
    slice_bytes: usize,
    data_offset: usize,
    /// Sequence number of the next slice this rank sums (the same on every rank: calls match).
    next_slice: Cell<u64>,
    /// The ring sockets to the neighbours: EOF on either means a peer died.
    probes: Vec<TcpStream>,
    /// How long a rank waits for a peer's progress before failing.
    stall: Duration,
}

fn layout(world: usize, slice_bytes: usize) -> (usize, usize) {
    let data_offset = (COUNTERS + world * 3 * 64).next_multiple_of(4096);
    (data_offset, data_offset + world * BUFFERS * slice_bytes)
}

fn slice_bytes_from_env() -> usize {
    std::env::var("XVLM_SHM_SLICE_BYTES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(DEFAULT_SLICE_BYTES, |b| b.max(64).next_multiple_of(64))
}

impl LocalGroup {
    fn map(path: &Path, rank: usize, world: usize, create: bool) -> io::Result<(Mapping, usize)> {
        if create {
            let slice_bytes = slice_bytes_from_env();
            let map = Mapping::open(path, Some(layout(world, slice_bytes).1))?;
            map.u64_at(WORLD).store(world as u64, SeqCst);
            map.u64_at(SLICE).store(slice_bytes as u64, SeqCst);
            return Ok((map, slice_bytes));
        }
        let map = Mapping::open(path, None)?;
        let their_world = map.u64_at(WORLD).load(SeqCst) as usize;
        let slice_bytes = map.u64_at(SLICE).load(SeqCst) as usize;
        if their_world != world
            || slice_bytes == 0
            || slice_bytes % 64 != 0
            || map.len() != layout(world, slice_bytes).1
        {
            return Err(io::Error::other(format!(
                "rank {rank}: shared segment {} is for another group",
                path.display()
            )));
        }
        Ok((map, slice_bytes))
    }

    /// Sets the segment up over the ring's TCP links: rank 0 creates it and sends its path around the
    /// ring; each rank maps it and passes on whether everyone so far succeeded; rank 0 unlinks the file
    /// (the mappings keep it) and sends the verdict around. `None` when any rank could not map it.
    pub(crate) fn connect(
        rank: usize,
        world: usize,
        tag: u64,
        next: &mut TcpStream,
        prev: &mut TcpStream,
        stall: Duration,
    ) -> io::Result<Option<LocalGroup>> {
        let mut mapped = None;
        if rank == 0 {
            let path = segment_path(tag);
            mapped = LocalGroup::map(&path, rank, world, true).ok();
            send_offer(next, mapped.is_some(), &path)?;
            let (all_mapped, _) = read_offer(prev)?;
            let _ = std::fs::remove_file(&path);
            next.write_all(&[all_mapped as u8])?;
            let mut verdict = [0u8];
            prev.read_exact(&mut verdict)?;
            if !all_mapped {
                mapped = None;
            }
        } else {
            let (ok_so_far, path) = read_offer(prev)?;
            if ok_so_far {
                mapped = LocalGroup::map(&path, rank, world, false).ok();
            }
            send_offer(next, mapped.is_some(), &path)?;
            let mut verdict = [0u8];
            prev.read_exact(&mut verdict)?;
            next.write_all(&verdict)?;
            if verdict[0] != 1 {
                mapped = None;
            }
        }
        let Some((map, slice_bytes)) = mapped else {
            return Ok(None);
        };
        Ok(Some(LocalGroup {
            rank,
            world,
            data_offset: layout(world, slice_bytes).0,
            map,
            slice_bytes,
            next_slice: Cell::new(0),
            probes: vec![next.try_clone()?, prev.try_clone()?],
            stall,
        }))
    }

    fn counter(&self, rank: usize, what: Progress) -> &AtomicU64 {
        self.map.u64_at(COUNTERS + (rank * 3 + what as usize) * 64)
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        self.map.u32_at(offset)
    }

    /// Rank `rank`'s slot `buffer`, as elements of T.
    fn slot<T: Element>(&self, rank: usize, buffer: usize) -> *mut T {
        let offset = self.data_offset + (buffer * self.world + rank) * self.slice_bytes;
        // SAFETY: in bounds by `layout`; slots are 64-byte aligned (page-aligned base, sizes % 64 == 0).
        unsafe { self.map.ptr().add(offset) as *mut T }
    }

    /// Publishes this rank's progress and wakes sleeping peers.
    fn publish(&self, what: Progress, slices: u64) {
        self.counter(self.rank, what).store(slices, SeqCst);
        self.word(EPOCH).fetch_add(1, SeqCst);
        if self.word(WAITERS).load(SeqCst) != 0 {
            futex_wake(self.word(EPOCH));
        }
    }

    /// Marks the group unusable (this rank failed or left) and wakes everyone, so peers fail fast.
    pub(crate) fn abandon(&self) {
        self.word(ABANDONED).store(1, SeqCst);
        self.word(EPOCH).fetch_add(1, SeqCst);
        futex_wake(self.word(EPOCH));
    }

    /// Waits until `rank`'s counter `what` reaches `slices`.
    fn wait_for(&self, rank: usize, what: Progress, slices: u64) -> Result<(), String> {
        let counter = self.counter(rank, what);
        let ready = || counter.load(SeqCst) >= slices;
        for _ in 0..SPINS {
            if ready() {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let start = Instant::now();
        loop {
            // Registered as a waiter before the last check, so a publish after it sees us and wakes us.
            self.word(WAITERS).fetch_add(1, SeqCst);
            let epoch = self.word(EPOCH).load(SeqCst);
            let done = ready();
            let abandoned = self.word(ABANDONED).load(SeqCst) != 0;
            if !done && !abandoned {
                futex_wait(self.word(EPOCH), epoch, POLL);
            }
            self.word(WAITERS).fetch_sub(1, SeqCst);
            if done || ready() {
                return Ok(());
            }
            if abandoned {
                return Err("another rank abandoned the collective".into());
            }
            if start.elapsed() > self.stall {
                return Err(format!("rank {rank} made no progress for {:?}", self.stall));
            }
            if start.elapsed() >= POLL {
                self.check_peers()?;
            }
        }
    }

    fn check_peers(&self) -> Result<(), String> {
        for peer in &self.probes {
            peer.set_nonblocking(true).map_err(|e| e.to_string())?;
            let mut probe = [0u8; 1];
            let closed = matches!(peer.peek(&mut probe), Ok(0));
            peer.set_nonblocking(false).map_err(|e| e.to_string())?;
            if closed {
                return Err("a neighbouring rank closed its connection".into());
            }
        }
        Ok(())
    }

    /// In-place sum of `data` across the group. Every rank passes the same length (the caller checked).
    /// On failure the group is abandoned.
    pub(crate) fn all_reduce<T: Element>(&self, data: &mut [T]) -> Result<(), String> {
        let result = self.all_reduce_inner(data);
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn all_reduce_inner<T: Element>(&self, data: &mut [T]) -> Result<(), String> {
        let (w, r) = (self.world, self.rank);
        let per_slice = self.slice_bytes / T::SIZE;
        let peers = || (1..w).map(move |i| (r + i) % w);
        for slice in data.chunks_mut(per_slice) {
            let seq = self.next_slice.get();
            self.next_slice.set(seq + 1);
            let buffer = (seq % BUFFERS as u64) as usize;
            // The slot is free once every rank has copied the sums out of the slice that last used it.
            if seq >= BUFFERS as u64 {
                for p in 0..w {
                    self.wait_for(p, Progress::Gathered, seq + 1 - BUFFERS as u64)?;
                }
            }
            let len = slice.len();
            let bounds = |c: usize| (c * len / w, (c + 1) * len / w);
            let (mine_start, mine_end) = bounds(r);
            let own = self.slot::<T>(r, buffer);
            // SAFETY: the slot holds `per_slice >= len` elements and is this rank's to write until it
            // publishes Copied; `slice` is private memory, so the ranges do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(slice.as_ptr(), own, mine_start);
                std::ptr::copy_nonoverlapping(
                    slice.as_ptr().add(mine_end),
                    own.add(mine_end),
                    len - mine_end,
                );
            }
            self.publish(Progress::Copied, seq + 1);
            let chunk = &mut slice[mine_start..mine_end];
            for p in peers() {
                self.wait_for(p, Progress::Copied, seq + 1)?;
                // SAFETY: rank p published its slice (Copied, SeqCst) and does not touch this chunk of
                // its slot until this rank publishes Gathered for the slice.
                let theirs = unsafe {
                    std::slice::from_raw_parts(self.slot::<T>(p, buffer).add(mine_start), chunk.len())
                };
                T::add_assign(chunk, theirs);
            }
            // SAFETY: this chunk of the own slot is read by peers only after Reduced is published.
            unsafe {
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), own.add(mine_start), chunk.len())
            };
            self.publish(Progress::Reduced, seq + 1);
            for p in peers() {
                self.wait_for(p, Progress::Reduced, seq + 1)?;
                let (start, end) = bounds(p);
                // SAFETY: rank p published its sum for chunk p; it stays until every rank is Gathered.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.slot::<T>(p, buffer).add(start),
                        slice.as_mut_ptr().add(start),
                        end - start,
                    )
                };
            }
            self.publish(Progress::Gathered, seq + 1);
        }
        Ok(())
    }
}

impl Drop for LocalGroup {
    fn drop(&mut self) {
        // Safe for peers still finishing the last call: once this rank has gathered a slice, every
        // counter they wait on for it is already published.
        self.abandon();
    }
}

fn send_offer(next: &mut TcpStream, ok: bool, path: &Path) -> io::Result<()> {
    let bytes = path.to_string_lossy().into_owned().into_bytes();
    next.write_all(&[ok as u8])?;
    next.write_all(&(bytes.len() as u16).to_le_bytes())?;
    next.write_all(&bytes)
}

fn read_offer(prev: &mut TcpStream) -> io::Result<(bool, PathBuf)> {
    let mut head = [0u8; 3];
    prev.read_exact(&mut head)?;
    let mut path = vec![0u8; u16::from_le_bytes([head[1], head[2]]) as usize];
    prev.read_exact(&mut path)?;
    Ok((
        head[0] == 1,
        PathBuf::from(String::from_utf8_lossy(&path).into_owned()),
    ))
}

fn segment_path(tag: u64) -> PathBuf {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    PathBuf::from(format!(
        "/dev/shm/xvlm-group-{}-{tag}-{nonce}",
        std::process::id()
    ))
}
