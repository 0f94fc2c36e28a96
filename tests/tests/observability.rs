//! Operations, observed from outside: a real Prometheus server (Debian package `prometheus`) scrapes
//! the coordinator's and the workers' `/metrics` over loopback, with the bearer tokens, while a
//! pre-training job runs; its HTTP API then has the series with the values `status` shows. Also:
//! `/metrics` refuses a request without the token; the dashboard, driven by headless Chromium,
//! shows a running job's reported steps and losses.
//!
//! One cluster per test binary; [`start_prometheus`] is meant for other tests of this file too.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xvlm_e2e::tiny_pretrain::TinyPretrain;
use xvlm_e2e::{http, start_coordinator_with_args, text, tool, wait_until, write, Cluster};
use xvlm_model::config::configs_dir;
use xvlm_model::data::synth::{generate, SynthConfig};

const STEPS: u64 = 120;

/// A Prometheus server on a free loopback port, its data in a temporary directory; killed on drop.
pub struct Prometheus {
    child: Child,
    /// `127.0.0.1:PORT` of its HTTP API.
    pub addr: String,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One scrape job of the generated configuration: its targets (`host:port`) and, when given, the
/// file holding the bearer token Prometheus sends.
pub struct ScrapeJob<'a> {
    /// The `job` label Prometheus gives its series.
    pub name: &'a str,
    /// `host:port` of each target.
    pub targets: Vec<String>,
    /// Bearer token file (`authorization: credentials_file:`).
    pub token_file: Option<&'a Path>,
}

/// Starts Prometheus under `dir` scraping `jobs` every second and waits until it is ready.
pub fn start_prometheus(dir: &Path, jobs: &[ScrapeJob]) -> Prometheus {
    let mut config =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
    for job in jobs {
        let targets: Vec<String> = job.targets.iter().map(|t| format!("'{t}'")).collect();
        // honor_labels: the series' own `job` label (the xvlm job id) is kept, not renamed
        // `exported_job` in favour of the scrape job's name.
        config.push_str(&format!(
            "  - job_name: '{}'\n    honor_labels: true\n    static_configs:\n      - targets: [{}]\n",
            job.name,
            targets.join(", ")
        ));
        if let Some(file) = job.token_file {
            config.push_str(&format!(
                "    authorization:\n      credentials_file: '{}'\n",
                file.display()
            ));
        }
    }
    let config_file = write(dir, "prometheus.yml", &config);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.join("prometheus.log");
    let child = Command::new(tool("prometheus", "prometheus"))
        .arg(format!("--config.file={}", config_file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("prometheus log"))
        .spawn()
        .expect("start prometheus");
    let prom = Prometheus { child, addr, log };
    let ready = format!("GET /-/ready HTTP/1.0\r\nHost: {}\r\n\r\n", prom.addr);
    wait_until(Duration::from_secs(30), || {
        http(&prom.addr, &ready).is_ok_and(|r| status(&r) == 200)
    })
    .unwrap_or_else(|| {
        panic!(
            "prometheus did not become ready:\n{}",
            std::fs::read_to_string(&prom.log).unwrap_or_default()
        )
    });
    prom
}

/// The status code of a raw HTTP reply (0 when it has none).
fn status(reply: &str) -> u16 {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// The instant vector of `query`: each series' labels and value.
    pub fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let req = format!(
            "GET /api/v1/query?query={} HTTP/1.0\r\nHost: {}\r\n\r\n",
            encode(query),
            self.addr
        );
        let reply = http(&self.addr, &req).expect("query prometheus");
        let body = reply.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {reply}"));
        assert_eq!(json["status"], "success", "{query}: {json}");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN);
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Its scrape targets' health and last errors, for failure messages.
    pub fn targets(&self) -> String {
        let req = format!(
            "GET /api/v1/targets HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.addr
        );
        http(&self.addr, &req).unwrap_or_default()
    }

    /// The single value of `query` (none while it has no result).
    pub fn value(&self, query: &str) -> Option<f64> {
        self.query(query).first().map(|(_, v)| *v)
    }
}

/// The address a process logged as `addr=HOST:PORT` on its first line containing `marker`.
fn logged_addr(log: &Path, marker: &str) -> String {
    nth_logged_addr(log, marker, 0)
}

/// [`logged_addr`] of the `n`-th line with `marker` (0-based): a restarted server appends its own.
fn nth_logged_addr(log: &Path, marker: &str, n: usize) -> String {
    let mut found = None;
    wait_until(Duration::from_secs(20), || {
        found = std::fs::read_to_string(log).ok().and_then(|t| {
            let line = t.lines().filter(|l| l.contains(marker)).nth(n)?.to_string();
            let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
            Some(addr.to_string())
        });
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("{} never logged {marker:?}", log.display()))
}

/// Waits up to `timeout` for `query` to have a value satisfying `ok`; returns the last value seen.
fn eventually(
    prom: &Prometheus,
    query: &str,
    timeout: Duration,
    ok: impl Fn(f64) -> bool,
) -> Option<f64> {
    let mut last = None;
    wait_until(timeout, || {
        last = prom.value(query);
        last.is_some_and(&ok)
    });
    last
}

/// Prometheus scrapes a coordinator and two workers (tokens required on both kinds of listener)
/// through a data-parallel pre-training job; the job's step, losses, learning rate, samples/s,
/// checkpoint commits, the workers' heartbeat ages, the gRPC latency histograms and the workers'
/// step, all-reduce, loader and upload series are all there with the values the job had.
#[test]
fn prometheus_scrapes_a_running_job() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let user_token = write(dir.path(), "user.token", "user-secret\n");
    let worker_token = write(dir.path(), "worker.token", "worker-secret\n");
    let (coord, url) = start_coordinator_with_args(
        dir.path(),
        "127.0.0.1:0",
        &[],
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--user-token-file",
            user_token.to_str().unwrap(),
            "--worker-token-file",
            worker_token.to_str().unwrap(),
        ],
    );
    let coord_http = logged_addr(&coord.log, "http listening");
    let mut c = Cluster {
        coord,
        url,
        workers: Vec::new(),
        dir: dir.path().to_path_buf(),
        client_env: vec![("XVLM_USER_TOKEN".into(), "user-secret".into())],
    };
    let worker_env = [
        ("XVLM_WORKER_TOKEN", "worker-secret"),
        ("XVLM_WORKER_HTTP_LISTEN", "127.0.0.1:0"),
    ];
    c.add_worker_with_env("w0", 1, &worker_env);
    c.add_worker_with_env("w1", 1, &worker_env);
    let worker_http: Vec<String> = c
        .workers
        .iter()
        .map(|w| logged_addr(&w.log, "metrics listening"))
        .collect();

    // A real scraper gets in with the tokens; without them it is refused (the worker's listener).
    let bare = |addr: &str| {
        http(
            addr,
            &format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
        )
    };
    let refused = bare(&worker_http[0]).unwrap();
    assert_eq!(status(&refused), 401, "{refused}");

    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom = start_prometheus(
        &prom_dir,
        &[
            ScrapeJob {
                name: "xvlm-coord",
                targets: vec![coord_http.clone()],
                token_file: Some(&user_token),
            },
            ScrapeJob {
                name: "xvlm-worker",
                targets: worker_http.clone(),
                token_file: Some(&worker_token),
            },
        ],
    );

    let data = dir.path().join("data");
    generate(
        &data,
        &SynthConfig {
            images: 30,
            width: 64,
            height: 48,
            shards: 2,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let config = write(
        dir.path(),
        "task.yaml",
        &TinyPretrain {
            regions: false,
            epochs: 60,
        }
        .yaml(&data, &configs_dir()),
    );
    let job = format!(
        "name: e2e-metrics\ntask: pretrain\nconfig: {}\nsteps: {STEPS}\nseed: 7\nworkers: {{min: 2}}\n\
         checkpoint: {{every_steps: 50}}\n",
        config.display()
    );
    let id = c.submit(&write(dir.path(), "job.yaml", &job));
    let running = format!(r#"xvlm_job_state{{job="{id}",state="RUNNING"}}"#);
    // Scraped while it runs, not only after.
    let seen_running = eventually(&prom, &running, Duration::from_secs(30), |v| v == 1.0);
    assert_eq!(
        seen_running,
        Some(1.0),
        "never scraped RUNNING\n{}\n{}\nup: {:?}",
        c.logs(),
        prom.targets(),
        prom.query("min_over_time(up[5m])"),
    );
    c.watch_succeeded(&id);
    let status_step = c.step(&id);
    assert_eq!(status_step, STEPS);

    // A scrape after the job's end: every coordinator series of that scrape has its final value
    // (commits are counted before the scheduler learns of them, and the job ends after them).
    let long = Duration::from_secs(15);
    let succeeded = format!(r#"xvlm_job_state{{job="{id}",state="SUCCEEDED"}}"#);
    assert_eq!(
        eventually(&prom, &succeeded, long, |v| v == 1.0),
        Some(1.0),
        "never scraped SUCCEEDED"
    );
    let step = format!(r#"xvlm_job_step{{job="{id}"}}"#);
    assert_eq!(
        prom.value(&step),
        Some(status_step as f64),
        "step as status shows it"
    );
    assert_eq!(prom.value(r#"xvlm_jobs{state="SUCCEEDED"}"#), Some(1.0));
    // Several scrapes over the run: the step went up between them.
    let scrapes = eventually(&prom, &format!("count_over_time({step}[5m])"), long, |n| {
        n >= 3.0
    });
    assert!(scrapes.is_some_and(|n| n >= 3.0), "{scrapes:?} scrapes");
    let first = prom.value(&format!("min_over_time({step}[5m])")).unwrap();
    assert!(first < STEPS as f64, "only the final step was ever scraped");

    let losses = prom.query(&format!(r#"xvlm_job_loss{{job="{id}"}}"#));
    let names: Vec<&str> = losses
        .iter()
        .filter_map(|(m, _)| m["loss"].as_str())
        .collect();
    for name in ["itc", "itm", "mlm", "total"] {
        assert!(names.contains(&name), "loss {name} missing: {names:?}");
    }
    assert!(losses.iter().all(|(_, v)| v.is_finite()), "{losses:?}");
    let lr = prom.value(&format!(
        r#"max_over_time(xvlm_job_learning_rate{{job="{id}"}}[5m])"#
    ));
    assert!(lr.is_some_and(|v| v > 0.0 && v <= 1e-4), "lr {lr:?}");
    let rate = prom.value(&format!(
        r#"max_over_time(xvlm_job_samples_per_second{{job="{id}"}}[5m])"#
    ));
    assert!(rate.is_some_and(|v| v > 0.0), "samples/s {rate:?}");
    assert_eq!(
        prom.value(&format!(r#"xvlm_job_restarts_total{{job="{id}"}}"#)),
        Some(0.0)
    );
    let commits = prom.value(&format!(r#"xvlm_checkpoint_commits_total{{job="{id}"}}"#));
    assert!(commits.is_some_and(|n| n >= 2.0), "commits {commits:?}");
    let bytes = prom.value(&format!(
        r#"xvlm_checkpoint_commit_bytes_total{{job="{id}"}}"#
    ));
    assert!(
        bytes.is_some_and(|b| b > 100_000.0),
        "commit bytes {bytes:?}"
    );
    let ages = prom.query("xvlm_worker_heartbeat_age_seconds");
    assert_eq!(ages.len(), 2, "{ages:?}");
    assert!(ages.iter().all(|(_, age)| *age < 5.0), "{ages:?}");
    for (service, method) in [("xvlm.v1.Jobs", "Submit"), ("xvlm.v1.Workers", "Heartbeat")] {
        let q = format!(
            r#"xvlm_grpc_request_duration_seconds_count{{service="{service}",method="{method}"}}"#
        );
        assert!(prom.value(&q).is_some_and(|n| n > 0.0), "{q}");
    }

    // The workers: both scraped, every rank's step time, all-reduce (world 2: the ring's real
    // reductions), loader queue and checkpoint uploads.
    let up = prom.query(r#"up{job="xvlm-worker"}"#);
    assert!(up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0), "{up:?}");
    // Both trainers exited (the last scrape of a worker may precede its trainer's exit).
    let exited = format!(r#"count(xvlm_worker_trainer_state{{job="{id}",state="exited"}})"#);
    let exited = eventually(&prom, &exited, long, |n| n == 2.0);
    assert_eq!(exited, Some(2.0));
    // Every step line of both ranks is in (the last scrape of a worker may precede its last line).
    let counted = format!(r#"min(xvlm_worker_step_duration_seconds_count{{job="{id}"}})"#);
    let counted = eventually(&prom, &counted, long, |n| n == STEPS as f64);
    assert_eq!(counted, Some(STEPS as f64));
    // Each rank's value, by rank.
    let worker_series = |name: &str| -> std::collections::BTreeMap<String, f64> {
        prom.query(&format!(r#"{name}{{job="{id}"}}"#))
            .into_iter()
            .map(|(m, v)| (m["rank"].as_str().unwrap_or("?").to_string(), v))
            .collect()
    };
    let step_time = worker_series("xvlm_worker_step_duration_seconds_sum");
    assert_eq!(step_time.len(), 2, "{step_time:?}");
    assert!(step_time.values().all(|s| *s > 0.0), "{step_time:?}");
    let step_count = worker_series("xvlm_worker_step_duration_seconds_count");
    assert!(
        step_count.len() == 2 && step_count.values().all(|n| *n == STEPS as f64),
        "{step_count:?}"
    );
    let allreduce = worker_series("xvlm_worker_allreduce_duration_seconds_sum");
    assert!(
        allreduce.len() == 2 && allreduce.values().all(|s| *s > 0.0),
        "{allreduce:?}"
    );
    let below = step_time
        .iter()
        .all(|(rank, step)| allreduce.get(rank).is_some_and(|r| r < step));
    assert!(below, "all-reduce {allreduce:?} within steps {step_time:?}");
    assert_eq!(worker_series("xvlm_worker_loader_queue_depth").len(), 2);
    let uploads = worker_series("xvlm_worker_checkpoint_upload_bytes_total");
    assert!(
        uploads.len() == 2 && uploads.values().all(|b| *b > 0.0),
        "{uploads:?}"
    );
    eprintln!("prometheus_scrapes_a_running_job: {:?}", started.elapsed());
}

/// With a user token configured, the coordinator's `/metrics` answers 401 to a request without it
/// or with another token (the worker's included), and the metrics to one with it.
#[test]
fn metrics_refuse_requests_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let user_token = write(dir.path(), "user.token", "user-secret\n");
    let (coord, _url) = start_coordinator_with_args(
        dir.path(),
        "127.0.0.1:0",
        &[("XVLM_WORKER_TOKEN", "worker-secret")],
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--user-token-file",
            user_token.to_str().unwrap(),
        ],
    );
    let addr = logged_addr(&coord.log, "http listening");
    let get = |auth: &str| {
        http(
            &addr,
            &format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n"),
        )
        .unwrap()
    };
    for auth in [
        "",
        "Authorization: Bearer worker-secret\r\n",
        "Authorization: user-secret\r\n",
    ] {
        let reply = get(auth);
        assert_eq!(status(&reply), 401, "{auth:?}: {reply}");
    }
    let reply = get("Authorization: Bearer user-secret\r\n");
    assert_eq!(status(&reply), 200, "{reply}");
    let pending = reply
        .lines()
        .find_map(|l| l.strip_prefix(r#"xvlm_jobs{state="PENDING"} "#));
    assert_eq!(
        pending.and_then(|v| v.parse::<f64>().ok()),
        Some(0.0),
        "{reply}"
    );
}

/// The page at `url` as headless Chromium (Debian package) renders it: its DOM after load.
fn chromium_dom(dir: &Path, url: &str) -> String {
    let out = std::process::Command::new(tool("chromium", "chromium"))
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium").display()
        ))
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "chromium: {}", text(&out.stderr));
    text(&out.stdout)
}

/// `(step, value)` of every chart point of series `name` in a dumped DOM.
fn chart_points(dom: &str, name: &str) -> Vec<(u64, f64)> {
    let marker = format!("data-series=\"{name}\" data-step=\"");
    dom.split(&marker)
        .skip(1)
        .filter_map(|rest| {
            let (step, rest) = rest.split_once('"')?;
            let value = rest.split("data-value=\"").nth(1)?.split('"').next()?;
            Some((step.parse().ok()?, value.parse().ok()?))
        })
        .collect()
}

/// The dashboard in headless Chromium against a running job: the front page lists the job and the
/// workers; the job's page charts exactly the steps and losses the job reported (every step once,
/// the values `watch` printed), shows later steps as the job goes on, and a screenshot is taken;
/// after a kill -9 and restart of the coordinator it still charts every step.
#[test]
fn dashboard_shows_a_running_job_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (coord, url) = start_coordinator_with_args(
        dir.path(),
        "127.0.0.1:0",
        &[],
        &["--http-listen", "127.0.0.1:0"],
    );
    let page = format!("http://{}", logged_addr(&coord.log, "http listening"));
    let mut c = Cluster::around(dir.path(), (coord, url));
    c.add_worker("w0", 1);
    c.add_worker("w1", 1);
    let job = c.submit(&write(
        dir.path(),
        "job.yaml",
        "name: dash\ntask: smoke\nsteps: 150\nworkers: {min: 2}\nsmoke: {batch_size: 8, lr: 0.1, step_delay_ms: 60}\n",
    ));
    let watch = c.watch_log(&job);
    watch
        .wait_for("step=15/150", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the job did not run:\n{}", c.logs()));

    let front = chromium_dom(dir.path(), &page);
    let link = format!("href=\"/jobs/{job}\"");
    for want in [
        link.as_str(),
        "RUNNING",
        "data-worker=\"w0\"",
        "data-worker=\"w1\"",
    ] {
        assert!(
            front.contains(want),
            "no {want} on the front page:\n{front}"
        );
    }
    let first = chromium_dom(dir.path(), &format!("{page}/jobs/{job}"));
    assert!(first.contains(&format!("data-job=\"{job}\"")), "{first}");
    let points = chart_points(&first, "mse");
    let last = points.last().map_or(0, |p| p.0);
    assert!(last >= 15, "{points:?}");
    let steps: Vec<u64> = points.iter().map(|p| p.0).collect();
    assert_eq!(
        steps,
        (1..=last).collect::<Vec<_>>(),
        "every reported step once"
    );
    // The chart's values are the reported losses (watch prints them to 4 decimals).
    let mut compared = 0;
    for line in watch.text().lines() {
        let step: Option<u64> = line
            .split("step=")
            .nth(1)
            .and_then(|s| s.split('/').next()?.parse().ok());
        let mse: Option<f64> = line
            .split("mse=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        let (Some(step), Some(mse)) = (step, mse) else {
            continue;
        };
        if let Some((_, charted)) = points.iter().find(|p| p.0 == step) {
            assert!(
                (charted - mse).abs() <= 5.1e-5,
                "step {step}: watch {mse}, chart {charted}"
            );
            compared += 1;
        }
    }
    assert!(compared >= 10, "only {compared} steps compared");
    assert!(first.contains("data-rank=\"1\""), "ranks table: {first}");

    wait_until(Duration::from_secs(30), || c.step(&job) >= last + 20)
        .unwrap_or_else(|| panic!("the job stopped:\n{}", c.logs()));
    let later = chart_points(
        &chromium_dom(dir.path(), &format!("{page}/jobs/{job}")),
        "mse",
    );
    assert!(
        later.last().map_or(0, |p| p.0) >= last + 20,
        "the page did not show later steps: {} then {:?}",
        last,
        later.last()
    );
    let shot = dir.path().join("dashboard.png");
    let out = std::process::Command::new(tool("chromium", "chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1280,1400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("chromium").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("{page}/jobs/{job}"))
        .output()
        .expect("run chromium");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let png = std::fs::read(&shot).expect("screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("XVLM_DASHBOARD_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("keep the screenshot");
    }

    // After a kill -9 and a restart the chart still holds every step, read back from the job's
    // TensorBoard files (the tests flush them every 0.5 s).
    wait_until(Duration::from_secs(60), || {
        c.status(&job).contains("SUCCEEDED")
    })
    .unwrap_or_else(|| panic!("the job did not succeed:\n{}", c.logs()));
    let get = |page: &str| {
        let addr = page.trim_start_matches("http://");
        let request = format!("GET /jobs/{job} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        http(addr, &request).unwrap_or_default()
    };
    let finished = chart_points(&get(&page), "mse");
    assert_eq!(finished.len(), 150, "{finished:?}");
    std::thread::sleep(Duration::from_millis(1500));
    c.coord.kill();
    let addr = c.url.trim_start_matches("http://").to_string();
    let (coord, url) =
        start_coordinator_with_args(dir.path(), &addr, &[], &["--http-listen", "127.0.0.1:0"]);
    let restarted = format!(
        "http://{}",
        nth_logged_addr(&coord.log, "http listening", 1)
    );
    c.coord = coord;
    c.url = url;
    let mut restored = Vec::new();
    wait_until(Duration::from_secs(20), || {
        restored = chart_points(&get(&restarted), "mse");
        restored.len() == finished.len()
    })
    .unwrap_or_else(|| panic!("restored {} of 150 points:\n{}", restored.len(), c.logs()));
    for ((step, value), (want_step, want)) in restored.iter().zip(&finished) {
        assert_eq!(step, want_step);
        // TensorBoard keeps f32.
        assert!(
            (value - want).abs() <= 1e-6 * want.abs().max(1e-6),
            "step {step}: {value} restored, {want} before"
        );
    }
}
