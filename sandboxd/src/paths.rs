//! Paths of file calls: absolute, without `.` or `..`, and resolved so that no symlink takes
//! them above the sandbox's root.
//!
//! Symlinks are followed as the sandbox would follow them (an absolute target starts again
//! at the root), one component at a time; a `..` that would climb above the root refuses
//! the path instead of being clamped, so a link planted to point outside is an error the
//! caller sees, not a silent redirection.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

/// Longest path accepted, in bytes (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Most symlinks followed while resolving one path (Linux's limit).
const MAX_LINKS: usize = 40;

/// Checks a path as a caller wrote it: `Err` says what is wrong with it.
pub fn check(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.len() > MAX_PATH {
        return Err(format!("is {} bytes, above {MAX_PATH}", path.len()));
    }
    if path.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not absolute"));
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err(format!("{path:?} has a '.' or '..' component"));
    }
    Ok(())
}

/// Resolves `path` under `root`. With `follow_last`, a symlink as the last component is
/// followed too. Missing components are kept as written (a file about to be created).
pub fn resolve(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, String> {
    check(path)?;
    let mut queue: VecDeque<String> = components(path).collect();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = queue.pop_front() {
        if c == ".." {
            if resolved.pop().is_none() {
                return Err(format!(
                    "{path:?} leads above the sandbox's root through a symlink"
                ));
            }
            continue;
        }
        let here = join(root, &resolved).join(&c);
        let last = queue.is_empty();
        let is_link = std::fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link || (last && !follow_last) {
            resolved.push(c);
            continue;
        }
        links += 1;
        if links > MAX_LINKS {
            return Err(format!(
                "{path:?} goes through more than {MAX_LINKS} symlinks"
            ));
        }
        let target = std::fs::read_link(&here).map_err(|e| format!("{}: {e}", here.display()))?;
        let target = target.to_string_lossy().into_owned();
        if target.starts_with('/') {
            resolved.clear();
        }
        for t in components(&target).rev() {
            queue.push_front(t);
        }
    }
    Ok(join(root, &resolved))
}

fn components(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_owned)
}

fn join(root: &Path, parts: &[String]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn relative_dotted_and_nul_paths_are_refused_as_written() {
        for bad in ["", "tmp/x", "/tmp/../etc", "/tmp/./x", "/a\0b"] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        assert!(check(&format!("/{}", "a".repeat(MAX_PATH))).is_err());
        assert!(check("/tmp/x").is_ok());
    }

    #[test]
    fn symlinks_inside_the_root_are_followed_and_ones_leading_out_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        symlink("usr/bin", root.join("bin")).expect("link");
        symlink("/usr", root.join("abs")).expect("link");
        symlink("../../../../../etc", root.join("usr/out")).expect("link");
        symlink("loop", root.join("loop")).expect("link");
        assert_eq!(
            resolve(root, "/bin/sh", true).expect("in"),
            root.join("usr/bin/sh")
        );
        assert_eq!(
            resolve(root, "/abs/bin/new", true).expect("absolute target stays in the root"),
            root.join("usr/bin/new")
        );
        assert_eq!(
            resolve(root, "/bin", false).expect("last kept"),
            root.join("bin")
        );
        let out = resolve(root, "/usr/out/passwd", true).expect_err("escapes");
        assert!(out.contains("above the sandbox's root"), "{out}");
        assert!(resolve(root, "/loop/x", true).is_err());
    }
}
