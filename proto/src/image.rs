//! OCI image references (`registry:port/name/path:tag@sha256:…`), checked against the
//! distribution reference grammar so that a malformed one is refused at the API, not when a
//! node tries to pull it.
//!
//! The grammar (distribution's `reference/regexp.go`, without Docker's normalisation):
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path-component [ "/" path-component ]*
//! domain         := host [ ":" port ]
//! host           := domain-component [ "." domain-component ]* | "[" IPv6 "]"
//! domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
//! path-component := [a-z0-9]+ ( separator [a-z0-9]+ )*
//! separator      := "." | "_" | "__" | "-"+
//! tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
//! digest         := "sha256:" [a-f0-9]{64}
//! ```
//!
//! The grammar lets a lowercase word be a domain or a path component. As Docker does, the
//! first of several components is the registry when it contains `.` or `:`, is
//! `localhost`, or has an uppercase letter (`library/python` is a path, `127.0.0.1:5000/x`
//! and `ghcr.io/x` name a registry); then it must be a well-formed `host[:port]`. A
//! reference is at most [`MAX_REFERENCE_LEN`] bytes.

use std::fmt;

/// Longest accepted reference, in bytes.
pub const MAX_REFERENCE_LEN: usize = 512;
/// Longest tag, in bytes (the grammar's `{0,127}` plus its first character).
pub const MAX_TAG_LEN: usize = 128;

/// A well-formed image reference, split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageReference {
    /// `host[:port]`, when the reference names one.
    pub registry: Option<String>,
    /// The path components joined by `/` (`library/python`).
    pub repository: String,
    /// The tag, when given.
    pub tag: Option<String>,
    /// `sha256:<hex>`, when given.
    pub digest: Option<String>,
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(registry) = &self.registry {
            write!(f, "{registry}/")?;
        }
        f.write_str(&self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl ImageReference {
    /// Parses `text`; the error says which part is wrong and what it should look like.
    pub fn parse(text: &str) -> Result<ImageReference, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.len() > MAX_REFERENCE_LEN {
            return Err(format!(
                "is {} bytes; the limit is {MAX_REFERENCE_LEN}",
                text.len()
            ));
        }
        let invalid = |why: String| format!("{text:?} is not an image reference: {why}");
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                check_digest(digest).map_err(invalid)?;
                (rest, Some(digest.to_owned()))
            }
            None => (text, None),
        };
        // A tag's colon comes after the last '/'; a colon before it is a registry's port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let (name, tag) = rest.split_at(last_slash + i);
                let tag = &tag[1..];
                check_tag(tag).map_err(invalid)?;
                (name, Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        let mut components: Vec<&str> = name.split('/').collect();
        let registry = if components.len() > 1 && names_a_registry(components[0]) {
            let registry = components.remove(0);
            if !is_domain(registry) {
                return Err(invalid(format!(
                    "registry {registry:?} must be host[:port], the host made of letters, \
                     digits, '-' and '.', or an [IPv6] address, and the port at most 65535"
                )));
            }
            Some(registry.to_owned())
        } else {
            None
        };
        for component in &components {
            check_path_component(component).map_err(invalid)?;
        }
        Ok(ImageReference {
            registry,
            repository: components.join("/"),
            tag,
            digest,
        })
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "digest {digest:?} must be sha256: and 64 lowercase hex digits"
        ))
    }
}

fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?} must be 1 to {MAX_TAG_LEN} letters, digits, '_', '.' or '-', not \
             starting with '.' or '-'"
        ))
    }
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or `-`+.
fn check_path_component(component: &str) -> Result<(), String> {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut ok =
        bytes.first().copied().is_some_and(alnum) && bytes.last().copied().is_some_and(alnum);
    let mut i = 0;
    while ok && i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
    }
    if ok {
        Ok(())
    } else {
        Err(format!(
            "path component {component:?} must be lowercase letters and digits, joined by \
             '.', '_', '__' or dashes"
        ))
    }
}

/// Whether the first component of a name is a registry rather than a path component.
fn names_a_registry(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

/// `host[:port]` as the grammar's domain: dot-separated components of letters, digits and
/// inner dashes, or a bracketed IPv6 address; the port is a number up to 65535.
fn is_domain(text: &str) -> bool {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ipv6, after)) => {
                let ok = !ipv6.is_empty()
                    && ipv6.contains(':')
                    && ipv6
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
                if !ok {
                    return false;
                }
                match after.strip_prefix(':') {
                    Some(port) => ("", Some(port)),
                    None if after.is_empty() => ("", None),
                    None => return false,
                }
            }
            None => return false,
        }
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u32>().is_ok_and(|n| n <= 65_535)
    });
    let host_ok = text.starts_with('[')
        || host.split('.').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
                && b.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        });
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(text: &str) -> (Option<String>, String, Option<String>, Option<String>) {
        let r = ImageReference::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(r.to_string(), text, "round trip");
        (r.registry, r.repository, r.tag, r.digest)
    }

    #[test]
    fn well_formed_references_split_into_their_parts() {
        let s = |v: &str| Some(v.to_owned());
        let digest = format!("sha256:{}", "0123456789abcdef".repeat(4));
        assert_eq!(parts("busybox"), (None, "busybox".into(), None, None));
        assert_eq!(
            parts("python:3.12"),
            (None, "python".into(), s("3.12"), None)
        );
        assert_eq!(
            parts("library/python:3.12-slim"),
            (None, "library/python".into(), s("3.12-slim"), None)
        );
        assert_eq!(
            parts("127.0.0.1:5000/busybox:1"),
            (s("127.0.0.1:5000"), "busybox".into(), s("1"), None)
        );
        assert_eq!(
            parts("localhost/a/b/c"),
            (s("localhost"), "a/b/c".into(), None, None)
        );
        assert_eq!(
            parts("Registry.Example.com/team/my_app__v2.x-y--z:V_1.0"),
            (
                s("Registry.Example.com"),
                "team/my_app__v2.x-y--z".into(),
                s("V_1.0"),
                None
            )
        );
        assert_eq!(
            parts(&format!("ghcr.io/org/img@{digest}")),
            (s("ghcr.io"), "org/img".into(), None, Some(digest.clone()))
        );
        assert_eq!(
            parts(&format!("[::1]:5000/img:tag@{digest}")),
            (s("[::1]:5000"), "img".into(), s("tag"), Some(digest))
        );
        let long_tag = format!("img:{}", "t".repeat(MAX_TAG_LEN));
        assert!(ImageReference::parse(&long_tag).is_ok());
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        let err = |text: &str| ImageReference::parse(text).expect_err(text);
        assert_eq!(err(""), "is empty");
        assert_eq!(
            err("Python:3"),
            "\"Python:3\" is not an image reference: path component \"Python\" must be \
             lowercase letters and digits, joined by '.', '_', '__' or dashes"
        );
        assert_eq!(
            err("img:.hidden"),
            "\"img:.hidden\" is not an image reference: tag \".hidden\" must be 1 to 128 \
             letters, digits, '_', '.' or '-', not starting with '.' or '-'"
        );
        assert_eq!(
            err("img@sha256:abc"),
            "\"img@sha256:abc\" is not an image reference: digest \"sha256:abc\" must be \
             sha256: and 64 lowercase hex digits"
        );
        for bad in [
            "img:",
            "/img",
            "img/",
            "a//b",
            "a/_b",
            "a/b_",
            "a/b___c",
            "a/b._c",
            "a b",
            "img\0",
            "img:tag:more",
            "host:99999/img",
            "host:/img",
            "-host.com/img",
            "[zz]:5000/img",
            "img@md5:0123",
            &format!("img@sha256:{}", "A".repeat(64)),
            &format!("img:{}", "t".repeat(MAX_TAG_LEN + 1)),
        ] {
            assert!(ImageReference::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            err("host:99999/img"),
            "\"host:99999/img\" is not an image reference: registry \"host:99999\" must be \
             host[:port], the host made of letters, digits, '-' and '.', or an [IPv6] address, \
             and the port at most 65535"
        );
        let long = format!("r/{}", "a".repeat(MAX_REFERENCE_LEN));
        assert_eq!(err(&long), "is 514 bytes; the limit is 512");
    }
}
