//! Checkpoint storage: one object store (`file://`, `s3://`, `hdfs://`; opened by
//! [`xvlm_proto::storage`]) under a root prefix, with a blocking API for the trainer.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use xvlm_proto::checkpoint::{CheckpointDir, Manifest, Part};

use super::CheckpointError;

/// Objects larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 32 << 20;
/// Size of one multipart part.
pub const PART_BYTES: usize = 16 << 20;

/// A store and the prefix every relative name lives under.
#[derive(Clone)]
pub struct Storage {
    url: String,
    store: Arc<dyn ObjectStore>,
    root: ObjectPath,
    rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Storage {
    /// Opens `url` (`file:///abs/dir` or `s3://bucket/prefix`) with settings from the environment.
    pub fn open(url: &str) -> Result<Storage, CheckpointError> {
        Storage::open_with_options(url, &[])
    }

    /// Opens `url`; `options` are S3 config keys (`aws_endpoint`, `aws_allow_http`, ...) that take
    /// precedence over the environment.
    pub fn open_with_options(
        url: &str,
        options: &[(&str, &str)],
    ) -> Result<Storage, CheckpointError> {
        let bad = |reason: String| CheckpointError::Location {
            url: url.to_string(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path).map_err(|e| bad(e.to_string()))?;
        }
        let located = xvlm_proto::storage::open(url, options).map_err(|e| bad(e.reason))?;
        let (store, root) = (located.store, located.path);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start I/O runtime: {e}")))?;
        Ok(Storage {
            url: url.trim_end_matches('/').to_string(),
            store,
            root,
            rt: Arc::new(rt),
        })
    }

    /// The URL of a relative name, for logs and errors.
    pub fn url_of(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn path(&self, name: &str) -> ObjectPath {
        let mut p = self.root.clone();
        for part in name.split('/').filter(|s| !s.is_empty()) {
            p = p.clone().join(part);
        }
        p
    }

    fn err(&self, name: &str, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Store {
            url: self.url_of(name),
            message: e.to_string(),
        }
    }

    /// Writes `data` as `name` (in parts when it is big); the object appears whole or not at all.
    pub fn put(&self, name: &str, data: Bytes) -> Result<(), CheckpointError> {
        let path = self.path(name);
        let store = self.store.clone();
        self.rt
            .block_on(async move {
                if data.len() <= MULTIPART_THRESHOLD {
                    store.put(&path, PutPayload::from(data)).await.map(|_| ())
                } else {
                    let upload = store.put_multipart(&path).await?;
                    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                    for chunk in data.chunks(PART_BYTES) {
                        writer.wait_for_capacity(4).await?;
                        writer.put(data.slice_ref(chunk));
                    }
                    writer.finish().await.map(|_| ())
                }
            })
            .map_err(|e| self.err(name, e))
    }

    /// Reads `name`; `Ok(None)` when it does not exist.
    pub fn get(&self, name: &str) -> Result<Option<Bytes>, CheckpointError> {
        let path = self.path(name);
        let store = self.store.clone();
        match self
            .rt
            .block_on(async move { store.get(&path).await?.bytes().await })
        {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(name, e)),
        }
    }

    /// Names of the sub-directories (common prefixes) directly under `dir`.
    pub fn list_dirs(&self, dir: &str) -> Result<Vec<String>, CheckpointError> {
        let path = self.path(dir);
        let store = self.store.clone();
        let listing = self
            .rt
            .block_on(async move { store.list_with_delimiter(Some(&path)).await });
        match listing {
            Ok(l) => Ok(l
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(self.err(dir, e)),
        }
    }

    /// Commits the parts of one step the way the coordinator does ([`Manifest::from_parts`],
    /// [`CheckpointDir::commit`]): for tools and tests that run trainers without one. Returns the
    /// steps retention removed.
    pub fn commit_parts(
        &self,
        parts: &[Part],
        keep_last: u32,
    ) -> Result<Vec<u64>, CheckpointError> {
        let manifest =
            Manifest::from_parts(parts).map_err(|e| CheckpointError::Format(e.to_string()))?;
        let dir = CheckpointDir {
            store: self.store.as_ref(),
            root: &self.root,
        };
        self.rt
            .block_on(dir.commit(&manifest, keep_last))
            .map_err(|e| CheckpointError::Store {
                url: self.url.clone(),
                message: e.to_string(),
            })
    }
}
