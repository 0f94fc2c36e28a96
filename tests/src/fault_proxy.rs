//! A TCP proxy that injects network faults (`tc netem` is not in this kernel): it forwards each
//! connection both ways and delivers every chunk it reads a fixed delay plus jitter later, and with
//! probability `loss` holds a chunk back a retransmission timeout first, which is what a lost segment
//! costs a TCP stream (the bytes still arrive, late, and everything behind them waits). Order within a
//! connection is kept: a chunk is never delivered before the one read before it. Open connections
//! can be cut. Plain std::net threads: one accepting, two per direction of each connection.

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Chunks in flight per direction before the reading side waits (a bounded window).
const WINDOW_CHUNKS: usize = 256;
/// Largest chunk read at once.
const CHUNK_BYTES: usize = 64 << 10;

/// What the proxy does to the connections it faults.
#[derive(Clone, Debug)]
pub struct Faults {
    /// Added to every chunk's delivery time.
    pub delay: Duration,
    /// Each chunk's delay varies uniformly within `delay ± jitter` (not below zero).
    pub jitter: Duration,
    /// Probability that a chunk is "lost": held back `rto` more before delivery.
    pub loss: f64,
    /// The retransmission timeout a lost chunk costs.
    pub rto: Duration,
    /// Fault only connections from this client address (others are forwarded untouched); `None`: all.
    pub only_from: Option<IpAddr>,
    /// Seed of the jitter and loss draws (each connection draws from its own stream of it).
    pub seed: u64,
}

impl Faults {
    /// No faults: a plain forwarder.
    pub fn none() -> Faults {
        Faults {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rto: Duration::from_millis(200),
            only_from: None,
            seed: 1,
        }
    }

    /// These faults, applied only to connections from `client`.
    pub fn only_from(self, client: IpAddr) -> Faults {
        Faults {
            only_from: Some(client),
            ..self
        }
    }

    fn applies_to(&self, client: IpAddr) -> bool {
        self.only_from.is_none_or(|only| only == client)
    }
}

/// What the proxy has seen and done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted and connected upstream.
    pub connections: u64,
    /// Of them, connections the faults applied to.
    pub faulted_connections: u64,
    /// Bytes delivered, both directions.
    pub bytes: u64,
    /// Chunks delivered on faulted connections.
    pub faulted_chunks: u64,
    /// Of them, chunks held back a retransmission timeout ("lost").
    pub held: u64,
    /// Connections ended by [`FaultProxy::cut`].
    pub cut: u64,
}

#[derive(Default)]
struct Shared {
    connections: AtomicU64,
    faulted_connections: AtomicU64,
    bytes: AtomicU64,
    faulted_chunks: AtomicU64,
    held: AtomicU64,
    cut: AtomicU64,
    stop: AtomicBool,
    /// Both sockets of every connection still open, for [`FaultProxy::cut`].
    open: Mutex<Vec<(TcpStream, TcpStream)>>,
}

/// The proxy; it stops accepting when dropped (connections open then run to their end).
pub struct FaultProxy {
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on `listen` (`ip:port`, port 0 picks a free one) and forwards each connection to
    /// `upstream` with `faults`. Panics when it cannot listen.
    pub fn start(listen: &str, upstream: &str, faults: Faults) -> FaultProxy {
        let listener =
            TcpListener::bind(listen).unwrap_or_else(|e| panic!("fault proxy on {listen}: {e}"));
        FaultProxy::on(listener, upstream, faults)
    }

    /// [`FaultProxy::start`] on a bound listener (so a test knows the port before it picks the
    /// upstream, e.g. one that keeps the port).
    pub fn on(listener: TcpListener, upstream: &str, faults: Faults) -> FaultProxy {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let proxy = FaultProxy {
            addr: listener.local_addr().expect("proxy address"),
            shared: Arc::default(),
        };
        let (shared, upstream) = (proxy.shared.clone(), upstream.to_string());
        std::thread::spawn(move || accept_loop(listener, &upstream, &faults, &shared));
        proxy
    }

    /// `http://ADDR`, for a gRPC or HTTP client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The counters so far.
    pub fn counters(&self) -> Counters {
        let s = &self.shared;
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Counters {
            connections: get(&s.connections),
            faulted_connections: get(&s.faulted_connections),
            bytes: get(&s.bytes),
            faulted_chunks: get(&s.faulted_chunks),
            held: get(&s.held),
            cut: get(&s.cut),
        }
    }

    /// Cuts every open connection (both sockets shut down, so both ends see the stream end); later
    /// connections are forwarded again.
    pub fn cut(&self) {
        let open = std::mem::take(&mut *self.shared.open.lock().unwrap_or_else(|p| p.into_inner()));
        for (client, server) in open {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            self.shared.cut.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn accept_loop(listener: TcpListener, upstream: &str, faults: &Faults, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (client, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        // A refused upstream closes the client's connection, as the upstream itself would.
        let Ok(server) = TcpStream::connect(upstream) else {
            continue;
        };
        let index = shared.connections.fetch_add(1, Ordering::SeqCst);
        let faulted = faults.applies_to(from.ip());
        if faulted {
            shared.faulted_connections.fetch_add(1, Ordering::SeqCst);
        }
        let _ = client.set_nonblocking(false);
        for s in [&client, &server] {
            let _ = s.set_nodelay(true);
        }
        if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
            shared
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c, s));
        }
        let active = faulted.then(|| faults.clone());
        // Two draw streams per connection (one per direction), distinct across connections.
        let seed = faults.seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for (from, to, seed) in [
            (client.try_clone(), server.try_clone(), seed),
            (server.try_clone(), client.try_clone(), !seed),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let (faults, shared) = (active.clone(), shared.clone());
            std::thread::spawn(move || direction(from, to, faults, seed, shared));
        }
    }
}

/// One direction of a connection: a reader stamps each chunk with its delivery time and a writer
/// delivers it then.
fn direction(
    from: TcpStream,
    to: TcpStream,
    faults: Option<Faults>,
    seed: u64,
    shared: Arc<Shared>,
) {
    let (tx, rx) = sync_channel(WINDOW_CHUNKS);
    let writer = {
        let shared = shared.clone();
        std::thread::spawn(move || deliver(rx, to, &shared))
    };
    read_and_stamp(from, &tx, faults.as_ref(), seed, &shared);
    drop(tx);
    let _ = writer.join();
}

/// Reads chunks until the stream ends, sending each with the time it is due.
fn read_and_stamp(
    mut from: TcpStream,
    tx: &SyncSender<(Instant, Vec<u8>)>,
    faults: Option<&Faults>,
    seed: u64,
    shared: &Shared,
) {
    let mut draws = SplitMix64(seed);
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut due = Instant::now();
        if let Some(f) = faults {
            due += jittered(f, &mut draws);
            if draws.unit() < f.loss {
                due += f.rto;
                shared.held.fetch_add(1, Ordering::SeqCst);
            }
            shared.faulted_chunks.fetch_add(1, Ordering::SeqCst);
        }
        if tx.send((due, buf[..n].to_vec())).is_err() {
            break;
        }
    }
}

/// `delay ± jitter`, not below zero.
fn jittered(f: &Faults, draws: &mut SplitMix64) -> Duration {
    let spread = f.jitter.as_secs_f64() * (2.0 * draws.unit() - 1.0);
    Duration::from_secs_f64((f.delay.as_secs_f64() + spread).max(0.0))
}

/// Delivers chunks at their due time, in the order read: one queue per direction, so a chunk due
/// early still waits for a held one before it (TCP's head-of-line blocking behind a retransmission).
/// When the reading side ends, ends the write side too.
fn deliver(rx: Receiver<(Instant, Vec<u8>)>, mut to: TcpStream, shared: &Shared) {
    for (due, chunk) in rx {
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if to.write_all(&chunk).is_err() {
            break;
        }
        shared.bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A small deterministic generator for the jitter and loss draws (SplitMix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    /// An echo server on a free loopback port: every connection gets its own bytes back.
    fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
        let addr = listener.local_addr().expect("echo address").to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let (mut rd, mut wr) = (stream.try_clone().expect("clone"), stream);
                    let _ = std::io::copy(&mut rd, &mut wr);
                    let _ = wr.shutdown(Shutdown::Write);
                });
            }
        });
        addr
    }

    fn faults(delay_ms: u64, jitter_ms: u64, loss: f64, rto_ms: u64) -> Faults {
        Faults {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss,
            rto: Duration::from_millis(rto_ms),
            ..Faults::none()
        }
    }

    /// Seconds of each of `n` one-byte round trips through `addr`.
    fn round_trips(addr: SocketAddr, n: usize) -> Vec<f64> {
        let mut s = TcpStream::connect(addr).expect("connect to the proxy");
        s.set_nodelay(true).expect("nodelay");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        (0..n)
            .map(|i| {
                let start = Instant::now();
                s.write_all(&[i as u8]).expect("write");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("echo");
                assert_eq!(b[0], i as u8);
                start.elapsed().as_secs_f64()
            })
            .collect()
    }

    /// Megabytes sent through a lossy, jittery proxy come back from an echo server intact and in
    /// order, the proxy counting every byte both ways and holding some chunks.
    #[test]
    fn bytes_arrive_intact_and_in_order() {
        let proxy = FaultProxy::start("127.0.0.1:0", &echo_server(), faults(1, 1, 0.2, 5));
        let data: Vec<u8> = (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut s = TcpStream::connect(proxy.addr).expect("connect");
        let mut tx = s.try_clone().expect("clone");
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            // Small writes, so the proxy reads many chunks and jitters each of them.
            for piece in sent.chunks(1500) {
                tx.write_all(piece).expect("write");
            }
            tx.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read the echo");
        writer.join().expect("writer");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes came back changed or reordered");
        let c = proxy.counters();
        assert_eq!(c.bytes, 2 * data.len() as u64);
        assert_eq!((c.connections, c.faulted_connections), (1, 1));
        assert!(c.held > 0 && c.held < c.faulted_chunks, "{c:?}");
    }

    /// A round trip through the proxy costs about twice the configured delay (one delay per leg):
    /// the mean lies within the jitter of it, and every trip at least the delay less the jitter.
    #[test]
    fn added_delay_is_the_configured_delay() {
        let proxy = FaultProxy::start("127.0.0.1:0", &echo_server(), faults(30, 5, 0.0, 200));
        let trips = round_trips(proxy.addr, 20);
        let mean = trips.iter().sum::<f64>() / trips.len() as f64;
        let least = trips.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(least >= 2.0 * 0.025, "a trip took only {least:.4} s");
        // Upper bound loose: a busy 2-core machine adds scheduling delay, never removes it.
        assert!(
            (0.055..0.090).contains(&mean),
            "mean round trip {mean:.4} s"
        );
        assert_eq!(proxy.counters().held, 0);
    }

    /// A held chunk costs the retransmission timeout: with every chunk lost each leg waits the RTO,
    /// without loss no trip does.
    #[test]
    fn held_chunks_cost_the_rto() {
        let lossy = FaultProxy::start("127.0.0.1:0", &echo_server(), faults(0, 0, 1.0, 150));
        let trips = round_trips(lossy.addr, 4);
        assert!(trips.iter().all(|&t| t >= 0.300), "{trips:?}");
        assert_eq!(lossy.counters().held, 8, "two legs of four trips");

        let clean = FaultProxy::start("127.0.0.1:0", &echo_server(), faults(0, 0, 0.0, 150));
        let trips = round_trips(clean.addr, 4);
        assert!(trips.iter().all(|&t| t < 0.150), "{trips:?}");
    }

    /// Faults limited to one client address leave other clients' connections alone.
    #[test]
    fn faults_only_from_one_client() {
        let other: IpAddr = "10.255.255.1".parse().expect("address");
        let proxy = FaultProxy::start(
            "127.0.0.1:0",
            &echo_server(),
            faults(0, 0, 1.0, 300).only_from(other),
        );
        let trips = round_trips(proxy.addr, 3);
        assert!(trips.iter().all(|&t| t < 0.300), "{trips:?}");
        let c = proxy.counters();
        assert_eq!((c.connections, c.faulted_connections, c.held), (1, 0, 0));
    }

    /// A cut ends the open connection for its client; a new connection is forwarded again.
    #[test]
    fn a_cut_ends_open_connections() {
        let proxy = FaultProxy::start("127.0.0.1:0", &echo_server(), Faults::none());
        let mut s = TcpStream::connect(proxy.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"x").expect("write");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo before the cut");
        proxy.cut();
        // The end of the stream or a reset, not the read timeout.
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("the connection outlived the cut: {other:?}"),
        }
        assert_eq!(proxy.counters().cut, 1);
        assert_eq!(round_trips(proxy.addr, 1).len(), 1);
    }
}
