//! Checkpoint requests at a step boundary, the trainer-side primitive behind preemption (SIGTERM to
//! the worker daemon) and on-demand checkpoints.
//!
//! Whoever supervises a trainer asks by signal: SIGUSR1 "save a checkpoint at the next step boundary,
//! then keep training", SIGUSR2 "save at the next step boundary, then leave" (exit
//! [`EXIT_PREEMPTED`]). A request may reach only some ranks (only the draining worker's), so at every
//! step boundary all ranks all-reduce their two flags ([`agree`]): every rank sees the same request
//! at the same step, saves the same step and commits it together.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};
use xvlm_model::collective::{Collective, CollectiveError};

/// Signal asking for a checkpoint at the next step boundary, training continues.
pub const SAVE_SIGNAL: i32 = libc::SIGUSR1;
/// Signal asking for a checkpoint at the next step boundary, then a clean exit.
pub const LEAVE_SIGNAL: i32 = libc::SIGUSR2;
/// Exit code of a trainer that left after committing its requested checkpoint (EX_TEMPFAIL).
pub const EXIT_PREEMPTED: u8 = 75;

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

/// Marks a request in this process, as the signals do (tests, in-process callers).
pub fn request(leave: bool) {
    if leave {
        LEAVE.store(true, Ordering::SeqCst);
    } else {
        SAVE.store(true, Ordering::SeqCst);
    }
}

/// What the ranks agreed on at a step boundary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Agreed {
    /// Some rank asked for a checkpoint now.
    pub save: bool,
    /// Some rank asked to checkpoint and leave.
    pub leave: bool,
}

impl Agreed {
    /// Whether a checkpoint must be taken at this boundary.
    pub fn checkpoint(&self) -> bool {
        self.save || self.leave
    }
}

/// One all-reduce of this rank's pending requests; every rank calls it at every step boundary and
/// gets the same answer. A save request is consumed; a leave request stays.
pub fn agree(comm: &dyn Collective, device: Device) -> Result<Agreed, CollectiveError> {
    let local = [
        f32::from(u8::from(SAVE.swap(false, Ordering::SeqCst))),
        f32::from(u8::from(LEAVE.load(Ordering::SeqCst))),
    ];
    let mut flags = Tensor::from_slice(&local)
        .to_kind(Kind::Float)
        .to_device(device);
    comm.all_reduce_sum(&mut flags)?;
    Ok(Agreed {
        save: flags.double_value(&[0]) > 0.0,
        leave: flags.double_value(&[1]) > 0.0,
    })
}
