//! Checkpoint save benchmark (not a test): the time a step is blocked and the background upload
//! throughput to `file://` and to a moto S3 server on loopback, beside plain writes of the same bytes.

use std::time::Instant;

use bytes::Bytes;
use tch::{Device, Tensor};
use xvlm_e2e::start_moto;
use xvlm_worker::checkpoint::{Checkpointer, Storage};
use xvlm_worker::trainer::task::TrainTask;

/// A task whose whole state is the benchmark's tensors.
/// A task that is only a big state, for the save benchmark.
struct BigState(Vec<(String, Tensor)>);

impl TrainTask for BigState {
    fn total_steps(&self) -> u64 {
        2
    }
    fn step(
        &mut self,
        _step: u64,
        _comm: &dyn xvlm_model::collective::Collective,
    ) -> Result<xvlm_worker::trainer::task::StepOutput, xvlm_worker::trainer::task::TaskError> {
        unreachable!("the benchmark only saves")
    }
    fn lr(&self) -> f64 {
        0.0
    }
    fn state(&self) -> Vec<(String, Tensor)> {
        self.0
            .iter()
            .map(|(k, t)| (k.clone(), t.shallow_clone()))
            .collect()
    }
}

/// One checkpoint save of `XVLM_BENCH_MB` (default 860, the base model in fp32) of random fp32
/// tensors: time the step is blocked, and background upload throughput, next to a plain write of the
/// same bytes. `cargo bench -p xvlm-worker --bench checkpoint_save --profile dev`
fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not, and must not do 1 GB of I/O.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mb: usize = std::env::var("XVLM_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(860);
    let per = 32usize << 20; // 32 MiB tensors, like big embedding/linear weights
    let n = (mb << 20) / per;
    let task = BigState(
        (0..n)
            .map(|i| {
                (
                    format!("layer.{i}.weight"),
                    Tensor::randn([(per / 4) as i64], (tch::Kind::Float, Device::Cpu)),
                )
            })
            .collect(),
    );
    let bytes = n * per;
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = start_moto();
    let options = [
        ("aws_endpoint", moto.url.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ];
    let targets = [
        (
            "file://",
            Storage::open(&format!("file://{}", dir.path().join("ck").display())).expect("open"),
        ),
        (
            "s3 (moto)",
            Storage::open_with_options("s3://ckpts/bench", &options).expect("open"),
        ),
    ];
    let mb_of = |b: usize| b as f64 / (1 << 20) as f64;
    println!(
        "state: {n} tensors, {:.0} MiB fp32; {} CPU threads",
        mb_of(bytes),
        tch::get_num_threads()
    );
    for (label, storage) in &targets {
        let (mut blocking, mut upload, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        // One checkpointer per target, as in training: saves after the first reuse its buffers.
        let mut ck = Checkpointer::new(
            storage.clone(),
            xvlm_proto::spec::CheckpointSpec {
                every_steps: 1,
                keep_last: 1,
            },
            0,
            1,
            1,
            serde_json::Value::Null,
        );
        for rep in 0..REPEATS {
            // The plain write: the same number of bytes, already in one buffer, no copy or hash.
            let data = Bytes::from(vec![7u8; bytes]);
            let started = Instant::now();
            if *label == "file://" {
                std::fs::write(dir.path().join(format!("plain-{rep}.bin")), &data).expect("write");
            } else {
                storage.put(&format!("plain-{rep}.bin"), data).expect("put");
            }
            plain.push(mb_of(bytes) / started.elapsed().as_secs_f64());
            ck.save(rep as u64 + 1, 0, &task).expect("save");
            storage
                .commit_parts(&ck.finish().expect("upload"), 1)
                .expect("commit");
            let t = ck.timings.last().expect("timing").clone();
            blocking.push(t.blocking.as_secs_f64() * 1e3);
            upload.push(mb_of(t.bytes as usize) / t.upload.as_secs_f64());
        }
        println!(
            "{label:10} blocking of each save {:?} ms",
            blocking.iter().map(|b| b.round()).collect::<Vec<_>>()
        );
        println!(
            "{label:10} median of {REPEATS}: blocking {:6.1} ms | checkpoint upload (copy done; sha256 + put) {:7.1} MB/s | plain write {:7.1} MB/s",
            median(&mut blocking),
            median(&mut upload),
            median(&mut plain),
        );
    }
}

/// Saves and plain writes per target, alternating (the page cache and the S3 server warm up).
const REPEATS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
