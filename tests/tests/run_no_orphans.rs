//! `xvlm-coord run` with real local workers and trainers leaves no process behind: SIGKILLed, its
//! workers get the parent-death signal and their trainers theirs; SIGTERMed, it drains the workers
//! (the trainers checkpoint and leave) and exits non-zero, saying so. Runs side by side in one folder
//! keep their jobs apart, and a second run on a state dir in use is refused with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use xvlm_e2e::{alive, bin, wait_until, write};

const JOB: &str = "name: tree\ntask: smoke\nsteps: 100000\nworkers: {min: 2}\nmax_restarts: 0\n\
                   smoke: {step_delay_ms: 20}\n";

/// `xvlm-coord run` in `dir`, killed on drop (a failed assertion leaves nothing running: its
/// workers die with it).
struct Run {
    child: Child,
    dir: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Run {
    fn start(dir: &Path) -> Run {
        let job = write(dir, "job.yaml", JOB);
        let child = Command::new(bin("xvlm-coord"))
            .arg("run")
            .arg(&job)
            .args(["--local-workers", "2", "--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--storage")
            .arg(format!("file://{}", dir.join("runs").display()))
            .env("XVLM_WORKER_BIN", bin("xvlm-worker"))
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("run.log")).unwrap())
            .spawn()
            .unwrap();
        Run {
            child,
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("run.log")).unwrap_or_default()
    }

    /// The two trainers' pids, once both run (the local workers write under the run's state dir).
    fn trainers(&self) -> Vec<u32> {
        let pid = |rank: u32| -> Option<u32> {
            let path = self
                .dir
                .join(format!("state/work/job-0001/g1/rank{rank}.pid"));
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        };
        let mut pids = Vec::new();
        wait_until(Duration::from_secs(60), || {
            pids = (0..2).filter_map(pid).collect();
            pids.len() == 2 && pids.iter().all(|&p| alive(p))
        })
        .unwrap_or_else(|| panic!("trainers never ran: {pids:?}\n{}", self.log()));
        pids
    }

    /// Its direct children (the local workers), from /proc.
    fn workers(&self) -> Vec<u32> {
        let parent = self.child.id();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        let rest = s.rsplit_once(')')?.1.to_string();
                        rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                    })
                    == Some(parent)
            })
            .collect()
    }
}

/// Every pid of `pids` still alive after up to `timeout`.
fn survivors(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let _ = wait_until(timeout, || pids.iter().all(|&p| !alive(p)));
    pids.iter().copied().filter(|&p| alive(p)).collect()
}

fn kill_all(pids: &[u32]) {
    for &pid in pids {
        // SAFETY: plain kill(2) of a leftover test process.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// `kill -9` of `run`: workers and trainers are gone within seconds.
#[test]
fn sigkilled_run_leaves_no_workers_or_trainers() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(dir.path());
    let trainers = run.trainers();
    let workers = run.workers();
    assert_eq!(workers.len(), 2, "{workers:?}\n{}", run.log());
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let all: Vec<u32> = workers.iter().chain(&trainers).copied().collect();
    let left = survivors(&all, Duration::from_secs(10));
    kill_all(&left);
    assert!(
        left.is_empty(),
        "alive after kill -9 of run: {left:?} (workers {workers:?}, trainers {trainers:?})"
    );
}

/// SIGTERM to `run`: the workers drain (trainers checkpoint and exit), `run` exits non-zero naming
/// the signal, and nothing is left.
#[test]
fn sigtermed_run_drains_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = Run::start(dir.path());
    let trainers = run.trainers();
    let workers = run.workers();
    assert_eq!(workers.len(), 2, "{workers:?}\n{}", run.log());
    // SAFETY: plain kill(2) of our child.
    unsafe {
        libc::kill(run.child.id() as libc::pid_t, libc::SIGTERM);
    }
    let mut status = None;
    let _ = wait_until(Duration::from_secs(90), || {
        status = run.child.try_wait().unwrap();
        status.is_some()
    });
    let all: Vec<u32> = workers.iter().chain(&trainers).copied().collect();
    let left = survivors(&all, Duration::from_secs(5));
    kill_all(&left);
    let log = run.log();
    let status = status.unwrap_or_else(|| panic!("run did not exit after SIGTERM\n{log}"));
    assert!(left.is_empty(), "alive after run exited: {left:?}\n{log}");
    assert!(!status.success(), "{log}");
    assert!(log.contains("stopped by SIGTERM"), "{log}");
    assert!(
        log.contains("draining"),
        "the workers did not drain:\n{log}"
    );
}

/// A smoke job `name` of `steps` steps run by `xvlm-coord run` in `dir` with the state dir
/// `dir/state`; stdout to `dir/name.out`, stderr to `dir/name.log`.
fn start_smoke(dir: &Path, name: &str, steps: u32, state: &str) -> Run {
    let job = write(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "name: {name}\ntask: smoke\nsteps: {steps}\nworkers: {{min: 1}}\nmax_restarts: 0\n\
             smoke: {{step_delay_ms: 10}}\n"
        ),
    );
    let file = |ext: &str| std::fs::File::create(dir.join(format!("{name}.{ext}"))).unwrap();
    let child = Command::new(bin("xvlm-coord"))
        .arg("run")
        .arg(&job)
        .args(["--local-workers", "1", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.join(state))
        .arg("--storage")
        .arg(format!(
            "file://{}",
            dir.join(format!("runs-{name}")).display()
        ))
        .env("XVLM_WORKER_BIN", bin("xvlm-worker"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file("out"))
        .stderr(file("log"))
        .spawn()
        .unwrap();
    Run {
        child,
        dir: dir.to_path_buf(),
    }
}

/// Waits for `run` (job `name`) to exit: whether it succeeded, its last stdout line, its log.
fn ended(run: &mut Run, name: &str) -> (bool, String, String) {
    let mut status = None;
    let _ = wait_until(Duration::from_secs(120), || {
        status = run.child.try_wait().unwrap();
        status.is_some()
    });
    let read = |ext: &str| std::fs::read_to_string(run.dir.join(format!("{name}.{ext}"))).unwrap();
    let (out, log) = (read("out"), read("log"));
    let status = status.unwrap_or_else(|| panic!("{name}: run did not end\n{log}"));
    let last = out.lines().last().unwrap_or_default().to_string();
    (status.success(), last, log)
}

/// Two `run`s started together in one folder (their own state dirs) each train their own job: both
/// first jobs are job-0001, and workers sharing one work dir would start each other's trainers.
#[test]
fn two_runs_in_one_folder_keep_their_jobs_apart() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs = [("short", 200u32), ("long", 300)].map(|(name, steps)| {
        (
            name,
            steps,
            start_smoke(dir.path(), name, steps, &format!("state-{name}")),
        )
    });
    for (name, steps, run) in &mut runs {
        let (success, last, log) = ended(run, name);
        assert!(success, "{name}: {last}\n{log}");
        assert!(
            last.contains("SUCCEEDED") && last.contains(&format!("step={steps}/{steps}")),
            "{name}: ended with {last:?}, not its own {steps} steps"
        );
    }
}

/// Two `run`s on one state dir: one trains, the other is refused with an error naming the state dir
/// and its locked job store (not a retry loop against a coordinator that never came up).
#[test]
fn a_second_run_on_a_state_dir_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut runs =
        ["first", "second"].map(|name| (name, start_smoke(dir.path(), name, 500, "state")));
    let outcomes: Vec<_> = runs
        .iter_mut()
        .map(|(name, run)| ended(run, name))
        .collect();
    let trained = outcomes
        .iter()
        .filter(|(ok, last, _)| *ok && last.contains("step=500/500"));
    assert_eq!(trained.count(), 1, "{outcomes:?}");
    let (_, _, refused) = outcomes.iter().find(|(ok, _, _)| !ok).expect("one refused");
    assert!(
        refused.contains("the coordinator of this run stopped (state dir")
            && refused.contains("jobs.redb"),
        "{refused}"
    );
}
