//! Resource arithmetic: CPU in milli-cores, memory in MiB, GPU in milli-GPUs.
//!
//! Every operation is checked: an overflow or an underflow is an error, never a wrapped or
//! saturated number that would let the scheduler over-commit a node. Also the parsers for the
//! quantities operators type (`"1.5"` cores, `"500m"`, `"16GiB"`).

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// An amount of the three resources the scheduler counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in milli-cores.
    pub cpu_milli: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// GPU in milli-GPUs summed over GPUs (1000 = one whole GPU).
    pub gpu_milli: u64,
}

/// Which resource an arithmetic error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    /// CPU milli-cores.
    Cpu,
    /// Memory MiB.
    Memory,
    /// Milli-GPUs.
    Gpu,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceKind::Cpu => "cpu_milli",
            ResourceKind::Memory => "memory_mib",
            ResourceKind::Gpu => "gpu_milli",
        })
    }
}

/// A resource sum that does not fit, or a subtraction below zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ResourceError {
    /// `a + b` does not fit in 64 bits.
    #[error("{kind} overflows: {a} + {b}")]
    Overflow {
        /// Resource.
        kind: ResourceKind,
        /// Left operand.
        a: u64,
        /// Right operand.
        b: u64,
    },
    /// `have - take` would be negative.
    #[error("{kind} underflows: {have} - {take}")]
    Underflow {
        /// Resource.
        kind: ResourceKind,
        /// What there is.
        have: u64,
        /// What was to be taken.
        take: u64,
    },
}

impl Resources {
    /// Nothing.
    pub const ZERO: Resources = Resources {
        cpu_milli: 0,
        memory_mib: 0,
        gpu_milli: 0,
    };

    /// `self + other`, or which resource overflowed.
    pub fn checked_add(self, other: Resources) -> Result<Resources, ResourceError> {
        let add = |kind, a: u64, b: u64| {
            a.checked_add(b)
                .ok_or(ResourceError::Overflow { kind, a, b })
        };
        Ok(Resources {
            cpu_milli: add(ResourceKind::Cpu, self.cpu_milli, other.cpu_milli)?,
            memory_mib: add(ResourceKind::Memory, self.memory_mib, other.memory_mib)?,
            gpu_milli: add(ResourceKind::Gpu, self.gpu_milli, other.gpu_milli)?,
        })
    }

    /// `self - other`, or which resource would go below zero.
    pub fn checked_sub(self, other: Resources) -> Result<Resources, ResourceError> {
        let sub = |kind, have: u64, take: u64| {
            have.checked_sub(take)
                .ok_or(ResourceError::Underflow { kind, have, take })
        };
        Ok(Resources {
            cpu_milli: sub(ResourceKind::Cpu, self.cpu_milli, other.cpu_milli)?,
            memory_mib: sub(ResourceKind::Memory, self.memory_mib, other.memory_mib)?,
            gpu_milli: sub(ResourceKind::Gpu, self.gpu_milli, other.gpu_milli)?,
        })
    }

    /// True when every component of `self` is at most that of `capacity`.
    pub fn fits_within(self, capacity: Resources) -> bool {
        self.cpu_milli <= capacity.cpu_milli
            && self.memory_mib <= capacity.memory_mib
            && self.gpu_milli <= capacity.gpu_milli
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu {}m, memory {} MiB, gpu {}m",
            self.cpu_milli, self.memory_mib, self.gpu_milli
        )
    }
}

/// A quantity string that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{input:?} is not a valid {what}: {why}")]
pub struct QuantityError {
    /// What was typed.
    pub input: String,
    /// "CPU quantity" or "memory size".
    pub what: &'static str,
    /// What is wrong, with the accepted forms.
    pub why: String,
}

/// Parses a non-negative decimal (`"1.5"`) and multiplies it by `unit`, exactly: the result
/// must be a whole number of the base unit.
fn parse_scaled(
    number: &str,
    unit: u64,
    what: &'static str,
    input: &str,
) -> Result<u64, QuantityError> {
    let err = |why: &str| QuantityError {
        input: input.to_owned(),
        what,
        why: why.to_owned(),
    };
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int_part.is_empty() && frac_part.is_empty() || !digits(int_part) || !digits(frac_part) {
        return Err(err("expected a non-negative number"));
    }
    if frac_part.len() > 6 {
        return Err(err("at most 6 digits after the decimal point"));
    }
    let int: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| err("number too large"))?
    };
    let scale = 10u64.pow(u32::try_from(frac_part.len()).unwrap_or(6));
    let frac: u64 = if frac_part.is_empty() {
        0
    } else {
        frac_part.parse().map_err(|_| err("bad fraction"))?
    };
    let whole = int
        .checked_mul(unit)
        .ok_or_else(|| err("number too large"))?;
    let frac_scaled = frac
        .checked_mul(unit)
        .ok_or_else(|| err("number too large"))?;
    if frac_scaled % scale != 0 {
        return Err(err(
            "the fraction does not come out as a whole number of the base unit",
        ));
    }
    whole
        .checked_add(frac_scaled / scale)
        .ok_or_else(|| err("number too large"))
}

/// Parses CPU: `"2"` or `"1.5"` cores, or `"500m"` milli-cores. Returns milli-cores.
pub fn parse_cpu_milli(input: &str) -> Result<u64, QuantityError> {
    const WHAT: &str = "CPU quantity";
    let text = input.trim();
    match text.strip_suffix('m') {
        Some(milli) if !milli.contains('.') => parse_scaled(milli, 1, WHAT, input),
        Some(_) => Err(QuantityError {
            input: input.to_owned(),
            what: WHAT,
            why: "milli-cores are whole numbers (\"500m\")".into(),
        }),
        None => parse_scaled(text, 1000, WHAT, input),
    }
}

/// Parses memory: a number with a binary unit `Mi`/`MiB`, `Gi`/`GiB`, `Ti`/`TiB` (a bare
/// number is MiB). Decimal units (`G`, `GB`) are refused rather than guessed. Returns MiB.
pub fn parse_memory_mib(input: &str) -> Result<u64, QuantityError> {
    const WHAT: &str = "memory size";
    let text = input.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = (text[..split].trim(), &text[split..]);
    let multiplier = match unit {
        "" | "Mi" | "MiB" => 1,
        "Gi" | "GiB" => 1024,
        "Ti" | "TiB" => 1024 * 1024,
        _ => {
            return Err(QuantityError {
                input: input.to_owned(),
                what: WHAT,
                why: format!("unknown unit {unit:?}; use MiB, GiB or TiB (e.g. \"16GiB\")"),
            });
        }
    };
    parse_scaled(number, multiplier, WHAT, input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked() {
        let a = Resources {
            cpu_milli: 1000,
            memory_mib: 2048,
            gpu_milli: 500,
        };
        let b = Resources {
            cpu_milli: 500,
            memory_mib: 1024,
            gpu_milli: 500,
        };
        assert_eq!(a.checked_add(b).map(|r| r.gpu_milli), Ok(1000));
        assert_eq!(a.checked_sub(b).map(|r| r.cpu_milli), Ok(500));
        assert_eq!(
            b.checked_sub(a),
            Err(ResourceError::Underflow {
                kind: ResourceKind::Cpu,
                have: 500,
                take: 1000
            })
        );
        let huge = Resources {
            memory_mib: u64::MAX,
            ..Resources::ZERO
        };
        assert_eq!(
            huge.checked_add(a).expect_err("overflow").to_string(),
            format!("memory_mib overflows: {} + 2048", u64::MAX)
        );
        assert!(b.fits_within(a));
        assert!(!a.fits_within(b));
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_milli("2"), Ok(2000));
        assert_eq!(parse_cpu_milli("1.5"), Ok(1500));
        assert_eq!(parse_cpu_milli("0.25"), Ok(250));
        assert_eq!(parse_cpu_milli("500m"), Ok(500));
        for bad in ["", "-1", "1.5m", "two", "0.0001", "1e3"] {
            assert!(parse_cpu_milli(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_cpu_milli("two").expect_err("bad").to_string(),
            "\"two\" is not a valid CPU quantity: expected a non-negative number"
        );
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("512MiB"), Ok(512));
        assert_eq!(parse_memory_mib("16Gi"), Ok(16 * 1024));
        assert_eq!(parse_memory_mib("1.5GiB"), Ok(1536));
        assert_eq!(parse_memory_mib("2TiB"), Ok(2 * 1024 * 1024));
        assert_eq!(
            parse_memory_mib("16GB").expect_err("decimal").to_string(),
            "\"16GB\" is not a valid memory size: unknown unit \"GB\"; use MiB, GiB or TiB (e.g. \"16GiB\")"
        );
        assert!(parse_memory_mib("0.3MiB").is_err());
        assert!(parse_memory_mib("99999999999999999999TiB").is_err());
    }
}
