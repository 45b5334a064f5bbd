//! Value parsers of `berth sandbox`'s flags: states, GPU options, `KEY=VALUE`, CPU and
//! memory amounts.

use berth_proto::gpu::GpuOption;
use berth_proto::pb::v1::SandboxState;

pub(super) fn parse_state(text: &str) -> Result<SandboxState, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SANDBOX_STATE_") {
        upper
    } else {
        format!("SANDBOX_STATE_{upper}")
    };
    SandboxState::from_str_name(&name)
        .filter(|s| *s != SandboxState::Unspecified)
        .ok_or_else(|| {
            format!(
                "{text:?} is not a state: pending, scheduled, running, pausing, paused, unknown, exited, \
                 failed or lost"
            )
        })
}

pub(super) fn parse_gpu_option(text: &str) -> Result<String, String> {
    GpuOption::parse(text)
        .map(|_| text.trim().to_owned())
        .map_err(|e| e.to_string())
}

pub(super) fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// CPU in cores (`0.5`, `2`) or milli-cores (`250m`) → milli-cores: the quantity grammar
/// of config files, and more than zero.
pub(super) fn parse_cpu_milli(text: &str) -> Result<u64, String> {
    match berth_proto::resources::parse_cpu_milli(text) {
        Ok(0) => Err("the CPU amount must be more than 0".into()),
        other => other.map_err(|e| e.to_string()),
    }
}

/// Memory as `512Mi`, `2Gi`, `1.5GiB` or a plain number of MiB → MiB: the quantity grammar
/// of config files (decimal units such as `1G` are refused, not guessed), and more than zero.
pub(super) fn parse_memory_mib(text: &str) -> Result<u64, String> {
    match berth_proto::resources::parse_memory_mib(text) {
        Ok(0) => Err("the memory size must be more than 0".into()),
        other => other.map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512Mi"), Ok(512));
        assert_eq!(parse_memory_mib("2Gi"), Ok(2048));
        assert_eq!(parse_memory_mib("1.5Gi"), Ok(1536));
        assert_eq!(parse_memory_mib("300"), Ok(300));
        assert_eq!(parse_memory_mib("1Ti"), Ok(1 << 20));
        // Decimal units are refused, as in config files, rather than rounded.
        let err = parse_memory_mib("1G").expect_err("decimal unit");
        assert!(err.contains("use MiB, GiB or TiB"), "{err}");
        for bad in [
            "", "0", "0Gi", "Gi", "2g", "1.2.3Gi", "-1Gi", "12XB", "1e3", "1Ki",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_memory_mib("99999999999999999999999999Ti").is_err());
    }

    #[test]
    fn cpu_amounts() {
        assert_eq!(parse_cpu_milli("1"), Ok(1000));
        assert_eq!(parse_cpu_milli("0.5"), Ok(500));
        assert_eq!(parse_cpu_milli(".25"), Ok(250));
        assert_eq!(parse_cpu_milli("2.125"), Ok(2125));
        assert_eq!(parse_cpu_milli("250m"), Ok(250));
        for bad in ["", "0", "0.0", "0.0001", "1.5m", "-1", "one", "1,5", "."] {
            assert!(parse_cpu_milli(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn states_by_name() {
        assert_eq!(parse_state("running"), Ok(SandboxState::Running));
        assert_eq!(parse_state("EXITED"), Ok(SandboxState::Exited));
        assert_eq!(parse_state("sandbox_state_lost"), Ok(SandboxState::Lost));
        assert_eq!(parse_state("unknown"), Ok(SandboxState::Unknown));
        assert!(parse_state("unspecified").is_err());
        assert!(parse_state("done").is_err());
    }
}
