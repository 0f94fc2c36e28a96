//! Final weights go to the job's output on any backend: a smoke job with an `s3://` output (moto on
//! loopback) ends with `final/model.safetensors` in the bucket, byte-identical (S3 ETag = md5) to the
//! file the same job writes to a `file://` output.

use md5::{Digest, Md5};
use xvlm_e2e::{http, start_moto_for_children, write, Cluster};

const JOB: &str = "name: final\ntask: smoke\nsteps: 5\nseed: 3\n";

#[test]
fn final_weights_reach_s3() {
    let moto = start_moto_for_children();
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path());
    c.add_worker("w0", 1);
    let s3_job = c.submit(&write(
        dir.path(),
        "s3.yaml",
        &format!("{JOB}output: s3://ckpts/finaljob\n"),
    ));
    c.watch_succeeded(&s3_job);
    let local_job = c.submit(&write(dir.path(), "local.yaml", JOB));
    c.watch_succeeded(&local_job);

    let list = http(
        &moto.addr,
        &format!(
            "GET /ckpts?list-type=2&prefix=finaljob/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            moto.addr
        ),
    )
    .expect("list the bucket");
    assert!(
        list.contains("<Key>finaljob/final/model.safetensors</Key>"),
        "no final weights in S3:\n{list}\n{}",
        c.logs()
    );
    let etag = list
        .split("<ETag>")
        .nth(1)
        .and_then(|r| r.split("</ETag>").next())
        .map(|e| e.replace("&#34;", "").replace('"', ""))
        .expect("an ETag");
    let local = std::fs::read(
        dir.path()
            .join("runs")
            .join(&local_job)
            .join("final/model.safetensors"),
    )
    .expect("final weights of the file:// job");
    let st = safetensors::SafeTensors::deserialize(&local).expect("safetensors");
    assert_eq!(st.names().len(), 4, "fc1/fc2 weight and bias");
    let md5: String = Md5::digest(&local)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!(
        "s3 final/model.safetensors ETag {etag}, file:// copy md5 {md5} ({} bytes)",
        local.len()
    );
    assert_eq!(
        etag, md5,
        "the S3 final weights differ from the file:// ones"
    );
}
