//! Checkpoint requests at a step boundary: preemption (SIGTERM to the worker daemon) and on-demand
//! checkpoints (`xvlm-coord checkpoint JOB`).
//!
//! Whoever supervises a trainer asks in one of two ways. By signal: SIGUSR1 "save a checkpoint at the
//! next step boundary, then keep training", SIGUSR2 "save at the next step boundary, then leave" (exit
//! [`EXIT_PREEMPTED`]). By request file: the daemon writes an on-demand request id next to the
//! trainer's assignment (atomically, by rename), which rank 0 reads; the id comes back with the commit
//! so the coordinator knows which request a checkpoint served. A request may reach only some ranks,
//! so at every step boundary all ranks all-reduce what they have ([`StepRequests::agree`]): every
//! rank sees the same request at the same step and saves the same step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};
use tracing::warn;
use xvlm_model::collective::{Collective, CollectiveError};
/// Signal asking for a checkpoint at the next step boundary, training continues.
pub const SAVE_SIGNAL: i32 = libc::SIGUSR1;
/// Signal asking for a checkpoint at the next step boundary, then a clean exit.
pub const LEAVE_SIGNAL: i32 = libc::SIGUSR2;
/// Exit code of a trainer that left after committing its requested checkpoint (EX_TEMPFAIL).
pub const EXIT_PREEMPTED: u8 = xvlm_proto::EXIT_PREEMPTED;

static SAVE: AtomicBool = AtomicBool::new(false);
static LEAVE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if signal == SAVE_SIGNAL {
        SAVE.store(true, Ordering::SeqCst);
    } else if signal == LEAVE_SIGNAL {
        LEAVE.store(true, Ordering::SeqCst);
    }
}

/// Installs the handlers of [`SAVE_SIGNAL`] and [`LEAVE_SIGNAL`]; call first thing in a trainer
/// (their default action would kill it).
pub fn install() -> std::io::Result<()> {
    for signal in [SAVE_SIGNAL, LEAVE_SIGNAL] {
        // SAFETY: a zeroed sigaction with a plain handler that only stores to an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Ignores SIGTERM from now on: a trainer leaving at a committed step exits on its own moments later
/// (the daemon's SIGKILL five seconds after its SIGTERM still bounds it). The generation's other
/// ranks leave at the same step, and the first one out makes the coordinator stop the rest while
/// they may still be waiting to see the commit.
pub fn ignore_stop_signal() -> std::io::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    if unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Marks a request in this process, as the signals do (tests, in-process callers).
pub fn request(leave: bool) {
    if leave {
        LEAVE.store(true, Ordering::SeqCst);
    } else {
        SAVE.store(true, Ordering::SeqCst);
    }
}

/// The request file of `rank` in a generation directory.
pub fn request_file(generation_dir: &Path, rank: usize) -> PathBuf {
    generation_dir.join(format!("rank{rank}.checkpoint-request"))
}

/// Writes on-demand request `id` for a trainer (tmp file + rename: the trainer never reads half a
/// number).
pub fn write_request(path: &Path, id: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, id.to_string())?;
    std::fs::rename(&tmp, path)
}

/// What the ranks agreed on at a step boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agreed {
    /// Some rank was signalled to checkpoint now.
    pub save: bool,
    /// Some rank asked to checkpoint and leave.
    pub leave: bool,
    /// A new on-demand request id (0: none).
    pub id: u64,
}

impl Agreed {
    /// Whether a checkpoint must be taken at this boundary.
    pub fn checkpoint(&self) -> bool {
        self.save || self.leave || self.id > 0
    }
}

/// This rank's request sources: the signal flags and, on rank 0, the request file.
pub struct StepRequests {
    file: Option<PathBuf>,
    rank: usize,
    device: Device,
    served: u64,
}

impl StepRequests {
    /// Requests of `rank`; only rank 0 reads `file` (the others learn its ids through the collective).
    pub fn new(file: Option<PathBuf>, rank: usize, device: Device) -> Self {
        StepRequests {
            file,
            rank,
            device,
            served: 0,
        }
    }

    /// The newest id in the request file that was not served yet, or 0.
    fn pending_id(&self) -> u64 {
        let Some(file) = self.file.as_ref().filter(|_| self.rank == 0) else {
            return 0;
        };
        let Ok(text) = std::fs::read_to_string(file) else {
            return 0;
        };
        match text.trim().parse::<u64>() {
            Ok(id) if id > self.served => id,
            Ok(_) => 0,
            Err(e) => {
                warn!("{}: not a request id ({e})", file.display());
                0
            }
        }
    }

    /// One all-reduce of this rank's pending requests; every rank calls it at every step boundary
    /// and gets the same answer. A save request and an id are consumed; a leave request stays. Ids
    /// stay exact in an f64 up to 2^53.
    pub fn agree(&mut self, comm: &dyn Collective) -> Result<Agreed, CollectiveError> {
        let local = [
            f64::from(u8::from(SAVE.swap(false, Ordering::SeqCst))),
            f64::from(u8::from(LEAVE.load(Ordering::SeqCst))),
            self.pending_id() as f64,
        ];
        let mut flags = Tensor::from_slice(&local)
            .to_kind(Kind::Double)
            .to_device(self.device);
        if comm.world_size() > 1 {
            comm.all_reduce_sum(&mut flags)?;
        }
        let id = flags.double_value(&[2]).round() as u64;
        let fresh = id > self.served;
        self.served = self.served.max(id);
        Ok(Agreed {
            save: flags.double_value(&[0]) > 0.0,
            leave: flags.double_value(&[1]) > 0.0,
            id: if fresh { id } else { 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xvlm_model::collective::SingleProcess;

    /// The only test touching the process-wide flags (they are statics). A request file's id is
    /// served once.
    #[test]
    fn save_is_consumed_leave_stays() {
        install().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = request_file(dir.path(), 0);
        let mut requests = StepRequests::new(Some(file.clone()), 0, Device::Cpu);
        let mut agree = || requests.agree(&SingleProcess).unwrap();
        assert_eq!(agree(), Agreed::default());
        write_request(&file, 3).unwrap();
        assert_eq!(agree().id, 3);
        assert_eq!(agree().id, 0, "an id is served once");
        // SAFETY: raise(3) of a signal whose handler was installed above.
        unsafe { libc::raise(SAVE_SIGNAL) };
        let first = agree();
        assert!(first.save && !first.leave && first.checkpoint());
        assert_eq!(agree(), Agreed::default(), "a save request is taken once");
        request(true);
        assert!(agree().leave);
        assert!(agree().leave, "a leave request stays");
    }

    /// After [`ignore_stop_signal`] a SIGTERM no longer ends the process. Checked in a child (this
    /// test binary re-run on this test alone), so the test process keeps its own SIGTERM; the child
    /// leaves a marker only after surviving its SIGTERM.
    #[test]
    fn sigterm_is_ignored_once_leaving() {
        const CHILD: &str = "XVLM_TEST_SIGTERM_MARKER";
        if let Some(marker) = std::env::var_os(CHILD) {
            ignore_stop_signal().unwrap();
            // SAFETY: raise(3) of a signal this process now ignores.
            unsafe { libc::raise(libc::SIGTERM) };
            std::fs::write(marker, "survived").unwrap();
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "trainer::save_request::tests::sigterm_is_ignored_once_leaving",
                "--test-threads=1",
            ])
            .env(CHILD, &marker)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "the child died of its SIGTERM: {status:?}"
        );
        assert!(marker.exists(), "the child did not run the test");
    }
}
