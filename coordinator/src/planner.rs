//! The shard plan: data files listed through object_store, partitioned exactly across ranks.

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::CoordError;

/// Every file under each URL (a file or a prefix), sorted, duplicates removed, as full URLs.
pub async fn list_shards(urls: &[String]) -> Result<Vec<String>, CoordError> {
    let mut files = Vec::new();
    for url in urls {
        let err = |reason: String| CoordError::Shards {
            url: url.clone(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| err(e.to_string()))?;
        let xvlm_proto::storage::Located { store, path } =
            xvlm_proto::storage::open(url, &[]).map_err(|e| err(e.reason))?;
        let base = base_url(&parsed);
        let listed: Vec<_> = store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| err(e.to_string()))?;
        if listed.is_empty() {
            // Not a prefix: a single file, or nothing at all.
            store.head(&path).await.map_err(|e| err(e.to_string()))?;
            files.push(format!("{base}{path}"));
        }
        files.extend(listed.into_iter().map(|m| format!("{base}{}", m.location)));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn base_url(url: &url::Url) -> String {
    match url.host_str() {
        Some(host) if !host.is_empty() => format!("{}://{host}/", url.scheme()),
        _ => format!("{}:///", url.scheme()),
    }
}

/// File i goes to rank i mod world: every file exactly once, counts differing by at most one.
pub fn partition(files: &[String], world: usize) -> Vec<Vec<String>> {
    let mut plan = vec![Vec::new(); world.max(1)];
    for (i, f) in files.iter().enumerate() {
        plan[i % world.max(1)].push(f.clone());
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file lands on exactly one rank.
    #[test]
    fn partition_is_exact() {
        let files: Vec<String> = (0..7).map(|i| format!("f{i}")).collect();
        let plan = partition(&files, 3);
        assert_eq!(plan.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2, 2]);
        let mut all: Vec<String> = plan.concat();
        all.sort();
        assert_eq!(all, files);
    }

    /// A local directory is listed through object_store; a missing path is an error naming it.
    #[tokio::test]
    async fn lists_local_directory() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.json", "a.json", "sub/c.json"] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let url = format!("file://{}", root.display());
        let files = list_shards(std::slice::from_ref(&url)).await.unwrap();
        let expect: Vec<String> = ["a.json", "b.json", "sub/c.json"]
            .iter()
            .map(|n| format!("file://{}/{n}", root.display()))
            .collect();
        assert_eq!(files, expect);
        let single = list_shards(&[expect[0].clone()]).await.unwrap();
        assert_eq!(single, vec![expect[0].clone()]);
        let missing = format!("{url}/nope");
        let err = list_shards(std::slice::from_ref(&missing))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(&missing), "{err}");
    }
}
