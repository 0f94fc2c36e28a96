//! Deployments as shipped (deploy/ and configs/):
//! - Slurm: `sbatch deploy/slurm/xvlm-workers.sbatch` on a single-node Slurm (munged, slurmctld,
//!   slurmd started here) starts a worker that registers with a coordinator and trains; the
//!   `--signal=B:SIGTERM` delivery (`scancel --batch --signal=TERM`) drains it: its trainer commits a
//!   checkpoint and exits 75, the daemon leaves, the Slurm job completes and the xvlm job re-forms on
//!   the remaining worker, resumes from that checkpoint and succeeds.
//! - Kubernetes: every manifest validates against the Kubernetes schemas (offline, strict), and what
//!   the manifests reference (Secrets, the ConfigMap, the PVC, mounted paths) is shipped with them.
//! - The Containerfile copies only from its own stages and from paths the repository has.
//! - Every file in configs/ and configs/jobs/ is either run for a few steps on data made here (tiny,
//!   demo and smoke jobs) or parsed and validated (cluster-size jobs and task configs), and a file
//!   neither path covers fails the test.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use xvlm_e2e::checkpoints::{committed_checkpoints, gen_logs, last_line, resumed_step, step_after};
use xvlm_e2e::{bin, die_with_test, output_within, text, tool, tools_python, wait_until, Cluster};
use xvlm_model::config::{TaskConfig, TextConfig};
use xvlm_model::data::synth::{generate, SynthConfig};

/// The repository root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// A free loopback TCP port (closed again, so a daemon can bind it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `user`'s uid and gid from /etc/passwd.
fn passwd_ids(user: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&user) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))?
        })
        .unwrap_or_else(|| {
            panic!("no user {user}: run scripts/setup.sh as root (it installs munge)")
        })
}

// ----------------------------------------------------------------------------------------------
// Slurm

/// A single-node Slurm under `dir`: munged on a private socket (so a system munged is neither needed
/// nor disturbed), slurmctld and slurmd as node `localhost` (BUILD-NOTES §8) on free ports. Dropping it
/// cancels every job and stops the daemons, panics included.
struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    /// munged, slurmctld, slurmd: stopped in reverse order.
    daemons: Vec<(&'static str, Child)>,
}

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        let munge_dir = dir.join("munge");
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).expect("slurm dirs");
        }
        std::fs::create_dir_all(&munge_dir).expect("munge dir");
        let mut slurm = Slurm {
            dir: dir.to_path_buf(),
            conf: dir.join("slurm.conf"),
            daemons: Vec::new(),
        };
        slurm.start_munged(&munge_dir);
        std::fs::write(&slurm.conf, slurm_conf(dir, &munge_dir.join("socket")))
            .expect("slurm.conf");
        let ctld = slurm.daemon("slurmctld", &[]);
        slurm.daemons.push(("slurmctld", ctld));
        let slurmd = slurm.daemon("slurmd", &["-N", "localhost"]);
        slurm.daemons.push(("slurmd", slurmd));
        wait_until(Duration::from_secs(30), || {
            text(&slurm.run("sinfo", &["-h", "-o", "%t"]).stdout).contains("idle")
        })
        .unwrap_or_else(|| panic!("the Slurm node did not become idle:\n{}", slurm.logs()));
        slurm
    }

    /// munged runs as `munge` (it owns /etc/munge/munge.key) in the foreground, its socket under
    /// `dir`, which every user must be able to traverse.
    fn start_munged(&mut self, dir: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let (uid, gid) = passwd_ids("munge");
        for (path, mode) in [(self.dir.as_path(), 0o755), (dir, 0o711)] {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown munge dir");
        let mut cmd = Command::new(tool("munged", "munge"));
        cmd.arg("--foreground")
            .arg(format!("--socket={}", dir.join("socket").display()))
            .arg(format!("--pid-file={}", dir.join("munged.pid").display()))
            .arg(format!("--log-file={}", dir.join("munged.log").display()))
            .arg(format!("--seed-file={}", dir.join("munged.seed").display()))
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let munged = die_with_test(&mut cmd).spawn().expect("start munged");
        self.daemons.push(("munged", munged));
        wait_until(Duration::from_secs(10), || dir.join("socket").exists())
            .unwrap_or_else(|| panic!("munged did not start:\n{}", self.logs()));
    }

    fn daemon(&self, name: &'static str, args: &[&str]) -> Child {
        let out = std::fs::File::create(self.dir.join(format!("{name}.out"))).expect("daemon log");
        let mut cmd = Command::new(tool(name, "slurm-wlm"));
        cmd.arg("-D")
            .arg("-f")
            .arg(&self.conf)
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out);
        die_with_test(&mut cmd)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"))
    }

    /// A Slurm client command against this cluster.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(tool(program, "slurm-wlm"));
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        output_within(self.command(program).args(args), Duration::from_secs(30))
    }

    /// `JobState` of a Slurm job (`scontrol show job`, kept for MinJobAge after it ends).
    fn job_state(&self, id: &str) -> String {
        let out = self.run("scontrol", &["show", "job", "-o", id]);
        text(&out.stdout)
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("JobState="))
            .unwrap_or("UNKNOWN")
            .to_string()
    }

    fn logs(&self) -> String {
        [
            "slurmctld.log",
            "slurmd.log",
            "slurmctld.out",
            "slurmd.out",
            "munge/munged.log",
        ]
        .iter()
        .map(|name| {
            let log = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            format!(
                "--- {name}\n{}",
                lines[lines.len().saturating_sub(15)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Job steps run under slurmstepd, not under this process: cancel them before the daemons go.
        let _ = self.run("scancel", &["--user=root", "--full", "--signal=KILL"]);
        let _ = self.run("scancel", &["--user=root"]);
        wait_until(Duration::from_secs(15), || {
            text(&self.run("squeue", &["-h"]).stdout).trim().is_empty()
        });
        while let Some((_, mut daemon)) = self.daemons.pop() {
            // SAFETY: kill(2) of a child this test started.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            if wait_until(Duration::from_secs(5), || {
                daemon.try_wait().ok().flatten().is_some()
            })
            .is_none()
            {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
    }
}

/// slurm.conf of a one-node cluster on free ports. KillWait is Slurm's default, written out because
/// it is what a drain has once a job is cancelled outright (the script's comment says so).
fn slurm_conf(dir: &Path, munge_socket: &Path) -> String {
    let d = dir.display();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!(
        "ClusterName=xvlmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=30
SlurmctldPort={ctld}
SlurmdPort={slurmd}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
",
        socket = munge_socket.display(),
        ctld = free_port(),
        slurmd = free_port(),
    )
}

/// A smoke job that runs long enough to be drained, takes one or two workers and has no periodic
/// checkpoints (so the drain's is the only one) and no restarts to spare (a drain is not a failure).
const DRAIN_JOB: &str = "name: slurm-drain\ntask: smoke\nsteps: 200\nseed: 3\n\
workers: {min: 1, max: 2}\nmax_restarts: 0\ncheckpoint: {every_steps: 0, keep_last: 3}\n\
smoke: {step_delay_ms: 50}\n";

/// The trainer logs of `job`'s generation `g` under a worker's work directory.
fn trainer_logs(work: &Path, job: &str, g: u64) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(work.join(job).join(format!("g{g}")))
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    logs.retain(|p| p.extension().is_some_and(|e| e == "log"));
    logs.sort();
    logs.iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// The shipped sbatch script starts a worker per node; Slurm's batch-shell SIGTERM drains it through
/// the preemption path and the job re-forms on the other worker.
#[test]
fn slurm_sbatch_worker_trains_and_drains_on_sigterm() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let slurm = Slurm::start(&dir.path().join("slurm"));
    let mut c = Cluster::start(dir.path());
    c.add_worker("w0", 1);

    let work_root = dir.path().join("slurm-work");
    let script = repo().join("deploy/slurm/xvlm-workers.sbatch");
    let output = dir.path().join("slurm-%j.out");
    // Only what a CPU-only test node lacks is overridden on the command line (GPUs, 64 CPUs, the
    // output file); the rest is the script's own #SBATCH header.
    let sbatch = output_within(
        slurm
            .command("sbatch")
            .arg("--parsable")
            .arg("--gpus-per-node=0")
            .arg("--cpus-per-task=1")
            .arg(format!("--output={}", output.display()))
            .arg(format!("--chdir={}", dir.path().display()))
            .arg(&script)
            .env("XVLM_COORDINATOR", &c.url)
            .env("XVLM_WORKER", bin("xvlm-worker"))
            .env("XVLM_WORK_ROOT", &work_root)
            .env("XVLM_WORKER_ARGS", "--devices cpu --cpu-slots 1")
            .env("RUST_LOG", "info"),
        Duration::from_secs(30),
    );
    assert!(sbatch.status.success(), "sbatch: {}", text(&sbatch.stderr));
    let slurm_job = text(&sbatch.stdout).trim().to_string();
    let worker_log = dir.path().join(format!("slurm-{slurm_job}.out"));
    let read_log = || std::fs::read_to_string(&worker_log).unwrap_or_default();
    wait_until(Duration::from_secs(30), || {
        read_log().contains("registered")
    })
    .unwrap_or_else(|| {
        panic!(
            "the Slurm worker did not register (job {slurm_job} {}):\n{}\n{}",
            slurm.job_state(&slurm_job),
            read_log(),
            slurm.logs()
        )
    });

    let job = c.submit_yaml(DRAIN_JOB);
    let slurm_work = work_root.join("localhost");
    wait_until(Duration::from_secs(40), || {
        c.step(&job) >= 10 && !trainer_logs(&slurm_work, &job, 1).is_empty()
    })
    .unwrap_or_else(|| {
        panic!(
            "the job did not train on both workers:\n{}\n{}",
            c.logs(),
            read_log()
        )
    });

    // What `--signal=B:SIGTERM@120` does before the time limit: SIGTERM to the batch shell only.
    let scancel = slurm.run("scancel", &["--batch", "--signal=TERM", &slurm_job]);
    assert!(
        scancel.status.success(),
        "scancel: {}",
        text(&scancel.stderr)
    );
    wait_until(Duration::from_secs(60), || {
        !matches!(
            slurm.job_state(&slurm_job).as_str(),
            "RUNNING" | "COMPLETING"
        )
    })
    .unwrap_or_else(|| panic!("the Slurm job did not end after SIGTERM:\n{}", read_log()));
    let log = read_log();
    assert_eq!(
        slurm.job_state(&slurm_job),
        "COMPLETED",
        "a drained worker ends its allocation cleanly:\n{log}"
    );
    for expected in [
        "SIGTERM: draining every worker",
        "draining: trainers checkpoint",
        "drain complete",
    ] {
        assert!(
            log.contains(expected),
            "no {expected:?} in the Slurm output:\n{log}"
        );
    }
    let trainer_exit = log
        .lines()
        .find(|l| l.contains("trainer exited"))
        .unwrap_or_else(|| panic!("no trainer exit in the Slurm output:\n{log}"));
    assert!(
        trainer_exit.contains("\"code\":75"),
        "the trainer did not leave through the preemption exit (75): {trainer_exit}\n{log}\n{}",
        c.logs()
    );
    let g1 = trainer_logs(&slurm_work, &job, 1);
    let saved = step_after(&g1, "preempted: checkpoint step-")
        .unwrap_or_else(|| panic!("the drained trainer did not checkpoint:\n{g1}"));

    // The job re-forms as its spec says (min 1): generation 2 on w0 alone, from the drain's checkpoint.
    let watch = c.watch_succeeded(&job);
    let last = last_line(&watch);
    assert!(
        last.contains("SUCCEEDED") && last.contains("gen=2") && last.contains("world=1"),
        "expected success in generation 2 at world 1: {last}\n{watch}"
    );
    assert_eq!(
        committed_checkpoints(&dir.path().join("runs").join(&job)),
        vec![saved]
    );
    let g2 = gen_logs(dir.path(), &["w0"], &job, 2);
    assert_eq!(
        resumed_step(&g2),
        Some(saved),
        "generation 2 did not resume the drain:\n{g2}"
    );
    println!(
        "slurm: drain committed step-{saved}, generation 2 resumed it; {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ----------------------------------------------------------------------------------------------
// Kubernetes and the Containerfile

/// The shipped manifests.
fn k8s_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/k8s"))
        .expect("deploy/k8s")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/k8s");
    files
}

/// Every document of `files`, as JSON (PyYAML from `.venv-tools`, which kubernetes-validate uses).
fn k8s_documents(files: &[PathBuf]) -> Vec<serde_json::Value> {
    let out = output_within(
        Command::new(tools_python())
            .arg("-c")
            .arg(
                "import json, sys, yaml\n\
                 print(json.dumps([d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]))",
            )
            .args(files),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "reading the manifests: {}",
        text(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).expect("manifests as JSON")
}

/// The Kubernetes version whose schemas the manifests are checked against (one kubernetes-validate
/// ships; the README says which).
const K8S_VERSION: &str = "1.33.0";

/// Every manifest validates strictly against the Kubernetes schemas, offline.
#[test]
fn kubernetes_manifests_validate_against_the_schemas() {
    let files = k8s_files();
    let out = output_within(
        Command::new(tool(
            "kubernetes-validate",
            "kubernetes-validate (PyPI, in .venv-tools)",
        ))
        .args(["--strict", "--kubernetes-version", K8S_VERSION])
        .args(&files),
        Duration::from_secs(60),
    );
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    let passed = report.lines().filter(|l| l.contains(" passed ")).count();
    let documents = k8s_documents(&files).len();
    assert_eq!(
        passed, documents,
        "not every document was validated:\n{report}"
    );
}

/// Names a document of `kind` must exist for, collected from the pod specs.
struct References {
    secrets: BTreeSet<String>,
    config_maps: BTreeSet<String>,
    claims: BTreeSet<String>,
}

fn collect_references(value: &serde_json::Value, refs: &mut References) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                let name = v.get("name").and_then(|n| n.as_str()).map(str::to_string);
                match key.as_str() {
                    "secretKeyRef" => refs.secrets.extend(name),
                    "configMapRef" | "configMapKeyRef" => refs.config_maps.extend(name),
                    "secret" => refs.secrets.extend(
                        v.get("secretName")
                            .and_then(|n| n.as_str())
                            .map(str::to_string),
                    ),
                    "persistentVolumeClaim" => refs.claims.extend(
                        v.get("claimName")
                            .and_then(|n| n.as_str())
                            .map(str::to_string),
                    ),
                    _ => {}
                }
                collect_references(v, refs);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_references(v, refs)),
        _ => {}
    }
}

/// The containers of a workload document.
fn containers(doc: &serde_json::Value) -> Vec<&serde_json::Value> {
    doc.pointer("/spec/template/spec/containers")
        .and_then(|c| c.as_array())
        .map(|c| c.iter().collect())
        .unwrap_or_default()
}

/// The manifests hold every piece a cluster needs, and what they reference is shipped with them: each
/// Secret, ConfigMap and claim a pod names exists, the workers request GPUs, and every file path the
/// ConfigMap gives a container is under one of that container's mounts.
#[test]
fn kubernetes_manifests_ship_what_they_reference() {
    let docs = k8s_documents(&k8s_files());
    let kind_of = |d: &serde_json::Value| d["kind"].as_str().unwrap_or_default().to_string();
    let names = |kind: &str| -> BTreeSet<String> {
        docs.iter()
            .filter(|d| kind_of(d) == kind)
            .filter_map(|d| d.pointer("/metadata/name")?.as_str().map(str::to_string))
            .collect()
    };
    for kind in [
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
        "ConfigMap",
    ] {
        assert!(!names(kind).is_empty(), "no {kind} in deploy/k8s");
    }
    let workers: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| matches!(kind_of(d).as_str(), "DaemonSet" | "StatefulSet"))
        .collect();
    assert!(!workers.is_empty(), "no worker DaemonSet or StatefulSet");
    for w in &workers {
        for c in containers(w) {
            assert!(
                c.pointer("/resources/requests/nvidia.com~1gpu").is_some()
                    && c.pointer("/resources/limits/nvidia.com~1gpu").is_some(),
                "worker container without nvidia.com/gpu requests and limits: {c}"
            );
        }
    }

    let mut refs = References {
        secrets: BTreeSet::new(),
        config_maps: BTreeSet::new(),
        claims: BTreeSet::new(),
    };
    docs.iter().for_each(|d| collect_references(d, &mut refs));
    for (what, wanted, shipped) in [
        ("Secret", &refs.secrets, names("Secret")),
        ("ConfigMap", &refs.config_maps, names("ConfigMap")),
        (
            "PersistentVolumeClaim",
            &refs.claims,
            names("PersistentVolumeClaim"),
        ),
    ] {
        let missing: Vec<&String> = wanted.difference(&shipped).collect();
        assert!(
            missing.is_empty(),
            "referenced but not shipped: {what} {missing:?}"
        );
    }

    // A setting that names a file (`/...`) must point into a mount of each container that reads it.
    for doc in &docs {
        for c in containers(doc) {
            let mounts: Vec<&str> = c["volumeMounts"]
                .as_array()
                .map(|m| m.iter().filter_map(|m| m["mountPath"].as_str()).collect())
                .unwrap_or_default();
            let from_maps: Vec<&str> = c["envFrom"]
                .as_array()
                .map(|e| {
                    e.iter()
                        .filter_map(|e| e.pointer("/configMapRef/name")?.as_str())
                        .collect()
                })
                .unwrap_or_default();
            for map in docs
                .iter()
                .filter(|d| kind_of(d) == "ConfigMap")
                .filter(|d| {
                    from_maps.contains(
                        &d.pointer("/metadata/name")
                            .and_then(|n| n.as_str())
                            .unwrap_or_default(),
                    )
                })
            {
                for (key, value) in map["data"].as_object().into_iter().flatten() {
                    let Some(path) = value.as_str().filter(|v| v.starts_with("/etc/")) else {
                        continue;
                    };
                    if !reads_setting(c, key) {
                        continue;
                    }
                    assert!(
                        mounts.iter().any(|m| path.starts_with(&format!("{m}/"))),
                        "{key}={path} is not under a mount of container {} ({mounts:?})",
                        c["name"]
                    );
                }
            }
        }
    }
}

/// Whether a container's program reads this environment setting: the coordinator the server's, a
/// worker the worker's (both get the whole ConfigMap).
fn reads_setting(container: &serde_json::Value, key: &str) -> bool {
    let program = container["command"][0].as_str().unwrap_or_default();
    let worker_keys = [
        "XVLM_TLS_CA",
        "XVLM_WORKER_TLS_CERT",
        "XVLM_WORKER_TLS_KEY",
        "XVLM_WORKER_TOKEN_FILE",
    ];
    match program {
        "xvlm-worker" => worker_keys.contains(&key),
        _ => !key.starts_with("XVLM_WORKER_TLS") && key != "XVLM_TLS_CA",
    }
}

/// The Containerfile copies only from earlier stages, and every repository path it copies exists.
#[test]
fn containerfile_copies_from_its_stages_and_existing_paths() {
    let file = repo().join("deploy/Containerfile");
    let text = std::fs::read_to_string(&file).expect("deploy/Containerfile");
    // Continuation lines joined, comments dropped: one instruction per entry.
    let instructions: Vec<String> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let mut stages: Vec<String> = Vec::new();
    let mut copies = 0;
    for line in &instructions {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().map(|w| w.to_ascii_uppercase()).as_deref() {
            Some("FROM") => {
                let stage = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .and_then(|i| words.get(i + 1))
                    .unwrap_or_else(|| panic!("unnamed stage: {line}"));
                stages.push(stage.to_string());
            }
            Some("COPY") => {
                copies += 1;
                let (flags, paths): (Vec<&str>, Vec<&str>) = words[1..]
                    .iter()
                    .copied()
                    .partition(|w| w.starts_with("--"));
                let from = flags.iter().find_map(|f| f.strip_prefix("--from="));
                let sources = &paths[..paths.len().saturating_sub(1)];
                assert!(!sources.is_empty(), "COPY without a source: {line}");
                match from {
                    Some(stage) => assert!(
                        stages.iter().any(|s| s == stage),
                        "COPY --from={stage} names no earlier stage ({stages:?}): {line}"
                    ),
                    None => {
                        for source in sources {
                            assert!(
                                repo().join(source).exists(),
                                "COPY of {source}, which the repository lacks: {line}"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    assert!(
        stages.len() >= 2,
        "expected a build stage and a runtime stage: {stages:?}"
    );
    assert!(copies > 0, "no COPY instructions");
    assert!(
        instructions.iter().any(|l| l.starts_with("ENTRYPOINT [")),
        "the entrypoint must be exec form (the binary is PID 1 and gets SIGTERM)"
    );
    // The build compiles every workspace member the COPY lines bring, i.e. the workspace builds.
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("workspace members");
    for member in members.trim_matches(|c| c == '[' || c == ']').split(',') {
        let member = member.trim().trim_matches('"');
        assert!(
            instructions
                .iter()
                .any(|l| l.starts_with(&format!("COPY {member} "))),
            "the Containerfile does not copy workspace member {member}"
        );
    }
}

// ----------------------------------------------------------------------------------------------
// configs/ and configs/jobs/

/// How the test covers a shipped config file.
#[derive(Debug)]
enum Coverage {
    /// A job file (shipped, or written for a task config no job names) run for a few steps.
    Run { job: PathBuf },
    /// A job parsed and validated by `submit` (with its task config loaded and checked).
    Validate { job: PathBuf },
    /// A task config run or validated through a shipped job that names it.
    ThroughJob(PathBuf),
    /// A model JSON, parsed (and validated as a text config when it is one).
    Json,
}

/// The task a task config's file name belongs to; `None` (a new family) fails the test.
fn task_of(file_name: &str) -> Option<&'static str> {
    [
        ("Pretrain_", "pretrain"),
        ("Retrieval_", "retrieval"),
        ("VQA", "vqa"),
        ("NLVR_pretrain", "nlvr_pretrain"),
        ("NLVR", "nlvr"),
        ("Grounding_bbox_pretrain", "grounding_bbox_pretrain"),
        ("Grounding_bbox", "grounding_bbox"),
        ("Grounding", "grounding"),
    ]
    .iter()
    .find(|(prefix, _)| file_name.starts_with(prefix))
    .map(|(_, task)| *task)
}

/// A job needs a cluster when it names NCCL, several devices per worker or remote storage.
fn needs_cluster(job_yaml: &str) -> bool {
    let job: serde_yaml::Value = serde_yaml::from_str(job_yaml).expect("job YAML");
    let nccl = job["backend"].as_str() == Some("nccl");
    let devices = job["workers"]["devices_per_worker"].as_u64().unwrap_or(1);
    nccl || devices > 2 || job_yaml.contains("s3://") || job_yaml.contains("hdfs://")
}

/// The `config:` of a job file, resolved against its folder.
fn job_config(job: &Path) -> Option<PathBuf> {
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(job).expect("job file")).expect("job YAML");
    let config = yaml["config"].as_str()?;
    let dir = job.parent().expect("job folder");
    Some(
        std::fs::canonicalize(dir.join(config))
            .unwrap_or_else(|e| panic!("{}: config {config}: {e}", job.display())),
    )
}

/// Every file of configs/ and configs/jobs/ with how it is covered; job files for task configs no
/// shipped job names are written under `scratch`. Panics on a file no path covers.
fn coverage(scratch: &Path) -> Vec<(PathBuf, Coverage)> {
    let configs = std::fs::canonicalize(repo().join("configs")).expect("configs/");
    let list = |dir: &Path| -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("config folder")
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    };
    let mut out = Vec::new();
    let mut named_by_jobs: Vec<(PathBuf, PathBuf)> = Vec::new();
    for job in list(&configs.join("jobs")) {
        match job.extension().and_then(|e| e.to_str()) {
            Some("md") => continue,
            Some("yaml") => {}
            _ => panic!("{}: neither a job YAML nor documentation", job.display()),
        }
        let yaml = std::fs::read_to_string(&job).expect("job file");
        if let Some(config) = job_config(&job) {
            named_by_jobs.push((config, job.clone()));
        }
        let how = if needs_cluster(&yaml) {
            Coverage::Validate { job: job.clone() }
        } else {
            Coverage::Run { job: job.clone() }
        };
        out.push((job, how));
    }
    for file in list(&configs) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let how = match file.extension().and_then(|e| e.to_str()) {
            Some("json") => Coverage::Json,
            Some("yaml") => match named_by_jobs.iter().find(|(config, _)| *config == file) {
                Some((_, job)) => Coverage::ThroughJob(job.clone()),
                None => {
                    let task = task_of(&name).unwrap_or_else(|| {
                        panic!("{name}: no job names it and its task is unknown: add a job or a task prefix")
                    });
                    let job = scratch.join(format!("job-{name}"));
                    let spec = format!(
                        "name: {}\ntask: {task}\nconfig: {}\n",
                        name.trim_end_matches(".yaml")
                            .replace('_', "-")
                            .to_lowercase(),
                        file.display()
                    );
                    std::fs::write(&job, spec).expect("write job");
                    // Tiny and demo configs run on the synthetic corpus; the others are cluster-size.
                    if name.contains("tiny") || name.contains("demo") {
                        Coverage::Run { job }
                    } else {
                        Coverage::Validate { job }
                    }
                }
            },
            _ => panic!("{}: neither a task YAML nor a model JSON", file.display()),
        };
        out.push((file, how));
    }
    out
}

/// Settings a run needs on this CPU machine: a few steps, one worker.
const RUN_SETTINGS: [&str; 6] = [
    "--set",
    "steps=2",
    "--set",
    "workers.min=1",
    "--set",
    "workers.max=1",
];

/// Every shipped config is covered, and every parse-and-validate one validates: task configs load with
/// no unknown keys and their model JSONs resolve, model JSONs parse, and cluster-size jobs pass
/// `submit`'s checks (then are cancelled: nothing here can run them).
#[test]
fn every_shipped_config_is_covered_and_the_cluster_ones_validate() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = coverage(dir.path());
    // The cluster jobs' S3 locations: a moto server stands in (the coordinator inherits its
    // `AWS_*` settings), holding their buckets and a shard where `data.shards` points.
    let moto = xvlm_e2e::start_moto_for_children();
    for (path, body) in [
        ("/bucket", ""),
        ("/my-bucket", ""),
        ("/bucket/data/4m/shard-00000.tar", "{}"),
    ] {
        let put = format!(
            "PUT {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            moto.addr,
            body.len()
        );
        let reply = xvlm_e2e::http(&moto.addr, &put).expect("moto");
        assert!(reply.starts_with("HTTP/1.1 200"), "PUT {path}: {reply}");
    }
    let c = Cluster::start(dir.path());
    let configs = std::fs::canonicalize(repo().join("configs")).expect("configs/");
    for (file, how) in &plan {
        // Task configs sit in configs/ itself; job files in configs/jobs/.
        let task_config = file.parent() == Some(configs.as_path())
            && file.extension().is_some_and(|e| e == "yaml");
        if task_config {
            check_task_config(file);
        }
        match how {
            Coverage::Json => check_model_json(file),
            Coverage::ThroughJob(job) => assert!(job.is_file(), "{}", job.display()),
            Coverage::Run { .. } => {}
            Coverage::Validate { job } => {
                if let Some(config) = job_config(job) {
                    check_task_config(&config);
                }
                let id = c.submit(job);
                let cancel = c.cli(&["cancel", &id]);
                assert!(
                    cancel.status.success(),
                    "cancel {id}: {}",
                    text(&cancel.stderr)
                );
            }
        }
    }
    let runs = plan
        .iter()
        .filter(|(_, h)| matches!(h, Coverage::Run { .. }))
        .count();
    let validated = plan
        .iter()
        .filter(|(_, h)| matches!(h, Coverage::Validate { .. }))
        .count();
    println!(
        "configs: {} files, {runs} run (next test), {validated} validated by submit; {:.1} s",
        plan.len(),
        started.elapsed().as_secs_f64()
    );
}

fn check_task_config(path: &Path) {
    let cfg = TaskConfig::load(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        cfg.unknown_keys().is_empty(),
        "{}: unknown keys {:?}",
        path.display(),
        cfg.unknown_keys()
    );
    cfg.load_text_config()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let vision = cfg
        .vision_config_path()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        vision.exists(),
        "{}: vision config {} is missing",
        path.display(),
        vision.display()
    );
}

fn check_model_json(path: &Path) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read JSON"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(json.is_object(), "{}: not a JSON object", path.display());
    if json.get("vocab_size").is_some() {
        TextConfig::load(path).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Every tiny, demo and smoke job runs for a few steps, as shipped, to SUCCEEDED: `xvlm-coord run`
/// with one local worker from a folder holding the corpus `xvlm synth-data --out demo-out/data` writes,
/// which the configs name (the demo's settings, fewer images).
#[test]
fn tiny_demo_and_smoke_jobs_run_a_few_steps() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = coverage(dir.path());
    generate(
        &dir.path().join("demo-out/data"),
        &SynthConfig {
            images: 60,
            shards: 2,
            shape_side: (0.6, 0.95),
            background: (225, 225),
            ..SynthConfig::default()
        },
    )
    .expect("synthetic corpus");
    let mut times = Vec::new();
    for (i, job) in plan
        .iter()
        .filter_map(|(_, how)| match how {
            Coverage::Run { job } => Some(job),
            _ => None,
        })
        .enumerate()
    {
        let t = Instant::now();
        let out = output_within(
            Command::new(bin("xvlm-coord"))
                .current_dir(dir.path())
                .arg("run")
                .arg(job)
                .args(["--local-workers", "1", "--listen", "127.0.0.1:0"])
                .arg("--state-dir")
                .arg(dir.path().join(format!("state-{i}")))
                .arg("--storage")
                .arg(format!(
                    "file://{}",
                    dir.path().join(format!("runs-{i}")).display()
                ))
                .args(RUN_SETTINGS),
            Duration::from_secs(180),
        );
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && last_line(&stdout).contains("SUCCEEDED"),
            "{} did not run as shipped:\n{stdout}\n{}",
            job.display(),
            text(&out.stderr)
        );
        times.push(format!(
            "{} {:.1}s",
            job.file_name().and_then(|n| n.to_str()).unwrap_or_default(),
            t.elapsed().as_secs_f64()
        ));
    }
    assert!(!times.is_empty(), "no job ran");
    println!(
        "ran {} jobs in {:.1} s: {}",
        times.len(),
        started.elapsed().as_secs_f64(),
        times.join(", ")
    );
}
