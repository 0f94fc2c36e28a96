//! Official checkpoints: every fixture `model.th` (read by our zip + pickle reader) holds exactly
//! the tensors of its `model.safetensors`, `xvlm convert model.th` reproduces `model.safetensors`, and bad
//! input gives errors that name the file or key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Kind, Tensor};
use xvlm_model::checkpoint::{
    load_state_dict, read_safetensors, read_state_dict, read_torch_file, CheckpointError,
    LoadOptions, StateDict,
};

fn fixture_cases_with_th() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(xvlm_model::fixtures_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("model.th").exists())
        .collect();
    cases.sort();
    cases
}

fn assert_same(a: &StateDict, b: &StateDict, what: &str) {
    let ka: Vec<_> = a.keys().collect();
    let kb: Vec<_> = b.keys().collect();
    assert_eq!(ka, kb, "{what}: key sets differ");
    for (k, t) in a {
        let u = &b[k];
        assert_eq!(t.kind(), u.kind(), "{what}: dtype of {k}");
        assert_eq!(t.size(), u.size(), "{what}: shape of {k}");
        assert!(t.equal(u), "{what}: values of {k}");
    }
}

#[test]
fn every_fixture_model_th_equals_its_safetensors() {
    let cases = fixture_cases_with_th();
    assert!(
        cases.len() >= 7,
        "expected the 7 model fixtures, found {cases:?}"
    );
    for case in cases {
        let file = read_torch_file(&case.join("model.th")).unwrap();
        assert!(
            file.tensors.iter().all(|(k, _)| k.starts_with("model.")),
            "{}: tensors outside 'model'",
            case.display()
        );
        // the official checkpointer also saves the task config; its scalars come through as JSON
        assert!(
            file.config().iter().any(|(k, _)| k == "image_res"),
            "{}: config.image_res not read",
            case.display()
        );
        let th = file.state_dict();
        let st: StateDict = read_safetensors(&case.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        assert_same(&th, &st, &case.display().to_string());
        // read_state_dict recognises both formats by content
        assert_same(
            &read_state_dict(&case.join("model.th")).unwrap(),
            &st,
            "auto th",
        );
    }
}

#[test]
fn xvlm_convert_reproduces_model_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    for case in fixture_cases_with_th() {
        let out = dir.path().join(format!(
            "{}.safetensors",
            case.file_name().unwrap().to_string_lossy()
        ));
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_xvlm"))
            .arg("convert")
            .arg(case.join("model.th"))
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "convert {}: {}",
            case.display(),
            String::from_utf8_lossy(&status.stderr)
        );
        let got: StateDict = read_safetensors(&out).unwrap().into_iter().collect();
        let want: StateDict = read_safetensors(&case.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        assert_same(&got, &want, &case.display().to_string());
    }
}

#[test]
fn convert_of_a_missing_file_fails_with_its_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xvlm"))
        .args(["convert", "/nonexistent/ckpt.th", "/tmp/never.safetensors"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ckpt.th"), "{err}");
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = read_torch_file(&dir.path().join("nope.th")).unwrap_err();
    assert!(matches!(missing, CheckpointError::Open { .. }), "{missing}");
    assert!(missing.to_string().contains("nope.th"));

    let text = write(dir.path(), "text.th", b"hello, this is not a checkpoint");
    let err = read_torch_file(&text).unwrap_err().to_string();
    assert!(
        err.contains("text.th") && err.contains("not a zip"),
        "{err}"
    );

    let legacy = write(
        dir.path(),
        "legacy.th",
        &[0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc],
    );
    let err = read_torch_file(&legacy).unwrap_err().to_string();
    assert!(err.contains("legacy"), "{err}");

    // a zip that is not a torch.save archive
    let zip = write(
        dir.path(),
        "broken.th",
        b"PK\x03\x04garbage garbage garbage",
    );
    let err = read_torch_file(&zip).unwrap_err().to_string();
    assert!(
        err.contains("broken.th") && err.contains("end-of-central-directory"),
        "{err}"
    );

    let err = read_state_dict(&text).unwrap_err().to_string();
    assert!(err.contains("text.th"), "{err}");
}

#[test]
fn load_reports_missing_unexpected_and_names_every_shape_mismatch() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let _a = (&root / "a").zeros("weight", &[2, 3]);
    let _b = (&root / "b").zeros("weight", &[4]);
    let _c = (&root / "c").zeros("weight", &[5]);

    let mut sd: StateDict = BTreeMap::new();
    sd.insert(
        "a.weight".into(),
        Tensor::ones([2, 3], (Kind::Double, Device::Cpu)),
    );
    sd.insert(
        "x.extra".into(),
        Tensor::ones([1], (Kind::Float, Device::Cpu)),
    );
    sd.insert(
        "layers.0.blocks.1.attn_mask".into(),
        Tensor::ones([1], (Kind::Float, Device::Cpu)),
    );
    let report = load_state_dict(&vs, &sd, &LoadOptions::default()).unwrap();
    assert_eq!(report.loaded, vec!["a.weight"]);
    assert_eq!(report.missing, vec!["b.weight", "c.weight"]);
    assert_eq!(report.unexpected, vec!["x.extra"]);
    assert_eq!(report.ignored, vec!["layers.0.blocks.1.attn_mask"]);
    // copied with dtype conversion
    let a = &vs.variables()["a.weight"];
    assert_eq!(a.kind(), Kind::Float);
    assert_eq!(a.sum(Kind::Float).double_value(&[]), 6.0);

    let strict = LoadOptions {
        strict: true,
        ..Default::default()
    };
    let err = load_state_dict(&vs, &sd, &strict).unwrap_err().to_string();
    assert!(err.contains("b.weight") && err.contains("x.extra"), "{err}");

    sd.insert(
        "b.weight".into(),
        Tensor::zeros([3], (Kind::Float, Device::Cpu)),
    );
    sd.insert(
        "c.weight".into(),
        Tensor::zeros([5, 1], (Kind::Float, Device::Cpu)),
    );
    let err = load_state_dict(&vs, &sd, &LoadOptions::default()).unwrap_err();
    let CheckpointError::ShapeMismatch(m) = &err else {
        panic!("expected a shape mismatch, got {err}");
    };
    assert_eq!(m.len(), 2);
    let msg = err.to_string();
    assert!(
        msg.contains("b.weight (model [4], checkpoint [3])"),
        "{msg}"
    );
    assert!(
        msg.contains("c.weight (model [5], checkpoint [5, 1])"),
        "{msg}"
    );
}

/// Tied tensors keep sharing memory when read from `model.th` (as after `torch.load`), and a state dict
/// written with aliases holds the tied tensor under every official key and reads back equal.
#[test]
fn tied_weights_share_storage_on_read_and_are_saved_under_every_key() {
    let case = xvlm_model::fixtures_dir().join("pretrain_swin_bert");
    let sd = read_torch_file(&case.join("model.th"))
        .unwrap()
        .state_dict();
    let word = &sd["text_encoder.bert.embeddings.word_embeddings.weight"];
    let decoder = &sd["text_encoder.cls.predictions.decoder.weight"];
    assert_eq!(word.data_ptr(), decoder.data_ptr());

    let vs = nn::VarStore::new(Device::Cpu);
    let _w = (&vs.root() / "emb").randn("weight", &[3, 2], 0.0, 1.0);
    let mut out = xvlm_model::checkpoint::varstore_state_dict(&vs);
    xvlm_model::checkpoint::add_aliases(
        &mut out,
        &[("decoder.weight".to_string(), "emb.weight".to_string())],
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tied.safetensors");
    xvlm_model::checkpoint::write_safetensors(&out, &path).unwrap();
    let back = read_state_dict(&path).unwrap();
    assert_eq!(back.len(), 2);
    assert!(back["decoder.weight"].equal(&back["emb.weight"]));
    let missing =
        xvlm_model::checkpoint::add_aliases(&mut out, &[("x".to_string(), "nope".to_string())]);
    assert!(missing.unwrap_err().to_string().contains("nope"));
}
