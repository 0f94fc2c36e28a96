//! `xvlm-coord`: the coordinator server and its CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xvlm_coord::security::Security;
use xvlm_coord::tls::ServerTls;
use xvlm_coord::watch_view::WatchView;
use xvlm_coord::{client, local, server, CoordConfig};
use xvlm_proto::logging::{self, LogFormat};
use xvlm_proto::security::{load_token, ClientSecurity, USER_TOKEN_ENV, WORKER_TOKEN_ENV};

/// xvlm coordinator: schedules distributed training jobs onto xvlm-worker nodes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Coordinator to talk to (client commands).
    #[arg(
        long,
        global = true,
        env = "XVLM_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// CA certificate (PEM) that signed the coordinator's certificate: clients trust it for
    /// `https://` URLs (and `run` hands it to its local workers).
    #[arg(long, global = true, env = "XVLM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// File holding the user token (Jobs API); without it, `XVLM_USER_TOKEN`. Clients send it;
    /// `serve` and `run` require it from every Jobs call.
    #[arg(long, global = true, env = "XVLM_USER_TOKEN_FILE")]
    user_token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free one; the bound address is printed).
    #[arg(long, env = "XVLM_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address of the HTTP listener serving Prometheus `/metrics` (off unless given; port 0 picks a
    /// free one, printed as `http listening on ADDR`). Protected as the Jobs API: TLS with
    /// --tls-cert, the user token when one is set, and the same loopback rule.
    #[arg(long, env = "XVLM_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Directory of the job store.
    #[arg(long, env = "XVLM_STATE_DIR", default_value = "./xvlm-state")]
    state_dir: PathBuf,
    /// Default output root of jobs without `output:`.
    #[arg(long, env = "XVLM_STORAGE", default_value = "file://./runs")]
    storage: String,
    /// Workers silent this long (ms) are lost.
    #[arg(long, default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Server certificate chain (PEM): serve both services over TLS.
    #[arg(long, env = "XVLM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "XVLM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that signs worker client certificates: the Workers API then requires one (mutual TLS).
    #[arg(long, env = "XVLM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// File holding the worker token (Workers API); without it, `XVLM_WORKER_TOKEN`.
    #[arg(long, env = "XVLM_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
    /// Listen on a non-loopback address without TLS and both tokens anyway (logs a warning).
    #[arg(long)]
    insecure: bool,
    /// Seconds between writes of the jobs' TensorBoard events to `{output}/tensorboard/` (each
    /// write is one new event file; shutdown writes what is left).
    #[arg(long, env = "XVLM_TENSORBOARD_FLUSH_SECS", default_value_t = 30.0)]
    tensorboard_flush_secs: f64,
    /// Bytes of trainer log lines kept per job under `{state-dir}/logs` (oldest dropped first).
    #[arg(long, env = "XVLM_LOG_RETENTION_BYTES", default_value_t = xvlm_coord::logs::DEFAULT_RETENTION_BYTES)]
    log_retention_bytes: u64,
}

/// The server configuration from the serve flags and the global user-token flag.
fn coord_config(a: &ServeArgs, user_token_file: Option<&Path>) -> Result<CoordConfig> {
    let tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: a.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let security = Security {
        tls,
        user_token: load_token(user_token_file, USER_TOKEN_ENV)?,
        worker_token: load_token(a.worker_token_file.as_deref(), WORKER_TOKEN_ENV)?,
        insecure: a.insecure,
    };
    Ok(CoordConfig {
        listen: a.listen,
        http_listen: a.http_listen,
        heartbeat_timeout_ms: a.heartbeat_timeout_ms,
        security,
        tensorboard_flush: flush_interval(a.tensorboard_flush_secs)?,
        ..CoordConfig::default()
            .with_state_dir(&a.state_dir)
            .with_storage(&a.storage)
            .with_log_retention_bytes(a.log_retention_bytes)
    })
}

/// `--tensorboard-flush-secs` as a duration: positive and finite.
fn flush_interval(secs: f64) -> Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| {
            format!("--tensorboard-flush-secs {secs}: give a positive number of seconds")
        })
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator server.
    Serve(ServeArgs),
    /// Submit a job.yaml; prints the job id.
    Submit {
        /// The job file.
        job: PathBuf,
        /// Override a key: `--set workers.min=2` (wins over XVLM_JOB_* and the file).
        #[arg(long = "set")]
        sets: Vec<String>,
    },
    /// A table of one job or of all jobs.
    Status {
        /// Job id; all jobs when omitted.
        job: Option<String>,
    },
    /// Live progress until the job ends; exits non-zero unless it succeeded.
    Watch {
        /// Job id.
        job: String,
    },
    /// The trainers' log lines (stderr, and stdout that is not progress), `[rank R gen G err|out]`
    /// first; kept by the coordinator, so a finished job's too.
    Logs {
        /// Job id.
        job: String,
        /// Only this rank's lines.
        #[arg(long)]
        rank: Option<u32>,
        /// Then print new lines as they come, until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Job ids, states and names.
    List,
    /// Cancel a job (stops every trainer).
    Cancel {
        /// Job id.
        job: String,
    },
    /// Save a committed checkpoint of a running job at its next step boundary.
    Checkpoint {
        /// Job id.
        job: String,
        /// Wait until it is committed and print its step.
        #[arg(long)]
        wait: bool,
    },
    /// Coordinator and N local workers in one command: runs the job to its end.
    Run {
        /// The job file.
        job: PathBuf,
        /// Override a key: `--set steps=10`.
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Workers to start on this machine.
        #[arg(long, default_value_t = 1)]
        local_workers: usize,
        /// Let local workers use CUDA devices (default: CPU slots).
        #[arg(long)]
        cuda: bool,
        #[command(flatten)]
        serve: ServeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn outcome(status: &xvlm_proto::v1::JobStatus) -> ExitCode {
    if client::state_name(status) == "SUCCEEDED" {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "job {} ended {}: {}",
            status.job_id,
            client::state_name(status),
            status.message
        );
        ExitCode::FAILURE
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let user_token_file = cli.user_token_file.as_deref();
    let security = ClientSecurity {
        ca: cli.tls_ca.clone(),
        token: load_token(user_token_file, USER_TOKEN_ENV)?,
        ..ClientSecurity::default()
    };
    let connect = || client::connect_with(&cli.coordinator, &security);
    match cli.command {
        Cmd::Serve(ref args) => {
            let config = coord_config(args, user_token_file)?;
            let listener = tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            let http = match config.http_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?,
                ),
                None => None,
            };
            // The bound addresses on stdout (port 0 picks one), for scripts and tests; in one write,
            // so a reader that stops after the first line never makes a later print fail.
            let mut bound = format!("listening on {}\n", listener.local_addr()?);
            if let Some(http) = &http {
                bound.push_str(&format!("http listening on {}\n", http.local_addr()?));
            }
            {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(bound.as_bytes())?;
                out.flush()?;
            }
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let stop = async move {
                tokio::select! {
                    _ = shutdown => {},
                    _ = term.recv() => {},
                }
            };
            server::serve_with_http(listener, http, config, stop).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit { job, sets } => {
            let mut c = connect().await?;
            println!("{}", client::submit(&mut c, &job, &sets).await?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { job } => {
            let mut c = connect().await?;
            let jobs = match job {
                Some(id) => vec![client::get(&mut c, &id).await?],
                None => client::list(&mut c).await?,
            };
            println!("{}", client::status_table(&jobs));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Watch { job } => {
            let mut c = connect().await?;
            let last =
                client::watch(&mut c, &job, std::io::stdout(), WatchView::for_stdout()).await?;
            Ok(outcome(&last))
        }
        Cmd::Logs { job, rank, follow } => {
            let mut c = connect().await?;
            tokio::select! {
                done = client::logs(&mut c, &job, rank, follow, std::io::stdout().lock()) => done?,
                // Ctrl-C: stop reading, without an error.
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::from(130)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List => {
            let mut c = connect().await?;
            for s in client::list(&mut c).await? {
                println!("{}\t{}\t{}", s.job_id, client::state_name(&s), s.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cancel { job } => {
            let mut c = connect().await?;
            let s = client::cancel(&mut c, &job).await?;
            println!("{} {}", s.job_id, client::state_name(&s));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Checkpoint { job, wait } => {
            let mut c = connect().await?;
            let ticket = client::checkpoint(&mut c, &job).await?;
            if wait {
                let step = client::wait_checkpoint(&mut c, &ticket).await?;
                println!("{job} checkpoint committed at step {step}");
            } else {
                println!(
                    "{job} checkpoint requested after step {} (request {}, generation {})",
                    ticket.step, ticket.request_id, ticket.generation
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            ref job,
            ref sets,
            local_workers,
            ref cuda,
            ref serve,
        } => {
            let config = coord_config(serve, user_token_file)?;
            let last = local::run(
                job,
                sets,
                local_workers,
                *cuda,
                config,
                &security,
                &local::worker_binary(),
            )
            .await?;
            Ok(outcome(&last))
        }
    }
}
