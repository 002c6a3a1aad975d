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

/// Check that `path` is `namespace` followed by plain components (no
/// `.`, `..` or root), each a real directory, not a symlink: then it
/// resolves inside `namespace`, wherever that resolves. Defence in depth on
/// top of [`validate_name`] and [`ensure_dir`]. One `lstat` per component
/// below the namespace: `canonicalize` of both paths (a `readlink` per
/// component of each, ~26 for a disk's folder) was 15 % of a receiver's
/// CPU with 256 continuous VMs (kernel-notes/replication-speed.md,
/// session 28).
pub(crate) fn check_inside(ctx: &Ctx, namespace: &Path, path: &Path) -> Result<(), StoreError> {
    let escape = || StoreError::Escape {
        ctx: ctx.clone(),
        path: path.to_path_buf(),
    };
    let rest = path.strip_prefix(namespace).map_err(|_| escape())?;
    let mut p = namespace.to_path_buf();
    for c in rest.components() {
        let std::path::Component::Normal(name) = c else {
            return Err(escape());
        };
        p.push(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => return Err(escape()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_inside_refuses_links_dots_and_strangers() {
        let t = tempfile::tempdir().unwrap();
        let ns = t.path().join("ns");
        std::fs::create_dir_all(ns.join("vms/a/disks")).unwrap();
        std::fs::create_dir_all(t.path().join("outside/disks")).unwrap();
        std::fs::write(ns.join("vms/file"), b"x").unwrap();
        let ctx = Ctx::default();
        let ok = |p: &Path| check_inside(&ctx, &ns, p);
        ok(&ns.join("vms/a/disks")).unwrap();
        ok(&ns).unwrap();
        // A link anywhere below the namespace: out, and in.
        std::os::unix::fs::symlink(t.path().join("outside"), ns.join("vms/out")).unwrap();
        std::os::unix::fs::symlink(ns.join("vms/a"), ns.join("vms/loop")).unwrap();
        for bad in [
            ns.join("vms/out/disks"),
            ns.join("vms/out"),
            ns.join("vms/loop/disks"),
            ns.join("vms/a/../../../outside"),
            ns.join("vms/file"),
            ns.join("vms/missing"),
            t.path().join("outside/disks"),
        ] {
            let e = ok(&bad).unwrap_err();
            assert!(
                matches!(e, StoreError::Escape { .. }),
                "{}: {e}",
                bad.display()
            );
        }
    }

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
