//! How `watch` and `run` show a job: on a terminal, one live progress bar with the latest losses,
//! redrawn in place, and a permanent line for what a reader must not miss (a state change, an
//! evaluation, a restart, a message); in a pipe, one line per event, as scripts and logs want.

use std::io::{IsTerminal, Write};

use xvlm_proto::v1;

use crate::status_text::{eta_text, evaluation, is_terminal, state_name, watch_line};

/// Cells of the bar itself.
const BAR_CELLS: usize = 24;

/// Lines or a live bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchView {
    /// One line per event (a pipe, a file, `TERM=dumb`).
    Lines,
    /// A live bar at most `width` columns wide.
    Bar {
        /// Terminal columns.
        width: usize,
    },
}

impl WatchView {
    /// A bar when stdout is a terminal that can redraw a line, else lines.
    pub fn for_stdout() -> WatchView {
        let stdout = std::io::stdout();
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if !stdout.is_terminal() || dumb {
            return WatchView::Lines;
        }
        WatchView::Bar {
            width: terminal_width().unwrap_or(100),
        }
    }
}

/// The terminal's columns: `TIOCGWINSZ` on stdout, else `COLUMNS`.
fn terminal_width() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; fd 1 is stdout.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        return Some(size.ws_col as usize);
    }
    std::env::var("COLUMNS").ok()?.parse().ok()
}

/// What a permanent line reports; a change of it prints one.
#[derive(Clone, Debug, Default, PartialEq)]
struct Milestones {
    state: String,
    generation: u64,
    evaluation: Option<String>,
    restarts: u32,
    message: String,
}

impl Milestones {
    fn of(s: &v1::JobStatus) -> Milestones {
        Milestones {
            state: state_name(s).to_string(),
            generation: s.generation,
            evaluation: evaluation(s),
            restarts: s.restarts,
            message: s.message.clone(),
        }
    }
}

/// Prints a job's statuses as they arrive.
pub struct WatchPrinter<W: Write> {
    out: W,
    view: WatchView,
    seen: Option<Milestones>,
    bar_shown: bool,
}

impl<W: Write> WatchPrinter<W> {
    /// A printer writing to `out`.
    pub fn new(out: W, view: WatchView) -> Self {
        WatchPrinter {
            out,
            view,
            seen: None,
            bar_shown: false,
        }
    }

    /// Shows one status.
    pub fn show(&mut self, s: &v1::JobStatus) -> std::io::Result<()> {
        let WatchView::Bar { width } = self.view else {
            writeln!(self.out, "{}", watch_line(s))?;
            return self.out.flush();
        };
        let now = Milestones::of(s);
        if self.seen.as_ref() != Some(&now) || is_terminal(s) {
            self.clear_bar()?;
            writeln!(self.out, "{}", watch_line(s))?;
            self.seen = Some(now);
        }
        if !is_terminal(s) {
            write!(self.out, "\r\x1b[2K{}", bar_line(s, width))?;
            self.bar_shown = true;
        }
        self.out.flush()
    }

    /// Leaves the terminal on a fresh line (the watch ended early).
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.clear_bar()?;
        self.out.flush()
    }

    fn clear_bar(&mut self) -> std::io::Result<()> {
        if self.bar_shown {
            write!(self.out, "\r\x1b[2K")?;
            self.bar_shown = false;
        }
        Ok(())
    }
}

/// The bar: `JOB STATE [#####-----] 45% 9/20 eta 1m05s itc=0.1234 lr=1.0e-4 12.3/s`, cut to `width`
/// columns so it never wraps (a wrapped line cannot be redrawn in place).
pub fn bar_line(s: &v1::JobStatus, width: usize) -> String {
    let p = s.progress.clone().unwrap_or_default();
    let mut line = format!("{} {} ", s.job_id, state_name(s));
    if p.total_steps > 0 {
        let done = p.step.min(p.total_steps);
        let filled = (done as usize * BAR_CELLS) / p.total_steps as usize;
        let percent = done * 100 / p.total_steps;
        line.push_str(&format!(
            "[{}{}] {percent:>3}% {}/{}",
            "#".repeat(filled),
            "-".repeat(BAR_CELLS - filled),
            p.step,
            p.total_steps
        ));
    } else {
        line.push_str(&format!("step {}", p.step));
    }
    // The ETA before the losses: a narrow terminal cuts the end of the line.
    if p.eta_seconds > 0.0 {
        line.push_str(&format!(" eta {}", eta_text(p.eta_seconds)));
    }
    for l in &p.losses {
        line.push_str(&format!(" {}={:.4}", l.name, l.value));
    }
    if p.step > 0 {
        line.push_str(&format!(" lr={:.1e} {:.1}/s", p.lr, p.samples_per_sec));
    }
    line.chars().take(width.saturating_sub(1).max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: v1::JobState, step: u64, total: u64) -> v1::JobStatus {
        v1::JobStatus {
            job_id: "job-0001".into(),
            state: state as i32,
            generation: 1,
            progress: Some(v1::Progress {
                step,
                total_steps: total,
                losses: vec![v1::Loss {
                    name: "itc".into(),
                    value: 0.5,
                }],
                lr: 1e-4,
                samples_per_sec: 12.0,
                eta_seconds: 65.0,
            }),
            ..Default::default()
        }
    }

    /// The bar fills with the steps, shows the losses and the ETA, and never exceeds the width.
    #[test]
    fn the_bar_shows_progress_within_the_width() {
        let half = bar_line(&status(v1::JobState::Running, 10, 20), 200);
        assert!(
            half.contains(&format!(
                "[{}{}]  50% 10/20",
                "#".repeat(12),
                "-".repeat(12)
            )),
            "{half}"
        );
        assert!(
            half.contains("itc=0.5000") && half.contains("eta 1m05s"),
            "{half}"
        );
        let narrow = bar_line(&status(v1::JobState::Running, 10, 20), 30);
        assert_eq!(narrow.chars().count(), 29);
        let unknown = bar_line(&status(v1::JobState::Running, 7, 0), 200);
        assert!(
            unknown.contains("step 7") && !unknown.contains('['),
            "{unknown}"
        );
    }

    /// On a terminal, steps redraw the bar in place; a state change and the end print lines that
    /// stay, and nothing is left of the bar after the end. In a pipe, one line per status.
    #[test]
    fn terminals_get_a_live_bar_and_pipes_get_lines() {
        let statuses = [
            status(v1::JobState::Running, 1, 4),
            status(v1::JobState::Running, 2, 4),
            status(v1::JobState::Running, 3, 4),
            status(v1::JobState::Succeeded, 4, 4),
        ];
        let mut out = Vec::new();
        let mut p = WatchPrinter::new(&mut out, WatchView::Bar { width: 120 });
        for s in &statuses {
            p.show(s).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text
            .split('\n')
            .map(|l| l.rsplit("\r\x1b[2K").next().unwrap_or(l))
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            lines.len(),
            2,
            "the first RUNNING and the SUCCEEDED lines stay: {text:?}"
        );
        assert!(
            lines[0].contains("RUNNING") && lines[1].contains("SUCCEEDED"),
            "{lines:?}"
        );
        assert_eq!(text.matches("] ").count(), 3, "three bar redraws: {text:?}");
        assert!(
            text.ends_with('\n'),
            "the end leaves no bar behind: {text:?}"
        );

        let mut out = Vec::new();
        let mut p = WatchPrinter::new(&mut out, WatchView::Lines);
        for s in &statuses {
            p.show(s).unwrap();
        }
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(!text.contains('\r'));
    }
}
