//! Validation of names that come from a peer, and namespace-confined
//! directories.

use super::error::{Ctx, StoreError};
use std::path::{Path, PathBuf};

/// Longest name accepted, in bytes (the usual `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255;

/// Names the store uses itself inside a VM or disk directory; a peer may not
/// use them for a disk.
const RESERVED: &[&str] = &[
    "state.json",
    "state.json.tmp",
    "points.json",
    "points.json.tmp",
    "incoming",
    "undo",
    "disks",
    "vms",
    "sites",
];

/// Check a site, vm or disk name sent by a peer: non-empty, at most
/// [`MAX_NAME_LEN`] bytes, not `.`/`..`, no leading dot, no `/`, `\`, NUL
/// or control characters, not a name the store reserves. `kind` ("site",
/// "vm", "disk") names it in the error.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 255 bytes")
    } else if name == "." || name == ".." {
        Some("it names a directory ('.' or '..')")
    } else if name.starts_with('.') {
        Some("it starts with a dot")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.contains('\\') {
        Some("it contains '\\'")
    } else if name.contains('\0') {
        Some("it contains NUL")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if RESERVED.contains(&name) || super::store::is_points_journal(name) {
        Some("the store reserves it")
    } else {
        None
    };
    match why {
        Some(why) => Err(StoreError::InvalidName {
            kind,
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

/// Create (if needed) the directory `parent/name` and check that it is a real
/// directory, not a symlink or anything else. `name` is a single validated
/// component or a fixed literal.
pub(crate) fn ensure_dir(
    ctx: &Ctx,
    store: &Path,
    parent: &Path,
    name: &str,
    create: bool,
) -> Result<PathBuf, StoreError> {
    let p = parent.join(name);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.file_type().is_dir() => Ok(p),
        Ok(_) => Err(StoreError::Escape {
            ctx: ctx.clone(),
            path: p,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            match std::fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(super::error::io_err(
                        ctx,
                        store,
                        "creating a directory",
                        &p,
                        e,
                    ))
                }
            }
            // Re-check: whatever is there now must be a real directory.
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_dir() => {}
                _ => {
                    return Err(StoreError::Escape {
                        ctx: ctx.clone(),
                        path: p,
                    })
                }
            }
            // Make the new entry durable.
            if let Ok(d) = std::fs::File::open(parent) {
                let _ = d.sync_all();
            }
            Ok(p)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotReady {
            ctx: ctx.clone(),
            what: format!(
                "{} does not exist: nothing was replicated here yet; start initial replication",
                p.display()
            ),
        }),
        Err(e) => Err(super::error::io_err(
            ctx,
            store,
            "looking up a directory",
            &p,
            e,
        )),
    }
}

/// Check that `path` (after resolving every link) is inside `namespace`
/// (itself resolved). Defence in depth on top of [`validate_name`] and
/// [`ensure_dir`].
pub(crate) fn check_inside(ctx: &Ctx, namespace: &Path, path: &Path) -> Result<(), StoreError> {
    let escape = || StoreError::Escape {
        ctx: ctx.clone(),
        path: path.to_path_buf(),
    };
    let ns = std::fs::canonicalize(namespace).map_err(|_| escape())?;
    let p = std::fs::canonicalize(path).map_err(|_| escape())?;
    if p.starts_with(&ns) {
        Ok(())
    } else {
        Err(escape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "vm1",
            "disk0.img",
            "a b",
            "Ünïcode",
            "x..y",
            &"a".repeat(255),
        ] {
            validate_name("vm", ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "/etc/passwd",
            "a\\b",
            "a\0b",
            "a\nb",
            "a\x7fb",
            &"a".repeat(256),
            "state.json",
            "points-12.jsonl",
            "incoming",
        ] {
            assert!(validate_name("vm", bad).is_err(), "{bad:?}");
        }
    }
}
