//! `xvlm-coord run` never leaves its local workers behind. The workers here are a stand-in script
//! (`XVLM_WORKER_BIN`) that records its pid and any SIGTERM and otherwise runs forever, so the test
//! needs no libtorch build; the real worker's trainers die with it the same way (the shared
//! `xvlm_proto::process::die_with_parent`, tested with real trainers by
//! `tests/tests/cancel.rs::killed_worker_leaves_no_orphans`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvlm_proto::process::{is_running, signal_process};

const FAKE_WORKER: &str = r#"#!/bin/sh
echo $$ > "$XVLM_TEST_PID_DIR/$$.pid"
trap 'echo term > "$XVLM_TEST_PID_DIR/$$.term"; exit 0' TERM
while :; do sleep 0.1; done
"#;

struct Setup {
    dir: tempfile::TempDir,
    pids: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        std::fs::create_dir(&pids).unwrap();
        let worker = dir.path().join("fake-worker");
        std::fs::write(&worker, FAKE_WORKER).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.path().join("job.yaml"),
            "name: orphans\ntask: smoke\nsteps: 10\nworkers: {min: 2}\n",
        )
        .unwrap();
        Setup { dir, pids }
    }

    /// `xvlm-coord run job.yaml --local-workers 2` with the stand-in workers.
    fn run(&self) -> Child {
        let root = self.dir.path();
        Command::new(env!("CARGO_BIN_EXE_xvlm-coord"))
            .arg("run")
            .arg(root.join("job.yaml"))
            .args(["--local-workers", "2", "--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--storage")
            .arg(format!("file://{}", root.join("runs").display()))
            .env("XVLM_WORKER_BIN", root.join("fake-worker"))
            .env("XVLM_TEST_PID_DIR", &self.pids)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The workers' pids, once both have started.
    fn worker_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        let started = wait_until(Duration::from_secs(20), || {
            pids = files(&self.pids, "pid");
            pids.len() == 2
        });
        assert!(started, "the local workers never started: {pids:?}");
        pids
    }
}

/// The pids named by the files `<pid>.<ext>` in `dir`.
fn files(dir: &Path, ext: &str) -> Vec<u32> {
    let mut pids: Vec<u32> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let path = e.ok()?.path();
            (path.extension()? == ext).then_some(())?;
            path.file_stem()?.to_str()?.parse().ok()
        })
        .collect();
    pids.sort();
    pids
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Kills whatever is left, so a failed assertion leaves no stand-in running.
fn cleanup(pids: &[u32]) {
    for &pid in pids {
        signal_process(pid, libc::SIGKILL);
    }
}

/// `kill -9` of `run`: its workers get the parent-death signal and are gone within seconds.
#[test]
fn workers_die_when_run_is_sigkilled() {
    let setup = Setup::new();
    let mut run = setup.run();
    let pids = setup.worker_pids();
    assert!(pids.iter().all(|&p| is_running(p)));
    run.kill().unwrap();
    run.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || {
        pids.iter().all(|&p| !is_running(p))
    });
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_running(p)).collect();
    cleanup(&pids);
    assert!(
        gone,
        "workers {alive:?} outlived a SIGKILLed `xvlm-coord run`"
    );
}

/// SIGTERM to `run`: it forwards SIGTERM to each worker (each records it), waits for them and exits
/// non-zero saying why; no worker is left.
#[test]
fn sigterm_to_run_stops_its_workers_gracefully() {
    let setup = Setup::new();
    let mut run = setup.run();
    let pids = setup.worker_pids();
    signal_process(run.id(), libc::SIGTERM);
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = run.try_wait().unwrap();
        status.is_some()
    });
    let alive: Vec<u32> = pids.iter().copied().filter(|&p| is_running(p)).collect();
    let termed = files(&setup.pids, "term");
    cleanup(&pids);
    let Some(status) = status else {
        let _ = run.kill();
        panic!("`xvlm-coord run` did not exit within 10 s of SIGTERM");
    };
    let mut stderr = String::new();
    use std::io::Read;
    run.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        alive.is_empty(),
        "workers {alive:?} outlived `run`\n{stderr}"
    );
    assert_eq!(termed, pids, "not every worker got SIGTERM\n{stderr}");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("stopped by SIGTERM"), "{stderr}");
}
