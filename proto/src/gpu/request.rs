//! GPU requests in Modal's spec language.
//!
//! ```text
//! option := models ['!'] [':' amount]
//! models := 'any' | model ('|' model)*     several models: any of them, equally preferred
//! model  := a catalog name or alias (any case) | any other name, kept verbatim
//! amount := count            whole GPUs on one node, 1..=16 (default 1)
//!         | milli 'm'        a share of ONE GPU, 1m..=999m, stacked with other shares
//! ```
//!
//! A request is a list of options in preference order (`["H100", "A100-80GB:2"]`), plus an
//! optional minimum memory per GPU. `!` pins the model: without it the scheduler may upgrade
//! to a strictly better model ([`GpuModel::strictly_better_than`]) when the operator enables
//! upgrades. Other names match only GPUs reporting exactly that name.
//!
//! [`GpuModel::strictly_better_than`]: super::GpuModel::strictly_better_than

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::catalog::{GpuModel, GpuModelName};

/// Most whole GPUs one sandbox may ask for (they must all be on one node).
pub const MAX_GPUS_PER_SANDBOX: u32 = 16;
/// Most options in one fallback list.
pub const MAX_GPU_OPTIONS: usize = 8;
/// Longest accepted spec string, in bytes.
pub const MAX_GPU_SPEC_LEN: usize = 128;
/// Largest accepted minimum GPU memory: 1 TiB.
pub const MAX_GPU_MIN_MEMORY_MIB: u64 = 1024 * 1024;
/// Milli-GPUs in one whole GPU.
pub const GPU_MILLI_PER_GPU: u32 = 1000;

/// Which models an option accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuModelSelector {
    /// Any model.
    Any,
    /// This model (or, unless exact, a strictly better catalog model when allowed).
    Model(GpuModelName),
    /// Any of these models (two or more, sorted), equally preferred: `"V100M16|V100M32"`.
    AnyOf(Vec<GpuModelName>),
}

impl GpuModelSelector {
    /// The named models (empty for `Any`).
    pub fn models(&self) -> &[GpuModelName] {
        match self {
            GpuModelSelector::Any => &[],
            GpuModelSelector::Model(m) => std::slice::from_ref(m),
            GpuModelSelector::AnyOf(models) => models,
        }
    }
}

/// How much GPU an option asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GpuAmount {
    /// This many fully free GPUs, all on one node.
    Whole(u32),
    /// This many milli-GPUs (1..=999) of one GPU, shared with other sandboxes.
    Shared(u32),
}

impl GpuAmount {
    /// Number of GPUs touched.
    pub fn gpu_count(self) -> u32 {
        match self {
            GpuAmount::Whole(n) => n,
            GpuAmount::Shared(_) => 1,
        }
    }

    /// Milli-GPUs taken on each touched GPU.
    pub fn milli_per_gpu(self) -> u32 {
        match self {
            GpuAmount::Whole(_) => GPU_MILLI_PER_GPU,
            GpuAmount::Shared(m) => m,
        }
    }

    /// Total milli-GPUs.
    pub fn total_milli(self) -> u64 {
        u64::from(self.gpu_count()) * u64::from(self.milli_per_gpu())
    }
}

/// One option of a GPU request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuOption {
    /// Accepted models.
    pub model: GpuModelSelector,
    /// `!`: never upgrade to a better model.
    pub exact: bool,
    /// How much.
    pub amount: GpuAmount,
}

/// A GPU request: options in preference order and an optional minimum memory per GPU.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuRequest {
    /// 1..=[`MAX_GPU_OPTIONS`] options, most preferred first.
    pub options: Vec<GpuOption>,
    /// Each bound GPU must report at least this much memory.
    pub min_memory_mib: Option<u64>,
}

/// Why a GPU spec was rejected. Each message quotes the offending spec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GpuSpecError {
    /// Nothing but white space.
    #[error("empty GPU spec: expected MODEL[!][:COUNT], e.g. \"H100:2\"")]
    Empty,
    /// Longer than [`MAX_GPU_SPEC_LEN`].
    #[error("GPU spec is {len} bytes long; the limit is {MAX_GPU_SPEC_LEN}")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// Nothing before ':' or '!'.
    #[error("GPU spec {spec:?} has no model name")]
    MissingModel {
        /// The spec.
        spec: String,
    },
    /// More than one ':'.
    #[error("GPU spec {spec:?} has more than one ':'")]
    TooManyColons {
        /// The spec.
        spec: String,
    },
    /// Nothing after ':'.
    #[error(
        "GPU spec {spec:?} has nothing after ':'; expected a GPU count (1..=16) or milli-GPUs (1m..=999m)"
    )]
    MissingAmount {
        /// The spec.
        spec: String,
    },
    /// The amount is not a number.
    #[error("GPU spec {spec:?}: {amount:?} is not a GPU count (1..=16) or milli-GPUs (1m..=999m)")]
    InvalidAmount {
        /// The spec.
        spec: String,
        /// The text after ':'.
        amount: String,
    },
    /// Count 0.
    #[error("GPU spec {spec:?}: the GPU count must be at least 1")]
    ZeroCount {
        /// The spec.
        spec: String,
    },
    /// Count above [`MAX_GPUS_PER_SANDBOX`].
    #[error(
        "GPU spec {spec:?}: {count} GPUs is above the limit of {MAX_GPUS_PER_SANDBOX} GPUs per sandbox"
    )]
    CountTooLarge {
        /// The spec.
        spec: String,
        /// Requested count.
        count: u64,
    },
    /// Milli outside 1..=999.
    #[error(
        "GPU spec {spec:?}: milli-GPUs must be 1m..=999m; ask for a count (\"{model}:1\") for a whole GPU"
    )]
    MilliOutOfRange {
        /// The spec.
        spec: String,
        /// The model part, for the hint.
        model: String,
    },
    /// `!` somewhere other than right after the model.
    #[error("GPU spec {spec:?}: '!' goes once, right after the model, as in \"H100!:2\"")]
    MisplacedExact {
        /// The spec.
        spec: String,
    },
    /// `any!`.
    #[error("GPU spec {spec:?}: '!' (exactly this model) cannot be combined with 'any'")]
    ExactAny {
        /// The spec.
        spec: String,
    },
    /// `"A||B"`, `"A|"`.
    #[error("GPU spec {spec:?} has an empty model name between '|'")]
    EmptyAlternative {
        /// The spec.
        spec: String,
    },
    /// `"A|A"`.
    #[error("GPU spec {spec:?} lists model {model} twice")]
    DuplicateAlternative {
        /// The spec.
        spec: String,
        /// The model.
        model: String,
    },
    /// `"any|H100"`.
    #[error("GPU spec {spec:?}: 'any' cannot be combined with other models")]
    AnyInAlternatives {
        /// The spec.
        spec: String,
    },
    /// A character outside the allowed set in the model name.
    #[error(
        "GPU spec {spec:?}: model name has {ch:?}; allowed are letters, digits, space and - _ . ( ) / +"
    )]
    InvalidModelChar {
        /// The spec.
        spec: String,
        /// The first offending character.
        ch: char,
    },
}

/// Why a GPU request (a list of options) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GpuRequestError {
    /// No options.
    #[error("GPU request has no options; give at least one spec such as \"H100\"")]
    NoOptions,
    /// More than [`MAX_GPU_OPTIONS`].
    #[error("GPU request has {count} options; the limit is {MAX_GPU_OPTIONS}")]
    TooManyOptions {
        /// Number given.
        count: usize,
    },
    /// One option is malformed (`index` counts from 0).
    #[error("option {index}: {source}")]
    Option {
        /// Position in the list.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: GpuSpecError,
    },
    /// The same option twice.
    #[error("options {first} and {second} are both {model}; list each option once")]
    DuplicateModel {
        /// The model.
        model: String,
        /// First position.
        first: usize,
        /// Second position.
        second: usize,
    },
    /// Options after `any` can never be used.
    #[error(
        "option {index} ({spec:?}) matches every model, so the options after it are never used; put it last"
    )]
    AnyNotLast {
        /// Position of the `any` option.
        index: usize,
        /// Its spec.
        spec: String,
    },
    /// Minimum memory above [`MAX_GPU_MIN_MEMORY_MIB`].
    #[error("minimum GPU memory {mib} MiB is above the limit of {MAX_GPU_MIN_MEMORY_MIB} MiB")]
    MinMemoryTooLarge {
        /// Requested MiB.
        mib: u64,
    },
}

impl GpuOption {
    /// Parses one spec such as `"H100!:2"` or `"any:250m"`.
    pub fn parse(spec: &str) -> Result<GpuOption, GpuSpecError> {
        let spec = spec.trim();
        if spec.is_empty() {
            return Err(GpuSpecError::Empty);
        }
        if spec.len() > MAX_GPU_SPEC_LEN {
            return Err(GpuSpecError::TooLong { len: spec.len() });
        }
        let owned = || spec.to_owned();
        let (head, amount) = match spec.split_once(':') {
            None => (spec, None),
            Some((_, rest)) if rest.contains(':') => {
                return Err(GpuSpecError::TooManyColons { spec: owned() });
            }
            Some((head, rest)) => (head, Some(rest.trim())),
        };
        let (name, exact) = match head.trim().strip_suffix('!') {
            Some(name) => (name.trim(), true),
            None => (head.trim(), false),
        };
        if name.contains('!') || amount.is_some_and(|a| a.contains('!')) {
            return Err(GpuSpecError::MisplacedExact { spec: owned() });
        }
        if name.is_empty() {
            return Err(GpuSpecError::MissingModel { spec: owned() });
        }
        if let Some(ch) = name.chars().find(|c| {
            !(c.is_ascii_alphanumeric()
                || matches!(c, ' ' | '-' | '_' | '.' | '|' | '(' | ')' | '/' | '+'))
        }) {
            return Err(GpuSpecError::InvalidModelChar { spec: owned(), ch });
        }
        let model = if name.contains('|') {
            let mut models: Vec<GpuModelName> = Vec::new();
            for part in name.split('|').map(str::trim) {
                if part.is_empty() {
                    return Err(GpuSpecError::EmptyAlternative { spec: owned() });
                }
                if part.eq_ignore_ascii_case("any") {
                    return Err(GpuSpecError::AnyInAlternatives { spec: owned() });
                }
                let model = GpuModelName::resolve(part);
                if models.contains(&model) {
                    return Err(GpuSpecError::DuplicateAlternative {
                        spec: owned(),
                        model: model.to_string(),
                    });
                }
                models.push(model);
            }
            models.sort();
            GpuModelSelector::AnyOf(models)
        } else if name.eq_ignore_ascii_case("any") {
            if exact {
                return Err(GpuSpecError::ExactAny { spec: owned() });
            }
            GpuModelSelector::Any
        } else {
            GpuModelSelector::Model(GpuModelName::resolve(name))
        };
        let amount = match amount {
            None => GpuAmount::Whole(1),
            Some("") => return Err(GpuSpecError::MissingAmount { spec: owned() }),
            Some(text) => parse_amount(spec, name, text)?,
        };
        Ok(GpuOption {
            model,
            exact,
            amount,
        })
    }

    /// Whether a GPU of `model` satisfies this option; `allow_upgrade` is the operator's
    /// switch for serving a non-exact option with a strictly better catalog model.
    pub fn accepts(&self, model: &GpuModelName, allow_upgrade: bool) -> bool {
        if self.model == GpuModelSelector::Any {
            return true;
        }
        self.model.models().iter().any(|wanted| {
            wanted == model
                || (allow_upgrade
                    && !self.exact
                    && match (wanted.known(), model.known()) {
                        (Some(wanted), Some(offered)) => offered.strictly_better_than(wanted),
                        _ => false,
                    })
        })
    }
}

fn parse_amount(spec: &str, name: &str, text: &str) -> Result<GpuAmount, GpuSpecError> {
    let invalid = || GpuSpecError::InvalidAmount {
        spec: spec.to_owned(),
        amount: text.to_owned(),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if let Some(milli) = text.strip_suffix('m') {
        if !all_digits(milli) {
            return Err(invalid());
        }
        return match milli.parse::<u32>() {
            Ok(m) if (1..GPU_MILLI_PER_GPU).contains(&m) => Ok(GpuAmount::Shared(m)),
            _ => Err(GpuSpecError::MilliOutOfRange {
                spec: spec.to_owned(),
                model: name.to_owned(),
            }),
        };
    }
    if !all_digits(text) {
        return Err(invalid());
    }
    // All digits: only a count too large for u64 fails to parse, and that is too large.
    let count = text.parse::<u64>().unwrap_or(u64::MAX);
    match count {
        0 => Err(GpuSpecError::ZeroCount {
            spec: spec.to_owned(),
        }),
        n if n > u64::from(MAX_GPUS_PER_SANDBOX) => Err(GpuSpecError::CountTooLarge {
            spec: spec.to_owned(),
            count: n,
        }),
        // In range, so it fits u32.
        n => Ok(GpuAmount::Whole(
            u32::try_from(n).unwrap_or(MAX_GPUS_PER_SANDBOX),
        )),
    }
}

impl GpuRequest {
    /// Parses a fallback list of specs, most preferred first.
    pub fn parse<S: AsRef<str>>(
        specs: &[S],
        min_memory_mib: Option<u64>,
    ) -> Result<GpuRequest, GpuRequestError> {
        if specs.is_empty() {
            return Err(GpuRequestError::NoOptions);
        }
        if specs.len() > MAX_GPU_OPTIONS {
            return Err(GpuRequestError::TooManyOptions { count: specs.len() });
        }
        let mut options: Vec<GpuOption> = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let option = GpuOption::parse(spec.as_ref())
                .map_err(|source| GpuRequestError::Option { index, source })?;
            if let Some(first) = options.iter().position(|o| *o == option) {
                return Err(GpuRequestError::DuplicateModel {
                    model: option.to_string(),
                    first,
                    second: index,
                });
            }
            options.push(option);
        }
        if let Some(index) = options[..options.len() - 1]
            .iter()
            .position(|o| o.model == GpuModelSelector::Any)
        {
            return Err(GpuRequestError::AnyNotLast {
                index,
                spec: specs[index].as_ref().trim().to_owned(),
            });
        }
        match min_memory_mib {
            Some(mib) if mib > MAX_GPU_MIN_MEMORY_MIB => {
                Err(GpuRequestError::MinMemoryTooLarge { mib })
            }
            _ => Ok(GpuRequest {
                options,
                min_memory_mib: min_memory_mib.filter(|m| *m > 0),
            }),
        }
    }

    /// A single whole-GPU option of a catalog model, e.g. `GpuRequest::whole(H100, 8)`.
    pub fn whole(model: GpuModel, count: u32) -> GpuRequest {
        GpuRequest {
            options: vec![GpuOption {
                model: GpuModelSelector::Model(model.into()),
                exact: false,
                amount: GpuAmount::Whole(count),
            }],
            min_memory_mib: None,
        }
    }

    /// The options as spec strings, which parse back to the same request.
    pub fn specs(&self) -> Vec<String> {
        self.options.iter().map(ToString::to_string).collect()
    }
}

fn selector_name(selector: &GpuModelSelector) -> String {
    match selector {
        GpuModelSelector::Any => "any".to_owned(),
        GpuModelSelector::Model(m) => m.as_str().to_owned(),
        GpuModelSelector::AnyOf(models) => models
            .iter()
            .map(GpuModelName::as_str)
            .collect::<Vec<_>>()
            .join("|"),
    }
}

impl fmt::Display for GpuOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&selector_name(&self.model))?;
        if self.exact {
            f.write_str("!")?;
        }
        match self.amount {
            GpuAmount::Whole(1) => Ok(()),
            GpuAmount::Whole(n) => write!(f, ":{n}"),
            GpuAmount::Shared(m) => write!(f, ":{m}m"),
        }
    }
}

impl fmt::Display for GpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.specs().join(" | "))?;
        if let Some(mib) = self.min_memory_mib {
            write!(f, " (>= {mib} MiB per GPU)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GpuModel::*;

    fn one(spec: &str) -> GpuOption {
        GpuOption::parse(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"))
    }

    fn model(m: GpuModel) -> GpuModelSelector {
        GpuModelSelector::Model(m.into())
    }

    #[test]
    fn valid_specs() {
        let cases = [
            ("H100", model(H100), false, GpuAmount::Whole(1)),
            ("H100:8", model(H100), false, GpuAmount::Whole(8)),
            ("A100-80GB:2", model(A100_80GB), false, GpuAmount::Whole(2)),
            ("H100!", model(H100), true, GpuAmount::Whole(1)),
            ("H100!:4", model(H100), true, GpuAmount::Whole(4)),
            ("h100", model(H100), false, GpuAmount::Whole(1)),
            ("  l4 : 2 ", model(L4), false, GpuAmount::Whole(2)),
            ("a100", model(A100_40GB), false, GpuAmount::Whole(1)),
            ("T4:500m", model(T4), false, GpuAmount::Shared(500)),
            ("any", GpuModelSelector::Any, false, GpuAmount::Whole(1)),
            (
                "ANY:250m",
                GpuModelSelector::Any,
                false,
                GpuAmount::Shared(250),
            ),
            ("any:16", GpuModelSelector::Any, false, GpuAmount::Whole(16)),
            (
                "V100M32|V100M16:2",
                GpuModelSelector::AnyOf(vec![
                    GpuModelName::Other("V100M16".into()),
                    GpuModelName::Other("V100M32".into()),
                ]),
                false,
                GpuAmount::Whole(2),
            ),
            (
                "V100M16:2",
                GpuModelSelector::Model(GpuModelName::Other("V100M16".into())),
                false,
                GpuAmount::Whole(2),
            ),
        ];
        for (spec, m, exact, amount) in cases {
            assert_eq!(
                one(spec),
                GpuOption {
                    model: m,
                    exact,
                    amount
                },
                "{spec}"
            );
        }
    }

    #[test]
    fn invalid_specs_have_precise_errors() {
        let cases = [
            (
                "",
                "empty GPU spec: expected MODEL[!][:COUNT], e.g. \"H100:2\"",
            ),
            (
                "   ",
                "empty GPU spec: expected MODEL[!][:COUNT], e.g. \"H100:2\"",
            ),
            (":2", "GPU spec \":2\" has no model name"),
            ("!:2", "GPU spec \"!:2\" has no model name"),
            ("H100:2:3", "GPU spec \"H100:2:3\" has more than one ':'"),
            (
                "H100:",
                "GPU spec \"H100:\" has nothing after ':'; expected a GPU count (1..=16) or milli-GPUs (1m..=999m)",
            ),
            (
                "H100:abc",
                "GPU spec \"H100:abc\": \"abc\" is not a GPU count (1..=16) or milli-GPUs (1m..=999m)",
            ),
            (
                "H100:-1",
                "GPU spec \"H100:-1\": \"-1\" is not a GPU count (1..=16) or milli-GPUs (1m..=999m)",
            ),
            (
                "H100:1.5",
                "GPU spec \"H100:1.5\": \"1.5\" is not a GPU count (1..=16) or milli-GPUs (1m..=999m)",
            ),
            (
                "H100:0",
                "GPU spec \"H100:0\": the GPU count must be at least 1",
            ),
            (
                "H100:17",
                "GPU spec \"H100:17\": 17 GPUs is above the limit of 16 GPUs per sandbox",
            ),
            (
                "H100:99999999999999999999999",
                "GPU spec \"H100:99999999999999999999999\": 18446744073709551615 GPUs is above the limit of 16 GPUs per sandbox",
            ),
            (
                "T4:1000m",
                "GPU spec \"T4:1000m\": milli-GPUs must be 1m..=999m; ask for a count (\"T4:1\") for a whole GPU",
            ),
            (
                "T4:0m",
                "GPU spec \"T4:0m\": milli-GPUs must be 1m..=999m; ask for a count (\"T4:1\") for a whole GPU",
            ),
            (
                "H100:2!",
                "GPU spec \"H100:2!\": '!' goes once, right after the model, as in \"H100!:2\"",
            ),
            (
                "H100!!",
                "GPU spec \"H100!!\": '!' goes once, right after the model, as in \"H100!:2\"",
            ),
            (
                "any!",
                "GPU spec \"any!\": '!' (exactly this model) cannot be combined with 'any'",
            ),
            (
                "H100||A10",
                "GPU spec \"H100||A10\" has an empty model name between '|'",
            ),
            ("H100|h100", "GPU spec \"H100|h100\" lists model H100 twice"),
            (
                "any|H100",
                "GPU spec \"any|H100\": 'any' cannot be combined with other models",
            ),
            (
                "H@100",
                "GPU spec \"H@100\": model name has '@'; allowed are letters, digits, space and - _ . ( ) / +",
            ),
        ];
        for (spec, message) in cases {
            let err = GpuOption::parse(spec).expect_err(spec);
            assert_eq!(err.to_string(), message, "{spec:?}");
        }
        let long = "H".repeat(129);
        assert_eq!(
            GpuOption::parse(&long).expect_err("long").to_string(),
            "GPU spec is 129 bytes long; the limit is 128"
        );
    }

    #[test]
    fn fallback_lists() {
        let req = GpuRequest::parse(&["H100", "A100-80GB:2"], None).expect("valid");
        // The same model with a smaller count is a sensible fallback.
        assert!(GpuRequest::parse(&["H100:8", "H100:4"], None).is_ok());
        assert!(GpuOption::parse("AMD Instinct MI250X / MI250").is_ok());
        assert_eq!(req.options.len(), 2);
        assert_eq!(req.options[1].amount, GpuAmount::Whole(2));
        assert_eq!(req.specs(), ["H100", "A100-80GB:2"]);

        let errors = [
            (
                GpuRequest::parse::<&str>(&[], None),
                "GPU request has no options; give at least one spec such as \"H100\"",
            ),
            (
                GpuRequest::parse(&["H100"; 9], None),
                "GPU request has 9 options; the limit is 8",
            ),
            (
                GpuRequest::parse(&["H100:2", "h100:2"], None),
                "options 0 and 1 are both H100:2; list each option once",
            ),
            (
                GpuRequest::parse(&["any", "H100"], None),
                "option 0 (\"any\") matches every model, so the options after it are never used; put it last",
            ),
            (
                GpuRequest::parse(&["H100", "A100:0"], None),
                "option 1: GPU spec \"A100:0\": the GPU count must be at least 1",
            ),
            (
                GpuRequest::parse(&["H100"], Some(2 * 1024 * 1024)),
                "minimum GPU memory 2097152 MiB is above the limit of 1048576 MiB",
            ),
        ];
        for (result, message) in errors {
            assert_eq!(result.expect_err(message).to_string(), message);
        }
    }

    #[test]
    fn upgrades_only_when_allowed_and_not_exact() {
        let h100 = one("H100");
        let exact = one("H100!");
        let h200: GpuModelName = H200.into();
        assert!(h100.accepts(&H100.into(), false));
        assert!(!h100.accepts(&h200, false));
        assert!(h100.accepts(&h200, true));
        assert!(!exact.accepts(&h200, true));
        assert!(!h100.accepts(&A100_80GB.into(), true), "never a downgrade");
        let other = one("G2");
        assert!(other.accepts(&GpuModelName::Other("G2".into()), true));
        assert!(!other.accepts(&GpuModelName::Other("G3".into()), true));
        assert!(one("any").accepts(&GpuModelName::Other("G3".into()), false));
        let set = one("G2|T4");
        assert!(set.accepts(&T4.into(), false));
        assert!(set.accepts(&GpuModelName::Other("G2".into()), false));
        assert!(!set.accepts(&L4.into(), false));
        assert_eq!(set.to_string(), "T4|G2");
    }

    proptest::proptest! {
        #[test]
        fn display_parses_back(
            idx in 0usize..GpuModel::ALL.len(),
            exact: bool,
            whole in proptest::option::of(1u32..=16),
            milli in 1u32..1000,
        ) {
            let option = GpuOption {
                model: model(GpuModel::ALL[idx]),
                exact,
                amount: whole.map_or(GpuAmount::Shared(milli), GpuAmount::Whole),
            };
            proptest::prop_assert_eq!(GpuOption::parse(&option.to_string()), Ok(option));
        }

        #[test]
        fn parsing_never_panics(spec in "\\PC{0,40}") {
            let _ = GpuOption::parse(&spec);
        }
    }
}
