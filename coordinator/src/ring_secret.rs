//! Per-generation ring secrets. Trainers of different hosts connect their all-reduce ring by
//! address; each generation's Start carries a secret they prove to each other on connect, so a stray
//! process (an old generation's trainer, anything else on the network) cannot join the ring.
//!
//! The secret is derived, not stored: SHA-256 of a random key drawn when the coordinator starts and
//! the (job, generation). Every worker of a generation gets the same secret without a new field in
//! the job store, and the state machine stays free of randomness. After a coordinator restart the
//! key is new, which only matters to generations started after it (older ones are stopped then).

use std::io::Read;

use sha2::{Digest, Sha256};
use xvlm_proto::v1;

use crate::error::CoordError;

/// The coordinator's key for ring secrets.
pub struct RingKey([u8; 32]);

impl RingKey {
    /// A fresh key from the operating system's random source.
    pub fn random() -> Result<RingKey, CoordError> {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .map_err(|e| {
                CoordError::Server(format!("cannot read /dev/urandom for ring secrets: {e}"))
            })?;
        Ok(RingKey(key))
    }

    /// The secret of `job`'s `generation`.
    pub fn secret(&self, job: &str, generation: u64) -> Vec<u8> {
        let mut h = Sha256::new();
        h.update(self.0);
        // Length-prefixed so no (job, generation) pair can collide with another.
        h.update((job.len() as u64).to_le_bytes());
        h.update(job.as_bytes());
        h.update(generation.to_le_bytes());
        h.finalize().to_vec()
    }

    /// Fills in the ring secret of a Start command; other commands pass through.
    pub fn seal(&self, mut cmd: v1::CoordinatorCommand) -> v1::CoordinatorCommand {
        if let Some(v1::coordinator_command::Command::Start(s)) = cmd.command.as_mut() {
            s.ring_secret = self.secret(&s.job_id, s.generation);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One secret per (job, generation) and key: same inputs agree, any change differs.
    #[test]
    fn secrets_differ_per_generation_and_key() {
        let k = RingKey::random().unwrap();
        assert_eq!(k.secret("job-1", 2), k.secret("job-1", 2));
        assert_ne!(k.secret("job-1", 2), k.secret("job-1", 3));
        assert_ne!(k.secret("job-1", 2), k.secret("job-12", 2));
        assert_ne!(
            k.secret("job-1", 2),
            RingKey::random().unwrap().secret("job-1", 2)
        );
    }
}
