//! Field-path validation errors, shared by config files and gRPC requests.
//!
//! A [`Validator`] collects every problem instead of stopping at the first, each with the
//! dotted path of the field (`autoscaler.node_groups[2].max_nodes`), so an operator fixes a
//! file in one pass and a client is told exactly which field of a request is wrong.

use std::fmt;

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path, with `[i]` for list elements.
    pub field: String,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// All problems found, in the order they were found; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<FieldError>);

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

impl FieldErrors {
    /// One problem.
    pub fn one(field: impl Into<String>, message: impl Into<String>) -> FieldErrors {
        FieldErrors(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    /// `field: must be set`, for a message or value that is absent.
    pub fn missing(field: &str) -> FieldErrors {
        FieldErrors::one(field, "must be set")
    }

    /// Every `path: problem` on one line, joined by `"; "`: what a gRPC client reads.
    pub fn one_line(&self) -> String {
        self.0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Collects [`FieldError`]s under a path prefix.
#[derive(Debug, Default)]
pub struct Validator {
    prefix: Vec<String>,
    errors: Vec<FieldError>,
}

impl Validator {
    /// A validator with no prefix.
    pub fn new() -> Validator {
        Validator::default()
    }

    /// Full path of `field` under the current prefix.
    pub fn path(&self, field: &str) -> String {
        let mut path = self.prefix.join(".");
        if !field.is_empty() {
            if !path.is_empty() && !field.starts_with('[') {
                path.push('.');
            }
            path.push_str(field);
        }
        path
    }

    /// Records a problem with `field`.
    pub fn error(&mut self, field: &str, message: impl Into<String>) {
        let field = self.path(field);
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }

    /// Records `message` against `field` unless `ok`.
    pub fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.error(field, message());
        }
    }

    /// Runs `f` with `segment` appended to the prefix (`"raft"`, `"node_groups[2]"`).
    pub fn nested<T>(
        &mut self,
        segment: impl Into<String>,
        f: impl FnOnce(&mut Validator) -> T,
    ) -> T {
        let segment = segment.into();
        // "[2]" attaches to the previous segment rather than starting a new one.
        let pushed = if segment.starts_with('[') && !self.prefix.is_empty() {
            let last = self.prefix.len() - 1;
            let before = self.prefix[last].len();
            self.prefix[last].push_str(&segment);
            Some(before)
        } else {
            self.prefix.push(segment);
            None
        };
        let out = f(self);
        match pushed {
            Some(len) => {
                let last = self.prefix.len() - 1;
                self.prefix[last].truncate(len);
            }
            None => {
                self.prefix.pop();
            }
        }
        out
    }

    /// Checks a `host:port` address: a non-empty host and a port in 1..=65535.
    pub fn address(&mut self, field: &str, value: &str) {
        let ok = match value.rsplit_once(':') {
            Some((host, port)) => {
                !host.is_empty()
                    && !host.contains(char::is_whitespace)
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            }
            None => false,
        };
        self.check(ok, field, || {
            format!("{value:?} is not a host:port address (e.g. \"127.0.0.1:7070\")")
        });
    }

    /// Checks an identifier: 1..=`max_len` characters of `[a-z0-9-.]`, starting and ending
    /// with a letter or digit (DNS-label style, safe in paths, metrics and URLs).
    pub fn identifier(&mut self, field: &str, value: &str, max_len: usize) {
        let chars_ok = value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let ends_ok = value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && value
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if value.is_empty() {
            self.error(field, "must be set");
        } else if value.len() > max_len {
            self.error(
                field,
                format!("is {} characters long; the limit is {max_len}", value.len()),
            );
        } else if !chars_ok || !ends_ok {
            self.error(
                field,
                format!("{value:?} must be lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"),
            );
        }
    }

    /// Takes every problem `other` found, each under this validator's current path (a
    /// message converted on its own, then placed where it sits in the request).
    pub fn absorb(&mut self, other: Validator) {
        for e in other.errors {
            let field = self.path(&e.field);
            self.errors.push(FieldError {
                field,
                message: e.message,
            });
        }
    }

    /// Orders the problems by the top-level field they concern, in `fields` order (a
    /// message's fields as its .proto declares them), then by list index (`gpus[0]` before
    /// `gpus[1]`), keeping the order found otherwise. Unknown fields go last.
    pub fn sort_by_fields(&mut self, fields: &[&str]) {
        self.errors.sort_by_key(|e| {
            let top = e.field.split(['.', '[']).next().unwrap_or_default();
            let rank = fields
                .iter()
                .position(|f| *f == top)
                .unwrap_or(fields.len());
            let index = e.field[top.len()..]
                .strip_prefix('[')
                .and_then(|rest| rest.split(']').next())
                .and_then(|i| i.parse::<usize>().ok());
            (rank, index)
        });
    }

    /// The problems recorded so far, to drop or rename some (a model's `id` that the wire
    /// calls `node_id`).
    pub fn errors_mut(&mut self) -> &mut Vec<FieldError> {
        &mut self.errors
    }

    /// As [`Validator::finish`], with `prefix` put before every path (`"spec"` makes
    /// `tenant` read `spec.tenant`, `[2]` reads `spec[2]`, an empty path reads `spec`).
    pub fn finish_under(self, prefix: &str) -> Result<(), FieldErrors> {
        if self.errors.is_empty() {
            return Ok(());
        }
        Err(FieldErrors(
            self.errors
                .into_iter()
                .map(|e| FieldError {
                    field: join(prefix, &e.field),
                    message: e.message,
                })
                .collect(),
        ))
    }

    /// Whether nothing has been recorded.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    /// `Ok` when nothing was recorded, else every problem.
    pub fn finish(self) -> Result<(), FieldErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(FieldErrors(self.errors))
        }
    }
}

/// `prefix.field`, `prefix[i]`, or whichever of the two is not empty.
fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_owned()
    } else if field.is_empty() {
        prefix.to_owned()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absorbed_problems_sort_by_field_order_and_finish_under_a_prefix() {
        let mut inner = Validator::new();
        inner.error("gpus[1].uuid", "must be set");
        inner.error("cpu_milli", "must be > 0");
        inner.error("gpus[0].model", "unknown");
        inner.error("id", "must be set");
        let mut v = Validator::new();
        v.error("zzz", "not a field of the message");
        v.absorb(inner);
        v.sort_by_fields(&["id", "cpu_milli", "gpus"]);
        for e in v.errors_mut() {
            if e.field == "id" {
                e.field = "node_id".into();
            }
        }
        let errors = v.finish_under("register.inventory").expect_err("problems");
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "register.inventory.node_id",
                "register.inventory.cpu_milli",
                "register.inventory.gpus[0].model",
                "register.inventory.gpus[1].uuid",
                "register.inventory.zzz",
            ]
        );
        let mut under = Validator::new();
        under.nested("spec", |v| {
            let mut inner = Validator::new();
            inner.error("tenant", "must be set");
            inner.error("", "is odd");
            v.absorb(inner);
        });
        under.error("[2]", "listed twice");
        let errors = under.finish_under("items").expect_err("problems");
        assert_eq!(
            errors.one_line(),
            "items.spec.tenant: must be set; items.spec: is odd; items[2]: listed twice"
        );
        assert_eq!(Validator::new().finish_under("x"), Ok(()));
    }

    #[test]
    fn addresses_and_identifiers() {
        let mut v = Validator::new();
        v.address("a", "127.0.0.1:7070");
        v.address("b", "scheduler-0.berth:7070");
        v.address("c", "[::1]:7070");
        v.identifier("d", "h100-node-1.us-east", 63);
        assert!(v.is_ok());
        v.address("e", "localhost");
        v.address("f", "host:0");
        v.identifier("g", "Bad_Name", 63);
        v.identifier("h", "", 63);
        v.identifier("i", "-x", 63);
        v.identifier("j", &"a".repeat(64), 63);
        let fields: Vec<String> = v
            .finish()
            .expect_err("bad")
            .0
            .into_iter()
            .map(|e| e.field)
            .collect();
        assert_eq!(fields, ["e", "f", "g", "h", "i", "j"]);
    }

    #[test]
    fn collects_every_error_with_its_path() {
        let mut v = Validator::new();
        v.nested("autoscaler", |v| {
            v.check(false, "interval_ms", || "must be > 0".into());
            v.nested("node_groups", |v| {
                v.nested("[2]", |v| v.error("max_nodes", "below min_nodes"));
                v.error("[3]", "duplicate name");
            });
            v.check(true, "never", String::new);
        });
        v.error("top", "bad");
        let errors = v.finish().expect_err("three errors");
        let paths: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            paths,
            [
                "autoscaler.interval_ms",
                "autoscaler.node_groups[2].max_nodes",
                "autoscaler.node_groups[3]",
                "top"
            ]
        );
        assert_eq!(
            errors.to_string().lines().nth(1),
            Some("autoscaler.node_groups[2].max_nodes: below min_nodes")
        );
    }
}
