//! Checkpoints through the real storage code: save, commit (as the coordinator does it, from the
//! reported parts), retention, exact resume, a corrupted checkpoint falling back to the previous one;
//! on `file://` and on a moto S3 server on loopback.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tch::{Device, Tensor};
use xvlm_e2e::start_moto;
use xvlm_model::collective::SingleProcess;
use xvlm_proto::spec::JobSpec;
use xvlm_worker::checkpoint::{sha256_hex, step_dir, Checkpointer, Part, Storage};
use xvlm_worker::trainer::smoke::SmokeTask;
use xvlm_worker::trainer::task::{TaskContext, TrainTask};

/// SmokeTask::new seeds libtorch's global generator: tests building tasks take turns.
static SERIAL: Mutex<()> = Mutex::new(());

const TOTAL: u64 = 12;

fn spec() -> JobSpec {
    JobSpec::from_json(
        r#"{"name":"ck","task":"smoke","steps":12,"seed":7,
            "checkpoint":{"every_steps":3,"keep_last":2},
            "smoke":{"batch_size":4,"features":6,"hidden":5,"lr":0.1}}"#,
    )
    .expect("spec")
}

fn task(spec: &JobSpec) -> SmokeTask {
    let ctx = TaskContext {
        spec,
        rank: 0,
        world: 1,
        device: Device::Cpu,
        shards: &[],
        output: "",
        comm: &SingleProcess,
    };
    SmokeTask::new(&ctx).expect("smoke task")
}

fn tensor_hashes(task: &SmokeTask) -> Vec<(String, String)> {
    task.state()
        .into_iter()
        .map(|(k, t)| {
            let n = t.numel();
            let mut buf = vec![0u8; n * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut buf, n);
            (k, sha256_hex(&buf))
        })
        .collect()
}

fn checkpointer(storage: &Storage, generation: u64) -> Checkpointer {
    let spec = spec();
    Checkpointer::new(
        storage.clone(),
        spec.checkpoint.clone(),
        0,
        1,
        generation,
        serde_json::json!({"job": spec}),
    )
}

/// Commits a world-1 part the moment it is reported, as the coordinator does.
fn commit(storage: &Storage, parts: Vec<Part>) {
    for part in parts {
        storage.commit_parts(&[part], 2).expect("commit");
    }
}

fn run(task: &mut SmokeTask, ck: &mut Checkpointer, from: u64, to: u64) {
    for step in from..to {
        task.step(step, &SingleProcess).expect("step");
        let parts = ck.after_step(step + 1, TOTAL, task).expect("after_step");
        commit(ck.storage(), parts);
    }
}

fn committed(storage: &Storage) -> Vec<u64> {
    let mut steps: Vec<u64> = storage
        .list_dirs("checkpoints")
        .expect("list")
        .iter()
        .filter_map(|d| d.strip_prefix("step-")?.parse().ok())
        .filter(|s| {
            storage
                .get(&format!("{}/MANIFEST.json", step_dir(*s)))
                .expect("get")
                .is_some()
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// The whole checkpoint story against one storage.
fn exercise(storage: &Storage) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = spec();
    let mut reference = task(&spec);
    for step in 0..TOTAL {
        reference.step(step, &SingleProcess).expect("step");
    }
    let expected = tensor_hashes(&reference);

    // Generation 1 runs 10 of 12 steps: saves after 3, 6, 9; keep_last 2 leaves 6 and 9.
    let mut first = task(&spec);
    let mut ck = checkpointer(storage, 1);
    run(&mut first, &mut ck, 0, 10);
    commit(storage, ck.finish().expect("finish"));
    assert_eq!(
        committed(storage),
        vec![6, 9],
        "retention keeps keep_last=2"
    );
    assert!(
        storage
            .get(&format!("{}/model.safetensors", step_dir(3)))
            .expect("get")
            .is_none(),
        "retention deleted step-3's files"
    );
    assert_eq!(
        storage.get("checkpoints/latest").expect("get").as_deref(),
        Some(&b"step-9\n"[..])
    );
    assert_eq!(ck.timings.len(), 3, "three saves completed");

    // Generation 2 resumes from step 9 and ends bit-identical to the uninterrupted run.
    let mut second = task(&spec);
    let mut ck2 = checkpointer(storage, 2);
    let from = ck2.resume(&mut second).expect("resume");
    assert_eq!(from, Some(9));
    assert_ne!(
        tensor_hashes(&second),
        expected,
        "not yet trained to the end"
    );
    run(&mut second, &mut ck2, 9, TOTAL);
    assert_eq!(tensor_hashes(&second), expected, "exact resume from step 9");

    // Corrupt step-9's weights: resume must reject it and fall back to step 6, still exact.
    let name = format!("{}/model.safetensors", step_dir(9));
    let mut bad = storage.get(&name).expect("get").expect("exists").to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x5a;
    storage.put(&name, Bytes::from(bad)).expect("put");
    let mut third = task(&spec);
    let mut ck3 = checkpointer(storage, 3);
    assert_eq!(ck3.resume(&mut third).expect("resume"), Some(6));
    run(&mut third, &mut ck3, 6, TOTAL);
    assert_eq!(tensor_hashes(&third), expected, "exact resume from step 6");

    // A big object goes up in parts and comes back whole.
    let big: Vec<u8> = (0..(40u32 << 20)).map(|i| (i % 251) as u8).collect();
    storage
        .put("bench/big.bin", Bytes::from(big.clone()))
        .expect("multipart put");
    let back = storage.get("bench/big.bin").expect("get").expect("exists");
    assert!(back.as_ref() == big.as_slice(), "multipart round trip");
}

#[test]
fn file_storage_save_commit_retain_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(&format!("file://{}", dir.path().display())).expect("open");
    exercise(&storage);
    // Files are where the layout says.
    let step6 = dir.path().join("checkpoints/step-6");
    for f in [
        "MANIFEST.json",
        "model.safetensors",
        "config.json",
        "rank-0.json",
    ] {
        assert!(step6.join(f).is_file(), "missing {f}");
    }
    // The weights file is plain safetensors with the task's names.
    let loaded = Tensor::read_safetensors(step6.join("model.safetensors")).expect("read");
    let names: Vec<&str> = loaded.iter().map(|(k, _)| k.as_str()).collect();
    assert!(names.contains(&"fc1.weight"), "{names:?}");

    // A model of another shape refuses the checkpoint before changing any of its weights.
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut wider = spec();
    if let Some(smoke) = wider.smoke.as_mut() {
        smoke.hidden = 7;
    }
    let mut other = task(&wider);
    let before = tensor_hashes(&other);
    let err = checkpointer(&storage, 4)
        .resume(&mut other)
        .expect_err("a checkpoint of another shape");
    assert!(err.to_string().contains("shape"), "{err}");
    assert_eq!(
        tensor_hashes(&other),
        before,
        "weights changed by a refused load"
    );
}

/// A save whose parts are all uploaded but which was never committed (the trainer died before
/// reporting its part) is never resumed: the previous committed checkpoint is.
#[test]
fn uncommitted_parts_are_never_resumed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(&format!("file://{}", dir.path().display())).expect("open");
    let spec = spec();
    let mut first = task(&spec);
    let mut ck = checkpointer(&storage, 1);
    run(&mut first, &mut ck, 0, 4);
    // The upload is asynchronous: wait for it and commit step 3.
    commit(&storage, ck.finish().expect("finish"));
    assert_eq!(committed(&storage), vec![3]);
    // The save of step 6 is held in flight, as the upload test hook does, then the "trainer" dies.
    run(&mut first, &mut ck, 4, 5);
    ck.upload_delay = Duration::from_millis(200);
    first.step(5, &SingleProcess).expect("step");
    ck.save(6, 0, &first).expect("save");
    drop(ck);
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        dir.path().join("checkpoints/step-6/rank-0.json").is_file(),
        "the parts of step 6 were uploaded"
    );
    assert_eq!(committed(&storage), vec![3], "step 6 has no manifest");
    let mut second = task(&spec);
    let resumed = checkpointer(&storage, 2)
        .resume(&mut second)
        .expect("resume");
    assert_eq!(resumed, Some(3));
}

#[test]
fn s3_storage_save_commit_retain_resume() {
    let moto = start_moto();
    let options = [
        ("aws_endpoint", moto.url.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ];
    let storage = Storage::open_with_options("s3://ckpts/run-1", &options).expect("open");
    exercise(&storage);
}
