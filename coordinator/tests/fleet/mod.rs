//! A fleet of simulated workers for scale tests of a real `xvlm-coord serve` process: each worker is
//! a real gRPC client with its own connection, registers, heartbeats at the interval the coordinator
//! asks for, answers rendezvous, "trains" one step per heartbeat with rank 0's losses, uploads
//! checkpoint parts, exits at the last step, and reconnects through the workers' own reconnect policy
//! ([`Backoff`]) when the coordinator goes away. Used by the 50-worker test and the 10 / 100 / 1,000
//! worker benchmark.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use xvlm_proto::backoff::{Backoff, RECONNECT_BASE, RECONNECT_CAP};
use xvlm_proto::v1::coordinator_command::Command as Cmd;
use xvlm_proto::v1::jobs_client::JobsClient;
use xvlm_proto::v1::workers_client::WorkersClient;
use xvlm_proto::{v1, PROTOCOL_VERSION};

/// A coordinator process on loopback; killed on drop.
pub struct Coordinator {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: PathBuf,
}

impl Coordinator {
    /// Starts `xvlm-coord serve` with its state and runs under `dir`, on `listen`.
    pub fn start(dir: &Path, listen: &str) -> Coordinator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("coordinator.log"))
            .expect("coordinator log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_xvlm-coord"))
            .args(["serve", "--listen", listen, "--state-dir"])
            .arg(dir.join("state"))
            .arg("--storage")
            .arg(format!("file://{}", dir.join("runs").display()))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start xvlm-coord serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("listen line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Coordinator {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// CPU seconds used so far (user + system), from /proc.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        ticks / hz
    }

    /// Peak resident memory, MiB (VmHWM).
    pub fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Fleet-wide counters.
#[derive(Default)]
pub struct FleetStats {
    /// Successful registrations (first ones and re-registrations).
    pub registrations: AtomicUsize,
    /// Workers whose heartbeat stream is open now.
    pub connected: AtomicUsize,
    /// Connection attempts that failed.
    pub failed_attempts: AtomicUsize,
    /// Highest step any rank 0 reported.
    pub max_step: AtomicU64,
}

/// How the simulated trainers behave.
#[derive(Clone, Copy, Debug)]
pub struct Training {
    /// Steps the job runs (each heartbeat is one step).
    pub steps: u64,
    /// A checkpoint part every this many steps (0: none).
    pub every_steps: u64,
}

/// `workers` simulated workers against `url`, on their own runtime threads.
pub struct Fleet {
    /// Counters.
    pub stats: Arc<FleetStats>,
    runtime: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Fleet {
    /// Starts the workers (`fleet-0000` ...), each registering as soon as it can.
    pub fn start(url: &str, workers: usize, training: Training) -> Fleet {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fleet runtime");
        let stats = Arc::new(FleetStats::default());
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for i in 0..workers {
            let worker = SimWorker {
                name: format!("fleet-{i:04}"),
                url: url.to_string(),
                training,
                stats: stats.clone(),
                backoff: Backoff::seeded(RECONNECT_BASE, RECONNECT_CAP, i as u64 + 1),
                running: None,
                parts: Vec::new(),
            };
            runtime.spawn(worker.run(stopped.clone()));
        }
        Fleet {
            stats,
            runtime,
            stop,
        }
    }

    /// Workers connected now.
    pub fn connected(&self) -> usize {
        self.stats.connected.load(Ordering::Relaxed)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One simulated rank.
#[derive(Clone, Debug)]
struct Running {
    job: String,
    generation: u64,
    rank: u32,
    world: u32,
    step: u64,
}

struct SimWorker {
    name: String,
    url: String,
    training: Training,
    stats: Arc<FleetStats>,
    backoff: Backoff,
    running: Option<Running>,
    /// Parts uploaded (sent again on registering, as a real worker does).
    parts: Vec<v1::CheckpointPart>,
}

impl SimWorker {
    async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.session() => {}
                _ = stop.changed() => return,
            }
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(self.backoff.next_delay()) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(self.url.clone())?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await
    }

    /// One coordinator session: register, then heartbeat until the stream breaks.
    async fn session(&mut self) {
        let Ok(channel) = self.connect().await else {
            return;
        };
        let mut client = WorkersClient::new(channel);
        let reply = match client
            .register(v1::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.name.clone(),
                host: "127.0.0.1".into(),
                devices: vec![v1::Device {
                    kind: v1::DeviceKind::Cpu as i32,
                    index: 0,
                    name: "cpu".into(),
                    memory_bytes: 0,
                }],
                parts: self.parts.clone(),
                tasks: vec!["smoke".into()],
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(_) => return,
        };
        self.stats.registrations.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.send(self.report(&reply.worker_id)).await;
        let Ok(inbound) = client.heartbeat(ReceiverStream::new(rx)).await else {
            return;
        };
        let mut inbound = inbound.into_inner();
        self.backoff.reset();
        self.stats.connected.fetch_add(1, Ordering::Relaxed);
        let beat = Duration::from_millis(reply.heartbeat_interval_ms.max(100));
        let mut tick = tokio::time::interval(beat);
        loop {
            let report = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(cmd)) => self.handle(cmd, &reply.worker_id),
                    _ => break,
                },
                _ = tick.tick() => Some(self.train_step(&reply.worker_id)),
            };
            if let Some(report) = report {
                if tx.send(report).await.is_err() {
                    break;
                }
            }
        }
        self.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }

    fn report(&self, worker: &str) -> v1::WorkerReport {
        v1::WorkerReport {
            worker_id: worker.to_string(),
            running: self
                .running
                .iter()
                .map(|r| v1::RunningGeneration {
                    job_id: r.job.clone(),
                    generation: r.generation,
                    ranks: vec![v1::RankProcess {
                        rank: r.rank,
                        state: "S".into(),
                    }],
                })
                .collect(),
            ..Default::default()
        }
    }

    fn handle(&mut self, cmd: v1::CoordinatorCommand, worker: &str) -> Option<v1::WorkerReport> {
        let mut report = self.report(worker);
        match cmd.command? {
            Cmd::Prepare(p) => {
                report.ready = p
                    .slots
                    .iter()
                    .map(|s| v1::RankReady {
                        job_id: p.job_id.clone(),
                        generation: p.generation,
                        rank: s.rank,
                        ring_address: format!("127.0.0.1:{}", 20_000 + s.rank),
                        ..Default::default()
                    })
                    .collect();
            }
            Cmd::Start(s) => {
                let slot = s.slots.first()?;
                self.running = Some(Running {
                    job: s.job_id,
                    generation: s.generation,
                    rank: slot.rank,
                    world: s.world_size,
                    step: s.start_step,
                });
                report = self.report(worker);
            }
            Cmd::Stop(s) => {
                let r = self
                    .running
                    .take_if(|r| r.job == s.job_id && r.generation == s.generation)?;
                report = self.report(worker);
                report.exits.push(v1::TrainerExit {
                    job_id: r.job,
                    generation: r.generation,
                    rank: r.rank,
                    code: -15,
                    message: "stopped".into(),
                });
            }
            Cmd::Checkpoint(_) => return None,
        }
        Some(report)
    }

    /// One heartbeat: a running rank advances one step (and uploads a part on checkpoint steps, and
    /// exits after the last).
    fn train_step(&mut self, worker: &str) -> v1::WorkerReport {
        let Some(r) = self.running.as_mut() else {
            return self.report(worker);
        };
        r.step += 1;
        let r = r.clone();
        let mut report = self.report(worker);
        report.progress.push(v1::RankProgress {
            job_id: r.job.clone(),
            generation: r.generation,
            rank: r.rank,
            step: r.step,
            losses: vec![v1::Loss {
                name: "mse".into(),
                value: 1.0 / r.step as f64,
            }],
            lr: 0.1,
            samples_per_sec: 8.0 * f64::from(r.world),
            total_steps: self.training.steps,
            ..Default::default()
        });
        if r.rank == 0 {
            self.stats.max_step.fetch_max(r.step, Ordering::Relaxed);
        }
        let every = self.training.every_steps;
        if every > 0 && r.step.is_multiple_of(every) {
            let part = v1::CheckpointPart {
                job_id: r.job.clone(),
                generation: r.generation,
                step: r.step,
                rank: r.rank,
                world_size: r.world,
                request_id: 0,
                files: vec![v1::CheckpointFile {
                    path: format!("rank-{}.json", r.rank),
                    size: 2,
                    sha256: "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
                        .into(),
                }],
            };
            self.parts.push(part.clone());
            if self.parts.len() > 4 {
                self.parts.remove(0);
            }
            report.parts.push(part);
        }
        if r.step >= self.training.steps {
            self.running = None;
            report.running.clear();
            report.exits.push(v1::TrainerExit {
                job_id: r.job,
                generation: r.generation,
                rank: r.rank,
                code: 0,
                message: String::new(),
            });
        }
        report
    }
}

/// A Jobs client for measurements.
pub async fn jobs_client(url: &str) -> JobsClient<Channel> {
    JobsClient::connect(url.to_string())
        .await
        .expect("jobs client")
}

/// Milliseconds of each of `n` calls of `Get` and `List`, alternating.
pub async fn status_latencies(url: &str, job: &str, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = jobs_client(url).await;
    let (mut get, mut list) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        let _ = c
            .get(v1::GetJobRequest {
                job_id: job.to_string(),
            })
            .await;
        get.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let _ = c.list(v1::ListJobsRequest::default()).await;
        list.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (get, list)
}

/// The `q` quantile (0..1) of `v`.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Submits a smoke job for `workers` ranks and returns its id.
pub async fn submit(url: &str, dir: &Path, workers: usize, training: Training) -> String {
    let spec = format!(
        "name: fleet\ntask: smoke\nsteps: {}\nworkers: {{min: {workers}}}\nmax_restarts: 3\n\
checkpoint: {{every_steps: {}, keep_last: 2}}\nsmoke: {{batch_size: 8, lr: 0.1}}\n",
        training.steps, training.every_steps
    );
    let path = dir.join("fleet-job.yaml");
    std::fs::write(&path, &spec).expect("job file");
    let mut c = xvlm_coord::client::connect(url).await.expect("jobs client");
    xvlm_coord::client::submit(&mut c, &path, &[])
        .await
        .unwrap_or_else(|e| panic!("submit refused: {e:#}"))
}

/// The job's status.
pub async fn status(url: &str, job: &str) -> v1::JobStatus {
    jobs_client(url)
        .await
        .get(v1::GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .expect("get")
        .into_inner()
}

/// Waits until `pred` holds for the job's status (polling every 20 ms); the time it took.
pub async fn wait_for(
    url: &str,
    job: &str,
    limit: Duration,
    pred: impl Fn(&v1::JobStatus) -> bool,
) -> Option<Duration> {
    let started = Instant::now();
    let mut c = jobs_client(url).await;
    while started.elapsed() < limit {
        if let Ok(s) = c
            .get(v1::GetJobRequest {
                job_id: job.to_string(),
            })
            .await
        {
            if pred(&s.into_inner()) {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// The state's protocol value.
pub fn is(s: &v1::JobStatus, state: v1::JobState) -> bool {
    s.state == state as i32
}

/// Polls `f` every 20 ms until it holds or `limit` passes.
pub async fn wait_until(limit: Duration, f: impl Fn() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}
