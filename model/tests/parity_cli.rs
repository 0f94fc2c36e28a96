//! `xvlm parity`: passes on an intact copy of a case, fails naming the tensor when one expected value is
//! moved by 10x its tolerance, and fails on an unknown kind. Works on temporary copies, never the fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

use tch::Tensor;

fn copy_case(name: &str) -> (tempfile::TempDir, PathBuf) {
    let src = xvlm_model::fixtures_dir().join(name);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
        }
    }
    (tmp, dst)
}

fn run_parity(dir: &Path) -> (bool, String) {
    run_parity_with(dir, &[])
}

fn run_parity_with(dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xvlm"))
        .arg("parity")
        .arg(dir)
        .args(["--weights", "safetensors"])
        .args(extra)
        .output()
        .expect("xvlm runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A perturbed expected tensor makes the command exit non-zero and name that tensor as FAIL.
#[test]
fn perturbed_expected_tensor_fails_by_name() {
    let (tmp, dir) = copy_case("pretrain_swin_bert");
    let report = tmp.path().join("report.json");
    let (ok, text) = run_parity_with(&dir, &["--out", report.to_str().unwrap()]);
    assert!(ok, "the intact copy must pass:\n{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["passed"], true);
    assert_eq!(json["rows"].as_array().unwrap().len(), 44);

    let path = dir.join("expected.safetensors");
    let target = "general.loss_itm";
    let (rtol, atol) = (1e-5, 1e-6);
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            if name == target {
                let e = t.double_value(&[]);
                let moved = e + 10.0 * (rtol * e.abs() + atol);
                (name, Tensor::from(moved as f32).to_kind(t.kind()))
            } else {
                (name, t)
            }
        })
        .collect();
    Tensor::write_safetensors(&tensors, &path).unwrap();

    let (ok, text) = run_parity(&dir);
    assert!(!ok, "a perturbed tensor must fail:\n{text}");
    let fail_line = text
        .lines()
        .find(|l| l.starts_with(target))
        .unwrap_or_else(|| panic!("no line for {target}:\n{text}"));
    assert!(fail_line.contains("FAIL"), "{fail_line}");
    let failing: Vec<&str> = text.lines().filter(|l| l.contains(" FAIL")).collect();
    assert_eq!(
        failing.len(),
        1,
        "only the perturbed tensor fails: {failing:?}"
    );
}

/// An unknown `kind` in case.yaml is an error, not a silent pass.
#[test]
fn unknown_kind_fails() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("case.yaml"), "kind: no_such_kind\n").unwrap();
    let (ok, text) = run_parity(tmp.path());
    assert!(!ok);
    assert!(text.contains("no_such_kind"), "{text}");
}

/// The `image_preprocessing` kind runs through the CLI: all 12 tensors pass on the intact case, and a
/// normalised image tensor moved by 10x the absolute tolerance fails by name.
#[test]
fn image_preprocessing_kind_passes_and_detects_a_perturbation() {
    let (_tmp, dir) = copy_case("image_preprocessing");
    let (ok, text) = run_parity(&dir);
    assert!(ok, "intact case must pass:\n{text}");
    assert!(text.contains("12 compared, 0 failed"), "{text}");

    let path = dir.join("expected.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    for (name, t) in tensors.iter_mut() {
        if name == "image_1.tensor" {
            let bumped = t.copy();
            let _ = bumped
                .view(-1)
                .get(5)
                .fill_(t.view(-1).get(5).double_value(&[]) + 0.16);
            *t = bumped;
        }
    }
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &path).unwrap();
    let (ok, text) = run_parity(&dir);
    assert!(!ok, "perturbed case must fail:\n{text}");
    let failing: Vec<&str> = text.lines().filter(|l| l.contains("FAIL")).collect();
    assert_eq!(failing.len(), 1, "{text}");
    assert!(failing[0].starts_with("image_1.tensor"), "{text}");
}
