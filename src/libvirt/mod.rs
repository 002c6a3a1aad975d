//! libvirt domains: vdrep protects a VM by its libvirt name and fails it
//! over by defining and starting a domain at the other site.
//!
//! - [`definition`]: a domain definition (the XML of `virsh dumpxml`):
//!   its disks with their formats, NICs and guest agent channel, and the
//!   rewrite into a failed-over copy's definition.
//! - [`virsh`]: the libvirt daemon reached through the `virsh` client
//!   (read a definition, define, start, destroy, undefine; isolated
//!   networks).
//!
//! `virsh` rather than the `virt` crate's C bindings: no build dependency
//! on libvirt-dev, the same libvirt the operator uses from the shell, and
//! the calls are few and slow anyway (a domain start is seconds; a virsh
//! call is ~10 ms). A leaf over [`crate::util`].

pub mod definition;
pub mod virsh;

pub use definition::{Definition, DiskFormat, DiskMove, NetTarget, NicPlan, Rewrite};
pub use virsh::Virsh;

/// Why a libvirt operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    /// `virsh` is missing or the daemon does not answer.
    #[error("libvirt is not usable here: {0}")]
    Unavailable(String),
    /// No domain of that name.
    #[error("{0}")]
    NoDomain(String),
    /// No network of that name.
    #[error("{0}")]
    NoNetwork(String),
    /// Refused in the current state (nothing was changed).
    #[error("{0}")]
    Refused(String),
    /// A definition that cannot be read.
    #[error("{0}")]
    Xml(String),
    /// A libvirt command failed (its message).
    #[error("{0}")]
    Failed(String),
}

/// The kinds of [`LibvirtError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibvirtErrorKind {
    Unavailable,
    NotFound,
    Refused,
    Invalid,
    Failed,
}

impl LibvirtError {
    pub fn kind(&self) -> LibvirtErrorKind {
        match self {
            LibvirtError::Unavailable(_) => LibvirtErrorKind::Unavailable,
            LibvirtError::NoDomain(_) | LibvirtError::NoNetwork(_) => LibvirtErrorKind::NotFound,
            LibvirtError::Refused(_) => LibvirtErrorKind::Refused,
            LibvirtError::Xml(_) => LibvirtErrorKind::Invalid,
            LibvirtError::Failed(_) => LibvirtErrorKind::Failed,
        }
    }
}

#[cfg(test)]
mod tests;
