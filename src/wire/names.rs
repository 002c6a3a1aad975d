//! Validation of names and paths received from peers: the first defence
//! against a sender naming `../x` or `/etc/passwd`.
//!
//! A safe name is a *canonical relative path*: components separated by
//! single `/`, none empty, none `.` or `..`. Accepted: `disk.img`,
//! `vm1/disk0.vhd`, `.hidden/disk.img`, `a..b`, `...`.
//! Refused (with the reason):
//! - empty; longer than [`MAX_NAME`] bytes; a component longer than
//!   [`MAX_COMPONENT`] bytes;
//! - absolute (`/etc/passwd`);
//! - any `..` component (`../x`, `a/../../b`, `a/..`), and `.` components
//!   (`./a`, `a/./b`: harmless but not canonical, so two spellings could
//!   name one file);
//! - empty components (`a//b`, `a/`);
//! - a backslash anywhere (`a\..\b`: a path separator elsewhere);
//! - NUL or any control character (C0, DEL, C1: `char::is_control`).
//!
//! Receivers must still resolve the name below their namespace directory
//! without following symbolic links; this check makes that the second
//! defence, not the only one.

use super::WireError;

/// Longest accepted name, in bytes.
pub const MAX_NAME: usize = 1024;
/// Longest accepted component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT: usize = 255;

fn refuse(name: &str, why: &'static str) -> WireError {
    let mut shown: String = name.chars().take(80).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    WireError::InvalidName { name: shown, why }
}

/// Check a relative path received from a peer (see the module doc).
pub fn safe_name(name: &str) -> Result<&str, WireError> {
    if name.is_empty() {
        return Err(refuse(name, "the name is empty"));
    }
    if name.len() > MAX_NAME {
        return Err(refuse(name, "the name is longer than 1024 bytes"));
    }
    if name.contains('\0') {
        return Err(refuse(name, "the name contains a NUL byte"));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse(name, "the name contains a control character"));
    }
    if name.contains('\\') {
        return Err(refuse(name, "the name contains a backslash"));
    }
    if name.starts_with('/') {
        return Err(refuse(name, "absolute paths are not allowed"));
    }
    for comp in name.split('/') {
        match comp {
            "" => {
                return Err(refuse(
                    name,
                    "the name has an empty component ('//' or a trailing '/')",
                ))
            }
            "." => return Err(refuse(name, "the name has a '.' component")),
            ".." => {
                return Err(refuse(
                    name,
                    "the name has a '..' component (it would escape its directory)",
                ))
            }
            c if c.len() > MAX_COMPONENT => {
                return Err(refuse(name, "a component is longer than 255 bytes"))
            }
            _ => {}
        }
    }
    Ok(name)
}

/// Check a single path component (no `/`), e.g. a VM name.
pub fn safe_component(name: &str) -> Result<&str, WireError> {
    safe_name(name)?;
    if name.contains('/') {
        return Err(refuse(name, "the name must be a single component (no '/')"));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted() {
        for ok in [
            "disk.img",
            "vm1/disk0.vhd",
            ".hidden/disk.img",
            "a..b",
            "...",
            "..a",
            "a.",
            "é/ü.img",
            "a b/c d",
        ] {
            assert_eq!(safe_name(ok).unwrap(), ok);
        }
        assert!(safe_component("vm-1").is_ok());
    }

    #[test]
    fn refused() {
        let long_comp = "x".repeat(256);
        let long_name = ["y"; 600].join("/");
        for bad in [
            "",
            "..",
            ".",
            "../x",
            "a/../../b",
            "a/..",
            "/etc/passwd",
            "/",
            "//x",
            "a\\..\\b",
            "..\\x",
            "a/./b",
            "./a",
            "a//b",
            "a/",
            "a\0b",
            "a\nb",
            "a\u{7f}",
            "a\u{85}b",
            "a\tb",
            long_comp.as_str(),
            long_name.as_str(),
        ] {
            assert!(safe_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(safe_component("a/b").is_err());
    }
}
