//! `xvlm`: single-process tools (doctor, parity, convert, data tools).

use anyhow::Result;
use clap::{Parser, Subcommand};
use xvlm_proto::logging::{self, LogFormat};

mod bench_data;
mod convert;
mod doctor;
mod eval_retrieval;
mod parity;
mod region_stats;
mod smoke;
mod synth_data;

#[derive(Parser)]
#[command(name = "xvlm", version, about = "X-VLM single-process tools")]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch, CUDA, NCCL, CPU and storage facts a run depends on; non-zero if libtorch is not 2.11.0.
    Doctor,
    /// Train a tiny MLP for a few steps with libtorch (proves the tensor stack works end to end).
    SmokeTrain(smoke::SmokeArgs),
    /// Convert an official `torch.save` checkpoint (`.th`/`.pth`) to safetensors.
    Convert(convert::ConvertArgs),
    /// Run a parity fixture case (`case.yaml` + `expected.safetensors`); non-zero if any tensor fails.
    Parity(parity::ParityArgs),
    /// Write a synthetic multi-grained corpus (shapes with boxes and captions) in the official formats.
    SynthData(synth_data::SynthDataArgs),
    /// Measure decode + pre-training transform throughput on a folder of JPEGs.
    BenchData(bench_data::BenchDataArgs),
    /// Zero-shot ITC/ITM retrieval of a pre-training checkpoint on a held-out split; prints R@1/5/10.
    EvalRetrieval(eval_retrieval::EvalRetrievalArgs),
    /// Dump what the pre-training region path feeds the model (boxes, coverage, pixels) as json lines.
    RegionStats(region_stats::RegionStatsArgs),
}

fn main() {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let _ = xvlm_model::runtime::load_cuda_backend();
    if let Err(err) = run(cli.command) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Doctor => doctor::run(),
        Command::SmokeTrain(args) => smoke::run(&args),
        Command::Convert(args) => convert::run(&args),
        Command::Parity(args) => parity::run(&args),
        Command::SynthData(args) => synth_data::run(&args),
        Command::BenchData(args) => bench_data::run(&args),
        Command::EvalRetrieval(args) => eval_retrieval::run(&args),
        Command::RegionStats(args) => region_stats::run(&args),
    }
}
