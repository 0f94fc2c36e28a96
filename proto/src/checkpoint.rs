//! The checkpoint commit protocol, shared by the trainers (which upload parts and resume) and the
//! coordinator (which commits). Layout under `{output}/checkpoints/`: one `step-{S}/` directory per
//! checkpoint, holding every rank's part and, once every part is in, `MANIFEST.json` (each file with
//! its size and sha256); `latest` names the newest committed step. A step directory without a
//! manifest is never resumed.
//!
//! Each rank uploads its files, then reports a [`Part`] (its files with sizes and hashes). The
//! coordinator collects the parts of a step; when all `world` are in, [`commit`] writes the manifest
//! last, moves `latest`, and applies `keep_last` retention.

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

/// Directory (relative to the job output) holding every checkpoint.
pub const CHECKPOINTS: &str = "checkpoints";
/// The commit record inside a step directory.
pub const MANIFEST: &str = "MANIFEST.json";
/// The pointer to the newest committed step, inside [`CHECKPOINTS`].
pub const LATEST: &str = "latest";

/// One file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name relative to the step directory.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Hex sha256.
    pub sha256: String,
}

/// One rank's uploaded part of a checkpoint, as the trainer reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// Global step the state is taken after.
    pub step: u64,
    /// Rank that wrote it.
    pub rank: usize,
    /// World size of the generation that saved it.
    pub world: usize,
    /// That generation.
    pub generation: u64,
    /// The on-demand checkpoint request it serves (0: periodic or requested by a drain).
    pub request: u64,
    /// Every file the rank wrote, its part record last.
    pub files: Vec<FileEntry>,
}

/// `MANIFEST.json`: the commit record of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Global step.
    pub step: u64,
    /// World size that saved it.
    pub world: usize,
    /// Generation that saved it.
    pub generation: u64,
    /// Every file of the checkpoint but the manifest itself, in rank order.
    pub files: Vec<FileEntry>,
}

/// Parts that do not make one checkpoint.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint parts of step {step}: {reason}")]
pub struct IncompleteParts {
    /// The step.
    pub step: u64,
    /// What is wrong.
    pub reason: String,
}

impl Manifest {
    /// The manifest of the parts of one step: every rank of its world exactly once, from the same
    /// generation.
    pub fn from_parts(parts: &[Part]) -> Result<Manifest, IncompleteParts> {
        let first = parts.first().ok_or(IncompleteParts {
            step: 0,
            reason: "no parts".into(),
        })?;
        let bad = |reason: String| IncompleteParts {
            step: first.step,
            reason,
        };
        let mut sorted: Vec<&Part> = parts.iter().collect();
        sorted.sort_by_key(|p| p.rank);
        for (i, p) in sorted.iter().enumerate() {
            if (p.step, p.world, p.generation) != (first.step, first.world, first.generation) {
                return Err(bad(format!(
                    "rank {} reports step {} world {} generation {}, rank {} step {} world {} generation {}",
                    p.rank, p.step, p.world, p.generation, first.rank, first.step, first.world, first.generation
                )));
            }
            if p.rank != i {
                return Err(bad(format!("rank {i} is missing or duplicated")));
            }
        }
        if sorted.len() != first.world {
            return Err(bad(format!(
                "{} of {} ranks reported",
                sorted.len(),
                first.world
            )));
        }
        Ok(Manifest {
            step: first.step,
            world: first.world,
            generation: first.generation,
            files: sorted.iter().flat_map(|p| p.files.clone()).collect(),
        })
    }
}

#[cfg(feature = "grpc")]
impl Part {
    /// The wire form, for job `job`.
    pub fn to_wire(&self, job: &str) -> crate::v1::CheckpointPart {
        crate::v1::CheckpointPart {
            job_id: job.to_string(),
            generation: self.generation,
            step: self.step,
            rank: self.rank as u32,
            world_size: self.world as u32,
            request_id: self.request,
            files: self
                .files
                .iter()
                .map(|f| crate::v1::CheckpointFile {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        }
    }

    /// From the wire form (the job id stays with the caller).
    pub fn from_wire(p: &crate::v1::CheckpointPart) -> Part {
        Part {
            step: p.step,
            rank: p.rank as usize,
            world: p.world_size as usize,
            generation: p.generation,
            request: p.request_id,
            files: p
                .files
                .iter()
                .map(|f| FileEntry {
                    path: f.path.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                })
                .collect(),
        }
    }
}

/// The directory name of step `s`, relative to the job output.
pub fn step_dir(step: u64) -> String {
    format!("{CHECKPOINTS}/step-{step}")
}

/// The step a `step-{S}` directory name holds.
pub fn parse_step(dir: &str) -> Option<u64> {
    dir.strip_prefix("step-")?.parse().ok()
}

/// A commit or retention request to the store failed.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint store {path}: {source}")]
pub struct CommitError {
    /// The object or prefix the request was about.
    pub path: String,
    /// The store's error.
    #[source]
    pub source: object_store::Error,
}

/// A job output's checkpoints in one store: `root` is the output's path in `store`.
pub struct CheckpointDir<'a> {
    /// The store.
    pub store: &'a dyn ObjectStore,
    /// The job output's path in it.
    pub root: &'a ObjectPath,
}

impl CheckpointDir<'_> {
    fn path(&self, name: &str) -> ObjectPath {
        name.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |p, part| p.join(part))
    }

    fn err(&self, name: &str) -> impl Fn(object_store::Error) -> CommitError + '_ {
        let path = self.path(name).to_string();
        move |source| CommitError {
            path: path.clone(),
            source,
        }
    }

    /// Writes the manifest (the commit point), then `latest`, then drops what `keep_last` no longer
    /// keeps; returns the removed steps. [`CheckpointDir::publish`] then [`CheckpointDir::retain`].
    pub async fn commit(
        &self,
        manifest: &Manifest,
        keep_last: u32,
    ) -> Result<Vec<u64>, CommitError> {
        self.publish(manifest).await?;
        self.retain(manifest.step, keep_last).await
    }

    /// Writes the manifest (the commit point), then moves `latest` to its step: the checkpoint is
    /// committed once this returns.
    pub async fn publish(&self, manifest: &Manifest) -> Result<(), CommitError> {
        let dir = step_dir(manifest.step);
        let name = format!("{dir}/{MANIFEST}");
        let json = serde_json::to_vec_pretty(manifest).unwrap_or_default();
        self.store
            .put(&self.path(&name), PutPayload::from(json))
            .await
            .map_err(self.err(&name))?;
        let latest = format!("{CHECKPOINTS}/{LATEST}");
        self.store
            .put(
                &self.path(&latest),
                PutPayload::from(format!("step-{}\n", manifest.step).into_bytes()),
            )
            .await
            .map_err(self.err(&latest))?;
        Ok(())
    }

    /// Committed steps and uncommitted step directories, each sorted.
    pub async fn steps(&self) -> Result<(Vec<u64>, Vec<u64>), CommitError> {
        let listing = match self
            .store
            .list_with_delimiter(Some(&self.path(CHECKPOINTS)))
            .await
        {
            Ok(l) => l,
            Err(object_store::Error::NotFound { .. }) => return Ok((Vec::new(), Vec::new())),
            Err(e) => return Err(self.err(CHECKPOINTS)(e)),
        };
        let mut committed = Vec::new();
        let mut partial = Vec::new();
        for prefix in &listing.common_prefixes {
            let Some(step) = prefix.filename().and_then(parse_step) else {
                continue;
            };
            let manifest = format!("{}/{MANIFEST}", step_dir(step));
            match self.store.head(&self.path(&manifest)).await {
                Ok(_) => committed.push(step),
                Err(object_store::Error::NotFound { .. }) => partial.push(step),
                Err(e) => return Err(self.err(&manifest)(e)),
            }
        }
        committed.sort_unstable();
        partial.sort_unstable();
        Ok((committed, partial))
    }

    /// Keeps the newest `keep_last` committed checkpoints; drops older ones and abandoned parts
    /// older than `newest`; returns the removed steps. A manifest goes before its files, so a
    /// half-deleted checkpoint is never resumed; on `file://` the emptied step directories go too
    /// ([`crate::storage::open`] removes the directories its deletes empty).
    pub async fn retain(&self, newest: u64, keep_last: u32) -> Result<Vec<u64>, CommitError> {
        let (committed, partial) = self.steps().await?;
        let drop_n = committed.len().saturating_sub(keep_last.max(1) as usize);
        let abandoned = partial.into_iter().filter(|&s| s < newest);
        let mut removed = Vec::new();
        for step in committed[..drop_n].iter().copied().chain(abandoned) {
            let dir = step_dir(step);
            let manifest = format!("{dir}/{MANIFEST}");
            match self.store.delete(&self.path(&manifest)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err(&manifest)(e)),
            }
            let objects: Vec<_> = self
                .store
                .list(Some(&self.path(&dir)))
                .try_collect()
                .await
                .map_err(self.err(&dir))?;
            for meta in objects {
                match self.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err(&dir)(e)),
                }
            }
            removed.push(step);
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    fn part(step: u64, rank: usize, world: usize) -> Part {
        Part {
            step,
            rank,
            world,
            generation: 1,
            request: 0,
            files: vec![FileEntry {
                path: format!("rank-{rank}.json"),
                size: 1,
                sha256: "00".into(),
            }],
        }
    }

    #[test]
    fn manifest_needs_every_rank_once() {
        let m = Manifest::from_parts(&[part(4, 1, 2), part(4, 0, 2)]).unwrap();
        assert_eq!(m.files[0].path, "rank-0.json");
        assert_eq!(m.files.len(), 2);
        let missing = Manifest::from_parts(&[part(4, 0, 2)]).unwrap_err();
        assert!(missing.reason.contains("1 of 2"), "{missing}");
        let dup = Manifest::from_parts(&[part(4, 0, 2), part(4, 0, 2)]).unwrap_err();
        assert!(dup.reason.contains("rank 1"), "{dup}");
        let mixed = Manifest::from_parts(&[part(4, 0, 2), part(6, 1, 2)]).unwrap_err();
        assert!(mixed.reason.contains("step 6"), "{mixed}");
    }

    /// Commit writes manifest and `latest`; retention keeps the newest two and drops abandoned
    /// parts older than the newest commit, but not newer ones (an upload in flight).
    #[test]
    fn commit_moves_latest_and_retains() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let store = InMemory::new();
        let root = ObjectPath::from("runs/job");
        let dir = CheckpointDir {
            store: &store,
            root: &root,
        };
        rt.block_on(async {
            for step in [2u64, 3, 4, 5, 6] {
                let name = root
                    .clone()
                    .join("checkpoints")
                    .join(format!("step-{step}"));
                store
                    .put(&name.join("rank-0.json"), PutPayload::from(vec![1u8]))
                    .await
                    .unwrap();
            }
            for step in [2u64, 4, 5] {
                let m = Manifest::from_parts(&[part(step, 0, 1)]).unwrap();
                dir.commit(&m, 2).await.unwrap();
            }
            let (committed, partial) = dir.steps().await.unwrap();
            assert_eq!(committed, vec![4, 5]);
            assert_eq!(partial, vec![6], "step 3 was abandoned, step 6 is newer");
            let latest = store
                .get(&root.clone().join("checkpoints").join("latest"))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(&latest[..], b"step-5\n");
        });
    }

    /// On `file://`, retention removes a pruned checkpoint's directory (nested ones included) and an
    /// abandoned step's, not only their files: what is left is the kept checkpoints and `latest`.
    #[test]
    fn file_retention_removes_step_directories() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let url = format!("file://{}/job", tmp.path().display());
        let located = crate::storage::open(&url, &[]).unwrap();
        let dir = CheckpointDir {
            store: located.store.as_ref(),
            root: &located.path,
        };
        rt.block_on(async {
            for step in [2u64, 3, 4, 5] {
                for name in ["rank-0.json", "rank-0/model.safetensors"] {
                    let path = dir.path(&format!("{}/{name}", step_dir(step)));
                    located
                        .store
                        .put(&path, PutPayload::from(vec![1u8]))
                        .await
                        .unwrap();
                }
            }
            let mut removed = Vec::new();
            for step in [2u64, 4, 5] {
                let m = Manifest::from_parts(&[part(step, 0, 1)]).unwrap();
                removed.extend(dir.commit(&m, 1).await.unwrap());
            }
            removed.sort_unstable();
            assert_eq!(removed, vec![2, 3, 4]);
        });
        let checkpoints = tmp.path().join("job").join(CHECKPOINTS);
        let mut left: Vec<String> = std::fs::read_dir(&checkpoints)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec!["latest", "step-5"],
            "in {}",
            checkpoints.display()
        );
        assert!(checkpoints
            .join("step-5/rank-0/model.safetensors")
            .is_file());
    }
}
