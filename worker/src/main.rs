//! `xvlm-worker`: the node daemon (default), a trainer (`train`), and `bench-allreduce`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xvlm_proto::logging::{self, LogFormat};
use xvlm_proto::security::{load_token, ClientSecurity, WORKER_TOKEN_ENV};
use xvlm_worker::devices::{self, DeviceChoice};
use xvlm_worker::{bench, daemon, trainer};

/// xvlm worker: runs training ranks for an xvlm coordinator.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Flags of the node daemon (the default command).
#[derive(clap::Args)]
struct DaemonArgs {
    /// Coordinator URL.
    #[arg(
        long,
        env = "XVLM_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Worker name (default: the host name); unique per worker.
    #[arg(long, env = "XVLM_WORKER_NAME")]
    name: Option<String>,
    /// Host or IP other nodes reach this node's trainers on.
    #[arg(long, env = "XVLM_WORKER_HOST", default_value = "127.0.0.1")]
    host: String,
    /// CUDA devices when available, or CPU slots only.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    devices: DeviceChoice,
    /// CPU slots to offer without CUDA.
    #[arg(long, default_value_t = 1)]
    cpu_slots: u32,
    /// CPU threads this worker's trainers share (default: the host's cores divided among the xvlm
    /// workers running on it).
    #[arg(long, env = "XVLM_CPU_THREADS", value_parser = clap::value_parser!(u32).range(1..))]
    cpu_threads: Option<u32>,
    /// Where assignments, pid files and trainer logs go.
    #[arg(long, default_value = "./xvlm-work")]
    work_dir: PathBuf,
    /// Seconds trainers keep running while the coordinator is unreachable.
    #[arg(long, default_value_t = 600)]
    grace_secs: u64,
    /// CA certificate (PEM) that signed the coordinator's certificate (for an `https://` URL).
    #[arg(long, env = "XVLM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) to present to a coordinator that requires mutual TLS.
    #[arg(long, env = "XVLM_WORKER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "XVLM_WORKER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// File holding the worker token; without it, `XVLM_WORKER_TOKEN`. Also required from
    /// `/metrics` scrapers when set.
    #[arg(long, env = "XVLM_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Address of the Prometheus `/metrics` listener (off unless given; port 0 picks a free one,
    /// logged as `metrics listening`). Keep it on loopback or set a worker token: it has no TLS.
    #[arg(long, env = "XVLM_WORKER_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Announce the ring sockets as HOST:PORT instead of `--host` and an ephemeral port: slot i
    /// listens on `--host` port PORT+i and is announced as HOST:PORT+i. For a forwarder in front of
    /// this node that keeps the port (a NAT; the multi-host tests' fault-injecting proxy).
    #[arg(long, env = "XVLM_RING_ADVERTISE", value_parser = parse_ring_advertise)]
    ring_advertise: Option<daemon::RingAdvertise>,
}

/// `HOST:PORT` of `--ring-advertise`.
fn parse_ring_advertise(s: &str) -> Result<daemon::RingAdvertise, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let first_port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    Ok(daemon::RingAdvertise {
        host: host.to_string(),
        first_port,
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one trainer rank (started by the daemon).
    Train {
        /// Assignment JSON written by the daemon.
        #[arg(long)]
        assignment: PathBuf,
        /// Inherited fd of this rank's listening ring socket.
        #[arg(long)]
        listen_fd: Option<i32>,
    },
    /// All-reduce an M MiB float32 buffer across N local ranks; prints median time, algbw, busbw.
    BenchAllreduce {
        /// Ranks.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Buffer size in MiB.
        #[arg(long, default_value_t = 64)]
        mb: usize,
        /// Timed iterations.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// `auto`: same-host neighbours use shared memory; `tcp`: loopback TCP only.
        #[arg(long, default_value = "auto", value_parser = ["auto", "tcp"])]
        transport: String,
        /// Run only this rank of a TCP ring across `--peers` (one process per rank, started
        /// together, e.g. one per host); rank 0 prints the result. `--world` is ignored.
        #[arg(long, requires = "peers")]
        rank: Option<usize>,
        /// Every rank's `host:port`, comma-separated, in rank order; this rank listens on its own.
        #[arg(long, value_delimiter = ',', requires = "rank")]
        peers: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if matches!(
                e.downcast_ref::<xvlm_worker::error::WorkerError>(),
                Some(xvlm_worker::error::WorkerError::Preempted { .. })
            ) =>
        {
            eprintln!("{e:#}");
            ExitCode::from(trainer::save_request::EXIT_PREEMPTED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Cmd::Train {
            assignment,
            listen_fd,
        }) => trainer::run_file(&assignment, listen_fd)
            .with_context(|| format!("trainer {}", assignment.display())),
        Some(Cmd::BenchAllreduce {
            world,
            mb,
            iters,
            transport,
            rank,
            peers,
        }) => {
            anyhow::ensure!(
                world >= 1 && iters >= 1,
                "--world and --iters must be at least 1"
            );
            tch::set_num_threads(1);
            if let Some(rank) = rank {
                anyhow::ensure!(
                    rank < peers.len(),
                    "--rank {rank} is not one of the {} --peers",
                    peers.len()
                );
                let result = bench::run_rank(rank, &peers, mb, iters, Duration::from_secs(60))?;
                if rank == 0 {
                    println!("{result}");
                }
                return Ok(());
            }
            let result = bench::run(world, mb, iters, transport != "tcp")?;
            println!("{result}");
            Ok(())
        }
        None => {
            let a = cli.daemon;
            let cfg = daemon::DaemonConfig {
                coordinator: a.coordinator,
                name: a.name.unwrap_or_else(host_name),
                host: a.host,
                devices: devices::detect(a.devices, a.cpu_slots),
                work_dir: a.work_dir,
                grace: Duration::from_secs(a.grace_secs),
                exe: std::env::current_exe().context("cannot locate the xvlm-worker binary")?,
                cpu_threads: a.cpu_threads.map(|n| n as usize),
                security: ClientSecurity {
                    ca: a.tls_ca,
                    cert: a.tls_cert,
                    key: a.tls_key,
                    token: load_token(a.worker_token_file.as_deref(), WORKER_TOKEN_ENV)?,
                },
                http_listen: a.http_listen,
                ring_advertise: a.ring_advertise,
            };
            // One thread: trainers get PR_SET_PDEATHSIG from the thread that forks them, so it must
            // live as long as the daemon.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                let (tx, signals) = tokio::sync::mpsc::unbounded_channel();
                // SIGTERM drains (checkpoint, then leave); a second SIGTERM or Ctrl-C stops now.
                tokio::spawn(async move {
                    let mut drain = true;
                    loop {
                        let signal = tokio::select! {
                            _ = tokio::signal::ctrl_c() => daemon::Signal::Stop,
                            _ = term.recv() => if drain {
                                daemon::Signal::Drain
                            } else {
                                daemon::Signal::Stop
                            },
                        };
                        drain = false;
                        if tx.send(signal).is_err() {
                            break;
                        }
                    }
                });
                daemon::run(cfg, signals).await?;
                anyhow::Ok(())
            })
        }
    }
}
