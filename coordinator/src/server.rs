//! `xvlm-coord serve`: the async driver around the state machine and the thin gRPC adapters. Every event
//! goes through [`Core::dispatch`], which persists the resulting records before it sends any command.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};
use xvlm_proto::checkpoint::Part;
use xvlm_proto::spec::{JobSpec, TaskKind};
use xvlm_proto::{v1, PROTOCOL_VERSION};

use crate::auth::Guard;
use crate::commit::{CommitRequest, Committer};
use crate::config::CoordConfig;
use crate::convert;
use crate::curves::Curves;
use crate::dashboard::{JobPage, Overview, PageSource};
use crate::error::CoordError;
use crate::http::grpc_latency::GrpcLatencyLayer;
use crate::http::metrics::{Metrics, Snapshot};
use crate::logs::LogStore;
use crate::planner;
use crate::ring_secret::RingKey;
use crate::state::{Action, Applied, Event, JobState, RunningGeneration, Scheduler};
use crate::store::{JobStore, RedbStore};
use crate::tensorboard::TensorBoard;
use crate::tls::ServerTls;

type CommandSender = mpsc::UnboundedSender<Result<v1::CoordinatorCommand, Status>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Inner {
    sched: Scheduler,
    store: Box<dyn JobStore>,
    links: HashMap<String, (u64, CommandSender)>,
    next_link: u64,
}

/// The coordinator's shared state: the scheduler, its store, worker links and watchers.
pub struct Core {
    inner: Mutex<Inner>,
    updates: broadcast::Sender<v1::JobStatus>,
    config: CoordConfig,
    committer: Committer,
    tensorboard: TensorBoard,
    curves: Curves,
    ring_key: RingKey,
    metrics: Arc<Metrics>,
    /// Trainer logs, written off the lock.
    logs: LogStore,
}

impl Core {
    /// Recovers every stored job and returns the core.
    pub fn open(config: CoordConfig, store: Box<dyn JobStore>) -> Result<Arc<Self>, CoordError> {
        let mut sched = Scheduler::new(config.heartbeat_timeout_ms);
        let records = store.load_all()?;
        info!(jobs = records.len(), "recovered job store");
        let actions = sched.recover(records, now_ms());
        let (updates, _) = broadcast::channel(1024);
        let logs = LogStore::open(&config.state_dir.join("logs"), config.log_retention_bytes)?;
        // Commit outcomes come back as events, from the commit thread.
        let me: Arc<OnceLock<Weak<Core>>> = Arc::default();
        // A scrape reads the state through the same weak handle (no metrics before the core exists).
        let metrics = Arc::new(Metrics::new({
            let me = me.clone();
            move || {
                me.get()
                    .and_then(Weak::upgrade)
                    .map(|core| core.snapshot())
                    .unwrap_or_default()
            }
        }));
        let committer = Committer::spawn(metrics.clone(), {
            let me = me.clone();
            move |event| {
                if let Some(core) = me.get().and_then(Weak::upgrade) {
                    if let Err(e) = core.dispatch(event) {
                        warn!(error = %e, "checkpoint commit outcome not applied");
                    }
                }
            }
        })?;
        let core = Arc::new(Core {
            inner: Mutex::new(Inner {
                sched,
                store,
                links: HashMap::new(),
                next_link: 0,
            }),
            updates,
            tensorboard: TensorBoard::spawn(config.tensorboard_flush)?,
            curves: Curves::default(),
            config,
            committer,
            ring_key: RingKey::random()?,
            metrics,
            logs,
        });
        let _ = me.set(Arc::downgrade(&core));
        {
            let mut inner = core.lock();
            core.act(&mut inner, actions)?;
        }
        core.restore_curves();
        Ok(core)
    }

    /// Every recovered job's dashboard curve, read back from its TensorBoard files off the lock.
    fn restore_curves(self: &Arc<Self>) {
        let jobs: Vec<(String, String)> = self
            .lock()
            .sched
            .jobs()
            .filter(|j| !j.output.is_empty())
            .map(|j| (j.id.clone(), j.output.clone()))
            .collect();
        if jobs.is_empty() {
            return;
        }
        let me = Arc::downgrade(self);
        self.tensorboard.load_histories(
            jobs,
            Box::new(move |job, reports| {
                if let Some(core) = me.upgrade() {
                    core.curves.restore(job, reports);
                }
            }),
        );
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a scrape reports from the state, copied under the lock (encoded after it is released).
    fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot::of(&inner.sched, now_ms())
    }

    /// The metrics this core records into; `/metrics` encodes them.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Applies an event: persist first, then send and notify.
    pub fn dispatch(&self, event: Event) -> Result<Applied, CoordError> {
        let mut inner = self.lock();
        let applied = inner.sched.apply(now_ms(), event)?;
        self.act(&mut inner, applied.actions.clone())?;
        Ok(applied)
    }

    /// Carries out actions in order. A commit is handed to the commit thread and runs off the lock;
    /// its outcome comes back as an event (the scheduler holds back a new generation's start until
    /// the checkpoint it must resume from is committed or abandoned).
    fn act(&self, inner: &mut Inner, actions: Vec<Action>) -> Result<(), CoordError> {
        for action in &actions {
            if let Action::Persist(rec) = action {
                inner.store.put(rec)?;
            }
        }
        for action in actions {
            match action {
                Action::Persist(_) => {}
                Action::Send { worker, command } => match inner.links.get(&worker) {
                    Some((_, tx)) => {
                        if tx
                            .send(Ok(self.ring_key.seal(convert::command(command))))
                            .is_err()
                        {
                            warn!(worker, "worker link closed; command dropped");
                        }
                    }
                    None => warn!(worker, "no link to worker; command dropped"),
                },
                Action::Commit {
                    job,
                    output,
                    manifest,
                    keep_last,
                    request,
                } => self.committer.submit(CommitRequest {
                    job,
                    output,
                    manifest,
                    keep_last,
                    request,
                }),
                Action::Notify(job) => {
                    if let Some(rec) = inner.sched.job(&job) {
                        let _ = self.updates.send(convert::job_status(rec));
                    }
                }
            }
        }
        Ok(())
    }

    /// The output of the job whose curve `p` continues: rank 0's report of the generation that runs
    /// now (a late report of an older generation is no part of it).
    fn curve_output(&self, p: &v1::RankProgress) -> Option<String> {
        if p.rank != 0 {
            return None;
        }
        let inner = self.lock();
        let job = inner.sched.job(&p.job_id)?;
        (job.generation == p.generation && job.state == JobState::Running)
            .then(|| job.output.clone())
    }

    fn status(&self, job: &str) -> Result<v1::JobStatus, CoordError> {
        let inner = self.lock();
        inner
            .sched
            .job(job)
            .map(convert::job_status)
            .ok_or_else(|| CoordError::UnknownJob(job.to_string()))
    }

    fn attach(&self, worker: &str, tx: CommandSender) -> Result<u64, CoordError> {
        let mut inner = self.lock();
        if !inner.sched.workers().any(|w| w.name == worker) {
            return Err(CoordError::UnknownWorker(worker.to_string()));
        }
        inner.next_link += 1;
        let id = inner.next_link;
        inner.links.insert(worker.to_string(), (id, tx));
        Ok(id)
    }

    fn detach(&self, worker: &str, link: u64) {
        let current = {
            let mut inner = self.lock();
            let current = inner.links.get(worker).map(|(id, _)| *id) == Some(link);
            if current {
                inner.links.remove(worker);
            }
            current
        };
        if current {
            info!(worker, "heartbeat stream closed");
            let _ = self.dispatch(Event::Disconnected {
                worker: worker.to_string(),
            });
        }
    }

    /// Checkpoint parts a worker reports; a step's last part commits it.
    fn parts(&self, parts: &[v1::CheckpointPart]) -> Result<(), CoordError> {
        for p in parts {
            self.dispatch(Event::Part {
                job: p.job_id.clone(),
                part: Part::from_wire(p),
            })?;
        }
        Ok(())
    }

    fn report(&self, mut r: v1::WorkerReport) -> Result<(), CoordError> {
        let worker = r.worker_id.clone();
        // Queued before the exits are applied, so a job ends after its last lines are in the queue
        // (a `logs --follow` reader flushes it before it stops).
        self.logs.submit(std::mem::take(&mut r.logs));
        self.dispatch(Event::Heartbeat {
            worker: worker.clone(),
            draining: r.draining,
            running: r
                .running
                .iter()
                .map(|g| RunningGeneration {
                    job: g.job_id.clone(),
                    generation: g.generation,
                    processes: g
                        .ranks
                        .iter()
                        .filter_map(|p| Some((p.rank, p.state.chars().next()?)))
                        .collect(),
                })
                .collect(),
        })?;
        for ready in r.ready {
            self.dispatch(Event::Ready {
                worker: worker.clone(),
                job: ready.job_id,
                generation: ready.generation,
                rank: ready.rank,
                ring_address: ready.ring_address,
                nccl_id: ready.nccl_unique_id,
                error: Some(ready.error).filter(|e| !e.is_empty()),
            })?;
        }
        for p in r.progress {
            let curve = self.curve_output(&p).map(|output| (output, p.clone()));
            self.dispatch(Event::Progress {
                progress: convert::progress_info(&p),
                metrics: convert::metrics(&p.metrics),
                job: p.job_id,
                generation: p.generation,
                rank: p.rank,
            })?;
            if let Some((output, p)) = curve {
                self.curves.add(&p);
                self.tensorboard.record(output, p);
            }
        }
        // Before the exits: a trainer's last part precedes its exit, and its commit the job's end.
        self.parts(&r.parts)?;
        for e in r.exits {
            self.dispatch(Event::Exited {
                worker: worker.clone(),
                job: e.job_id,
                generation: e.generation,
                rank: e.rank,
                code: e.code,
                message: e.message,
            })?;
        }
        Ok(())
    }
}

impl PageSource for Core {
    fn overview(&self) -> Overview {
        Overview::of(&self.lock().sched, now_ms())
    }

    fn job_page(&self, job: &str) -> Option<JobPage> {
        let curve = self.curves.of(job);
        JobPage::of(&self.lock().sched, job, curve, now_ms())
    }
}

fn check_protocol(version: u32) -> Result<(), Status> {
    if version != PROTOCOL_VERSION {
        return Err(CoordError::Protocol {
            theirs: version,
            ours: PROTOCOL_VERSION,
        }
        .into());
    }
    Ok(())
}

/// The `Jobs` service.
pub struct JobsService(pub Arc<Core>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::jobs_server::Jobs for JobsService {
    async fn submit(
        &self,
        req: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitReply>, Status> {
        let req = req.into_inner();
        check_protocol(req.protocol_version)?;
        let spec = JobSpec::from_json(&req.spec_json).map_err(CoordError::from)?;
        let files = planner::list_shards(&spec.data.shards).await?;
        let multi_host = spec.workers.max_workers() > 1;
        let applied = self.0.dispatch(Event::Submit {
            spec: Box::new(spec),
            files,
            output_root: self.0.config.storage_root(),
        })?;
        let job_id = applied.job_id.unwrap_or_default();
        if let Some(out) = self
            .0
            .lock()
            .sched
            .job(&job_id)
            .map(|j| j.output.clone())
            .filter(|o| o.starts_with("file://") && multi_host)
        {
            warn!(job = job_id, output = out, "file:// output on several workers is each host's own disk unless it is a shared file system");
        }
        info!(job = job_id, "submitted");
        Ok(Response::new(v1::SubmitReply { job_id }))
    }

    async fn get(
        &self,
        req: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        Ok(Response::new(self.0.status(&req.into_inner().job_id)?))
    }

    async fn list(
        &self,
        _req: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsReply>, Status> {
        let inner = self.0.lock();
        let jobs = inner.sched.jobs().map(convert::job_status).collect();
        Ok(Response::new(v1::ListJobsReply { jobs }))
    }

    async fn cancel(
        &self,
        req: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        let job = req.into_inner().job_id;
        self.0.dispatch(Event::Cancel { job: job.clone() })?;
        info!(job, "cancel requested");
        Ok(Response::new(self.0.status(&job)?))
    }

    async fn checkpoint(
        &self,
        req: Request<v1::CheckpointRequest>,
    ) -> Result<Response<v1::CheckpointReply>, Status> {
        let job = req.into_inner().job_id;
        let applied = self.0.dispatch(Event::Checkpoint { job: job.clone() })?;
        let ticket = applied
            .checkpoint
            .ok_or_else(|| Status::internal("checkpoint request was not recorded"))?;
        info!(
            job,
            request = ticket.request,
            generation = ticket.generation,
            step = ticket.step,
            "checkpoint requested"
        );
        Ok(Response::new(v1::CheckpointReply {
            job_id: job,
            request_id: ticket.request,
            generation: ticket.generation,
            step: ticket.step,
        }))
    }

    type LogsStream = BoxStream<v1::LogLine>;

    async fn logs(
        &self,
        req: Request<v1::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let req = req.into_inner();
        // Subscribe before reading the status so the job's end cannot fall in between.
        let updates = self.0.updates.subscribe();
        let done = terminal(&self.0.status(&req.job_id)?);
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(stream_logs(
            self.0.clone(),
            req.job_id,
            req.rank,
            req.follow,
            updates,
            done,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type WatchStream = BoxStream<v1::JobEvent>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let job = req.into_inner().job_id;
        // Subscribe before reading the current status so no change falls in between.
        let mut updates = self.0.updates.subscribe();
        let current = self.0.status(&job)?;
        let core = self.0.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let terminal = |s: &v1::JobStatus| {
                matches!(
                    v1::JobState::try_from(s.state),
                    Ok(v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled)
                )
            };
            let done = terminal(&current);
            if tx
                .send(Ok(v1::JobEvent {
                    status: Some(current),
                }))
                .is_err()
                || done
            {
                return;
            }
            loop {
                let status = match updates.recv().await {
                    Ok(s) if s.job_id == job => s,
                    Ok(_) => continue,
                    // Missed updates: the latest status is what matters.
                    Err(broadcast::error::RecvError::Lagged(_)) => match core.status(&job) {
                        Ok(s) => s,
                        Err(_) => return,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let done = terminal(&status);
                if tx
                    .send(Ok(v1::JobEvent {
                        status: Some(status),
                    }))
                    .is_err()
                    || done
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

fn terminal(s: &v1::JobStatus) -> bool {
    matches!(
        v1::JobState::try_from(s.state),
        Ok(v1::JobState::Succeeded | v1::JobState::Failed | v1::JobState::Cancelled)
    )
}

/// Streams a job's kept log lines and, with `follow`, the new ones until the job has ended and its
/// last lines are written.
async fn stream_logs(
    core: Arc<Core>,
    job: String,
    rank: Option<u32>,
    follow: bool,
    mut updates: broadcast::Receiver<v1::JobStatus>,
    mut done: bool,
    tx: mpsc::Sender<Result<v1::LogLine, Status>>,
) {
    let send_all = |lines: Vec<crate::logs::Stored>, next: &mut u64| {
        let tx = tx.clone();
        let start = *next;
        let mut out = Vec::new();
        for s in lines {
            if s.index >= start {
                *next = s.index + 1;
                if rank.is_none_or(|r| r == s.line.rank) {
                    out.push(s.line);
                }
            }
        }
        async move {
            for line in out {
                if tx.send(Ok(line)).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    let snapshot = |from: u64| core.logs.snapshot(&job, from, rank);
    // Lines still queued for the writer are part of what is kept.
    core.logs.flush().await;
    let (lines, mut next, mut rx) = match snapshot(0) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let from = next;
    next = 0;
    if !send_all(lines, &mut next).await || !follow {
        return;
    }
    next = next.max(from);
    let mut flushed = false;
    loop {
        if done && !flushed {
            // Everything reported before the job ended is written once the queue is flushed.
            core.logs.flush().await;
            flushed = true;
        }
        let batch = if done {
            match rx.try_recv() {
                Ok(b) => Ok(b),
                Err(broadcast::error::TryRecvError::Lagged(_)) => Err(true),
                Err(_) => return,
            }
        } else {
            tokio::select! {
                got = rx.recv() => match got {
                    Ok(b) => Ok(b),
                    Err(broadcast::error::RecvError::Lagged(_)) => Err(true),
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                update = updates.recv() => {
                    match update {
                        Ok(s) if s.job_id == job => done = terminal(&s),
                        Ok(_) => {}
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            done = core.status(&job).map(|s| terminal(&s)).unwrap_or(true);
                        }
                        Err(broadcast::error::RecvError::Closed) => done = true,
                    }
                    Err(false)
                }
                _ = tx.closed() => return,
            }
        };
        match batch {
            Ok(b) => {
                if !send_all(b.to_vec(), &mut next).await {
                    return;
                }
            }
            // This reader fell behind the broadcast: the lines are on disk.
            Err(true) => match snapshot(next) {
                Ok((lines, _, fresh)) => {
                    rx = fresh;
                    if !send_all(lines, &mut next).await {
                        return;
                    }
                }
                Err(_) => return,
            },
            Err(false) => {}
        }
    }
}

/// The `Workers` service.
pub struct WorkersService(pub Arc<Core>);

#[tonic::async_trait]
impl v1::workers_server::Workers for WorkersService {
    async fn register(
        &self,
        req: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterReply>, Status> {
        let req = req.into_inner();
        check_protocol(req.protocol_version)?;
        if req.name.is_empty() || req.devices.is_empty() {
            return Err(Status::invalid_argument(
                "register: name and at least one device are required",
            ));
        }
        let cuda = req
            .devices
            .iter()
            .all(|d| d.kind == v1::DeviceKind::Cuda as i32);
        let tasks = convert::worker_tasks(&req.tasks);
        let unknown: Vec<&String> = req
            .tasks
            .iter()
            .filter(|t| TaskKind::from_name(t).is_none())
            .collect();
        if !unknown.is_empty() {
            warn!(
                worker = req.name,
                ?unknown,
                "ignoring tasks this coordinator does not know"
            );
        }
        info!(
            worker = req.name,
            host = req.host,
            devices = req.devices.len(),
            cuda,
            tasks = ?tasks.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
            "worker registered"
        );
        // Parts first: the registration may start a new generation, which must resume from them.
        self.0.parts(&req.parts)?;
        self.0.dispatch(Event::Register {
            name: req.name.clone(),
            host: req.host,
            slots: req.devices.len() as u32,
            cuda,
            tasks,
        })?;
        Ok(Response::new(v1::RegisterReply {
            worker_id: req.name,
            heartbeat_interval_ms: self.0.config.heartbeat_interval_ms,
        }))
    }

    type HeartbeatStream = BoxStream<v1::CoordinatorCommand>;

    async fn heartbeat(
        &self,
        req: Request<Streaming<v1::WorkerReport>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("heartbeat stream sent nothing"))?;
        let worker = first.worker_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let link = self.0.attach(&worker, tx.clone())?;
        self.0.report(first)?;
        let core = self.0.clone();
        let commands = tx;
        tokio::spawn(async move {
            while let Ok(Some(report)) = inbound.message().await {
                match core.report(report) {
                    Ok(()) => {}
                    // Declared lost (a partition its TCP connection outlived): the stream ends, and
                    // the worker registers again, so its stray trainers are stopped and it can
                    // rejoin, instead of reporting into a session that no longer exists.
                    Err(e @ CoordError::UnknownWorker(_)) => {
                        warn!(
                            worker,
                            "report from a worker no longer registered: ending its session"
                        );
                        let _ = commands.send(Err(Status::not_found(format!(
                            "{e}: it was declared lost; register again"
                        ))));
                        break;
                    }
                    Err(e) => warn!(worker, error = %e, "bad worker report"),
                }
            }
            core.detach(&worker, link);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// Opens the store under `config.state_dir`, recovers, and serves on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    config: CoordConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    serve_with_http(listener, None, config, shutdown).await
}

/// [`serve`], and the HTTP listener (`/metrics`, [`crate::http`]) on `http` when given; both stop
/// at `shutdown`. The HTTP listener's failure ends the coordinator too: one asked for but not
/// served would leave its scrapers blind without anyone noticing.
pub async fn serve_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    config: CoordConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    let store = RedbStore::open(&config.state_dir)?;
    let core = Core::open(config, Box::new(store))?;
    let Some(http) = http else {
        return serve_core(listener, core, shutdown).await;
    };
    if let Ok(addr) = http.local_addr() {
        info!(%addr, "http listening (/metrics, dashboard at /)");
    }
    let shutdown = shutdown.boxed().shared();
    let security = core.config.security.clone();
    let pages: Arc<dyn PageSource> = core.clone();
    let http_server = crate::http::serve(http, core.metrics(), pages, &security, shutdown.clone());
    let grpc_server = serve_core(listener, core, shutdown);
    tokio::pin!(http_server, grpc_server);
    tokio::select! {
        // At shutdown both end; wait for the other one's graceful end too.
        grpc = &mut grpc_server => grpc.and(http_server.await),
        http = &mut http_server => match http {
            // Refused (the loopback rule) or failed: stop serving gRPC too (module docs).
            Err(e) => Err(e),
            Ok(()) => grpc_server.await,
        },
    }
}

/// Serves an already opened core (tests use an in-memory store).
pub async fn serve_core(
    listener: TcpListener,
    core: Arc<Core>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordError> {
    let security = core.config.security.clone();
    let addr = listener
        .local_addr()
        .map_err(|e| CoordError::Server(format!("listener address: {e}")))?;
    security.check_listen(addr)?;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        builder = builder
            .tls_config(tls.load()?)
            .map_err(|e| CoordError::Tls(xvlm_proto::security::error_chain(&e)))?;
    }
    let mut builder = builder.layer(GrpcLatencyLayer::new(core.metrics()));
    let mutual = security.tls.as_ref().is_some_and(ServerTls::mutual);
    let jobs = Guard::new("Jobs", security.user_token, false);
    let workers = Guard::new("Workers", security.worker_token, mutual);
    let ticker = {
        let core = core.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                every.tick().await;
                if let Err(e) = core.dispatch(Event::Tick) {
                    warn!(error = %e, "tick failed");
                }
            }
        })
    };
    let result = builder
        .add_service(v1::jobs_server::JobsServer::with_interceptor(
            JobsService(core.clone()),
            jobs,
        ))
        .add_service(v1::workers_server::WorkersServer::with_interceptor(
            WorkersService(core.clone()),
            workers,
        ))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    ticker.abort();
    core.tensorboard.flush(SHUTDOWN_FLUSH).await;
    result.map_err(|e| CoordError::Server(e.to_string()))
}

/// How long a stopping coordinator waits for its last TensorBoard events to be written.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// Accepted connections with Nagle off: tonic's own `tcp_nodelay` does not apply to an incoming
/// stream, and the TLS handshake's small writes then wait for delayed ACKs (measured: a TLS connect
/// plus first call took 44 ms on loopback with Nagle on).
fn incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(stream) = &conn {
            if let Err(e) = stream.set_nodelay(true) {
                warn!(error = %e, "cannot turn Nagle off on a connection");
            }
        }
        conn
    })
}
