//! The job spec (`job.yaml`): what to train, on how many workers, where to write. Shared by the
//! coordinator (validation, scheduling) and the trainers (task parameters), so it has no tch dependency.
//!
//! Layering: serde defaults < the YAML file < `XVLM_JOB_*` environment (`__` nests: `XVLM_JOB_WORKERS__MIN=2`)
//! < `--set key.path=value` flags. Unknown keys are errors, unlike the official task YAMLs, and so is
//! a key written twice in one mapping (YAML parsers keep the last without a word). `overrides:` are
//! checked against the keys the task's config has ([`crate::task_keys`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::duplicate_keys::find_duplicate_key;
use crate::task_keys::{self, ConfigValue};

/// Longest job name: a DNS label's limit, so a name can label cluster objects (Kubernetes, Slurm).
pub const MAX_NAME_LEN: usize = 63;

/// Restarts a job gets when its spec sets none (see [`JobSpec::max_restarts`]).
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// Largest world size any backend here supports; a guard against typos like `devices_per_worker: 80`.
pub const MAX_WORLD_SIZE: u32 = 4096;

/// Prefix of the environment variables that override job keys.
pub const ENV_PREFIX: &str = "XVLM_JOB_";

/// A job spec that could not be read or is invalid; every message names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The job file does not exist.
    #[error("job file {0} does not exist")]
    MissingFile(PathBuf),
    /// A key appears twice in one mapping of the job file.
    #[error("{}: duplicate key `{key}`{}: a YAML parser keeps only the last; remove one", file.display(), at_line(*line))]
    DuplicateKey {
        /// The job file.
        file: PathBuf,
        /// Dotted path of the key (`workers.min`).
        key: String,
        /// Line of its second occurrence.
        line: Option<usize>,
    },
    /// A `--set` flag is not `key.path=value`.
    #[error("--set {0:?}: expected key.path=value")]
    BadOverride(String),
    /// Parsing or layering failed (unknown key, wrong type, bad enum value).
    #[error("{0}")]
    Parse(String),
    /// A field has a value outside what is allowed.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted key, e.g. `workers.min`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

/// ` at line N`, or nothing when the line is unknown.
fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// What the trainers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// A tiny data-parallel regression model on synthetic data: the test and demo task.
    Smoke,
    /// X-VLM pre-training.
    Pretrain,
    /// Image-text retrieval fine-tuning.
    Retrieval,
    /// VQA fine-tuning.
    Vqa,
    /// NLVR2 fine-tuning.
    Nlvr,
    /// Referring-expression grounding (patch-level).
    Grounding,
    /// Referring-expression grounding with box regression.
    GroundingBbox,
    /// NLVR2 domain pre-training (text-to-images alignment, `NLVR_pretrain.py`).
    NlvrPretrain,
    /// Box-grounding domain pre-training on region data (`Grounding_bbox_pretrain.py`).
    GroundingBboxPretrain,
}

impl TaskKind {
    /// Every task, in declaration order.
    pub const ALL: [TaskKind; 9] = [
        TaskKind::Smoke,
        TaskKind::Pretrain,
        TaskKind::Retrieval,
        TaskKind::Vqa,
        TaskKind::Nlvr,
        TaskKind::Grounding,
        TaskKind::GroundingBbox,
        TaskKind::NlvrPretrain,
        TaskKind::GroundingBboxPretrain,
    ];

    /// The task named `name` as job.yaml spells it ([`TaskKind::as_str`]); `None` for any other name.
    pub fn from_name(name: &str) -> Option<TaskKind> {
        TaskKind::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The name used in job.yaml.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Smoke => "smoke",
            TaskKind::Pretrain => "pretrain",
            TaskKind::Retrieval => "retrieval",
            TaskKind::Vqa => "vqa",
            TaskKind::Nlvr => "nlvr",
            TaskKind::Grounding => "grounding",
            TaskKind::GroundingBbox => "grounding_bbox",
            TaskKind::NlvrPretrain => "nlvr_pretrain",
            TaskKind::GroundingBboxPretrain => "grounding_bbox_pretrain",
        }
    }
}

/// Which collective backend the trainers use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// NCCL when the ranks run on CUDA devices, else the TCP ring.
    #[default]
    Auto,
    /// CPU ring over TCP.
    Ring,
    /// NCCL (CUDA devices only).
    Nccl,
}

impl Backend {
    /// The name used in job.yaml and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Ring => "ring",
            Backend::Nccl => "nccl",
        }
    }

    /// Parses the wire name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" | "" => Some(Backend::Auto),
            "ring" => Some(Backend::Ring),
            "nccl" => Some(Backend::Nccl),
            _ => None,
        }
    }
}

/// How many workers the job runs on: world size = workers x devices_per_worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersSpec {
    /// Fewest workers the job starts (or restarts) with.
    #[serde(default = "one")]
    pub min: u32,
    /// Most workers the job uses; defaults to `min`.
    #[serde(default)]
    pub max: Option<u32>,
    /// Trainer processes (GPUs or CPU slots) per worker.
    #[serde(default = "one")]
    pub devices_per_worker: u32,
}

impl Default for WorkersSpec {
    fn default() -> Self {
        WorkersSpec {
            min: 1,
            max: None,
            devices_per_worker: 1,
        }
    }
}

impl WorkersSpec {
    /// `max`, or `min` when unset.
    pub fn max_workers(&self) -> u32 {
        self.max.unwrap_or(self.min)
    }
}

/// Data shards: URLs of files or of directories (prefixes) whose files the coordinator lists and
/// partitions across ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `file:///abs/dir/`, `s3://bucket/prefix/`, or a local path (made absolute at submit).
    #[serde(default)]
    pub shards: Vec<String>,
}

/// When trainers save checkpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save every this many steps; 0 disables periodic checkpoints.
    #[serde(default)]
    pub every_steps: u64,
    /// Committed checkpoints to keep.
    #[serde(default = "three")]
    pub keep_last: u32,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            every_steps: 0,
            keep_last: 3,
        }
    }
}

/// When the coordinator declares a rank hung: no step progress for
/// `max(min_secs, p99_factor x the rank's p99 step time)` (`startup_secs` before its first step).
/// A hung rank restarts the generation (counted against `max_restarts`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HangSpec {
    /// Floor of the bound, seconds.
    #[serde(default = "hang_min_secs")]
    pub min_secs: f64,
    /// Multiple of the rank's p99 step time.
    #[serde(default = "hang_p99_factor")]
    pub p99_factor: f64,
    /// Bound before a rank's first step (model build, data start-up, resume), seconds.
    #[serde(default = "hang_startup_secs")]
    pub startup_secs: f64,
}

impl Default for HangSpec {
    fn default() -> Self {
        HangSpec {
            min_secs: hang_min_secs(),
            p99_factor: hang_p99_factor(),
            startup_secs: hang_startup_secs(),
        }
    }
}

impl HangSpec {
    fn validate(&self) -> Result<(), SpecError> {
        for (field, v, least) in [
            ("hang.min_secs", self.min_secs, 0.0),
            ("hang.startup_secs", self.startup_secs, 0.0),
        ] {
            if !(v.is_finite() && v > least) {
                return Err(invalid(
                    field,
                    format!("{v} must be a positive number of seconds"),
                ));
            }
        }
        if !(self.p99_factor.is_finite() && self.p99_factor >= 1.0) {
            return Err(invalid(
                "hang.p99_factor",
                format!("{} must be a number >= 1", self.p99_factor),
            ));
        }
        Ok(())
    }
}

fn hang_min_secs() -> f64 {
    60.0
}
fn hang_p99_factor() -> f64 {
    3.0
}
fn hang_startup_secs() -> f64 {
    600.0
}

/// Parameters of `task: smoke` (a regression MLP on deterministic synthetic data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeSpec {
    /// Samples per rank per step.
    #[serde(default = "smoke_batch")]
    pub batch_size: u32,
    /// Input features.
    #[serde(default = "smoke_features")]
    pub features: u32,
    /// Hidden width of the MLP.
    #[serde(default = "smoke_hidden")]
    pub hidden: u32,
    /// SGD learning rate.
    #[serde(default = "smoke_lr")]
    pub lr: f64,
    /// Sleep after each step, to pace demos and cancellation tests.
    #[serde(default)]
    pub step_delay_ms: u64,
}

impl Default for SmokeSpec {
    fn default() -> Self {
        SmokeSpec {
            batch_size: smoke_batch(),
            features: smoke_features(),
            hidden: smoke_hidden(),
            lr: smoke_lr(),
            step_delay_ms: 0,
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max_restarts() -> u32 {
    DEFAULT_MAX_RESTARTS
}
fn three() -> u32 {
    3
}
fn seed() -> u64 {
    42
}
fn smoke_batch() -> u32 {
    16
}
fn smoke_features() -> u32 {
    8
}
fn smoke_hidden() -> u32 {
    16
}
fn smoke_lr() -> f64 {
    0.05
}

/// A training job, as written in `job.yaml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Human name: 1 to [`MAX_NAME_LEN`] letters, digits, `-`, `_`, `.`, starting with a letter or
    /// digit.
    pub name: String,
    /// What the trainers run.
    pub task: TaskKind,
    /// Official-format task config (required for every task but `smoke`).
    #[serde(default)]
    pub config: Option<String>,
    /// Keys patched into the task config; checked against the keys, types and ranges the task's
    /// config has ([`task_keys::TASK_CONFIG_KEYS`]).
    #[serde(default)]
    pub overrides: BTreeMap<String, serde_json::Value>,
    /// Weights to start from.
    #[serde(default)]
    pub init_checkpoint: Option<String>,
    /// Where checkpoints and logs go; defaults to `{coordinator storage}/{job id}`.
    #[serde(default)]
    pub output: Option<String>,
    /// Data shards partitioned across ranks.
    #[serde(default)]
    pub data: DataSpec,
    /// Worker count and devices per worker.
    #[serde(default)]
    pub workers: WorkersSpec,
    /// Collective backend.
    #[serde(default)]
    pub backend: Backend,
    /// Training steps (iterations); required by `smoke`, otherwise derived from the task config.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Root of every random draw.
    #[serde(default = "seed")]
    pub seed: u64,
    /// Checkpoint cadence and retention.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// Restarts after a trainer failure, a lost worker or a hung rank before the job fails. Defaults to
    /// [`DEFAULT_MAX_RESTARTS`] (3): one SIGKILL or preemption of a node should not fail a job that
    /// resumes from its last checkpoint, and a small bound still stops a crash loop quickly.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    /// Hang detection bounds.
    #[serde(default)]
    pub hang: HangSpec,
    /// Evaluate only, as the official `--evaluate`: evaluate `init_checkpoint` on the task's
    /// evaluation splits and stop, without training.
    #[serde(default)]
    pub evaluate: bool,
    /// Parameters of `task: smoke`.
    #[serde(default)]
    pub smoke: Option<SmokeSpec>,
}

/// The URL schemes job storage may use.
pub const STORAGE_SCHEMES: [&str; 3] = ["file://", "s3://", "hdfs://"];

impl JobSpec {
    /// Reads `path` with the layering described in the module doc; `sets` are `key.path=value` flags.
    /// Relative local paths (`config`, `data.shards` without a scheme) are made absolute against the
    /// job file's directory, and the spec is validated.
    pub fn load(path: &Path, sets: &[String]) -> Result<JobSpec, SpecError> {
        if !path.is_file() {
            return Err(SpecError::MissingFile(path.to_path_buf()));
        }
        // An unreadable file is left to figment, which names it in its error.
        if let Some(dup) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| find_duplicate_key(&text))
        {
            return Err(SpecError::DuplicateKey {
                file: path.to_path_buf(),
                key: dup.key,
                line: dup.line,
            });
        }
        let mut figment = Figment::new()
            .merge(Yaml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        for set in sets {
            let (key, value) = set
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| SpecError::BadOverride(set.clone()))?;
            let value: figment::value::Value = value
                .parse()
                .map_err(|_| SpecError::BadOverride(set.clone()))?;
            figment = figment.merge(Serialized::default(key.trim(), value));
        }
        let mut spec: JobSpec = figment
            .extract()
            .map_err(|e| SpecError::Parse(format_figment_error(e)))?;
        // The overrides as written: `spec.overrides` holds JSON values, in which a `.nan` or `.inf`
        // has already become null; these still say what the file (or a flag) wrote.
        if let Ok(written) = figment.extract_inner::<BTreeMap<String, ConfigValue>>("overrides") {
            check_overrides(spec.task, &written)?;
        }
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        spec.resolve_paths(&base)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses the JSON form sent over the wire and validates it.
    pub fn from_json(json: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec =
            serde_json::from_str(json).map_err(|e| SpecError::Parse(format!("job spec: {e}")))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The JSON form sent over the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Trainer processes of a generation with `workers` workers.
    pub fn world_size(&self, workers: u32) -> u32 {
        workers.saturating_mul(self.workers.devices_per_worker)
    }

    /// `smoke` parameters with defaults filled in.
    pub fn smoke_params(&self) -> SmokeSpec {
        self.smoke.clone().unwrap_or_default()
    }

    fn resolve_paths(&mut self, base: &Path) -> Result<(), SpecError> {
        if let Some(config) = &self.config {
            if !has_scheme(config) {
                let abs = absolute(base, config);
                if !abs.is_file() {
                    return Err(invalid(
                        "config",
                        format!("file {} does not exist", abs.display()),
                    ));
                }
                self.config = Some(abs.display().to_string());
            }
        }
        for (i, shard) in self.data.shards.iter_mut().enumerate() {
            if !has_scheme(shard) {
                let abs = absolute(base, shard);
                if !abs.exists() {
                    return Err(invalid(
                        &format!("data.shards[{i}]"),
                        format!("{} does not exist", abs.display()),
                    ));
                }
                *shard = format!("file://{}", abs.display());
            }
        }
        Ok(())
    }

    /// Checks every value against what is allowed; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name(&self.name)?;
        let w = &self.workers;
        if w.min == 0 {
            return Err(invalid("workers.min", "must be at least 1"));
        }
        if w.max_workers() < w.min {
            return Err(invalid(
                "workers.max",
                format!("{} is below workers.min ({})", w.max_workers(), w.min),
            ));
        }
        if w.devices_per_worker == 0 {
            return Err(invalid("workers.devices_per_worker", "must be at least 1"));
        }
        let max_world = u64::from(w.max_workers()) * u64::from(w.devices_per_worker);
        if max_world > u64::from(MAX_WORLD_SIZE) {
            return Err(invalid(
                "workers",
                format!(
                    "world size up to {} x {} = {max_world} exceeds the limit of {MAX_WORLD_SIZE}",
                    w.max_workers(),
                    w.devices_per_worker
                ),
            ));
        }
        match self.task {
            TaskKind::Smoke => {
                if self.steps.unwrap_or(0) == 0 {
                    return Err(invalid("steps", "task smoke needs steps >= 1"));
                }
                let p = self.smoke_params();
                if p.batch_size == 0 || p.features == 0 || p.hidden == 0 {
                    return Err(invalid(
                        "smoke",
                        "batch_size, features and hidden must be at least 1",
                    ));
                }
                if !(p.lr.is_finite() && p.lr > 0.0) {
                    return Err(invalid(
                        "smoke.lr",
                        format!("{} must be a positive number", p.lr),
                    ));
                }
            }
            other => {
                if self.config.is_none() {
                    return Err(invalid(
                        "config",
                        format!("task {} needs an official task config", other.as_str()),
                    ));
                }
                if self.smoke.is_some() {
                    return Err(invalid("smoke", "only allowed with task: smoke"));
                }
            }
        }
        let overrides = self
            .overrides
            .iter()
            .map(|(k, v)| {
                serde_json::from_value(v.clone())
                    .map(|v| (k.clone(), v))
                    .map_err(|e| invalid(&format!("overrides.{k}"), e.to_string()))
            })
            .collect::<Result<BTreeMap<String, ConfigValue>, SpecError>>()?;
        check_overrides(self.task, &overrides)?;
        self.hang.validate()?;
        for (field, url) in [
            ("output", self.output.as_deref()),
            ("init_checkpoint", self.init_checkpoint.as_deref()),
        ] {
            if let Some(url) = url {
                check_scheme(field, url)?;
            }
        }
        for (i, shard) in self.data.shards.iter().enumerate() {
            check_scheme(&format!("data.shards[{i}]"), shard)?;
        }
        Ok(())
    }
}

/// A job name names directories, log lines and cluster objects: short, plain ASCII, and not starting
/// with `-` (read as a flag) or `.` (hidden, or `..`).
fn check_name(name: &str) -> Result<(), SpecError> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_well = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > MAX_NAME_LEN || !plain || !starts_well {
        let length = if name.len() > MAX_NAME_LEN {
            format!(" (it has {})", name.chars().count())
        } else {
            String::new()
        };
        return Err(invalid(
            "name",
            format!(
                "{name:?} must be 1 to {MAX_NAME_LEN} characters{length}, each a letter, digit, \
                 '-', '_' or '.', starting with a letter or digit"
            ),
        ));
    }
    Ok(())
}

/// `overrides` (as written) against the keys of `task`'s config; `smoke` has no config to patch.
fn check_overrides(
    task: TaskKind,
    overrides: &BTreeMap<String, ConfigValue>,
) -> Result<(), SpecError> {
    if overrides.is_empty() {
        return Ok(());
    }
    if task == TaskKind::Smoke {
        return Err(invalid(
            "overrides",
            "task smoke has no task config to override (its parameters are under smoke:)",
        ));
    }
    task_keys::check_keys(task, "overrides", overrides).map_err(|e| SpecError::Invalid {
        field: e.key,
        message: e.message,
    })
}

fn has_scheme(s: &str) -> bool {
    s.contains("://")
}

fn absolute(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    std::fs::canonicalize(&joined).unwrap_or(joined)
}

fn check_scheme(field: &str, url: &str) -> Result<(), SpecError> {
    if STORAGE_SCHEMES.iter().any(|s| url.starts_with(s)) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{url:?} must be a URL starting with one of {}",
                STORAGE_SCHEMES.join(", ")
            ),
        ))
    }
}

/// figment's messages say "for key default.x"; the profile name means nothing in job.yaml.
fn format_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| e.to_string().replace("key \"default.", "key \""))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("job.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const SMOKE: &str = "name: demo\ntask: smoke\nsteps: 10\nworkers: {min: 2}\n";

    /// Every task's name parses back to it and is the name job.yaml uses (its serde name).
    #[test]
    fn task_names_round_trip() {
        for task in TaskKind::ALL {
            assert_eq!(TaskKind::from_name(task.as_str()), Some(task));
            let serde: TaskKind = serde_json::from_str(&format!("{:?}", task.as_str())).unwrap();
            assert_eq!(serde, task);
        }
        assert_eq!(TaskKind::from_name("dance"), None);
    }

    /// Every example job of configs/jobs loads and validates, its config file exists.
    #[test]
    fn example_jobs_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/jobs");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let spec =
                JobSpec::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if let Some(config) = &spec.config {
                assert!(
                    Path::new(config).exists(),
                    "{}: no {config}",
                    path.display()
                );
            }
            loaded += 1;
        }
        assert!(loaded >= 10, "only {loaded} jobs in {}", dir.display());
    }

    /// A minimal smoke job loads with every default filled in.
    #[test]
    fn loads_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let spec = JobSpec::load(&write(dir.path(), SMOKE), &[]).unwrap();
        assert_eq!(spec.workers.min, 2);
        assert_eq!(spec.workers.max_workers(), 2);
        assert_eq!(spec.seed, 42);
        assert_eq!(spec.backend, Backend::Auto);
        assert_eq!(spec.world_size(2), 2);
        assert_eq!(spec.max_restarts, 3);
        let back = JobSpec::from_json(&spec.to_json()).unwrap();
        assert_eq!(back, spec);
    }

    /// `--set` flags win over the file, and values are typed.
    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), SMOKE);
        let spec = JobSpec::load(
            &path,
            &["steps=25".into(), "workers.devices_per_worker=2".into()],
        )
        .unwrap();
        assert_eq!(spec.steps, Some(25));
        assert_eq!(spec.world_size(2), 4);
        assert!(matches!(
            JobSpec::load(&path, &["novalue".into()]),
            Err(SpecError::BadOverride(_))
        ));
    }

    /// `XVLM_JOB_*` variables override the file (`__` nests) and `--set` overrides them. Only keys no
    /// other test asserts are touched, since the environment is shared by the test threads.
    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &format!("{SMOKE}max_restarts: 1\n"));
        std::env::set_var("XVLM_JOB_MAX_RESTARTS", "2");
        std::env::set_var("XVLM_JOB_CHECKPOINT__KEEP_LAST", "7");
        let from_env = JobSpec::load(&path, &[]);
        let from_flag = JobSpec::load(&path, &["max_restarts=5".into()]);
        std::env::remove_var("XVLM_JOB_MAX_RESTARTS");
        std::env::remove_var("XVLM_JOB_CHECKPOINT__KEEP_LAST");
        let from_env = from_env.unwrap();
        assert_eq!(from_env.max_restarts, 2);
        assert_eq!(from_env.checkpoint.keep_last, 7);
        assert_eq!(from_flag.unwrap().max_restarts, 5);
        assert_eq!(JobSpec::load(&path, &[]).unwrap().max_restarts, 1);
    }

    /// Unknown keys are errors naming the key and the allowed ones.
    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = JobSpec::load(&write(dir.path(), &format!("{SMOKE}stepz: 3\n")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("stepz"), "{err}");
        assert!(err.contains("max_restarts"), "{err}");
        let err = JobSpec::load(
            &write(dir.path(), &format!("{SMOKE}smoke: {{batchsize: 3}}\n")),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("batchsize"), "{err}");
    }

    /// Wrong types and bad enum values name the key.
    #[test]
    fn wrong_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = JobSpec::load(
            &write(dir.path(), "name: a\ntask: smoke\nsteps: many\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("steps"), "{err}");
        let err = JobSpec::load(&write(dir.path(), "name: a\ntask: dance\nsteps: 1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dance") && err.contains("pretrain"), "{err}");
    }

    /// Values outside the allowed ranges name their field.
    #[test]
    fn invalid_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("name: a\ntask: smoke\n", "steps"),
            ("name: a\ntask: pretrain\n", "config"),
            (
                "name: a\ntask: smoke\nsteps: 1\nworkers: {min: 0}\n",
                "workers.min",
            ),
            (
                "name: a\ntask: smoke\nsteps: 1\nworkers: {min: 3, max: 2}\n",
                "workers.max",
            ),
            (
                "name: a\ntask: smoke\nsteps: 1\nworkers: {min: 100, devices_per_worker: 100}\n",
                "workers",
            ),
            ("name: a\ntask: smoke\nsteps: 1\noutput: /tmp/x\n", "output"),
            (
                "name: a\ntask: smoke\nsteps: 1\nconfig: nope.yaml\n",
                "config",
            ),
            ("name: 'a b'\ntask: smoke\nsteps: 1\n", "name"),
            (
                "name: a\ntask: smoke\nsteps: 1\nhang: {min_secs: 0}\n",
                "hang.min_secs",
            ),
            (
                "name: a\ntask: smoke\nsteps: 1\nhang: {p99_factor: 0.5}\n",
                "hang.p99_factor",
            ),
            (
                "name: a\ntask: smoke\nsteps: 1\nhang: {startup_secs: -1}\n",
                "hang.startup_secs",
            ),
        ];
        for (text, field) in cases {
            match JobSpec::load(&write(dir.path(), text), &[]) {
                Err(SpecError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: expected invalid {field}, got {other:?}"),
            }
        }
    }

    /// A key written twice, at the top or nested, is an error naming the key and its line; the same
    /// key in two different mappings is fine.
    #[test]
    fn duplicate_keys_are_named_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (format!("{SMOKE}steps: 20\n"), "steps", 5),
            (
                "name: a\ntask: smoke\nsteps: 1\nworkers:\n  min: 1\n  min: 2\n".to_string(),
                "workers.min",
                6,
            ),
            (
                "name: a\ntask: smoke\nsteps: 1\nsmoke: {lr: 0.1, hidden: 4, lr: 0.2}\n"
                    .to_string(),
                "smoke.lr",
                4,
            ),
        ];
        for (text, key, line) in cases {
            let path = write(dir.path(), &text);
            let err = JobSpec::load(&path, &[]).unwrap_err();
            let SpecError::DuplicateKey {
                key: k, line: l, ..
            } = &err
            else {
                panic!("{text}: expected a duplicate {key}, got {err:?}")
            };
            assert_eq!((k.as_str(), *l), (key, Some(line)), "{text}");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("duplicate key `{key}` at line {line}"))
                    && msg.contains("job.yaml"),
                "{msg}"
            );
        }
        let fine = "name: a\ntask: smoke\nsteps: 1\nworkers: {min: 1}\nhang: {min_secs: 5}\n";
        JobSpec::load(&write(dir.path(), fine), &[]).unwrap();
    }

    /// Names: up to 63 plain characters, starting with a letter or digit; the error says the rule.
    #[test]
    fn job_name_rules() {
        let dir = tempfile::tempdir().unwrap();
        let load = |name: &str| {
            JobSpec::load(
                &write(
                    dir.path(),
                    &format!("name: '{name}'\ntask: smoke\nsteps: 1\n"),
                ),
                &[],
            )
        };
        let longest = "a".repeat(MAX_NAME_LEN);
        assert_eq!(load(&longest).unwrap().name, longest);
        load("7.run_b-2").unwrap();
        let err = load(&"a".repeat(64)).unwrap_err().to_string();
        assert!(
            err.starts_with("name: ") && err.contains("must be 1 to 63 characters (it has 64)"),
            "{err}"
        );
        for bad in ["", "-rf", ".hidden", "a/b", "caf\u{e9}", "a b"] {
            let err = load(bad).unwrap_err().to_string();
            assert!(
                err.contains(
                    "each a letter, digit, '-', '_' or '.', starting with a letter or digit"
                ),
                "{bad:?}: {err}"
            );
        }
    }

    fn retrieval_job(overrides: &str) -> String {
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/Retrieval_demo.yaml");
        format!(
            "name: ft\ntask: retrieval\nconfig: {}\noverrides: {overrides}\n",
            config.display()
        )
    }

    /// `overrides` are checked at load (where a `.nan` is still a NaN) and in the wire form the
    /// coordinator validates at submit (where JSON has turned it into null): the message names the
    /// key path and the allowed values.
    #[test]
    fn overrides_are_checked_against_the_task_keys() {
        let dir = tempfile::tempdir().unwrap();
        let load = |overrides: &str, sets: &[String]| {
            JobSpec::load(&write(dir.path(), &retrieval_job(overrides)), sets)
                .map_err(|e| e.to_string())
        };
        let ok = load(
            "{optimizer: {lr: 1e-4}, batch_size_train: 4, xvlm: {dropout: false}}",
            &[],
        )
        .unwrap();
        assert_eq!(ok.overrides["batch_size_train"], serde_json::json!(4));
        let cases = [
            (
                "{optimizer: {lr: .nan}}",
                "overrides.optimizer.lr: must be a finite number > 0, got .nan",
            ),
            (
                "{optimizer: {lr: .inf}}",
                "overrides.optimizer.lr: must be a finite number > 0, got .inf",
            ),
            (
                "{optimizer: {lr: -0.001}}",
                "overrides.optimizer.lr: must be a finite number > 0, got -0.001",
            ),
            (
                "{batch_size_train: many}",
                "overrides.batch_size_train: must be an integer >= 1, got \"many\"",
            ),
        ];
        for (overrides, want) in cases {
            assert_eq!(load(overrides, &[]).unwrap_err(), want, "{overrides}");
        }
        let err = load("{optimiser: {lr: 1e-4}}", &[]).unwrap_err();
        assert!(
            err.starts_with("overrides.optimiser: unknown key for task retrieval (its keys here: ")
                && err.contains("optimizer"),
            "{err}"
        );
        // A flag's `nan` is the string "nan", which the model's reader would parse to a NaN.
        let err = load("{}", &["overrides.optimizer.lr=nan".into()]).unwrap_err();
        assert_eq!(
            err,
            "overrides.optimizer.lr: must be a finite number > 0, got \"nan\""
        );
        // The wire form: what a client that skipped these checks would send.
        let spec = load("{}", &[]).unwrap();
        let mut wire: serde_json::Value = serde_json::from_str(&spec.to_json()).unwrap();
        wire["overrides"] = serde_json::json!({"optimizer": {"lr": null}, "k_test": 0});
        let err = JobSpec::from_json(&wire.to_string())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "overrides.k_test: must be an integer >= 1, got 0");
        wire["overrides"] = serde_json::json!({"optimizer": {"lr": null}});
        let err = JobSpec::from_json(&wire.to_string())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "overrides.optimizer.lr: must be a finite number > 0, got null"
        );
        let smoke = write(dir.path(), &format!("{SMOKE}overrides: {{lr: 0.1}}\n"));
        let err = JobSpec::load(&smoke, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("overrides: task smoke has no task config"),
            "{err}"
        );
    }

    /// Every shipped task config passes the key table of its task (file names say the task), so the
    /// table knows every key, type and range the real configs use.
    #[test]
    fn shipped_task_configs_pass_their_task_keys() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        // Longest prefix first: `NLVR_pretrain` before `NLVR`.
        let tasks = [
            ("Grounding_bbox_pretrain", TaskKind::GroundingBboxPretrain),
            ("Grounding_bbox", TaskKind::GroundingBbox),
            ("Grounding", TaskKind::Grounding),
            ("NLVR_pretrain", TaskKind::NlvrPretrain),
            ("NLVR", TaskKind::Nlvr),
            ("Pretrain", TaskKind::Pretrain),
            ("Retrieval", TaskKind::Retrieval),
            ("VQA", TaskKind::Vqa),
        ];
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            let (_, task) = tasks
                .iter()
                .find(|(prefix, _)| file.starts_with(prefix))
                .unwrap_or_else(|| panic!("{file}: no task for this config name; add it here"));
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(find_duplicate_key(&text), None, "{file}");
            let keys: BTreeMap<String, ConfigValue> = Figment::new()
                .merge(Yaml::string(&text))
                .extract()
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            task_keys::check_keys(*task, "", &keys).unwrap_or_else(|e| panic!("{file}: {e}"));
            checked += 1;
        }
        assert!(checked >= 18, "only {checked} configs in {}", dir.display());
    }

    /// A missing job file is reported with its path.
    #[test]
    fn missing_file() {
        let err = JobSpec::load(Path::new("/nonexistent/job.yaml"), &[]).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/job.yaml"));
    }
}
