//! Where job records live: an in-memory store for tests and an embedded crash-safe one (redb) for the
//! server. Both pass the same test suite, including reopen-after-crash for redb.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use crate::error::CoordError;
use crate::state::JobRecord;

/// Persistent job records keyed by job id.
pub trait JobStore: Send {
    /// Inserts or replaces a record; durable when it returns.
    fn put(&mut self, record: &JobRecord) -> Result<(), CoordError>;
    /// Every stored record.
    fn load_all(&self) -> Result<Vec<JobRecord>, CoordError>;
}

/// Records in a map; lost with the process.
#[derive(Debug, Default)]
pub struct MemStore {
    records: BTreeMap<String, JobRecord>,
}

impl JobStore for MemStore {
    fn put(&mut self, record: &JobRecord) -> Result<(), CoordError> {
        self.records.insert(record.id.clone(), record.clone());
        Ok(())
    }
    fn load_all(&self) -> Result<Vec<JobRecord>, CoordError> {
        Ok(self.records.values().cloned().collect())
    }
}

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// Records in a redb file (`{state_dir}/jobs.redb`); each put is one durable transaction.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    /// Opens or creates the store under `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, CoordError> {
        let path = state_dir.join("jobs.redb");
        let err = |reason: String| CoordError::Store {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(state_dir).map_err(|e| err(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| err(e.to_string()))?;
        txn.open_table(JOBS).map_err(|e| err(e.to_string()))?;
        txn.commit().map_err(|e| err(e.to_string()))?;
        Ok(RedbStore { db, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> CoordError {
        CoordError::Store {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        }
    }
}

impl JobStore for RedbStore {
    fn put(&mut self, record: &JobRecord) -> Result<(), CoordError> {
        let bytes = serde_json::to_vec(record).map_err(|e| self.err(e))?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            table
                .insert(record.id.as_str(), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn load_all(&self) -> Result<Vec<JobRecord>, CoordError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.err(e))? {
            let (key, value) = entry.map_err(|e| self.err(e))?;
            let record: JobRecord = serde_json::from_slice(value.value())
                .map_err(|e| self.err(format!("record {}: {e}", key.value())))?;
            out.push(record);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Event, Scheduler};
    use xvlm_proto::spec::JobSpec;

    fn records() -> Vec<JobRecord> {
        let spec = JobSpec::from_json(r#"{"name":"a","task":"smoke","steps":3}"#).unwrap();
        let mut s = Scheduler::new(1000);
        for _ in 0..3 {
            s.apply(
                0,
                Event::Submit {
                    spec: Box::new(spec.clone()),
                    files: vec!["file:///x/0.json".into()],
                    output_root: "file:///runs".into(),
                },
            )
            .unwrap();
        }
        s.jobs().cloned().collect()
    }

    /// Put, overwrite and load back, for any store.
    fn lifecycle<S: JobStore>(store: &mut S) {
        let mut recs = records();
        for r in &recs {
            store.put(r).unwrap();
        }
        recs[1].message = "changed".into();
        store.put(&recs[1]).unwrap();
        let mut back = store.load_all().unwrap();
        back.sort_by_key(|r| r.seq);
        assert_eq!(back, recs);
    }

    /// The in-memory store keeps records.
    #[test]
    fn mem_lifecycle() {
        lifecycle(&mut MemStore::default());
    }

    /// redb keeps records across a reopen (the process "crashed" without any shutdown step).
    #[test]
    fn redb_lifecycle_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(dir.path()).unwrap();
        lifecycle(&mut store);
        let before = store.load_all().unwrap();
        drop(store);
        let reopened = RedbStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load_all().unwrap(), before);
    }
}
