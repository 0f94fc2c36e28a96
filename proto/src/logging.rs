//! One logging setup for every xvlm binary: `RUST_LOG` filters, `--log-format` picks text or JSON.
//! Text is coloured only on a terminal, and [`strip_terminal_escapes`] cleans a log line that is
//! quoted elsewhere (a trainer's last line in a job's failure message).

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level. Logs go to stderr so
/// stdout stays machine-readable (job ids, benchmark results). Text lines carry ANSI colours only when
/// stderr is a terminal and `NO_COLOR` is unset: a trainer's stderr is a log file, and colour codes
/// there end up in failure messages and `grep` results.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let colour = colour_wanted(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    // A second init (tests calling main logic twice) is harmless, so its error is ignored.
    let _ = match format {
        LogFormat::Text => builder.with_ansi(colour).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Whether text logs are coloured: on a terminal, unless `NO_COLOR` is set to anything non-empty
/// (no-color.org).
pub fn colour_wanted(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// `line` without terminal escape sequences: CSI (`ESC [ ... final`, colours and cursor moves), OSC
/// (`ESC ] ... BEL` or `ESC ] ... ESC \`, titles and hyperlinks), the other ESC sequences and their
/// 8-bit forms, and any other control character but tab. For quoting a log line in a message that
/// is shown in a terminal or stored (a job's failure message).
pub fn strip_terminal_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                Some('[') => skip_csi(&mut chars),
                Some(']' | 'P' | 'X' | '^' | '_') => skip_string(&mut chars),
                // ESC, intermediate bytes (0x20..=0x2F), one final byte: `ESC ( B`, `ESC 7`.
                Some(' '..='/') => {
                    while chars.next_if(|c| matches!(c, ' '..='/')).is_some() {}
                    chars.next();
                }
                Some(_) | None => {}
            },
            '\u{9b}' => skip_csi(&mut chars),
            '\u{9d}' | '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => skip_string(&mut chars),
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Past a CSI's parameter and intermediate bytes and its final byte (0x40..=0x7E).
fn skip_csi(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if ('\u{40}'..='\u{7e}').contains(&c) {
            return;
        }
    }
}

/// Past an OSC / DCS / SOS / PM / APC string and its terminator: BEL, `ESC \` or the 8-bit ST.
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{7}' | '\u{9c}' => return,
            '\u{1b}' if chars.peek() == Some(&'\\') => {
                chars.next();
                return;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A coloured tracing line (what a trainer wrote to its log before) comes out as plain text.
    #[test]
    fn tracing_colours_are_stripped() {
        let line = "\u{1b}[2m2026-12-03T10:00:00.123Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \
                    \u{1b}[2mxvlm_worker::trainer\u{1b}[0m\u{1b}[2m:\u{1b}[0m task failed: \
                    \u{1b}[3mrank\u{1b}[0m\u{1b}[2m=\u{1b}[0m1 out of memory";
        assert_eq!(
            strip_terminal_escapes(line),
            "2026-12-03T10:00:00.123Z ERROR xvlm_worker::trainer: task failed: rank=1 out of memory"
        );
    }

    /// OSC titles and hyperlinks (BEL or ST terminated), other ESC sequences, 8-bit CSI and stray
    /// controls go; tabs and non-ASCII text stay.
    #[test]
    fn other_sequences_are_stripped() {
        let cases = [
            ("\u{1b}]0;title\u{7}done", "done"),
            (
                "see \u{1b}]8;;https://x.org/a\u{1b}\\the docs\u{1b}]8;;\u{1b}\\ now",
                "see the docs now",
            ),
            ("\u{1b}(Bplain\u{1b}7 x\u{1b}8", "plain x"),
            ("\u{9b}1;31mred\u{9b}0m", "red"),
            ("a\u{7}b\rc\u{0}d", "abcd"),
            ("tab\tkept, naïve ✓", "tab\tkept, naïve ✓"),
            ("cut at the end \u{1b}[3", "cut at the end "),
            ("lone escape \u{1b}", "lone escape "),
        ];
        for (input, want) in cases {
            assert_eq!(strip_terminal_escapes(input), want, "{input:?}");
        }
    }

    /// Colour only on a terminal, and never with a non-empty NO_COLOR.
    #[test]
    fn colour_only_on_a_terminal() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(OsStr::new(""))));
        assert!(!colour_wanted(true, Some(OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
    }
}
