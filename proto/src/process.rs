//! Child processes that never outlive their parent, for every binary that starts some (`xvlm-coord
//! run` its local workers, a worker daemon its trainers): a parent killed by SIGKILL runs no cleanup
//! code, so only the kernel can take its children down, through Linux's parent-death signal.

use std::os::unix::process::CommandExt;

/// Makes the child that `cmd` spawns receive `signal` (e.g. `libc::SIGKILL`) as soon as its parent
/// dies, however it dies. Linux ties the signal to the *thread* that forks the child: spawn from a
/// thread that lives as long as the process (the main thread, a current-thread runtime), never from
/// a pool thread that may retire. A parent that died between fork and the `prctl` call is caught too:
/// the child then fails to start instead of running orphaned. On other systems this does nothing.
pub fn die_with_parent(cmd: &mut std::process::Command, signal: i32) -> &mut std::process::Command {
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other(
                        "parent exited before the child started",
                    ));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = signal;
    cmd
}

/// Sends `signal` to the process group led by `pid` (children started with `process_group(0)`).
pub fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a negative pid signals that process group; harmless if it is gone.
    unsafe {
        libc::kill(-(pid as libc::pid_t), signal);
    }
}

/// Sends `signal` to the process `pid`.
pub fn signal_process(pid: u32, signal: i32) {
    // SAFETY: plain kill(2); harmless if the process is gone.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Whether process `pid` exists and has not exited (a zombie, exited but not yet reaped, counts as
/// gone), from `/proc/PID/stat`.
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The command name in parentheses may hold spaces: the state follows the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .is_some_and(|state| !matches!(state, 'Z' | 'X'))
}
