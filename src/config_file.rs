//! A berth config file: TOML with any of the sections `[scheduler]`, `[agent]` and
//! `[autoscaler]`, so one file can configure one process or a whole development machine.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use berth_autoscaler::AutoscalerConfig;
use berth_node_agent::AgentConfig;
use berth_proto::{FieldErrors, Validator};
use berth_scheduler::SchedulerConfig;

/// Largest config file read, so a wrong path (a log, a binary) fails fast.
const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The sections of a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ConfigFile {
    pub(crate) scheduler: Option<SchedulerConfig>,
    pub(crate) agent: Option<AgentConfig>,
    pub(crate) autoscaler: Option<AutoscalerConfig>,
}

/// Why a config file is unusable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: {size} bytes is larger than the {MAX_CONFIG_BYTES}-byte limit for a config file"
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{path}: no [scheduler], [agent] or [autoscaler] section")]
    Empty { path: PathBuf },
    #[error("{}", prefix_lines(path, errors))]
    Invalid { path: PathBuf, errors: FieldErrors },
}

fn prefix_lines(path: &Path, errors: &FieldErrors) -> String {
    errors
        .0
        .iter()
        .map(|e| format!("{}: {e}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigFile {
    /// Reads, parses and validates a file; every validation problem is reported at once.
    pub(crate) fn load(path: &Path) -> Result<ConfigFile, ConfigError> {
        let file = ConfigFile::read(path)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        file.validate(dir).map_err(|errors| ConfigError::Invalid {
            path: path.to_owned(),
            errors,
        })?;
        Ok(file)
    }

    /// The file parsed, not yet validated: for a caller that replaces some fields first
    /// (`berth dev --autoscaler-config` sets `schedulers` and `tls` itself).
    pub(crate) fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_err)?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let file: ConfigFile = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        if file.sections().is_empty() {
            return Err(ConfigError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(file)
    }

    /// Names of the sections present.
    pub(crate) fn sections(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.scheduler.is_some() {
            names.push("scheduler");
        }
        if self.agent.is_some() {
            names.push("agent");
        }
        if self.autoscaler.is_some() {
            names.push("autoscaler");
        }
        names
    }

    /// The `[autoscaler]` section checked as `berth dev` runs it: everything but the
    /// fields dev replaces (`tls`; `schedulers` it sets before this).
    pub(crate) fn dev_autoscaler(
        path: &Path,
        schedulers: &[String],
    ) -> Result<berth_autoscaler::AutoscalerConfig, String> {
        let mut cfg = ConfigFile::read(path)
            .map_err(|e| e.to_string())?
            .autoscaler
            .ok_or_else(|| format!("{}: no [autoscaler] section", path.display()))?;
        cfg.schedulers = schedulers.to_vec();
        let mut v = Validator::new();
        v.nested("autoscaler", |v| cfg.validate_policy(v));
        v.finish().map_err(|errors| {
            ConfigError::Invalid {
                path: path.to_owned(),
                errors,
            }
            .to_string()
        })?;
        Ok(cfg)
    }

    fn validate(&self, dir: &Path) -> Result<(), FieldErrors> {
        let mut v = Validator::new();
        if let Some(scheduler) = &self.scheduler {
            v.nested("scheduler", |v| scheduler.validate(v));
        }
        if let Some(agent) = &self.agent {
            v.nested("agent", |v| agent.validate(v, dir));
        }
        if let Some(autoscaler) = &self.autoscaler {
            v.nested("autoscaler", |v| autoscaler.validate(v));
        }
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berth.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn two_mistakes_in_two_sections_are_both_named() {
        let (_dir, path) = write("[scheduler]\nnode_id = 0\n[autoscaler]\ninterval_ms = 5\n");
        let err = ConfigFile::load(&path).expect_err("invalid").to_string();
        assert!(err.contains("scheduler.node_id: must be non-zero"), "{err}");
        assert!(
            err.contains("autoscaler.interval_ms: 5 is outside 100..=3600000"),
            "{err}"
        );
    }

    #[test]
    fn unknown_section_and_empty_file_are_refused() {
        let (_dir, path) = write("[schedular]\nnode_id = 1\n");
        let err = ConfigFile::load(&path).expect_err("typo").to_string();
        assert!(err.contains("unknown field `schedular`"), "{err}");
        let (_dir, path) = write("# nothing\n");
        let err = ConfigFile::load(&path).expect_err("empty").to_string();
        assert!(
            err.ends_with("no [scheduler], [agent] or [autoscaler] section"),
            "{err}"
        );
    }
}
