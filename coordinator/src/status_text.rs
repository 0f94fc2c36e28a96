//! How jobs read as text: state names, the `watch` line, the `status` table and the evaluation
//! line, shared by the CLI's printers.

use xvlm_proto::v1;

/// The state's upper-case name.
pub fn state_name(s: &v1::JobStatus) -> &'static str {
    match v1::JobState::try_from(s.state).unwrap_or(v1::JobState::Unspecified) {
        v1::JobState::Unspecified => "UNKNOWN",
        v1::JobState::Pending => "PENDING",
        v1::JobState::Rendezvous => "RENDEZVOUS",
        v1::JobState::Running => "RUNNING",
        v1::JobState::Restarting => "RESTARTING",
        v1::JobState::Succeeded => "SUCCEEDED",
        v1::JobState::Failed => "FAILED",
        v1::JobState::Cancelled => "CANCELLED",
    }
}

/// SUCCEEDED, FAILED or CANCELLED.
pub fn is_terminal(s: &v1::JobStatus) -> bool {
    matches!(state_name(s), "SUCCEEDED" | "FAILED" | "CANCELLED")
}

fn losses(p: &v1::Progress) -> String {
    if p.losses.is_empty() {
        return "-".into();
    }
    p.losses
        .iter()
        .map(|l| format!("{}={:.4}", l.name, l.value))
        .collect::<Vec<_>>()
        .join(" ")
}

fn eta(p: &v1::Progress) -> String {
    if p.eta_seconds <= 0.0 {
        return "-".into();
    }
    eta_text(p.eta_seconds)
}

/// A positive ETA in seconds as `1h05m`, `2m30s` or `40s`.
pub fn eta_text(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// A metric value: whole numbers (an epoch, a count) without decimals, others to 4 places.
fn metric_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.4}")
    }
}

/// The job's latest evaluation results, `eval@step-N: name=value ...`; `None` before any.
pub fn evaluation(s: &v1::JobStatus) -> Option<String> {
    let e = s.evaluation.as_ref().filter(|e| !e.metrics.is_empty())?;
    let metrics: Vec<String> = e
        .metrics
        .iter()
        .map(|m| format!("{}={}", m.name, metric_value(m.value)))
        .collect();
    Some(format!("eval@step-{}: {}", e.step, metrics.join(" ")))
}

/// One line of `watch` output.
pub fn watch_line(s: &v1::JobStatus) -> String {
    let p = s.progress.clone().unwrap_or_default();
    let mut line = format!(
        "{} {} gen={} world={} step={}/{} losses: {} lr={:.4} samples/s={:.1} eta={}",
        s.job_id,
        state_name(s),
        s.generation,
        s.world_size,
        p.step,
        p.total_steps,
        losses(&p),
        p.lr,
        p.samples_per_sec,
        eta(&p)
    );
    if s.checkpoint_step > 0 {
        line.push_str(&format!(" ckpt=step-{}", s.checkpoint_step));
    }
    if let Some(eval) = evaluation(s) {
        line.push_str(&format!(" {eval}"));
    }
    if s.restarts > 0 {
        line.push_str(&format!(" restarts={}", s.restarts));
    }
    if !s.message.is_empty() {
        line.push_str(&format!(" ({})", s.message));
    }
    line
}

/// The `status` table, then one line per job with evaluation results (`JOB eval@step-N: ...`).
pub fn status_table(jobs: &[v1::JobStatus]) -> String {
    let header = [
        "JOB",
        "NAME",
        "STATE",
        "GEN",
        "WORLD",
        "STEP",
        "LOSSES",
        "SAMPLES/S",
        "ETA",
        "MESSAGE",
    ];
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|s| {
            let p = s.progress.clone().unwrap_or_default();
            vec![
                s.job_id.clone(),
                s.name.clone(),
                state_name(s).to_string(),
                s.generation.to_string(),
                s.world_size.to_string(),
                format!("{}/{}", p.step, p.total_steps),
                losses(&p),
                format!("{:.1}", p.samples_per_sec),
                eta(&p),
                s.message.clone(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let fmt = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = fmt(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        out.push('\n');
        out.push_str(&fmt(row));
    }
    for s in jobs {
        if let Some(eval) = evaluation(s) {
            out.push_str(&format!("\n{} {eval}", s.job_id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with_eval() -> v1::JobStatus {
        v1::JobStatus {
            job_id: "job-0001".into(),
            name: "ft".into(),
            state: v1::JobState::Running as i32,
            evaluation: Some(v1::Evaluation {
                step: 40,
                metrics: vec![
                    v1::Metric {
                        name: "epoch".into(),
                        value: 1.0,
                    },
                    v1::Metric {
                        name: "val.r_mean".into(),
                        value: 52.31234,
                    },
                ],
            }),
            ..Default::default()
        }
    }

    /// `watch` and `status` print the latest evaluation results with their step; nothing before any.
    #[test]
    fn evaluation_is_printed_by_watch_and_status() {
        let s = status_with_eval();
        let expected = "eval@step-40: epoch=1 val.r_mean=52.3123";
        assert!(watch_line(&s).contains(expected), "{}", watch_line(&s));
        let table = status_table(std::slice::from_ref(&s));
        assert_eq!(
            table.lines().last(),
            Some(format!("job-0001 {expected}").as_str())
        );
        let plain = v1::JobStatus {
            evaluation: None,
            ..s
        };
        assert!(!watch_line(&plain).contains("eval@"));
        assert_eq!(status_table(&[plain]).lines().count(), 2);
    }
}
