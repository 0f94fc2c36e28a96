//! Helpers for the end-to-end tests in `tests/tests/`: build and locate the real binaries, start a
//! coordinator and workers on loopback with free ports and temporary directories, run CLI commands.

pub mod checkpoints;
pub mod fault_proxy;
pub mod netns;
pub mod stall;
pub mod tiny_pretrain;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The workspace's target profile directory (`target/debug`), found from the test executable
/// (`target/debug/deps/<test>`), which is where both cargo test and nextest put it.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf()
}

static BUILT: OnceLock<()> = OnceLock::new();

/// Path of a workspace binary, built once per test process with `cargo build` (a no-op when fresh), so
/// the tests never run stale binaries. `XVLM_E2E_NO_BUILD=1` skips the build.
pub fn bin(name: &str) -> PathBuf {
    BUILT.get_or_init(|| {
        if std::env::var_os("XVLM_E2E_NO_BUILD").is_some() {
            return;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile_dir = target_dir();
        let target = profile_dir.parent().expect("target dir");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let status = Command::new(cargo)
            .current_dir(workspace)
            .args([
                "build",
                "-p",
                "xvlm-coord",
                "-p",
                "xvlm-worker",
                "--target-dir",
            ])
            .arg(target)
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of xvlm-coord and xvlm-worker failed"
        );
    });
    let path = target_dir().join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// Makes a spawned server die with the test thread that started it, even if the test process is killed.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A child process killed when dropped; stderr goes to a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its stderr log.
    pub log: PathBuf,
}

impl Proc {
    /// The last `n` lines of its log, for assertion messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator on a free loopback port with its state and storage under `dir`.
pub struct Cluster {
    /// The coordinator.
    pub coord: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Workers started with [`Cluster::add_worker`].
    pub workers: Vec<Proc>,
    /// The test's directory.
    pub dir: PathBuf,
    /// Environment of [`Cluster::cli`] commands (a TLS CA, a user token).
    pub client_env: Vec<(String, String)>,
}

impl Cluster {
    /// Starts `xvlm-coord serve --listen 127.0.0.1:0` and reads the bound address it prints.
    pub fn start(dir: &Path) -> Cluster {
        let (coord, url) = start_coordinator(dir);
        Cluster {
            coord,
            url,
            workers: Vec::new(),
            dir: dir.to_path_buf(),
            client_env: Vec::new(),
        }
    }

    /// A cluster around a coordinator started otherwise (other flags, another address).
    pub fn around(dir: &Path, (coord, url): (Proc, String)) -> Cluster {
        Cluster {
            coord,
            url,
            workers: Vec::new(),
            dir: dir.to_path_buf(),
            client_env: Vec::new(),
        }
    }

    /// [`Cluster::start`] plus one worker with one CPU slot per name.
    pub fn with_workers(dir: &Path, names: &[&str]) -> Cluster {
        let mut c = Cluster::start(dir);
        for name in names {
            c.add_worker(name, 1);
        }
        c
    }

    /// Starts a worker with `slots` CPU slots and waits until the coordinator can see it (a job
    /// needing it would otherwise be refused as unsatisfiable).
    pub fn add_worker(&mut self, name: &str, slots: u32) {
        self.add_worker_with_env(name, slots, &[]);
    }

    /// [`Cluster::add_worker`] with extra environment variables (inherited by its trainers, e.g. the
    /// `XVLM_TEST_*` hooks).
    pub fn add_worker_with_env(&mut self, name: &str, slots: u32, env: &[(&str, &str)]) {
        self.add_worker_via(name, slots, env, &[], &[]);
    }

    /// [`Cluster::add_worker_with_env`] run through `prefix` (e.g. `ip netns exec HOST`, a simulated
    /// host of [`netns::Net`]) with extra worker flags (e.g. `--host`).
    pub fn add_worker_via(
        &mut self,
        name: &str,
        slots: u32,
        env: &[(&str, &str)],
        prefix: &[String],
        flags: &[&str],
    ) {
        let url = self.url.clone();
        self.add_worker_through(&url, name, slots, env, prefix, flags);
    }

    /// [`Cluster::add_worker_via`] with the coordinator reached at `coordinator` (e.g. a proxy in
    /// front of it) instead of [`Cluster::url`].
    pub fn add_worker_through(
        &mut self,
        coordinator: &str,
        name: &str,
        slots: u32,
        env: &[(&str, &str)],
        prefix: &[String],
        flags: &[&str],
    ) {
        let log = self.dir.join(format!("{name}.log"));
        let work = self.dir.join(format!("work-{name}"));
        let mut cmd = match prefix.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(bin("xvlm-worker"));
                cmd
            }
            None => Command::new(bin("xvlm-worker")),
        };
        let child = die_with_test(&mut cmd)
            .args(flags)
            .args([
                "--coordinator",
                coordinator,
                "--name",
                name,
                "--devices",
                "cpu",
                "--cpu-slots",
            ])
            .arg(slots.to_string())
            .arg("--work-dir")
            .arg(&work)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .spawn()
            .expect("start xvlm-worker");
        let proc = Proc { child, log };
        wait_until(Duration::from_secs(20), || {
            std::fs::read_to_string(&proc.log)
                .map(|t| t.contains("registered"))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("worker {name} did not register:\n{}", proc.log_tail(20)));
        self.workers.push(proc);
    }

    /// Runs `xvlm-coord --coordinator URL args...` (killed after 60 s).
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("xvlm-coord"));
        cmd.arg("--coordinator")
            .arg(&self.url)
            .args(args)
            .envs(self.client_env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir);
        output_within(&mut cmd, Duration::from_secs(60))
    }

    /// Submits a job file and returns its id (panics with the CLI's stderr on failure).
    pub fn submit(&self, job: &Path) -> String {
        let out = self.cli(&["submit", job.to_str().expect("utf-8 path")]);
        assert!(out.status.success(), "submit failed: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    /// Writes `yaml` as `job.yaml` in the test's directory and submits it.
    pub fn submit_yaml(&self, yaml: &str) -> String {
        self.submit(&write(&self.dir, "job.yaml", yaml))
    }

    /// The `status JOB` table.
    pub fn status(&self, job: &str) -> String {
        let out = self.cli(&["status", job]);
        assert!(out.status.success(), "status failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// `watch JOB` until the job ends; panics with every log unless it exits 0 (SUCCEEDED). Returns stdout.
    pub fn watch_succeeded(&self, job: &str) -> String {
        let watch = self.cli(&["watch", job]);
        let out = text(&watch.stdout);
        assert!(
            watch.status.success(),
            "watch failed:\n{out}\n{}\n{}",
            text(&watch.stderr),
            self.logs()
        );
        out
    }

    /// Every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = format!("--- coordinator\n{}\n", self.coord.log_tail(30));
        for w in &self.workers {
            s.push_str(&format!("--- {}\n{}\n", w.log.display(), w.log_tail(30)));
        }
        s
    }
}

/// Starts a coordinator with state and storage under `dir`; returns it and its URL.
pub fn start_coordinator(dir: &Path) -> (Proc, String) {
    start_coordinator_at(dir, "127.0.0.1:0")
}

/// [`start_coordinator`] on a given address (a restart on the address workers already know).
pub fn start_coordinator_at(dir: &Path, listen: &str) -> (Proc, String) {
    start_coordinator_with_env(dir, listen, &[])
}

/// [`start_coordinator_at`] with extra environment variables (e.g. its own `AWS_ENDPOINT`).
pub fn start_coordinator_with_env(
    dir: &Path,
    listen: &str,
    env: &[(&str, &str)],
) -> (Proc, String) {
    start_coordinator_with_args(dir, listen, env, &[])
}

/// [`start_coordinator_with_env`] with extra `serve` flags (e.g. `--tls-cert`); the URL returned is
/// `http://ADDR` whatever the flags.
pub fn start_coordinator_with_args(
    dir: &Path,
    listen: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Proc, String) {
    let log = dir.join("coordinator.log");
    let mut child = die_with_test(&mut Command::new(bin("xvlm-coord")))
        .args(["serve", "--listen", listen])
        .args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--storage")
        .arg(format!("file://{}", dir.join("runs").display()))
        .env("RUST_LOG", "info")
        // Tests read jobs' TensorBoard files soon after the job ends.
        .env("XVLM_TENSORBOARD_FLUSH_SECS", "0.5")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("coordinator log"),
        )
        .spawn()
        .expect("start xvlm-coord serve");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read listen line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc { child, log }, format!("http://{addr}"))
}

/// Runs a command to completion like `Command::output`, but kills it after `timeout` so a hung
/// command fails the test instead of hanging it.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = die_with_test(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn command");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("wait after kill");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path
}

/// Whether a process with this pid exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A moto S3 server (installed by scripts/setup.sh into `.venv-moto`) on a free loopback port with
/// the bucket `ckpts`; killed on drop.
pub struct Moto {
    /// The server.
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends one raw HTTP/1.1 request (with `Connection: close`) and returns the whole reply.
pub fn http(addr: &str, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// Starts moto and creates the bucket `ckpts`. Panics, naming scripts/setup.sh, when moto is missing.
/// [`start_moto`], and the standard object_store `AWS_*` environment pointing at it, inherited by
/// every process the test starts afterwards (workers, trainers).
pub fn start_moto_for_children() -> Moto {
    let moto = start_moto();
    std::env::set_var("AWS_ENDPOINT", &moto.url);
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    moto
}

pub fn start_moto() -> Moto {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-moto/bin/moto_server");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup.sh (it installs moto[server] into .venv-moto)",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = die_with_test(&mut Command::new(&bin))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let addr = format!("127.0.0.1:{port}");
    let moto = Moto {
        child,
        url: format!("http://{addr}"),
        addr: addr.clone(),
    };
    let put = format!(
        "PUT /ckpts HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    wait_until(Duration::from_secs(30), || match http(&addr, &put) {
        Ok(reply) => {
            assert!(reply.starts_with("HTTP/1.1 200"), "create bucket: {reply}");
            true
        }
        Err(_) => false,
    })
    .expect("moto_server did not start");
    moto
}

impl Cluster {
    /// The step rank 0 last reported, from the `status JOB` table (0 when unknown).
    pub fn step(&self, job: &str) -> u64 {
        self.status(job)
            .lines()
            .find(|l| l.starts_with(job))
            .and_then(|row| {
                row.split_whitespace()
                    .find_map(|cell| cell.split_once('/')?.0.parse().ok())
            })
            .unwrap_or(0)
    }

    /// `watch JOB` in the background, every line stamped with the time it arrived.
    pub fn watch_log(&self, job: &str) -> WatchLog {
        let mut child = die_with_test(&mut Command::new(bin("xvlm-coord")))
            .arg("--coordinator")
            .arg(&self.url)
            .args(["watch", job])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start xvlm-coord watch");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), line));
            }
        });
        WatchLog { child, lines }
    }
}

/// A background `xvlm-coord watch` (see [`Cluster::watch_log`]); killed on drop.
pub struct WatchLog {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<(Instant, String)>>>,
}

impl WatchLog {
    /// The first line containing `pattern`, with its arrival time, waiting up to `timeout`.
    pub fn wait_for(&self, pattern: &str, timeout: Duration) -> Option<(Instant, String)> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .find(|(_, l)| l.contains(pattern))
                .cloned();
            found.is_some()
        })?;
        found
    }

    /// Every line so far.
    pub fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for WatchLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program the operations tests need (a Debian package's binary, or a script in `.venv-tools`),
/// found on `PATH`, in `/usr/sbin`, or in `.venv-tools/bin`. Panics naming the package and
/// scripts/setup.sh when it is missing: these tests must run in CI, so a missing tool fails them
/// rather than skipping them.
pub fn tool(name: &str, package: &str) -> PathBuf {
    let venv_tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-tools/bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([
            PathBuf::from("/usr/sbin"),
            PathBuf::from("/sbin"),
            venv_tools,
        ])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is missing: run scripts/setup.sh as root (it installs {package})")
        })
}

/// The Python of `.venv-tools` (TensorBoard's event reader, kubernetes-validate), installed by
/// scripts/setup.sh.
pub fn tools_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv-tools/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (it installs tensorboard and kubernetes-validate there)",
        python.display()
    );
    python
}
