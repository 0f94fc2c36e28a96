//! Trainer processes: spawned in their own process group with the parent-death signal set
//! ([`xvlm_proto::process::die_with_parent`], shared with `xvlm-coord run`), so a cancelled or
//! orphaned trainer never outlives its worker; stopped by signalling the whole group.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::error::WorkerError;

pub use xvlm_proto::process::signal_group;

/// The fd number the ring listener has in the trainer.
pub const LISTEN_FD: i32 = 3;

/// Starts `xvlm-worker train --assignment FILE [--listen-fd 3]`, stdout piped for progress lines and
/// stderr piped for its log (`trainer_logs`).
pub fn spawn_trainer(
    exe: &Path,
    assignment: &Path,
    listener: Option<&OwnedFd>,
    passive_wait: bool,
) -> Result<Child, WorkerError> {
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg("--assignment").arg(assignment);
    let fd = listener.map(|l| l.as_raw_fd());
    if fd.is_some() {
        cmd.arg("--listen-fd").arg(LISTEN_FD.to_string());
    }
    // OpenMP's own bounded spin after each parallel region is what a trainer with its cores to itself
    // wants (a futex wake-up per region costs more than half the tiny pre-training's time); when its
    // threads exceed the host's cores (cpu_share.rs) the spin would starve its peers: wait passively,
    // unless the operator chose a policy.
    if passive_wait && std::env::var_os("OMP_WAIT_POLICY").is_none() {
        cmd.env("OMP_WAIT_POLICY", "PASSIVE");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // Die with the worker even if it is SIGKILLed (the daemon forks from its one runtime thread).
    xvlm_proto::process::die_with_parent(cmd.as_std_mut(), libc::SIGKILL);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = fd {
                if fd == LISTEN_FD {
                    // dup2 onto itself keeps FD_CLOEXEC; clear it instead.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, LISTEN_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| WorkerError::Spawn(format!("{}: {e}", exe.display())))
}

/// The Linux state letter of a process (`R`, `S`, `D`, `T`, `Z`, ...) from `/proc/PID/stat`.
pub fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces or parentheses: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}
