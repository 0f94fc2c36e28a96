//! The CPU threads a worker's trainers get. Trainers that oversubscribe the cores lose badly: OpenMP's
//! spin-wait after each parallel region takes the core a peer rank needs (measured 8 s instead of
//! 0.17 s per step), and waiting passively instead costs a futex wake-up per region (2.3 instead of
//! 5.6 iterations/s on the tiny pre-training). So the cores are divided, not waited around: a worker
//! takes its `--cpu-threads`, or else the host's cores divided among the xvlm workers alive on it
//! (each registers its pid in a per-user folder under the temporary directory), and its trainers
//! keep OpenMP's own bounded spin unless their threads still exceed the host's cores.

use std::path::{Path, PathBuf};

/// This worker's claim on the host's cores.
pub struct CpuShare {
    explicit: Option<usize>,
    host_cores: usize,
    registration: Option<Registration>,
}

/// How a trainer's libtorch threads are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainerThreads {
    /// Intra-op threads per trainer.
    pub threads: usize,
    /// Whether OpenMP should wait passively (the trainers' threads exceed the host's cores).
    pub passive_wait: bool,
}

impl CpuShare {
    /// Registers this worker on the host; `explicit` is `--cpu-threads` when given.
    pub fn new(explicit: Option<usize>) -> Self {
        let host_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let registration = Registration::create(&registry_dir())
            .map_err(|e| tracing::warn!("cannot register in the host's worker list: {e}"))
            .ok();
        CpuShare {
            explicit,
            host_cores,
            registration,
        }
    }

    /// The threads of each of `trainers` trainers started now.
    pub fn for_trainers(&self, trainers: usize) -> TrainerThreads {
        let workers = match &self.registration {
            Some(r) => live_workers(r.path.parent().unwrap_or(Path::new("."))).max(1),
            None => 1,
        };
        split(self.explicit, self.host_cores, workers, trainers)
    }
}

/// `explicit` (or the host's `host_cores` over `workers`) divided among `trainers`.
fn split(
    explicit: Option<usize>,
    host_cores: usize,
    workers: usize,
    trainers: usize,
) -> TrainerThreads {
    let share = explicit.unwrap_or(host_cores / workers.max(1)).max(1);
    let trainers = trainers.max(1);
    let threads = (share / trainers).max(1);
    TrainerThreads {
        threads,
        passive_wait: threads > 1 && threads * trainers * workers > host_cores,
    }
}

/// The per-user folder of live workers' pid files.
fn registry_dir() -> PathBuf {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::env::temp_dir().join(format!("xvlm-workers-{uid}"))
}

/// This process's pid file, removed on drop.
struct Registration {
    path: PathBuf,
}

impl Registration {
    fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pid = std::process::id();
        let path = dir.join(pid.to_string());
        let started = start_time(pid).unwrap_or_default();
        std::fs::write(&path, started)?;
        Ok(Registration { path })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Workers in `dir` whose process still runs (the same pid and start time); stale files are removed.
fn live_workers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 1;
    };
    let mut live = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let recorded = std::fs::read_to_string(&path).unwrap_or_default();
        if start_time(pid).is_some_and(|t| t == recorded) {
            live += 1;
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    live
}

/// Field 22 of `/proc/PID/stat` (start time in clock ticks): a pid and its start time name a process
/// even after pid reuse.
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cores_are_divided_among_workers_then_trainers() {
        let t = |explicit, cores, workers, trainers| split(explicit, cores, workers, trainers);
        assert_eq!(t(None, 16, 1, 1).threads, 16);
        assert_eq!(t(None, 16, 2, 1).threads, 8);
        assert_eq!(t(None, 16, 2, 4).threads, 2);
        assert_eq!(t(None, 2, 4, 1).threads, 1);
        assert_eq!(t(Some(6), 16, 2, 2).threads, 3);
        assert!(!t(None, 16, 2, 4).passive_wait);
        // Told more threads than the host has: the spin would starve peers.
        assert!(t(Some(8), 4, 1, 2).passive_wait);
        assert!(
            !t(Some(1), 4, 8, 1).passive_wait,
            "one thread has no pool to wait in"
        );
    }

    #[test]
    fn live_workers_count_running_processes_and_drop_stale_files() {
        let dir = tempfile::tempdir().unwrap();
        let me = Registration::create(dir.path()).unwrap();
        // A pid that is not running, and this process under a wrong start time (a reused pid).
        std::fs::write(dir.path().join("4194304"), "1").unwrap();
        std::fs::write(dir.path().join("1"), "not-a-start-time").unwrap();
        assert_eq!(live_workers(dir.path()), 1);
        assert!(!dir.path().join("4194304").exists());
        assert!(!dir.path().join("1").exists());
        drop(me);
        assert_eq!(live_workers(dir.path()), 0);
    }
}
