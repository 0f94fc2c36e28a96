//! The CPU collective backend: a ring over TCP. Each rank holds one connection to the next rank (it
//! sends) and one from the previous rank (it receives). All-reduce is reduce-scatter then all-gather
//! around the ring (each rank moves 2(N-1)/N of the buffer); within a step the send runs on a scoped
//! thread while the receive side reduces chunk by chunk as data arrives, so transfer and reduction
//! overlap. When every rank runs on one host, all-reduce goes through one shared segment instead
//! ([`super::local_group`]), which moves each rank's buffer through memory once.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};

use super::element::Element;
use super::local_group::LocalGroup;
use super::ring_hello;
use super::shm::{self, ShmReceiver, ShmSender};

/// Received data is reduced in pieces of this size while the rest is still in flight.
const CHUNK_BYTES: usize = 1 << 20;

/// Which transports ranks on the same host use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Loopback TCP only.
    Tcp,
    /// Ring neighbours on one host talk through shared-memory channels.
    ShmRing,
    /// As `ShmRing`, and when every rank is on one host, all-reduce uses one shared segment.
    Auto,
}

impl Transport {
    /// From `XVLM_RING_TRANSPORT`: `tcp`, `shm-ring`, anything else (or unset) is `auto`.
    pub fn from_env() -> Transport {
        match std::env::var("XVLM_RING_TRANSPORT").as_deref() {
            Ok("tcp") => Transport::Tcp,
            Ok("shm-ring") => Transport::ShmRing,
            _ => Transport::Auto,
        }
    }
}

/// Ring collective over TCP sockets.
pub struct RingCollective {
    rank: usize,
    world: usize,
    links: Option<RefCell<Links>>,
    /// Set when every rank is on this host: all-reduce goes through it.
    group: Option<LocalGroup>,
}

struct Links {
    next: Tx,
    prev: Rx,
    /// 8-byte aligned receive buffer for reduce steps.
    scratch: Vec<u64>,
}

/// How bytes reach the next rank: TCP, or shared memory when it runs on this host.
enum Tx {
    Tcp(TcpStream),
    Shm(ShmSender),
}

/// How bytes arrive from the previous rank.
enum Rx {
    Tcp(TcpStream),
    Shm(ShmReceiver),
}

impl Tx {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Tx::Tcp(s) => s.write_all(bytes),
            Tx::Shm(s) => s.write_all(bytes),
        }
    }
}

impl Rx {
    fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Rx::Tcp(s) => s.read_exact(buf),
            Rx::Shm(s) => s.receive(buf.len(), |off, piece| {
                buf[off..off + piece.len()].copy_from_slice(piece)
            }),
        }
    }
}

fn fail(op: &'static str, rank: usize, reason: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Failed {
        op,
        rank,
        reason: reason.to_string(),
    }
}

impl RingCollective {
    /// Connects rank `rank` of `peers.len()` ranks: accepts the previous rank on `listener` and
    /// connects to the next rank's address, retrying until `timeout`. `tag` (e.g. the generation) and
    /// `secret` (the generation's ring secret) must agree on both ends, so a stale or foreign peer is
    /// refused (`ring_hello`). Neighbours on the same host switch to shared
    /// memory, as [`Transport::from_env`] says.
    pub fn connect(
        rank: usize,
        listener: Option<TcpListener>,
        peers: &[String],
        tag: u64,
        secret: &[u8],
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        Self::connect_with(
            rank,
            listener,
            peers,
            tag,
            secret,
            timeout,
            Transport::from_env(),
        )
    }

    /// [`RingCollective::connect`] with the transport explicit.
    pub fn connect_with(
        rank: usize,
        listener: Option<TcpListener>,
        peers: &[String],
        tag: u64,
        secret: &[u8],
        timeout: Duration,
        transport: Transport,
    ) -> Result<Self, CollectiveError> {
        let world = peers.len();
        if world <= 1 {
            return Ok(RingCollective {
                rank,
                world: world.max(1),
                links: None,
                group: None,
            });
        }
        let listener = listener.ok_or_else(|| fail("connect", rank, "no listening socket"))?;
        let deadline = Instant::now() + timeout;
        let prev_rank = (rank + world - 1) % world;
        let secret_owned = secret.to_vec();
        let accept = std::thread::spawn(move || -> Result<TcpStream, String> {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            // The last refused connection, for the error if the right peer never comes: a refused
            // peer is dropped and accepting goes on, so a stray cannot take the ring down.
            let mut refused: Option<String> = None;
            loop {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                        stream
                            .set_read_timeout(Some(Duration::from_secs(10)))
                            .map_err(|e| e.to_string())?;
                        let mut hello = [0u8; ring_hello::HELLO_LEN];
                        if stream.read_exact(&mut hello).is_err() {
                            continue;
                        }
                        match ring_hello::check(&hello, prev_rank, world, tag, &secret_owned) {
                            Ok(()) => return Ok(stream),
                            Err(why) => {
                                tracing::warn!(rank, %from, "ring: refused {why}");
                                refused = Some(format!("refused {why} from {from}"));
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let mut msg = format!("rank {prev_rank} did not connect in time");
                            if let Some(r) = &refused {
                                msg.push_str(&format!(" (last: {r})"));
                            }
                            return Err(msg);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let next_addr = &peers[(rank + 1) % world];
        let mut next = loop {
            match TcpStream::connect(next_addr) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(fail("connect", rank, format!("{next_addr}: {e}")))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        next.write_all(&ring_hello::encode(rank, world, tag, secret))
            .map_err(|e| fail("connect", rank, e))?;
        let mut prev = accept
            .join()
            .map_err(|_| fail("connect", rank, "accept thread panicked"))?
            .map_err(|e| fail("connect", rank, e))?;
        for s in [&next, &prev] {
            s.set_nodelay(true).map_err(|e| fail("connect", rank, e))?;
        }
        // A dead peer shows up as EOF/RST; the timeout only guards against a silent hang.
        let stall = Duration::from_secs(600);
        prev.set_read_timeout(Some(stall))
            .map_err(|e| fail("connect", rank, e))?;
        let same_host = host_of(next_addr) == host_of(&peers[rank]) || is_loopback(next_addr);
        let all_local = peers.iter().all(|p| host_of(p) == host_of(&peers[0]))
            || peers.iter().all(|p| is_loopback(p));
        let group = if transport == Transport::Auto && all_local {
            LocalGroup::connect(rank, world, tag, &mut next, &mut prev, stall)
                .map_err(|e| fail("connect", rank, e))?
        } else {
            None
        };
        let offer = transport != Transport::Tcp && same_host;
        let (next, prev) =
            negotiate(rank, tag, next, prev, offer, stall).map_err(|e| fail("connect", rank, e))?;
        Ok(RingCollective {
            rank,
            world,
            links: Some(RefCell::new(Links {
                next,
                prev,
                scratch: vec![0u64; CHUNK_BYTES / 8],
            })),
            group,
        })
    }

    /// Whether all-reduce goes through the shared segment of an all-local group.
    pub fn uses_local_group(&self) -> bool {
        self.group.is_some()
    }

    /// Whether the links to the next and previous ranks use shared memory.
    pub fn uses_shared_memory(&self) -> (bool, bool) {
        match &self.links {
            Some(l) => {
                let l = l.borrow();
                (matches!(l.next, Tx::Shm(_)), matches!(l.prev, Rx::Shm(_)))
            }
            None => (false, false),
        }
    }

    /// Sends a small header (operation, byte count) around the ring and checks the previous rank's
    /// matches, so mismatched calls fail loudly instead of mixing data.
    fn handshake(
        &self,
        links: &mut Links,
        op: &'static str,
        code: u32,
        bytes: u64,
    ) -> Result<(), CollectiveError> {
        let mut header = [0u8; 12];
        header[..4].copy_from_slice(&code.to_le_bytes());
        header[4..].copy_from_slice(&bytes.to_le_bytes());
        links
            .next
            .write_all(&header)
            .map_err(|e| fail(op, self.rank, e))?;
        let mut theirs = [0u8; 12];
        links
            .prev
            .read_exact(&mut theirs)
            .map_err(|e| fail(op, self.rank, e))?;
        if theirs != header {
            return Err(fail(
                op,
                self.rank,
                format!(
                    "previous rank called op {} with {} bytes, this rank op {code} with {bytes} bytes",
                    u32::from_le_bytes(theirs[..4].try_into().unwrap_or_default()),
                    u64::from_le_bytes(theirs[4..].try_into().unwrap_or_default())
                ),
            ));
        }
        Ok(())
    }

    /// In-place ring all-reduce of a typed buffer.
    fn all_reduce_slice<T: Element>(&self, data: &mut [T]) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let links = &mut *links.borrow_mut();
        let op = "all_reduce_sum";
        let checked = self.handshake(links, op, 1, std::mem::size_of_val(data) as u64);
        if let Some(group) = &self.group {
            if checked.is_err() {
                group.abandon();
            }
            checked?;
            return group.all_reduce(data).map_err(|e| fail(op, self.rank, e));
        }
        checked?;
        let (w, r) = (self.world, self.rank);
        let n = data.len();
        let bounds = |seg: usize| (seg * n / w, (seg + 1) * n / w);
        let base = data.as_mut_ptr();
        // Reduce-scatter: after step s, segment (r - s - 1) holds s + 2 contributions.
        for s in 0..w - 1 {
            let (ss, se) = bounds((r + w - s) % w);
            let (rs, re) = bounds((r + 2 * w - s - 1) % w);
            // SAFETY: send and receive segments are disjoint ranges of `data` (w >= 2).
            let send = unsafe {
                std::slice::from_raw_parts(base.add(ss) as *const u8, (se - ss) * T::SIZE)
            };
            let recv = unsafe { std::slice::from_raw_parts_mut(base.add(rs), re - rs) };
            let Links {
                next,
                prev,
                scratch,
            } = links;
            exchange(next, send, || reduce_from(prev, recv, scratch))
                .map_err(|e| fail(op, r, e))?;
        }
        // All-gather: pass the finished segments around.
        for s in 0..w - 1 {
            let (ss, se) = bounds((r + 1 + w - s) % w);
            let (rs, re) = bounds((r + w - s) % w);
            // SAFETY: as above.
            let send = unsafe {
                std::slice::from_raw_parts(base.add(ss) as *const u8, (se - ss) * T::SIZE)
            };
            let recv = unsafe {
                std::slice::from_raw_parts_mut(base.add(rs) as *mut u8, (re - rs) * T::SIZE)
            };
            let Links { next, prev, .. } = links;
            exchange(next, send, || prev.read_exact(recv)).map_err(|e| fail(op, r, e))?;
        }
        Ok(())
    }

    /// All-gather of equal-sized byte blocks: `out` has `world` blocks, this rank's already in place.
    fn all_gather_bytes(&self, out: &mut [u8]) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let links = &mut *links.borrow_mut();
        let op = "all_gather";
        self.handshake(links, op, 2, out.len() as u64)?;
        let (w, r) = (self.world, self.rank);
        let block = out.len() / w;
        let base = out.as_mut_ptr();
        for s in 0..w - 1 {
            let send_block = (r + w - s) % w;
            let recv_block = (r + 2 * w - s - 1) % w;
            // SAFETY: distinct blocks of `out`.
            let send = unsafe { std::slice::from_raw_parts(base.add(send_block * block), block) };
            let recv =
                unsafe { std::slice::from_raw_parts_mut(base.add(recv_block * block), block) };
            let Links { next, prev, .. } = links;
            exchange(next, send, || prev.read_exact(recv)).map_err(|e| fail(op, r, e))?;
        }
        Ok(())
    }

    /// Pipelined broadcast along the ring from `root`.
    fn broadcast_bytes(&self, data: &mut [u8], root: usize) -> Result<(), CollectiveError> {
        let Some(links) = &self.links else {
            return Ok(());
        };
        let links = &mut *links.borrow_mut();
        let op = "broadcast";
        self.handshake(links, op, 3 + root as u32 * 16, data.len() as u64)?;
        let (w, r) = (self.world, self.rank);
        let forwards = (r + 1) % w != root;
        for chunk in data.chunks_mut(CHUNK_BYTES) {
            if r != root {
                links.prev.read_exact(chunk).map_err(|e| fail(op, r, e))?;
            }
            if forwards {
                links.next.write_all(chunk).map_err(|e| fail(op, r, e))?;
            }
        }
        Ok(())
    }
}

/// Writes `send` to `next` on a scoped thread while `recv` runs here.
fn exchange(
    next: &mut Tx,
    send: &[u8],
    recv: impl FnOnce() -> std::io::Result<()>,
) -> std::io::Result<()> {
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| next.write_all(send));
        let received = recv();
        let sent = sender
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("send thread panicked")));
        received.and(sent)
    })
}

/// Receives `dst.len()` elements piece by piece and adds them into `dst`: straight out of shared
/// memory, or through `scratch` from TCP.
fn reduce_from<T: Element>(
    prev: &mut Rx,
    dst: &mut [T],
    scratch: &mut [u64],
) -> std::io::Result<()> {
    let prev = match prev {
        Rx::Shm(rx) => {
            let len = std::mem::size_of_val(dst);
            return rx.receive(len, |off, piece| {
                let start = off / T::SIZE;
                // SAFETY: pieces start at 8-byte aligned offsets of the mapping and hold whole elements.
                let src = unsafe {
                    std::slice::from_raw_parts(piece.as_ptr() as *const T, piece.len() / T::SIZE)
                };
                T::add_assign(&mut dst[start..start + src.len()], src);
            });
        }
        Rx::Tcp(s) => s,
    };
    let per_chunk = (scratch.len() * 8) / T::SIZE;
    for part in dst.chunks_mut(per_chunk) {
        // SAFETY: scratch is 8-byte aligned and large enough for `part.len()` elements of T.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut u8, part.len() * T::SIZE)
        };
        prev.read_exact(buf)?;
        let src = unsafe { std::slice::from_raw_parts(scratch.as_ptr() as *const T, part.len()) };
        T::add_assign(part, src);
    }
    Ok(())
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

fn is_loopback(addr: &str) -> bool {
    matches!(host_of(addr), "localhost" | "[::1]") || host_of(addr).starts_with("127.")
}

/// Offers the next rank a shared-memory channel and answers the previous rank's offer; a refused or
/// failed offer keeps TCP. Offers are tiny, so writing before reading cannot deadlock.
fn negotiate(
    rank: usize,
    tag: u64,
    mut next: TcpStream,
    mut prev: TcpStream,
    offer: bool,
    stall: Duration,
) -> std::io::Result<(Tx, Rx)> {
    let mut pending = None;
    if offer {
        let path = shm::channel_path(tag, rank);
        match ShmSender::create(&path, next.try_clone()?, stall) {
            Ok(sender) => {
                let bytes = path.to_string_lossy().into_owned().into_bytes();
                next.write_all(&[1])?;
                next.write_all(&(bytes.len() as u16).to_le_bytes())?;
                next.write_all(&bytes)?;
                pending = Some((sender, path));
            }
            Err(_) => next.write_all(&[0])?,
        }
    } else {
        next.write_all(&[0])?;
    }
    let mut flag = [0u8; 1];
    prev.read_exact(&mut flag)?;
    let rx = if flag[0] == 1 {
        let mut len = [0u8; 2];
        prev.read_exact(&mut len)?;
        let mut path = vec![0u8; u16::from_le_bytes(len) as usize];
        prev.read_exact(&mut path)?;
        let path = std::path::PathBuf::from(String::from_utf8_lossy(&path).into_owned());
        match ShmReceiver::open(&path, prev.try_clone()?, stall) {
            Ok(rx) => {
                prev.write_all(&[1])?;
                Rx::Shm(rx)
            }
            Err(_) => {
                prev.write_all(&[0])?;
                Rx::Tcp(prev)
            }
        }
    } else {
        Rx::Tcp(prev)
    };
    let tx = match pending {
        Some((sender, path)) => {
            let mut answer = [0u8; 1];
            next.read_exact(&mut answer)?;
            if answer[0] == 1 {
                Tx::Shm(sender)
            } else {
                let _ = std::fs::remove_file(path);
                Tx::Tcp(next)
            }
        }
        None => Tx::Tcp(next),
    };
    Ok((tx, rx))
}

fn host_view(t: &Tensor, op: &'static str, rank: usize) -> Result<(Tensor, bool), CollectiveError> {
    if !t.defined() {
        return Err(fail(op, rank, "undefined tensor"));
    }
    let native = matches!(
        t.kind(),
        Kind::Float | Kind::Double | Kind::Int | Kind::Int64
    );
    if t.device() == Device::Cpu && t.is_contiguous() && native {
        return Ok((t.shallow_clone(), false));
    }
    let kind = if native { t.kind() } else { Kind::Float };
    Ok((t.to_device(Device::Cpu).to_kind(kind).contiguous(), true))
}

/// The `n` elements at a contiguous CPU tensor's `data_ptr` (null for an empty tensor).
fn elements<'a, T>(ptr: *mut std::ffi::c_void, n: usize) -> &'a mut [T] {
    if n == 0 {
        return &mut [];
    }
    // SAFETY: callers pass the data pointer of a contiguous CPU tensor of `n` elements of T that
    // outlives the slice and is not otherwise accessed while it lives.
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, n) }
}

fn tensor_bytes(t: &mut Tensor) -> &mut [u8] {
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: `t` is a contiguous CPU tensor that outlives the returned slice in every caller, and no
    // other view of it is used while the slice lives.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "all_reduce_sum";
        let (host, copied) = host_view(tensor, op, self.rank)?;
        let n = host.numel();
        let ptr = host.data_ptr();
        match host.kind() {
            Kind::Float => self.all_reduce_slice(elements::<f32>(ptr, n)),
            Kind::Double => self.all_reduce_slice(elements::<f64>(ptr, n)),
            Kind::Int => self.all_reduce_slice(elements::<i32>(ptr, n)),
            _ => self.all_reduce_slice(elements::<i64>(ptr, n)),
        }?;
        if copied {
            tch::no_grad(|| tensor.copy_(&host));
        }
        Ok(())
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>, CollectiveError> {
        if self.world == 1 {
            return Ok(vec![tensor.shallow_clone()]);
        }
        let op = "all_gather";
        if !tensor.defined() {
            return Err(fail(op, self.rank, "undefined tensor"));
        }
        let mut local = tensor.detach().to_device(Device::Cpu).contiguous();
        let block = local.numel() * local.kind().elt_size_in_bytes();
        let mut out = vec![0u8; block * self.world];
        out[self.rank * block..(self.rank + 1) * block].copy_from_slice(tensor_bytes(&mut local));
        self.all_gather_bytes(&mut out)?;
        let shape = tensor.size();
        (0..self.world)
            .map(|r| {
                if r == self.rank {
                    return Ok(tensor.shallow_clone());
                }
                Tensor::f_from_data_size(&out[r * block..(r + 1) * block], &shape, tensor.kind())
                    .and_then(|t| t.f_to_device(tensor.device()))
                    .map_err(|e| fail(op, self.rank, e))
            })
            .collect()
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<(), CollectiveError> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "broadcast";
        if root >= self.world {
            return Err(fail(
                op,
                self.rank,
                format!("root {root} >= world {}", self.world),
            ));
        }
        let mut host = tensor.detach().to_device(Device::Cpu).contiguous();
        self.broadcast_bytes(tensor_bytes(&mut host), root)?;
        // When `host` is the tensor's own storage the bytes already landed in place.
        if host.data_ptr() != tensor.data_ptr() {
            tch::no_grad(|| tensor.copy_(&host));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let mut t = Tensor::from_slice(&[1i64]);
        self.all_reduce_sum(&mut t)?;
        let got = t.int64_value(&[0]);
        if got != self.world as i64 {
            return Err(fail(
                "barrier",
                self.rank,
                format!("counted {got} ranks, expected {}", self.world),
            ));
        }
        Ok(())
    }
}

/// Binds `world` loopback listeners and connects a ring on threads: for tests and the benchmark.
pub fn local_ring(world: usize) -> Result<Vec<RingCollective>, CollectiveError> {
    local_ring_with(world, Transport::Auto)
}

/// [`local_ring`] with the transport explicit.
pub fn local_ring_with(
    world: usize,
    transport: Transport,
) -> Result<Vec<RingCollective>, CollectiveError> {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|r| TcpListener::bind("127.0.0.1:0").map_err(|e| fail("connect", r, e)))
        .collect::<Result<_, _>>()?;
    let peers: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()).unwrap_or_default())
        .collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                RingCollective::connect_with(
                    rank,
                    Some(l),
                    &peers,
                    7,
                    b"local ring",
                    Duration::from_secs(30),
                    transport,
                )
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| {
            h.join()
                .map_err(|_| fail("connect", r, "thread panicked"))?
        })
        .collect()
}
