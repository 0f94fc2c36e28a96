//! The learning corpus and the committed starting checkpoints of the fine-tuning learning tests
//! (`tests/fixtures/learning/`, made by `scripts/make-learning-starts.sh`, whose header says why they
//! are committed rather than pre-trained in each run).

use std::path::{Path, PathBuf};

use xvlm_model::data::synth::{generate, SynthConfig};
use xvlm_worker::checkpoint::sha256_hex;

/// The learning corpus's images: 3,200 training images, 400 each for val and test.
pub const LEARNING_IMAGES: usize = 4000;

/// `tests/fixtures/learning/`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/learning")
}

/// The files of `sums` (`digest  path` lines, paths relative to `root`) that are missing or differ.
fn mismatches(root: &Path, sums: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(sums).unwrap_or_else(|e| panic!("{}: {e}", sums.display()));
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, name) = line
            .split_once("  ")
            .unwrap_or_else(|| panic!("{}: not a `digest  path` line: {line}", sums.display()));
        match std::fs::read(root.join(name)) {
            Ok(bytes) if sha256_hex(&bytes) == digest => {}
            Ok(_) => bad.push(format!("{name} differs")),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    bad
}

/// The learning corpus (the one `scripts/make-learning-starts.sh` pre-trained the starts on), made
/// once per test binary: (data folder, seconds it took). Panics when it is not byte for byte the
/// corpus of `corpus.sha256`: the committed starts would then have been trained on other images.
pub fn learning_corpus() -> &'static (PathBuf, f64) {
    static CORPUS: std::sync::OnceLock<(PathBuf, f64)> = std::sync::OnceLock::new();
    CORPUS.get_or_init(|| {
        // Kept for the whole binary: the tests read from it until the process exits.
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
        let data = dir.path().join("data");
        let started = std::time::Instant::now();
        generate(
            &data,
            &SynthConfig {
                images: LEARNING_IMAGES,
                shape_side: (0.6, 0.95),
                background: (225, 225),
                ..SynthConfig::default()
            },
        )
        .expect("learning corpus");
        let bad = mismatches(&data, &fixtures().join("corpus.sha256"));
        assert!(
            bad.is_empty(),
            "the learning corpus is not the one the committed starts were pre-trained on ({}); \
             rerun scripts/make-learning-starts.sh",
            bad.join(", ")
        );
        (data, started.elapsed().as_secs_f64())
    })
}

/// The committed starting checkpoint `name` (`pretrained` or `nlvr_pretrained`), checked against
/// the fixture's SHA256SUMS.
pub fn learning_start(name: &str) -> PathBuf {
    let root = fixtures();
    let bad = mismatches(&root, &root.join("SHA256SUMS"));
    assert!(
        bad.is_empty(),
        "tests/fixtures/learning: {}",
        bad.join(", ")
    );
    let path = root.join(format!("{name}.safetensors"));
    assert!(path.is_file(), "no learning start {}", path.display());
    path
}
