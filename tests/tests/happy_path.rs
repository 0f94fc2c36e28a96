//! Coordinator + 2 workers over loopback: a smoke job runs data-parallel to completion, and `watch`,
//! `status` and `list` show it; a second job queued behind it runs after it; the same over TLS with
//! user and worker tokens and worker client certificates.

use std::time::Duration;

use xvlm_e2e::{start_coordinator_with_args, text, wait_until, write, Cluster};

const JOB: &str = "name: e2e-smoke
task: smoke
steps: 40
workers: {min: 2}
smoke: {batch_size: 8, lr: 0.1}
";

/// Submit, watch to SUCCEEDED, check the status table and the final weights rank 0 wrote.
#[test]
fn two_workers_run_a_job_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(dir.path(), "job.yaml", JOB));
    assert_eq!(job, "job-0001");
    let out = c.watch_succeeded(&job);
    assert!(!out.contains('\r'), "a pipe gets plain lines: {out:?}");
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("job-0001 SUCCEEDED gen=1 world=2 step=40/40 losses: mse="),
        "{out}"
    );
    let status = c.status(&job);
    let row = status.lines().nth(1).unwrap_or_default();
    for cell in ["job-0001", "e2e-smoke", "SUCCEEDED", " 2 ", "40/40", "mse="] {
        assert!(row.contains(cell), "status row lacks {cell:?}:\n{status}");
    }
    assert!(status.starts_with("JOB"), "{status}");
    // The loss went down over the run (first reported vs last).
    let mse = |line: &str| -> Option<f64> {
        line.split("mse=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let first = out.lines().find_map(mse).unwrap();
    let final_mse = mse(last).unwrap();
    assert!(final_mse < first, "mse {first} -> {final_mse}\n{out}");
    let weights = dir.path().join("runs/job-0001/final/model.safetensors");
    assert!(weights.is_file(), "{} missing", weights.display());
}

/// `watch` on a terminal (a pseudo-terminal from util-linux `script`) draws one live bar, redrawn in
/// place and never wider than the terminal, and leaves the state changes and the end as lines; in a
/// pipe (the test above) it prints plain lines.
#[test]
fn watch_on_a_terminal_draws_a_live_bar() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let job = c.submit(&write(
        dir.path(),
        "job.yaml",
        "name: bar\ntask: smoke\nsteps: 30\nworkers: {min: 2}\nsmoke: {batch_size: 8, lr: 0.1, step_delay_ms: 40}\n",
    ));
    let watch = format!(
        "{} --coordinator {} watch {job}",
        xvlm_e2e::bin("xvlm-coord").display(),
        c.url
    );
    let out = xvlm_e2e::output_within(
        std::process::Command::new(xvlm_e2e::tool("script", "bsdutils"))
            .args(["-qefc", &watch, "/dev/null"])
            .env("COLUMNS", "80")
            .env("TERM", "xterm"),
        Duration::from_secs(60),
    );
    let screen = text(&out.stdout);
    assert!(out.status.success(), "{screen}");
    let redraws = screen.matches("\r\x1b[2K").count();
    assert!(redraws >= 5, "{redraws} redraws:\n{screen:?}");
    assert!(
        screen.contains("] ") && screen.contains("% "),
        "no bar:\n{screen:?}"
    );
    // What stays on the screen: each line's text after its last redraw.
    let kept: Vec<&str> = screen
        .split('\n')
        .map(|l| {
            l.trim_end_matches('\r')
                .rsplit("\r\x1b[2K")
                .next()
                .unwrap_or("")
        })
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        kept.last()
            .is_some_and(|l| l.starts_with(&format!("{job} SUCCEEDED"))),
        "{kept:?}"
    );
    assert!(kept.len() < 10, "steps are redrawn, not printed: {kept:?}");
    // A bar is what a redraw writes without ending the line (a line that stays may wrap).
    for bar in screen
        .split("\r\x1b[2K")
        .skip(1)
        .filter(|s| !s.contains('\n'))
    {
        assert!(bar.chars().count() < 80, "wider than the terminal: {bar:?}");
    }
}

/// Two jobs wait in submission order: the second starts only after the first frees the workers.
#[test]
fn jobs_queue_in_submission_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let slow = JOB
        .replace("steps: 40", "steps: 30")
        .replace("lr: 0.1}", "lr: 0.1, step_delay_ms: 30}");
    let first = c.submit(&write(dir.path(), "a.yaml", &slow));
    let second = c.submit(&write(
        dir.path(),
        "b.yaml",
        &JOB.replace("min: 2", "min: 1"),
    ));
    // While the first holds both workers, the second waits its turn.
    wait_until(Duration::from_secs(30), || {
        c.status(&first).contains("RUNNING")
    })
    .unwrap_or_else(|| panic!("first job never ran:\n{}", c.logs()));
    let list = text(&c.cli(&["list"]).stdout);
    assert!(list.contains(&format!("{second}\tPENDING")), "{list}");
    let watch = c.cli(&["watch", &second]);
    assert!(
        watch.status.success(),
        "{}\n{}",
        text(&watch.stdout),
        c.logs()
    );
    let status = text(&c.cli(&["status"]).stdout);
    assert_eq!(status.matches("SUCCEEDED").count(), 2, "{status}");
}

/// A CA and certificates signed by it for 127.0.0.1 (server) or a worker (client); PEM files in `dir`.
fn make_pki(dir: &std::path::Path) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, purpose) in [
        ("server", ExtendedKeyUsagePurpose::ServerAuth),
        ("worker", ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// A coordinator with TLS, both tokens (from files) and mutual TLS for workers; two workers with the
/// CA, their client certificate and the worker token; the CLI with the CA and the user token runs a
/// smoke job to SUCCEEDED. The same CLI without the token is refused.
#[test]
fn tls_and_tokens_run_a_job_to_completion() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let path = |f: &str| d.join(f).display().to_string();
    std::fs::write(d.join("user.token"), "user-token-1\n").unwrap();
    std::fs::write(d.join("worker.token"), "worker-token-1\n").unwrap();
    let (coord, url) = start_coordinator_with_args(
        d,
        "127.0.0.1:0",
        &[],
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--tls-client-ca",
            &path("ca.pem"),
            "--user-token-file",
            &path("user.token"),
            "--worker-token-file",
            &path("worker.token"),
        ],
    );
    let mut c = Cluster {
        coord,
        url: url.replacen("http://", "https://", 1),
        workers: Vec::new(),
        dir: d.to_path_buf(),
        client_env: vec![("XVLM_TLS_CA".into(), path("ca.pem"))],
    };
    let ca = path("ca.pem");
    let (cert, key) = (path("worker.pem"), path("worker.key"));
    let worker_env = [
        ("XVLM_TLS_CA", ca.as_str()),
        ("XVLM_WORKER_TLS_CERT", cert.as_str()),
        ("XVLM_WORKER_TLS_KEY", key.as_str()),
        ("XVLM_WORKER_TOKEN", "worker-token-1"),
    ];
    c.add_worker_with_env("w0", 1, &worker_env);
    c.add_worker_with_env("w1", 1, &worker_env);
    let refused = c.cli(&["list"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("Jobs API: missing bearer token"),
        "{}",
        text(&refused.stderr)
    );
    c.client_env
        .push(("XVLM_USER_TOKEN".into(), "user-token-1".into()));
    let job = c.submit(&write(d, "job.yaml", JOB));
    let out = c.watch_succeeded(&job);
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("{job} SUCCEEDED gen=1 world=2 step=40/40")),
        "{out}"
    );
    // The ranks connected their ring with the generation's secret (a wrong one fails the job).
    assert!(!c.logs().contains("wrong ring secret"), "{}", c.logs());
}
