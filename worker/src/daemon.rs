//! The node daemon: registers its devices, keeps a heartbeat stream open (reports up, commands down),
//! prepares rendezvous data, spawns and supervises one trainer process per slot, and stops them on
//! command, on shutdown, or when the coordinator has been unreachable for longer than the grace period.
//!
//! Draining (SIGTERM, e.g. a preempted node): the daemon asks its trainers to checkpoint at the next
//! step boundary and leave ([`crate::trainer::save_request`]); every rank of the job agrees on that
//! step, commits it, and exits. The daemon keeps heartbeating meanwhile but reports none of its
//! trainers' non-zero exits, refuses new ranks, and disconnects once they are gone: the coordinator sees the
//! worker leave (its ranks count as lost) and forms the next generation without it, resuming from the
//! step the drain committed.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};
use xvlm_proto::backoff::Backoff;
use xvlm_proto::security::ClientSecurity;
use xvlm_proto::spec::{Backend, JobSpec};
use xvlm_proto::v1::workers_client::WorkersClient;
use xvlm_proto::{v1, PROTOCOL_VERSION};

use crate::comm::nccl;
use crate::cpu_share::CpuShare;
use crate::error::WorkerError;
use crate::metrics::WorkerMetrics;
use crate::process;
use crate::progress_queue::ProgressQueue;
use crate::supervision::{self, TrainerEvent, TrainerSinks};
use crate::trainer::{save_request, task, Assignment};
use crate::trainer_logs::{self, TrainerLogs};

/// What the operator asked the daemon to do (from signals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Checkpoint and leave: trainers save at the next step boundary and exit, then the daemon.
    Drain,
    /// Stop now: SIGTERM to trainers, SIGKILL after 5 s.
    Stop,
}

/// How long a drain may take before the trainers are stopped anyway.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Coordinator URL.
    pub coordinator: String,
    /// This node's name (its worker id).
    pub name: String,
    /// Host peers reach this node's ring sockets on.
    pub host: String,
    /// Devices to register.
    pub devices: Vec<v1::Device>,
    /// Where assignments, pid files and trainer logs go.
    pub work_dir: PathBuf,
    /// Trainers keep running this long while the coordinator is unreachable.
    pub grace: Duration,
    /// The binary trainers run (`xvlm-worker` itself).
    pub exe: PathBuf,
    /// CPU threads this worker's trainers share (`--cpu-threads`); `None`: the host's cores divided
    /// among the workers on it.
    pub cpu_threads: Option<usize>,
    /// TLS trust, client certificate and worker token for the coordinator.
    pub security: ClientSecurity,
    /// Address of the Prometheus `/metrics` listener ([`crate::metrics`]); none: not served.
    pub http_listen: Option<SocketAddr>,
    /// Ring address announced instead of `host` and an ephemeral port (`--ring-advertise`).
    pub ring_advertise: Option<RingAdvertise>,
}

/// A ring address a node announces in place of its own, for a forwarder in front of it that keeps
/// the port (a NAT, or the fault-injecting proxy of the multi-host tests): slot `i` of a generation
/// listens on `host`'s port `first_port + i` and is announced as `self.host:first_port + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingAdvertise {
    /// Host or IP announced to the ring peers.
    pub host: String,
    /// Port of the first slot; the next slots take the ports after it.
    pub first_port: u16,
}

type Key = (String, u64);

/// Parts a worker holds per job until a newer generation of it is prepared here.
const PARTS_HELD_PER_JOB: usize = 16;

#[derive(Default)]
struct Generation {
    listeners: HashMap<u32, OwnedFd>,
    /// Rank -> pid (process group id) of running trainers.
    children: HashMap<u32, u32>,
    /// Ranks whose exit is known.
    exited: Vec<u32>,
    slots: Vec<u32>,
}

impl Generation {
    fn done(&self) -> bool {
        self.slots.iter().all(|r| self.exited.contains(r))
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// The daemon's state across coordinator sessions.
pub struct Daemon {
    cfg: DaemonConfig,
    cuda: bool,
    cpus: CpuShare,
    gens: BTreeMap<Key, Generation>,
    events_tx: mpsc::UnboundedSender<TrainerEvent>,
    events_rx: mpsc::UnboundedReceiver<TrainerEvent>,
    ready: Vec<v1::RankReady>,
    progress: ProgressQueue,
    exits: Vec<v1::TrainerExit>,
    /// Checkpoint parts not yet reported.
    parts: Vec<v1::CheckpointPart>,
    /// Every recent part, by (job, generation, step, rank): sent again on re-registering, because a
    /// restarted coordinator has not seen them and commits only complete steps.
    parts_held: BTreeMap<(String, u64, u64, u32), v1::CheckpointPart>,
    /// When a drain began.
    draining: Option<Instant>,
    /// What `/metrics` serves: trainer states and what their progress lines report.
    metrics: Arc<WorkerMetrics>,
    /// Trainer log lines not yet reported.
    logs: TrainerLogs,
}

/// Runs the daemon until [`Signal::Stop`] arrives (or a drain ends); then stops every trainer.
pub async fn run(
    cfg: DaemonConfig,
    mut signals: mpsc::UnboundedReceiver<Signal>,
) -> Result<(), WorkerError> {
    std::fs::create_dir_all(&cfg.work_dir).map_err(|e| WorkerError::io(&cfg.work_dir, e))?;
    let metrics = Arc::new(WorkerMetrics::new());
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = match cfg.http_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| WorkerError::Metrics {
                        addr: addr.to_string(),
                        reason: e.to_string(),
                    })?;
            if let Ok(bound) = listener.local_addr() {
                info!(addr = %bound, "metrics listening (/metrics)");
            }
            let token = cfg.security.token.clone();
            let served = crate::metrics::serve(listener, metrics.clone(), token, async {
                let _ = metrics_stopped.await;
            });
            // A failing metrics listener is logged when it fails; training goes on without it.
            Some(tokio::spawn(async move {
                if let Err(e) = served.await {
                    warn!(error = %e, "metrics listener failed");
                }
            }))
        }
        None => None,
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let cuda = cfg
        .devices
        .iter()
        .all(|d| d.kind == v1::DeviceKind::Cuda as i32);
    let mut d = Daemon {
        cpus: CpuShare::new(cfg.cpu_threads),
        cfg,
        cuda,
        gens: BTreeMap::new(),
        events_tx,
        events_rx,
        ready: Vec::new(),
        progress: ProgressQueue::default(),
        exits: Vec::new(),
        parts: Vec::new(),
        parts_held: BTreeMap::new(),
        draining: None,
        metrics,
        logs: TrainerLogs::default(),
    };
    let mut backoff = Backoff::reconnect();
    let mut lost_since: Option<Instant> = None;
    loop {
        match d.session(&mut signals, &mut backoff, &mut lost_since).await {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost(why) => {
                let since = *lost_since.get_or_insert_with(Instant::now);
                warn!(
                    coordinator = d.cfg.coordinator,
                    error = why,
                    "coordinator unreachable; retrying"
                );
                if since.elapsed() > d.cfg.grace && !d.gens.is_empty() {
                    warn!("grace period over: stopping every trainer");
                    d.stop_all().await;
                }
            }
        }
        let wait = tokio::time::sleep(backoff.next_delay());
        tokio::select! {
            _ = wait => {}
            sig = signals.recv() => match sig {
                Some(Signal::Drain) => d.begin_drain(),
                Some(Signal::Stop) | None => break,
            },
            Some(ev) = d.events_rx.recv() => d.absorb(ev),
        }
        if d.drained() {
            break;
        }
    }
    info!("shutting down: stopping trainers");
    d.stop_all().await;
    let _ = metrics_stop.send(());
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    Ok(())
}

impl Daemon {
    async fn session(
        &mut self,
        signals: &mut mpsc::UnboundedReceiver<Signal>,
        backoff: &mut Backoff,
        lost_since: &mut Option<Instant>,
    ) -> SessionEnd {
        let security = &self.cfg.security;
        let mut client = match security.connect(&self.cfg.coordinator).await {
            Ok(channel) => WorkersClient::with_interceptor(channel, security.bearer()),
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        let reply = match client
            .register(v1::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.cfg.name.clone(),
                host: self.cfg.host.clone(),
                devices: self.cfg.devices.clone(),
                parts: self.parts_held.values().cloned().collect(),
                tasks: advertised_tasks(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(e) => return SessionEnd::Lost(e.message().to_string()),
        };
        info!(
            worker = reply.worker_id,
            devices = self.cfg.devices.len(),
            "registered"
        );
        let beat = Duration::from_millis(reply.heartbeat_interval_ms.max(100));
        let (out_tx, out_rx) = mpsc::channel(256);
        if out_tx
            .send(self.take_report(&reply.worker_id))
            .await
            .is_err()
        {
            return SessionEnd::Lost("report channel closed".into());
        }
        let mut inbound = match client.heartbeat(ReceiverStream::new(out_rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => return SessionEnd::Lost(e.message().to_string()),
        };
        backoff.reset();
        *lost_since = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut last_beat = Instant::now();
        loop {
            let mut urgent = false;
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(cmd)) => { self.handle(cmd).await; urgent = true; }
                    Ok(None) => return SessionEnd::Lost("heartbeat stream ended".into()),
                    Err(e) => return SessionEnd::Lost(e.message().to_string()),
                },
                Some(ev) = self.events_rx.recv() => {
                    urgent = matches!(ev, TrainerEvent::Exit(_));
                    self.absorb(ev);
                }
                _ = tick.tick() => {}
                sig = signals.recv() => match sig {
                    Some(Signal::Drain) => self.begin_drain(),
                    Some(Signal::Stop) | None => return SessionEnd::Shutdown,
                },
            }
            if self.drained() {
                info!("drain complete: leaving the coordinator");
                return SessionEnd::Shutdown;
            }
            let has_news = !self.ready.is_empty()
                || !self.exits.is_empty()
                || !self.parts.is_empty()
                || !self.logs.lock().is_empty();
            let due = last_beat.elapsed() >= beat || (!self.progress.is_empty() && !urgent);
            if has_news || due {
                last_beat = Instant::now();
                if out_tx
                    .send(self.take_report(&reply.worker_id))
                    .await
                    .is_err()
                {
                    return SessionEnd::Lost("heartbeat stream closed".into());
                }
            }
        }
    }

    fn take_report(&mut self, worker: &str) -> v1::WorkerReport {
        let gens = &self.gens;
        let mut buffer = self.logs.lock();
        let logs = buffer.take(trainer_logs::REPORT_BYTES, |k| {
            gens.get(&(k.job.clone(), k.generation))
                .is_some_and(|g| g.children.contains_key(&k.rank))
        });
        // A trainer's exit waits for its last lines, so a job ends after its logs are in.
        let (exits, held) = std::mem::take(&mut self.exits)
            .into_iter()
            .partition(|e| !buffer.pending(&e.job_id, e.generation, e.rank));
        drop(buffer);
        self.exits = held;
        v1::WorkerReport {
            worker_id: worker.to_string(),
            running: self
                .gens
                .iter()
                .map(|((job, generation), g)| v1::RunningGeneration {
                    job_id: job.clone(),
                    generation: *generation,
                    ranks: g
                        .children
                        .iter()
                        .filter_map(|(&rank, &pid)| {
                            Some(v1::RankProcess {
                                rank,
                                state: process::state(pid)?.to_string(),
                            })
                        })
                        .collect(),
                })
                .collect(),
            ready: std::mem::take(&mut self.ready),
            progress: self.progress.take(),
            exits,
            parts: std::mem::take(&mut self.parts),
            draining: self.draining.is_some(),
            logs,
        }
    }

    fn absorb(&mut self, ev: TrainerEvent) {
        match ev {
            TrainerEvent::Progress(p) => self.progress.push(p),
            TrainerEvent::Part(p) => self.hold_part(p),
            TrainerEvent::Exit(e) => {
                self.metrics.trainer_exited(&e.job_id, e.generation, e.rank);
                let key = (e.job_id.clone(), e.generation);
                if let Some(g) = self.gens.get_mut(&key) {
                    g.children.remove(&e.rank);
                    g.exited.push(e.rank);
                    if g.done() {
                        self.gens.remove(&key);
                    }
                }
                info!(
                    job = e.job_id,
                    generation = e.generation,
                    rank = e.rank,
                    code = e.code,
                    "trainer exited"
                );
                // A draining worker's failed or preempted exits are not reported: were they, the
                // coordinator could see this worker free and put it in the next generation before it
                // disconnects. A clean exit (the job's last step came first) is: the job is done.
                if self.draining.is_none() || e.code == 0 {
                    self.exits.push(e);
                }
            }
        }
    }

    /// Reports a part and keeps it for a re-registration; drops the job's oldest beyond
    /// [`PARTS_HELD_PER_JOB`].
    fn hold_part(&mut self, p: v1::CheckpointPart) {
        info!(
            job = p.job_id,
            generation = p.generation,
            step = p.step,
            rank = p.rank,
            "checkpoint part uploaded"
        );
        let job = p.job_id.clone();
        self.parts_held
            .insert((job.clone(), p.generation, p.step, p.rank), p.clone());
        self.parts.push(p);
        let of_job: Vec<_> = self
            .parts_held
            .keys()
            .filter(|k| k.0 == job)
            .cloned()
            .collect();
        for key in of_job
            .iter()
            .take(of_job.len().saturating_sub(PARTS_HELD_PER_JOB))
        {
            self.parts_held.remove(key);
        }
    }

    async fn handle(&mut self, cmd: v1::CoordinatorCommand) {
        use v1::coordinator_command::Command as C;
        match cmd.command {
            Some(C::Prepare(p)) => self.prepare(p),
            Some(C::Start(s)) => self.start(s),
            Some(C::Stop(s)) => self.stop(&s.job_id, s.generation, &s.reason),
            Some(C::Checkpoint(c)) => self.request_checkpoint(&c),
            None => {}
        }
    }

    /// Asks every running trainer to checkpoint at the next step boundary and leave.
    fn begin_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(Instant::now());
        let pids: Vec<u32> = self
            .gens
            .values()
            .flat_map(|g| g.children.values().copied())
            .collect();
        info!(
            trainers = pids.len(),
            "draining: trainers checkpoint at the next step boundary, then this worker leaves"
        );
        for pid in pids {
            process::signal_group(pid, save_request::LEAVE_SIGNAL);
        }
    }

    /// Whether a drain is over: no trainer left, or past [`DRAIN_TIMEOUT`] (then they are stopped).
    fn drained(&mut self) -> bool {
        let Some(since) = self.draining else {
            return false;
        };
        let running = self.gens.values().any(|g| !g.children.is_empty());
        if running && since.elapsed() > DRAIN_TIMEOUT {
            warn!("drain timed out: stopping trainers");
            return true;
        }
        !running
    }

    fn prepare(&mut self, p: v1::PrepareRanks) {
        if self.draining.is_some() {
            for slot in &p.slots {
                self.ready.push(v1::RankReady {
                    job_id: p.job_id.clone(),
                    generation: p.generation,
                    rank: slot.rank,
                    error: "worker is draining".into(),
                    ..Default::default()
                });
            }
            return;
        }
        info!(
            job = p.job_id,
            generation = p.generation,
            ranks = p.slots.len(),
            "preparing ranks"
        );
        // The coordinator forms a newer generation only after committing what it could of the older
        // ones: their parts are history.
        self.parts_held
            .retain(|(job, generation, _, _), _| *job != p.job_id || *generation >= p.generation);
        let key = (p.job_id.clone(), p.generation);
        let gen = self.gens.entry(key).or_default();
        let bind_ip = match self.cfg.host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) => std::net::IpAddr::from([0, 0, 0, 0]),
        };
        for (i, slot) in p.slots.iter().enumerate() {
            gen.slots.push(slot.rank);
            let mut ready = v1::RankReady {
                job_id: p.job_id.clone(),
                generation: p.generation,
                rank: slot.rank,
                ..Default::default()
            };
            let (announced, port) = match &self.cfg.ring_advertise {
                // A fixed port: one an earlier generation's trainer still holds fails this bind.
                Some(a) => (
                    a.host.as_str(),
                    u16::try_from(usize::from(a.first_port) + i).ok(),
                ),
                None => (self.cfg.host.as_str(), Some(0)),
            };
            let bound = port
                .ok_or_else(|| std::io::Error::other("past port 65535 (--ring-advertise)"))
                .and_then(|port| TcpListener::bind((bind_ip, port)))
                .and_then(|l| l.local_addr().map(|a| (l, a)));
            match bound {
                Ok((listener, addr)) => {
                    ready.ring_address = format!("{announced}:{}", addr.port());
                    gen.listeners.insert(slot.rank, OwnedFd::from(listener));
                }
                Err(e) => ready.error = format!("cannot bind a ring socket: {e}"),
            }
            if slot.rank == 0 && p.backend == Backend::Nccl.as_str() && p.world_size > 1 {
                match nccl::unique_id() {
                    Ok(id) => ready.nccl_unique_id = id,
                    Err(e) => ready.error = e,
                }
            }
            self.ready.push(ready);
        }
    }

    fn start(&mut self, s: v1::StartGeneration) {
        let key = (s.job_id.clone(), s.generation);
        let spec = JobSpec::from_json(&s.spec_json);
        let backend = Backend::parse(&s.backend).unwrap_or_default();
        let threads = self.cpus.for_trainers(s.slots.len());
        let dir = self.generation_dir(&s.job_id, s.generation);
        for (i, slot) in s.slots.iter().enumerate() {
            let exit = |message: String| v1::TrainerExit {
                job_id: s.job_id.clone(),
                generation: s.generation,
                rank: slot.rank,
                code: 127,
                message,
            };
            let Some(gen) = self.gens.get_mut(&key) else {
                self.exits
                    .push(exit("start without prepare (worker restarted?)".into()));
                continue;
            };
            let spec = match &spec {
                Ok(spec) => spec.clone(),
                Err(e) => {
                    gen.exited.push(slot.rank);
                    self.exits.push(exit(format!("bad job spec: {e}")));
                    continue;
                }
            };
            let assignment = Assignment {
                job_id: s.job_id.clone(),
                generation: s.generation,
                rank: slot.rank as usize,
                local_rank: slot.local_rank as usize,
                world: s.world_size as usize,
                device: slot.device,
                cuda: self.cuda,
                backend,
                peers: s.peers.clone(),
                nccl_id: s.nccl_unique_id.clone(),
                ring_secret: s.ring_secret.clone(),
                spec,
                output: s.output.clone(),
                shards: s.shards.get(i).map(|l| l.files.clone()).unwrap_or_default(),
                start_step: s.start_step,
                threads: threads.threads,
                checkpoint_request_file: Some(save_request::request_file(&dir, slot.rank as usize)),
            };
            let listener = gen.listeners.remove(&slot.rank);
            let sinks = TrainerSinks {
                events: self.events_tx.clone(),
                metrics: self.metrics.clone(),
                logs: self.logs.clone(),
            };
            match supervision::launch(&self.cfg.exe, &dir, assignment, listener, threads, sinks) {
                Ok(pid) => {
                    gen.children.insert(slot.rank, pid);
                }
                Err(e) => {
                    gen.exited.push(slot.rank);
                    self.exits.push(exit(e.to_string()));
                }
            }
        }
        if self.gens.get(&key).is_some_and(Generation::done) {
            self.gens.remove(&key);
        }
    }

    fn generation_dir(&self, job: &str, generation: u64) -> PathBuf {
        self.cfg.work_dir.join(job).join(format!("g{generation}"))
    }

    /// Hands an on-demand checkpoint request to this node's trainers of the generation.
    fn request_checkpoint(&mut self, c: &v1::SaveCheckpoint) {
        let Some(gen) = self.gens.get(&(c.job_id.clone(), c.generation)) else {
            warn!(
                job = c.job_id,
                generation = c.generation,
                "checkpoint request for a generation not running here"
            );
            return;
        };
        if c.leave {
            // Rank 0 agrees the leave with every rank at the next step boundary.
            info!(
                job = c.job_id,
                generation = c.generation,
                "checkpoint and leave requested (the generation re-forms)"
            );
            for pid in gen.children.values() {
                process::signal_group(*pid, save_request::LEAVE_SIGNAL);
            }
            return;
        }
        let dir = self.generation_dir(&c.job_id, c.generation);
        for rank in &gen.slots {
            let path = save_request::request_file(&dir, *rank as usize);
            match save_request::write_request(&path, c.request_id) {
                Ok(()) => info!(
                    job = c.job_id,
                    generation = c.generation,
                    rank,
                    request = c.request_id,
                    "checkpoint requested"
                ),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot write checkpoint request")
                }
            }
        }
    }

    fn stop(&mut self, job: &str, generation: u64, reason: &str) {
        let key = (job.to_string(), generation);
        let Some(gen) = self.gens.get_mut(&key) else {
            return;
        };
        info!(job, generation, reason, "stopping trainers");
        for pid in gen.children.values() {
            process::signal_group(*pid, libc::SIGTERM);
            let pid = *pid;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                process::signal_group(pid, libc::SIGKILL);
            });
        }
        // Ranks prepared but never started have nothing to kill: report them stopped now.
        let unstarted: Vec<u32> = gen
            .slots
            .iter()
            .copied()
            .filter(|r| !gen.children.contains_key(r) && !gen.exited.contains(r))
            .collect();
        for rank in unstarted {
            gen.listeners.remove(&rank);
            gen.exited.push(rank);
            self.exits.push(v1::TrainerExit {
                job_id: job.to_string(),
                generation,
                rank,
                code: -libc::SIGTERM,
                message: format!("stopped before start: {reason}"),
            });
        }
        if gen.done() {
            self.gens.remove(&key);
        }
    }

    /// SIGTERM to every trainer group, up to 5 s for them to exit, then SIGKILL.
    async fn stop_all(&mut self) {
        let keys: Vec<Key> = self.gens.keys().cloned().collect();
        for (job, generation) in keys {
            self.stop(&job, generation, "worker stopping");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.gens.values().any(|g| !g.children.is_empty()) && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), self.events_rx.recv()).await {
                Ok(Some(ev)) => self.absorb(ev),
                Ok(None) => break,
                Err(_) => {}
            }
        }
        for g in self.gens.values() {
            for pid in g.children.values() {
                process::signal_group(*pid, libc::SIGKILL);
            }
        }
    }
}

/// Test hook: `XVLM_TEST_WORKER_TASKS=smoke,pretrain` makes the worker advertise these task names
/// instead of its build's (to test a cluster whose workers cannot run a task).
const TASKS_HOOK: &str = "XVLM_TEST_WORKER_TASKS";

/// The task names this worker registers with: its build's ([`task::supported_tasks`]).
fn advertised_tasks() -> Vec<String> {
    if let Ok(names) = std::env::var(TASKS_HOOK) {
        return names
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
    }
    task::supported_tasks()
        .into_iter()
        .map(|t| t.as_str().to_string())
        .collect()
}
