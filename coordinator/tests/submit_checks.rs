//! The coordinator's submit path checks what a client may have skipped: a spec sent as raw JSON with
//! a bad override or a bad name is refused (INVALID_ARGUMENT) with the key path, and nothing is
//! queued; a valid one is queued.

use std::path::Path;

use tokio::net::TcpListener;
use xvlm_coord::{client, server, CoordConfig};
use xvlm_proto::v1::SubmitRequest;
use xvlm_proto::PROTOCOL_VERSION;

fn retrieval_spec(name: &str, overrides: serde_json::Value) -> String {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/Retrieval_demo.yaml");
    serde_json::json!({
        "name": name,
        "task": "retrieval",
        "config": config.display().to_string(),
        "overrides": overrides,
    })
    .to_string()
}

/// Each bad spec is refused with its key named; the good one after them is the only job.
#[tokio::test]
async fn submit_refuses_bad_overrides_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = CoordConfig::default()
        .with_state_dir(dir.path().join("state"))
        .with_storage(format!("file://{}", dir.path().join("runs").display()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::serve(listener, config, async {
        let _ = stop_rx.await;
    }));
    let mut c = client::connect(&url).await.unwrap();
    let cases = [
        (
            retrieval_spec("ft", serde_json::json!({"optimizer": {"lr": -1e-4}})),
            "overrides.optimizer.lr: must be a finite number > 0, got -0.0001",
        ),
        (
            // JSON has no NaN: a client's `.nan` arrives as null.
            retrieval_spec("ft", serde_json::json!({"optimizer": {"lr": null}})),
            "overrides.optimizer.lr: must be a finite number > 0, got null",
        ),
        (
            retrieval_spec("ft", serde_json::json!({"batch_size_train": "8"})),
            "overrides.batch_size_train: must be an integer >= 1, got \"8\"",
        ),
        (
            retrieval_spec("ft", serde_json::json!({"block_num": 8})),
            "overrides.block_num: task retrieval does not read this key (tasks that do: grounding)",
        ),
        (
            retrieval_spec(&"x".repeat(64), serde_json::json!({})),
            "must be 1 to 63 characters (it has 64)",
        ),
    ];
    for (spec_json, want) in cases {
        let err = c
            .submit(SubmitRequest {
                protocol_version: PROTOCOL_VERSION,
                spec_json: spec_json.clone(),
            })
            .await
            .expect_err(&spec_json);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{spec_json}");
        assert!(err.message().contains(want), "{}: {want}", err.message());
    }
    assert!(client::list(&mut c).await.unwrap().is_empty());
    let id = c
        .submit(SubmitRequest {
            protocol_version: PROTOCOL_VERSION,
            spec_json: retrieval_spec("ft", serde_json::json!({"optimizer": {"lr": 1e-4}})),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    assert_eq!(client::list(&mut c).await.unwrap().len(), 1, "{id}");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
