//! All-reduce among ranks that all run on one host, through one shared segment instead of a ring.
//!
//! Each rank owns `BUFFERS` slots of `slice` bytes in the segment. The buffer is summed slice by slice:
//! every rank copies its slice into its slot (all but its own chunk), sums its own 1/N chunk of the slice
//! by reading the peers' slots directly and publishes the sum in its slot, then copies the peers' sums
//! out. Per rank that is one read and one write of its buffer from memory; the slots stay in the cache.
//! There are no barriers: each rank publishes monotonic counters (slices copied, reduced, gathered) and
//! waits only for the counters it depends on, so with more ranks than cores whichever rank is scheduled
//! makes progress, and a rank may run `BUFFERS - 1` slices ahead. An idle rank spins briefly, then
//! sleeps on a futex, so ranks never burn a core another rank needs.

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
/// Checks before an idle rank sleeps on the futex. Yielding between spinning and sleeping was measured
/// slower at 4 ranks on a loaded 2-core machine (a yield hands the core to another process for a whole
/// time slice), and so were 4 slots per rank instead of 2.
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
            || slice_bytes & 63 != 0
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

    /// Rank `rank`'s slot for slice `seq`, as elements of T.
    fn slot<T: Element>(&self, rank: usize, seq: u64) -> *mut T {
        let buffer = (seq % BUFFERS as u64) as usize;
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

    /// Whether every rank's counter `what` has reached `slices`.
    fn all_reached(&self, what: Progress, slices: u64) -> bool {
        (0..self.world).all(|p| self.counter(p, what).load(SeqCst) >= slices)
    }

    /// Called when no step can proceed: spins a little, then sleeps until any rank publishes (the
    /// epoch moves past `epoch`, read before the failed checks, so no publish is missed). Fails when
    /// the group was abandoned, a neighbour died, or nothing happened for `stall`.
    fn idle(&self, epoch: u32, idle: &mut Idle) -> Result<(), String> {
        if idle.spins < SPINS {
            idle.spins += 1;
            std::hint::spin_loop();
            return Ok(());
        }
        if self.word(ABANDONED).load(SeqCst) != 0 {
            return Err("another rank abandoned the collective".into());
        }
        let since = *idle.since.get_or_insert_with(Instant::now);
        self.word(WAITERS).fetch_add(1, SeqCst);
        futex_wait(self.word(EPOCH), epoch, POLL);
        self.word(WAITERS).fetch_sub(1, SeqCst);
        if self.word(EPOCH).load(SeqCst) == epoch {
            if since.elapsed() > self.stall {
                return Err(format!("no rank made progress for {:?}", self.stall));
            }
            self.check_peers()?;
        }
        Ok(())
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

    /// Works through the slices as a small state machine: of the steps that can proceed, gather (frees
    /// slots), then reduce (peers wait on it), then copy ahead; idles only when none can.
    fn all_reduce_inner<T: Element>(&self, data: &mut [T]) -> Result<(), String> {
        let per_slice = self.slice_bytes / T::SIZE;
        let slices = data.len().div_ceil(per_slice) as u64;
        let base = self.next_slice.get();
        self.next_slice.set(base + slices);
        let buffers = BUFFERS as u64;
        // Slices (relative to `base`) this rank has copied in, reduced, gathered.
        let (mut copied, mut reduced, mut gathered) = (0u64, 0u64, 0u64);
        let mut idle = Idle::default();
        while gathered < slices {
            let epoch = self.word(EPOCH).load(SeqCst);
            if gathered < reduced && self.all_reached(Progress::Reduced, base + gathered + 1) {
                self.gather(part(data, per_slice, gathered), base + gathered);
                gathered += 1;
                self.publish(Progress::Gathered, base + gathered);
            } else if reduced < copied && self.all_reached(Progress::Copied, base + reduced + 1) {
                self.reduce(part(data, per_slice, reduced), base + reduced);
                reduced += 1;
                self.publish(Progress::Reduced, base + reduced);
            } else if copied < slices
                && (base + copied < buffers
                    || self.all_reached(Progress::Gathered, base + copied + 1 - buffers))
            {
                self.copy_in(part(data, per_slice, copied), base + copied);
                copied += 1;
                self.publish(Progress::Copied, base + copied);
            } else {
                self.idle(epoch, &mut idle)?;
                continue;
            }
            idle = Idle::default();
        }
        Ok(())
    }

    /// Chunk `c` of a slice of `len` elements.
    fn bounds(&self, c: usize, len: usize) -> (usize, usize) {
        (c * len / self.world, (c + 1) * len / self.world)
    }

    /// Copies every chunk but this rank's own of `slice` (sequence `seq`) into this rank's slot.
    fn copy_in<T: Element>(&self, slice: &[T], seq: u64) {
        let own = self.slot::<T>(self.rank, seq);
        let (start, end) = self.bounds(self.rank, slice.len());
        // SAFETY: the slot holds at least `slice.len()` elements and is this rank's alone until it
        // publishes Copied for `seq` (every rank has gathered the slice that used it before);
        // `slice` is private memory, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(slice.as_ptr(), own, start);
            std::ptr::copy_nonoverlapping(slice.as_ptr().add(end), own.add(end), slice.len() - end);
        }
    }

    /// Sums this rank's chunk of slice `seq` in place from the peers' slots and publishes the sum in
    /// this rank's slot.
    fn reduce<T: Element>(&self, slice: &mut [T], seq: u64) {
        let (w, r) = (self.world, self.rank);
        let (start, end) = self.bounds(r, slice.len());
        let chunk = &mut slice[start..end];
        for p in (1..w).map(|i| (r + i) % w) {
            // SAFETY: rank p published Copied for `seq` and leaves this chunk of its slot alone until
            // this rank publishes Gathered for it.
            let theirs = unsafe {
                std::slice::from_raw_parts(self.slot::<T>(p, seq).add(start), chunk.len())
            };
            T::add_assign(chunk, theirs);
        }
        // SAFETY: peers read this chunk of the own slot only after Reduced is published.
        unsafe {
            std::ptr::copy_nonoverlapping(
                chunk.as_ptr(),
                self.slot::<T>(r, seq).add(start),
                chunk.len(),
            )
        };
    }

    /// Copies the peers' sums for slice `seq` out of their slots.
    fn gather<T: Element>(&self, slice: &mut [T], seq: u64) {
        let (w, r) = (self.world, self.rank);
        for p in (1..w).map(|i| (r + i) % w) {
            let (start, end) = self.bounds(p, slice.len());
            // SAFETY: rank p published Reduced for `seq`; its sums stay until every rank is Gathered.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.slot::<T>(p, seq).add(start),
                    slice.as_mut_ptr().add(start),
                    end - start,
                )
            };
        }
    }
}

/// Slice `k` (of `per_slice` elements; the last may be shorter) of `data`.
fn part<T>(data: &mut [T], per_slice: usize, k: u64) -> &mut [T] {
    let start = k as usize * per_slice;
    let end = (start + per_slice).min(data.len());
    &mut data[start..end]
}

/// How long this rank has been idle within one call.
#[derive(Default)]
struct Idle {
    spins: usize,
    since: Option<Instant>,
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
