//! Bad job files are rejected at submit with a message naming the problem, and nothing is queued.

use xvlm_e2e::{text, write, Cluster};

/// Unknown key, wrong type, bad enum value, missing job file, missing config file, and a world larger
/// than the registered workers allow.
#[test]
fn bad_job_yaml_is_rejected_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::with_workers(dir.path(), &["w0", "w1"]);
    let base = "name: bad\ntask: smoke\nsteps: 5\n";
    let cases: Vec<(String, &str, Vec<&str>)> = vec![
        (
            format!("{base}stpes: 3\n"),
            "unknown.yaml",
            vec!["stpes", "steps"],
        ),
        (
            "name: bad\ntask: smoke\nsteps: lots\n".into(),
            "type.yaml",
            vec!["steps", "lots"],
        ),
        (
            "name: bad\ntask: dance\nsteps: 5\n".into(),
            "enum.yaml",
            vec!["dance", "pretrain"],
        ),
        (
            format!("{base}config: missing.yaml\n"),
            "config.yaml",
            vec!["config", "missing.yaml"],
        ),
        (
            format!("{base}workers: {{min: 3}}\n"),
            "world.yaml",
            vec!["workers.min", "3 workers"],
        ),
        (
            format!("{base}workers: {{devices_per_worker: 4}}\n"),
            "devices.yaml",
            vec!["workers.devices_per_worker"],
        ),
    ];
    for (yaml, name, needles) in cases {
        let path = write(dir.path(), name, &yaml);
        let out = c.cli(&["submit", path.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        for needle in needles {
            assert!(
                err.contains(needle),
                "{name}: error lacks {needle:?}: {err}"
            );
        }
    }
    let out = c.cli(&["submit", dir.path().join("absent.yaml").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("absent.yaml"),
        "{}",
        text(&out.stderr)
    );
    let list = c.cli(&["list"]);
    assert!(
        text(&list.stdout).trim().is_empty(),
        "jobs were queued: {}",
        text(&list.stdout)
    );
}
