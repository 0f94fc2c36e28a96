//! Real processes: a child started through `process::die_with_parent` dies when its parent is
//! SIGKILLed (one started without it survives, so the check can fail), and text logs written to a
//! file carry no colour codes. The parent is this test binary run again in a helper role
//! (`XVLM_TEST_ROLE`), since the test process itself cannot be the one killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use xvlm_proto::process::{die_with_parent, is_running, signal_process};

const ROLE: &str = "XVLM_TEST_ROLE";

/// This test binary, running only the test `name` in the role `role`.
fn helper(name: &str, role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role);
    cmd
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// Helper role `parent`: starts `sleep 60` twice, guarded and not, prints both pids, waits to be
/// killed. In any other run this test does nothing.
#[test]
fn parent_role() {
    if std::env::var(ROLE).as_deref() != Ok("parent") {
        return;
    }
    let guarded = die_with_parent(Command::new("sleep").arg("60"), libc::SIGKILL)
        .spawn()
        .unwrap();
    let unguarded = Command::new("sleep").arg("60").spawn().unwrap();
    println!("PIDS {} {}", guarded.id(), unguarded.id());
    std::thread::sleep(Duration::from_secs(60));
    // Reached only if nobody killed this helper in a minute.
    for mut child in [guarded, unguarded] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// SIGKILL the parent: the guarded child is gone within seconds, the unguarded one still runs.
#[test]
fn child_dies_with_its_sigkilled_parent() {
    let mut parent = helper("parent_role", "parent")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(parent.stdout.take().unwrap()).lines();
    let pids: Vec<u32> = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            // The harness may have written `test parent_role ... ` before it on the same line.
            l.split_once("PIDS ")
                .map(|(_, p)| p.split(' ').map(|n| n.parse().unwrap()).collect())
        })
        .expect("the helper printed its children's pids");
    let (guarded, unguarded) = (pids[0], pids[1]);
    assert!(is_running(guarded) && is_running(unguarded));
    parent.kill().unwrap();
    parent.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || !is_running(guarded));
    let survivor = is_running(unguarded);
    signal_process(unguarded, libc::SIGKILL);
    signal_process(guarded, libc::SIGKILL);
    assert!(gone, "the guarded child {guarded} outlived its parent");
    assert!(
        survivor,
        "the unguarded child died too: the check would pass without the helper"
    );
}

/// Helper role `log`: one text log line to stderr.
#[test]
fn log_role() {
    if std::env::var(ROLE).as_deref() != Ok("log") {
        return;
    }
    xvlm_proto::logging::init(xvlm_proto::logging::LogFormat::Text);
    tracing::warn!(rank = 1, "trainer failed");
}

/// Text logs to a file (a trainer's stderr) have no escape codes, even with colour forced nowhere.
#[test]
fn text_logs_to_a_file_are_plain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rank0.log");
    let status = helper("log_role", "log")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&path).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(
        log.contains("WARN") && log.contains("trainer failed") && log.contains("rank=1"),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "escape codes in {log:?}");
}
