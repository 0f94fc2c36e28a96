//! Shard files on a local disk (plain paths) or in an object store (`file://`, `s3://`, `hdfs://` with
//! the `hdfs` feature; opened by `xvlm_proto::storage`): listing a train_file entry and reading a file from a byte offset as a stream of bytes.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};

use super::DataError;

/// Where a shard file lives.
#[derive(Clone)]
pub enum Location {
    /// A local file.
    Local(PathBuf),
    /// An object in a store.
    Object {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// The object's path in the store.
        path: ObjectPath,
    },
}

/// One shard file.
#[derive(Clone)]
pub struct ShardFile {
    /// Display name (path or URL), used in errors and as the sort key.
    pub name: String,
    /// Where to read it.
    pub location: Location,
}

impl std::fmt::Debug for ShardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn store_err(url: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Store {
        url: url.to_string(),
        message: e.to_string(),
    }
}

fn runtime(url: &str) -> Result<tokio::runtime::Runtime, DataError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| store_err(url, format!("cannot start I/O runtime: {e}")))
}

/// Whether a listed name is a shard (Hadoop `_SUCCESS` markers are dropped, as the official code does).
fn is_shard_name(name: &str) -> bool {
    !name.contains("_SUCCESS")
}

/// Expand train_file entries (directories are listed non-recursively, files kept) into shard files,
/// sorted by name so every rank sees the same list. A missing entry is an error naming it.
pub fn list_shards(entries: &[String]) -> Result<Vec<ShardFile>, DataError> {
    let mut files = Vec::new();
    for entry in entries.iter().flat_map(|e| e.split(',')).map(str::trim) {
        if entry.is_empty() {
            continue;
        }
        if entry.contains("://") {
            files.extend(list_object_entry(entry)?);
        } else {
            files.extend(list_local_entry(entry)?);
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    Ok(files)
}

fn list_local_entry(entry: &str) -> Result<Vec<ShardFile>, DataError> {
    let path = PathBuf::from(entry);
    if path.is_file() {
        return Ok(vec![ShardFile {
            name: entry.to_string(),
            location: Location::Local(path),
        }]);
    }
    if !path.is_dir() {
        return Err(DataError::MissingFile(path));
    }
    let io = |e| DataError::Io {
        path: path.clone(),
        source: e,
    };
    let mut out = Vec::new();
    for item in std::fs::read_dir(&path).map_err(io)? {
        let item = item.map_err(io)?;
        let p = item.path();
        let name = item.file_name().to_string_lossy().to_string();
        if p.is_file() && is_shard_name(&name) {
            out.push(ShardFile {
                name: p.display().to_string(),
                location: Location::Local(p),
            });
        }
    }
    Ok(out)
}

fn list_object_entry(entry: &str) -> Result<Vec<ShardFile>, DataError> {
    let xvlm_proto::storage::Located {
        store,
        path: prefix,
    } = xvlm_proto::storage::open(entry, &[]).map_err(|e| DataError::BadLocation {
        url: entry.into(),
        reason: e.reason,
    })?;
    let rt = runtime(entry)?;
    let listing = rt
        .block_on(store.list_with_delimiter(Some(&prefix)))
        .map_err(|e| store_err(entry, e))?;
    let base = entry.trim_end_matches('/');
    let mut out: Vec<ShardFile> = listing
        .objects
        .into_iter()
        .filter(|m| m.location.filename().is_some_and(is_shard_name))
        .map(|m| ShardFile {
            name: format!("{base}/{}", m.location.filename().unwrap_or_default()),
            location: Location::Object {
                store: store.clone(),
                path: m.location,
            },
        })
        .collect();
    if out.is_empty() {
        match rt.block_on(store.head(&prefix)) {
            Ok(_) => out.push(ShardFile {
                name: entry.to_string(),
                location: Location::Object {
                    store,
                    path: prefix,
                },
            }),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(DataError::MissingFile(PathBuf::from(entry)))
            }
            Err(e) => return Err(store_err(entry, e)),
        }
    }
    Ok(out)
}

/// Open a shard file for reading from byte `offset`.
pub fn open_at(file: &ShardFile, offset: u64) -> Result<Box<dyn BufRead + Send>, DataError> {
    match &file.location {
        Location::Local(path) => {
            let mut f = std::fs::File::open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    DataError::MissingFile(path.clone())
                } else {
                    DataError::Io {
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
            f.seek(SeekFrom::Start(offset)).map_err(|e| DataError::Io {
                path: path.clone(),
                source: e,
            })?;
            Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
        }
        Location::Object { store, path } => {
            let rt = runtime(&file.name)?;
            let opts = GetOptions {
                range: (offset > 0).then_some(GetRange::Offset(offset)),
                ..GetOptions::default()
            };
            let result = match rt.block_on(store.get_opts(path, opts)) {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(DataError::MissingFile(PathBuf::from(&file.name)))
                }
                // A cursor at the very end of a file (it was read to the last line): stores refuse
                // a range that starts at the size, and there is nothing left to read.
                Err(e) if offset > 0 => match rt.block_on(store.head(path)) {
                    Ok(meta) if offset >= meta.size => return Ok(Box::new(std::io::empty())),
                    _ => return Err(store_err(&file.name, e)),
                },
                Err(e) => return Err(store_err(&file.name, e)),
            };
            let reader = ObjectReader {
                rt,
                stream: result.into_stream(),
                chunk: bytes::Bytes::new(),
            };
            Ok(Box::new(BufReader::with_capacity(1 << 20, reader)))
        }
    }
}

/// A blocking `Read` over an object store byte stream.
struct ObjectReader {
    rt: tokio::runtime::Runtime,
    stream: BoxStream<'static, object_store::Result<bytes::Bytes>>,
    chunk: bytes::Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}
