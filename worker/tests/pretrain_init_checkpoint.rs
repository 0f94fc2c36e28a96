//! `init_checkpoint` of `task: pretrain` from any storage: the weights of one task, saved as
//! safetensors, initialise a task with another seed when read from `file://` and from `s3://` (a moto
//! server on loopback, configured through the usual `AWS_*` environment).

mod common;
mod task_common;

use bytes::Bytes;
use common::max_diff;
use task_common::{corpus, spec, task, task_yaml, weights};
use xvlm_e2e::start_moto;
use xvlm_model::collective::SingleProcess;
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::Storage;
use xvlm_worker::trainer::task::TrainTask;

#[test]
fn init_checkpoint_loads_from_file_and_s3() {
    let moto = start_moto();
    // The only test of this binary: the environment is not shared with another test.
    for (k, v) in [
        ("AWS_ENDPOINT", moto.url.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(k, v);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let data = corpus(dir.path());
    let base = spec(&task_yaml(dir.path(), &data, 4, 0.0), 1, "");

    let source = task(&base, &SingleProcess, &[]);
    let expected = weights(&source);
    let file = dir.path().join("init.safetensors");
    let state = source.state();
    let named: Vec<(&str, tch::Tensor)> = state
        .iter()
        .map(|(k, t)| (k.as_str(), t.shallow_clone()))
        .collect();
    tch::Tensor::write_safetensors(&named, &file).expect("write safetensors");
    drop(source);
    Storage::open("s3://ckpts/init")
        .expect("s3 storage")
        .put(
            "model.safetensors",
            Bytes::from(std::fs::read(&file).expect("read")),
        )
        .expect("upload");

    let other_seed = JobSpec {
        seed: base.seed + 1,
        ..base.clone()
    };
    let fresh = weights(&task(&other_seed, &SingleProcess, &[]));
    assert!(
        max_diff(&fresh, &expected) > 1e-3,
        "another seed gave the same weights"
    );
    for url in [
        format!("file://{}", file.display()),
        "s3://ckpts/init/model.safetensors".to_string(),
    ] {
        let job = JobSpec {
            init_checkpoint: Some(url.clone()),
            ..other_seed.clone()
        };
        let loaded = weights(&task(&job, &SingleProcess, &[]));
        assert_eq!(
            max_diff(&loaded, &expected),
            0.0,
            "{url}: weights differ from the saved ones"
        );
    }
    // A missing object is an error naming it.
    let job = JobSpec {
        init_checkpoint: Some("s3://ckpts/init/missing.th".into()),
        ..other_seed
    };
    let ctx = xvlm_worker::trainer::task::TaskContext {
        spec: &job,
        rank: 0,
        world: 1,
        device: tch::Device::Cpu,
        shards: &[],
        output: "",
        comm: &SingleProcess,
    };
    let err =
        xvlm_worker::trainer::runner::Runner::<xvlm_worker::trainer::pretrain::PretrainTask>::new(
            &ctx,
        )
        .err()
        .expect("missing init_checkpoint must fail");
    assert!(err.to_string().contains("missing.th"), "{err}");
}
