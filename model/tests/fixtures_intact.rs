//! The parity fixtures shipped in `tests/fixtures/parity/` are byte-for-byte the ones listed in its
//! SHA256SUMS, and every file there is listed: nobody edits ground truth to make a test pass.

use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read fixture dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .to_string_lossy()
                .into_owned();
            if rel != "SHA256SUMS" {
                out.insert(format!("./{rel}"));
            }
        }
    }
}

#[test]
fn every_fixture_matches_its_sha256() {
    let root = xvlm_model::fixtures_dir();
    let sums = std::fs::read_to_string(root.join("SHA256SUMS")).expect("SHA256SUMS present");
    let mut listed = BTreeSet::new();
    for line in sums.lines().filter(|l| !l.trim().is_empty()) {
        let (digest, name) = line.split_once("  ").expect("`digest  path` lines");
        let bytes = std::fs::read(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            digest,
            "{name} was modified"
        );
        listed.insert(name.to_string());
    }
    let mut present = BTreeSet::new();
    files_under(&root, &root, &mut present);
    assert_eq!(
        present, listed,
        "files present vs listed in SHA256SUMS differ"
    );
    assert!(
        listed.len() > 50,
        "expected the whole fixture set, found {}",
        listed.len()
    );
}
