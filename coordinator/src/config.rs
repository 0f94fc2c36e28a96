//! The coordinator's library configuration (the CLI converts its flags into this).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::security::Security;

/// How `serve` runs; `Default` works on one machine.
#[derive(Clone, Debug)]
pub struct CoordConfig {
    /// Where the job store lives.
    pub state_dir: PathBuf,
    /// Default output root for jobs without `output:`.
    pub storage: String,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address of the HTTP listener (`/metrics`); none: no HTTP listener.
    pub http_listen: Option<SocketAddr>,
    /// Workers silent this long are lost.
    pub heartbeat_timeout_ms: u64,
    /// How often workers report.
    pub heartbeat_interval_ms: u64,
    /// TLS, tokens and the loopback rule.
    pub security: Security,
    /// How often jobs' TensorBoard events are written to their outputs.
    pub tensorboard_flush: Duration,
    /// Bytes of trainer log lines kept per job (`{state_dir}/logs`); the oldest go first.
    pub log_retention_bytes: u64,
}

impl Default for CoordConfig {
    fn default() -> Self {
        CoordConfig {
            state_dir: PathBuf::from("./xvlm-state"),
            storage: "file://./runs".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http_listen: None,
            heartbeat_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            security: Security::default(),
            tensorboard_flush: crate::tensorboard::DEFAULT_FLUSH,
            log_retention_bytes: crate::logs::DEFAULT_RETENTION_BYTES,
        }
    }
}

impl CoordConfig {
    /// Uses this state directory.
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// Uses this default storage root.
    pub fn with_storage(mut self, url: impl Into<String>) -> Self {
        self.storage = url.into();
        self
    }

    /// Keeps this many bytes of trainer logs per job.
    pub fn with_log_retention_bytes(mut self, bytes: u64) -> Self {
        self.log_retention_bytes = bytes;
        self
    }

    /// `file://./x` made absolute against the current directory, so trainers in other working
    /// directories write to the same place.
    pub fn storage_root(&self) -> String {
        match self.storage.strip_prefix("file://") {
            Some(path) if !path.starts_with('/') => {
                let cwd = std::env::current_dir().unwrap_or_default();
                let joined = cwd.join(path.trim_start_matches("./"));
                format!("file://{}", joined.display())
            }
            _ => self.storage.clone(),
        }
    }
}
