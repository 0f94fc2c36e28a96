//! Object stores from URLs: the one place a `file://`, `s3://` or `hdfs://` location becomes an
//! `object_store` client and a path in it, for data shards, checkpoints and the coordinator's shard
//! listing alike. S3 settings come from the usual `AWS_*` environment (endpoint, region, credentials,
//! `AWS_ALLOW_HTTP`) and may be overridden by explicit options; `hdfs://` needs the `hdfs` feature.

use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

/// A store and the path a URL names in it.
pub struct Located {
    /// The client.
    pub store: Arc<dyn ObjectStore>,
    /// The URL's path inside the store (a file or a prefix).
    pub path: ObjectPath,
}

/// A URL that cannot be opened, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {reason}")]
pub struct StoreUrlError {
    /// The URL as given.
    pub url: String,
    /// Why it cannot be opened.
    pub reason: String,
}

/// Opens `url` (`file:///abs/path`, `s3://bucket/prefix`, `hdfs://namenode:port/path`); `options`
/// are S3 config keys (`aws_endpoint`, `aws_allow_http`, ...) that take precedence over the
/// environment. A `file://` store removes the directories its deletes leave empty, as a prefix
/// vanishes from an object store with its last object (checkpoint retention leaves no empty
/// `step-N/` behind).
pub fn open(url: &str, options: &[(&str, &str)]) -> Result<Located, StoreUrlError> {
    let bad = |reason: String| StoreUrlError {
        url: url.to_string(),
        reason,
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad(
                "a file:// URL needs an absolute path (file:///dir)".into()
            ));
        }
        let path = ObjectPath::from_url_path(path).map_err(|e| bad(e.to_string()))?;
        return Ok(Located {
            store: Arc::new(LocalFileSystem::new().with_automatic_cleanup(true)),
            path,
        });
    }
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        for (key, value) in options {
            let key: AmazonS3ConfigKey =
                key.parse().map_err(|e| bad(format!("option {key}: {e}")))?;
            builder = builder.with_config(key, *value);
        }
        let s3 = builder.build().map_err(|e| bad(e.to_string()))?;
        let path = ObjectPath::from_url_path(prefix).map_err(|e| bad(e.to_string()))?;
        return Ok(Located {
            store: Arc::new(s3),
            path,
        });
    }
    if url.starts_with("hdfs://") {
        return open_hdfs(url).map_err(bad);
    }
    Err(bad(
        "unsupported location; use file:///abs/path, s3://bucket/prefix or hdfs://namenode/path"
            .into(),
    ))
}

#[cfg(feature = "hdfs")]
fn open_hdfs(url: &str) -> Result<Located, String> {
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let namenode = match parsed.port() {
        Some(port) => format!("hdfs://{}:{port}", parsed.host_str().unwrap_or_default()),
        None => format!("hdfs://{}", parsed.host_str().unwrap_or_default()),
    };
    let store = hdfs_native_object_store::HdfsObjectStoreBuilder::new()
        .with_url(&namenode)
        .build()
        .map_err(|e| e.to_string())?;
    let path = ObjectPath::from_url_path(parsed.path()).map_err(|e| e.to_string())?;
    Ok(Located {
        store: Arc::new(store),
        path,
    })
}

#[cfg(not(feature = "hdfs"))]
fn open_hdfs(_url: &str) -> Result<Located, String> {
    Err("hdfs:// needs a build with the `hdfs` cargo feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_name_absolute_paths() {
        let loc = open("file:///tmp/some%20dir/x", &[]).unwrap();
        assert_eq!(loc.path.as_ref(), "tmp/some dir/x");
        let err = open("file://relative/dir", &[]).err().unwrap();
        assert!(err.to_string().contains("absolute path"), "{err}");
    }

    #[test]
    fn s3_urls_split_bucket_and_prefix() {
        let opts = [
            ("aws_region", "us-east-1"),
            ("aws_endpoint", "http://127.0.0.1:1"),
        ];
        let loc = open("s3://bucket/runs/a", &opts).unwrap();
        assert_eq!(loc.path.as_ref(), "runs/a");
        assert!(open("s3:///x", &opts).is_err());
        let err = open("s3://b/x", &[("no_such_option", "1")]).err().unwrap();
        assert!(err.to_string().contains("no_such_option"), "{err}");
    }

    #[test]
    fn other_schemes_are_refused_by_name() {
        let err = open("gs://bucket/x", &[]).err().unwrap();
        assert!(
            err.to_string().starts_with("gs://bucket/x: unsupported"),
            "{err}"
        );
        if !cfg!(feature = "hdfs") {
            let err = open("hdfs://nn:8020/data", &[]).err().unwrap();
            assert!(err.to_string().contains("`hdfs` cargo feature"), "{err}");
        }
    }
}
