//! The read-only web dashboard's pages, rendered on the server as plain HTML with inline SVG charts
//! (no script, no CDN): `/` lists the jobs with their state, progress and ETA, and the workers with
//! their health; `/jobs/{id}` shows one job's loss and lr charts over the steps, its evaluations per
//! epoch, its ranks and their workers, and its committed checkpoints. Pages of live jobs reload
//! themselves every [`REFRESH_SECS`]. The HTTP listener serves them with the Jobs API's protection.
//!
//! What a page shows is copied from the scheduler under the core's lock ([`Overview`], [`JobPage`])
//! and rendered after the lock is released.

mod chart;

use std::fmt::Write;

use xvlm_proto::v1;

use crate::convert;
use crate::curves::JobCurve;
use crate::state::{Millis, RankAssignment, RankHealth, Scheduler, WorkerEntry};
use crate::status_text::{eta_text, is_terminal, state_name};
use chart::{line_chart, Series};

/// Seconds between a live page's reloads.
pub const REFRESH_SECS: u32 = 2;

/// A worker as the dashboard shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRow {
    /// Name.
    pub name: String,
    /// Host.
    pub host: String,
    /// Trainer slots and their kind.
    pub slots: u32,
    /// CUDA slots (else CPU).
    pub cuda: bool,
    /// Time since its last report.
    pub age_ms: Millis,
    /// Its heartbeat stream is open.
    pub connected: bool,
    /// It is draining.
    pub draining: bool,
    /// The job it serves, if any.
    pub busy: Option<String>,
}

impl WorkerRow {
    /// The row of `w` at `now`.
    pub fn of(w: &WorkerEntry, now: Millis) -> WorkerRow {
        WorkerRow {
            name: w.name.clone(),
            host: w.host.clone(),
            slots: w.slots,
            cuda: w.cuda,
            age_ms: now.saturating_sub(w.last_seen_ms),
            connected: w.connected,
            draining: w.draining,
            busy: w.busy.as_ref().map(|(job, _)| job.clone()),
        }
    }

    fn health(&self) -> &'static str {
        match (self.connected, self.draining) {
            (false, _) => "disconnected",
            (true, true) => "draining",
            (true, false) => "healthy",
        }
    }
}

/// The front page's content.
#[derive(Clone, Debug, Default)]
pub struct Overview {
    /// Every job, in submission order.
    pub jobs: Vec<v1::JobStatus>,
    /// Every registered worker.
    pub workers: Vec<WorkerRow>,
}

/// One job's page content.
#[derive(Clone, Debug)]
pub struct JobPage {
    /// Its status (as `watch` sees it).
    pub status: v1::JobStatus,
    /// The current generation's ranks.
    pub ranks: Vec<RankAssignment>,
    /// Their clocks (RUNNING only).
    pub health: Vec<RankHealth>,
    /// The workers they run on.
    pub workers: Vec<WorkerRow>,
    /// Its curve and evaluations.
    pub curve: JobCurve,
    /// Committed checkpoint steps, or why they could not be listed.
    pub checkpoints: Result<Vec<u64>, String>,
    /// When the page was made.
    pub now_ms: Millis,
}

impl Overview {
    /// The front page's content from the scheduler at `now`.
    pub fn of(sched: &Scheduler, now: Millis) -> Overview {
        Overview {
            jobs: sched.jobs().map(convert::job_status).collect(),
            workers: sched.workers().map(|w| WorkerRow::of(w, now)).collect(),
        }
    }
}

impl JobPage {
    /// Job `id`'s page content from the scheduler at `now` (checkpoints not listed yet: they come
    /// from the job's storage, off the lock); `None` for an unknown job.
    pub fn of(sched: &Scheduler, id: &str, curve: JobCurve, now: Millis) -> Option<JobPage> {
        let rec = sched.job(id)?;
        let serving: Vec<&str> = rec.ranks.iter().map(|r| r.worker.as_str()).collect();
        Some(JobPage {
            status: convert::job_status(rec),
            ranks: rec.ranks.clone(),
            health: sched.rank_health(id),
            workers: sched
                .workers()
                .filter(|w| serving.contains(&w.name.as_str()))
                .map(|w| WorkerRow::of(w, now))
                .collect(),
            curve,
            checkpoints: Ok(Vec::new()),
            now_ms: now,
        })
    }
}

/// Where the pages' content comes from: the coordinator's core (copied under its lock).
pub trait PageSource: Send + Sync {
    /// The front page's content.
    fn overview(&self) -> Overview;
    /// Job `id`'s page content without its checkpoints; `None` for an unknown job.
    fn job_page(&self, id: &str) -> Option<JobPage>;
}

/// Fixed content: this overview and no job pages (a listener without a coordinator behind it).
impl PageSource for Overview {
    fn overview(&self) -> Overview {
        self.clone()
    }

    fn job_page(&self, _: &str) -> Option<JobPage> {
        None
    }
}

/// How long a page waits for its job's checkpoint listing.
const LISTING_BUDGET: std::time::Duration = std::time::Duration::from_secs(3);

/// The committed checkpoint steps of the job output `output`, listed from its storage (within
/// [`LISTING_BUDGET`], so a stalled store does not hang the page).
pub async fn committed_steps(output: &str) -> Result<Vec<u64>, String> {
    let located = xvlm_proto::storage::open(output, &[]).map_err(|e| e.to_string())?;
    let dir = xvlm_proto::checkpoint::CheckpointDir {
        store: located.store.as_ref(),
        root: &located.path,
    };
    match tokio::time::timeout(LISTING_BUDGET, dir.steps()).await {
        Ok(Ok((committed, _))) => Ok(committed),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the store did not answer within {LISTING_BUDGET:?}"
        )),
    }
}

/// `s` safe inside HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}\
table{border-collapse:collapse;margin:8px 0 20px}td,th{padding:4px 10px;border-bottom:1px solid #ddd;\
text-align:left}th{background:#f4f4f4}.bar{width:160px;height:10px;background:#eee;display:inline-block}\
.bar i{display:block;height:10px;background:#2ca02c}.state{font-weight:600}.FAILED{color:#c00}\
.SUCCEEDED{color:#080}.RUNNING{color:#06c}.chart{display:inline-block;margin:0 16px 16px 0}\
.frame{fill:#fafafa;stroke:#ccc}.tick{font-size:10px;fill:#666}.legend span{margin-right:12px}\
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}.empty{color:#888}";

fn page(title: &str, refresh: bool, body: &str) -> String {
    let refresh = if refresh {
        format!("<meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">")
    } else {
        String::new()
    };
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">{refresh}<title>{}</title>\
         <style>{STYLE}</style></head><body>{body}</body></html>",
        escape(title)
    )
}

fn progress_cells(s: &v1::JobStatus) -> String {
    let p = s.progress.clone().unwrap_or_default();
    let fraction = if p.total_steps > 0 {
        (p.step as f64 / p.total_steps as f64).min(1.0)
    } else {
        0.0
    };
    let eta = if p.eta_seconds > 0.0 && !is_terminal(s) {
        eta_text(p.eta_seconds)
    } else {
        "-".into()
    };
    let losses: Vec<String> = p
        .losses
        .iter()
        .map(|l| format!("{}={:.4}", escape(&l.name), l.value))
        .collect();
    format!(
        "<td><span class=\"bar\"><i style=\"width:{:.1}%\"></i></span> <span class=\"step\">{}/{}</span></td>\
         <td>{eta}</td><td>{}</td>",
        fraction * 100.0,
        p.step,
        p.total_steps,
        losses.join(" ")
    )
}

/// The front page.
pub fn render_overview(o: &Overview) -> String {
    let mut body = String::from("<h1>xvlm</h1><h2>Jobs</h2>");
    if o.jobs.is_empty() {
        body.push_str("<p class=\"empty\">no jobs yet</p>");
    } else {
        body.push_str(
            "<table id=\"jobs\"><tr><th>job</th><th>name</th><th>task</th><th>state</th>\
             <th>world</th><th>progress</th><th>ETA</th><th>losses</th><th>restarts</th></tr>",
        );
        for s in &o.jobs {
            let state = state_name(s);
            let _ = write!(
                body,
                "<tr data-job=\"{id}\"><td><a href=\"/jobs/{id}\">{id}</a></td><td>{}</td><td>{}</td>\
                 <td class=\"state {state}\">{state}</td><td>{}</td>{}<td>{}</td></tr>",
                escape(&s.name),
                escape(&s.task),
                s.world_size,
                progress_cells(s),
                s.restarts,
                id = escape(&s.job_id),
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h2>Workers</h2>");
    workers_table(&mut body, &o.workers);
    page("xvlm", true, &body)
}

fn workers_table(body: &mut String, workers: &[WorkerRow]) {
    if workers.is_empty() {
        body.push_str("<p class=\"empty\">no workers registered</p>");
        return;
    }
    body.push_str(
        "<table id=\"workers\"><tr><th>worker</th><th>host</th><th>slots</th><th>health</th>\
         <th>last report</th><th>serving</th></tr>",
    );
    for w in workers {
        let _ = write!(
            body,
            "<tr data-worker=\"{}\"><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{:.1} s ago</td>\
             <td>{}</td></tr>",
            escape(&w.name),
            escape(&w.name),
            escape(&w.host),
            w.slots,
            if w.cuda { "GPU" } else { "CPU" },
            w.health(),
            w.age_ms as f64 / 1000.0,
            escape(w.busy.as_deref().unwrap_or("-")),
        );
    }
    body.push_str("</table>");
}

/// One job's page.
pub fn render_job(j: &JobPage) -> String {
    let s = &j.status;
    let state = state_name(s);
    let mut body = format!(
        "<p><a href=\"/\">all jobs</a></p><h1 data-job=\"{id}\">{id} <small>{}</small></h1>\
         <table><tr><th>task</th><th>state</th><th>generation</th><th>world</th><th>progress</th>\
         <th>ETA</th><th>latest losses</th></tr><tr><td>{}</td><td class=\"state {state}\">{state}</td>\
         <td>{}</td><td>{}</td>{}</tr></table>",
        escape(&s.name),
        escape(&s.task),
        s.generation,
        s.world_size,
        progress_cells(s),
        id = escape(&s.job_id),
    );
    if !s.message.is_empty() {
        let _ = write!(body, "<p class=\"message\">{}</p>", escape(&s.message));
    }
    charts(&mut body, &j.curve);
    evaluations(&mut body, &j.curve);
    ranks(&mut body, j);
    body.push_str("<h2>Checkpoints</h2>");
    match &j.checkpoints {
        Ok(steps) if steps.is_empty() => body.push_str("<p class=\"empty\">none committed</p>"),
        Ok(steps) => {
            let items: Vec<String> = steps
                .iter()
                .map(|st| format!("<li data-checkpoint=\"{st}\">step-{st}</li>"))
                .collect();
            let _ = write!(
                body,
                "<ul id=\"checkpoints\">{}</ul><p>output: {}</p>",
                items.join(""),
                escape(&s.output)
            );
        }
        Err(e) => {
            let _ = write!(body, "<p class=\"empty\">cannot list: {}</p>", escape(e));
        }
    }
    page(&format!("xvlm {}", s.job_id), !is_terminal(s), &body)
}

fn charts(body: &mut String, curve: &JobCurve) {
    body.push_str("<h2>Training</h2>");
    let mut names: Vec<&str> = Vec::new();
    for p in &curve.points {
        for (name, _) in &p.losses {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let losses: Vec<Series> = names
        .iter()
        .map(|name| Series {
            name,
            points: curve
                .points
                .iter()
                .filter_map(|p| {
                    let v = p.losses.iter().find(|(n, _)| n == name)?.1;
                    Some((p.step, v))
                })
                .collect(),
        })
        .collect();
    body.push_str(&line_chart("loss", "losses", &losses));
    let lr = Series {
        name: "lr",
        points: curve.points.iter().map(|p| (p.step, p.lr)).collect(),
    };
    body.push_str(&line_chart("lr", "learning rate", &[lr]));
    if curve.stride > 1 {
        let _ = write!(
            body,
            "<p class=\"empty\">every {}th step shown (long run)</p>",
            curve.stride
        );
    }
}

fn evaluations(body: &mut String, curve: &JobCurve) {
    body.push_str("<h2>Evaluation</h2>");
    if curve.evaluations.is_empty() {
        body.push_str("<p class=\"empty\">none yet</p>");
        return;
    }
    let mut names: Vec<&str> = Vec::new();
    for e in &curve.evaluations {
        for (name, _) in &e.metrics {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    body.push_str("<table id=\"evaluation\"><tr><th>step</th>");
    for n in &names {
        let _ = write!(body, "<th>{}</th>", escape(n));
    }
    body.push_str("</tr>");
    for e in &curve.evaluations {
        let _ = write!(body, "<tr><td>{}</td>", e.step);
        for n in &names {
            match e.metrics.iter().find(|(m, _)| m == n) {
                Some((_, v)) => {
                    let _ = write!(body, "<td>{v:.4}</td>");
                }
                None => body.push_str("<td></td>"),
            }
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
}

fn ranks(body: &mut String, j: &JobPage) {
    body.push_str("<h2>Ranks</h2>");
    if j.ranks.is_empty() {
        body.push_str("<p class=\"empty\">no generation running</p>");
    } else {
        body.push_str(
            "<table id=\"ranks\"><tr><th>rank</th><th>worker</th><th>device</th><th>step</th>\
             <th>since last step</th><th>p99 step</th><th>process</th><th>exit</th></tr>",
        );
        for r in &j.ranks {
            let h = j.health.iter().find(|h| h.rank == r.rank);
            let _ = write!(
                body,
                "<tr data-rank=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td></tr>",
                r.rank,
                r.rank,
                escape(&r.worker),
                r.device,
                h.map_or("-".into(), |h| h.step.to_string()),
                h.map_or("-".into(), |h| format!(
                    "{:.1} s",
                    j.now_ms.saturating_sub(h.since_ms) as f64 / 1000.0
                )),
                h.filter(|h| h.p99_step_ms > 0)
                    .map_or("-".into(), |h| format!("{} ms", h.p99_step_ms)),
                h.and_then(|h| h.process).map_or("-".into(), String::from),
                r.exit.map_or("-".into(), |c| c.to_string()),
            );
        }
        body.push_str("</table>");
    }
    body.push_str("<h3>Their workers</h3>");
    workers_table(body, &j.workers);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curves::Curves;

    fn status(state: v1::JobState) -> v1::JobStatus {
        v1::JobStatus {
            job_id: "job-0001".into(),
            name: "<ft>".into(),
            task: "retrieval".into(),
            state: state as i32,
            generation: 1,
            world_size: 2,
            progress: Some(v1::Progress {
                step: 3,
                total_steps: 12,
                losses: vec![v1::Loss {
                    name: "itc".into(),
                    value: 0.5,
                }],
                lr: 1e-4,
                samples_per_sec: 8.0,
                eta_seconds: 30.0,
            }),
            ..Default::default()
        }
    }

    /// The front page lists the job with its state, progress and ETA and links to its page; names
    /// are escaped; it reloads itself.
    #[test]
    fn overview_lists_jobs_and_workers() {
        let html = render_overview(&Overview {
            jobs: vec![status(v1::JobState::Running)],
            workers: vec![WorkerRow {
                name: "w0".into(),
                host: "127.0.0.1".into(),
                slots: 1,
                cuda: false,
                age_ms: 400,
                connected: true,
                draining: false,
                busy: Some("job-0001".into()),
            }],
        });
        for want in [
            "href=\"/jobs/job-0001\"",
            "&lt;ft&gt;",
            "RUNNING",
            "3/12",
            "width:25.0%",
            "30s",
            "itc=0.5000",
            "data-worker=\"w0\"",
            "healthy",
            "http-equiv=\"refresh\"",
        ] {
            assert!(html.contains(want), "no {want} in {html}");
        }
        assert!(!html.contains("<ft>"));
    }

    /// A job page charts every reported step, tables its evaluations, ranks and checkpoints, and
    /// stops reloading once the job ended.
    #[test]
    fn job_page_shows_curves_ranks_and_checkpoints() {
        let curves = Curves::default();
        for step in 1..=3 {
            curves.add(&v1::RankProgress {
                job_id: "job-0001".into(),
                generation: 1,
                step,
                losses: vec![v1::Loss {
                    name: "itc".into(),
                    value: 1.0 / step as f64,
                }],
                lrs: vec![1e-4, 1e-4, 2e-4, 2e-4],
                metrics: if step == 3 {
                    vec![v1::Metric {
                        name: "val.r_mean".into(),
                        value: 41.5,
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            });
        }
        let mut job = JobPage {
            status: status(v1::JobState::Running),
            ranks: vec![RankAssignment {
                rank: 0,
                worker: "w0".into(),
                local_rank: 0,
                device: 0,
                ring_address: None,
                exit: None,
            }],
            health: vec![RankHealth {
                rank: 0,
                step: 3,
                since_ms: 1_000,
                p99_step_ms: 120,
                process: Some('R'),
            }],
            workers: vec![],
            curve: curves.of("job-0001"),
            checkpoints: Ok(vec![4, 8]),
            now_ms: 3_500,
        };
        let html = render_job(&job);
        assert_eq!(html.matches("data-series=\"itc\"").count(), 3);
        assert!(html.contains("data-step=\"2\" data-value=\"0.5\""));
        assert_eq!(html.matches("data-series=\"lr\"").count(), 3);
        for want in [
            "<td>41.5000</td>",
            "data-rank=\"0\"",
            "2.5 s",
            "120 ms",
            "data-checkpoint=\"8\"",
            "http-equiv=\"refresh\"",
        ] {
            assert!(html.contains(want), "no {want} in {html}");
        }
        job.status = status(v1::JobState::Succeeded);
        assert!(!render_job(&job).contains("http-equiv=\"refresh\""));
    }
}
