//! Failover as the operator runs it at one site: typed procedures that
//! drive the local mount daemon ([`crate::daemon::control`]), the local
//! receiver ([`crate::receiver::control`]) and the other site
//! ([`crate::roles::admin_call`]).
//!
//! - [`test`](mod@test): test failover (a recovery point exposed as bootable VHD
//!   files by the receiver's views, [`crate::testview`]), its cleanup, the
//!   test VM's boot, and listing recovery points.
//! - [`role_change`]: planned and unplanned failover, commit, cancel and
//!   reverse: which site runs a VM (the steps each site takes itself are
//!   [`crate::roles`]).
//! - [`plan`]: recovery plans, VMs failed over in ordered groups.
//! - [`group`](mod@group): a consistency group failed over to one group point.
//! - [`ready`]: waiting until a started domain is ready (guest agent,
//!   a command, a console marker).
//! - [`domain`]: a libvirt domain's failover: the test copy on an isolated
//!   network, the domain started on the live disks with its NICs mapped.
//!
//! Nothing here prints: progress goes to a `say` callback and results are
//! returned, for the command line ([`crate::cli`]) to show.

pub mod domain;
pub mod group;
pub mod plan;
pub mod ready;
pub mod role_change;
pub mod test;

use crate::daemon::DaemonError;
use crate::ipc::{CallError, CallErrorKind};
use crate::libvirt::{LibvirtError, LibvirtErrorKind};
use crate::roles::{RoleError, RoleErrorKind};

/// Why a failover procedure failed.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The local mount daemon or receiver could not be reached or
    /// refused ([`CallError::server`] says which).
    #[error(transparent)]
    Control(#[from] CallError),
    /// Stopping the local mount daemon failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// A role change step (here or at the other site) failed.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// libvirt refused or failed (a domain's failover).
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    /// Refused in the current state; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// An argument (a point, a time) does not name anything.
    #[error("{0}")]
    Invalid(String),
    /// A server answered without what was asked for.
    #[error("{0}")]
    Answer(String),
    /// The replica does not equal the source (a planned failover's check).
    #[error("{0}")]
    Differs(String),
    /// Reading the store directly (no receiver running) failed.
    #[error("{0}")]
    Store(String),
    /// The test VM did not start.
    #[error("{0}")]
    Boot(String),
    /// A started domain did not become ready in time (its guest agent did
    /// not answer, a `wait_for` command did not succeed, it stopped).
    #[error("domain {domain} was not ready after {secs:.0} s: {why}")]
    NotReady {
        domain: String,
        secs: f64,
        why: String,
    },
    /// An error and what state it left things in (the note, on the next
    /// line).
    #[error("{source}\n{note}")]
    Noted {
        source: Box<FailoverError>,
        note: String,
    },
}

/// The kinds of [`FailoverError`] callers decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverErrorKind {
    /// The local mount or receiver is not running.
    NotRunning,
    /// Talking to a local daemon failed.
    Transport,
    /// Refused (by this procedure, a daemon or the other site's rules).
    Refused,
    /// A bad argument.
    Invalid,
    /// The other site failed or is unreachable.
    Peer,
    /// Something at this site failed.
    Local,
    /// The replica differs from the source.
    Differs,
    /// Partly done (see the message).
    Partial,
    /// A started domain did not become ready in time.
    NotReady,
}

impl FailoverErrorKind {
    /// The kind's name in reports (`--json`), snake case.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverErrorKind::NotRunning => "not_running",
            FailoverErrorKind::Transport => "transport",
            FailoverErrorKind::Refused => "refused",
            FailoverErrorKind::Invalid => "invalid",
            FailoverErrorKind::Peer => "peer",
            FailoverErrorKind::Local => "local",
            FailoverErrorKind::Differs => "differs",
            FailoverErrorKind::Partial => "partial",
            FailoverErrorKind::NotReady => "not_ready",
        }
    }
}

impl FailoverError {
    pub fn kind(&self) -> FailoverErrorKind {
        use FailoverErrorKind as K;
        match self {
            FailoverError::Control(e) => match e.kind() {
                CallErrorKind::NotRunning => K::NotRunning,
                CallErrorKind::Transport => K::Transport,
                CallErrorKind::Refused => K::Refused,
            },
            FailoverError::Role(e) => match e.kind() {
                RoleErrorKind::Local => K::Local,
                RoleErrorKind::Mount => K::Transport,
                RoleErrorKind::Refused => K::Refused,
                RoleErrorKind::Peer => K::Peer,
                RoleErrorKind::Partial => K::Partial,
            },
            FailoverError::Libvirt(e) => match e.kind() {
                LibvirtErrorKind::NotFound | LibvirtErrorKind::Refused => K::Refused,
                LibvirtErrorKind::Invalid => K::Invalid,
                LibvirtErrorKind::Unavailable | LibvirtErrorKind::Failed => K::Local,
            },
            FailoverError::Daemon(_) | FailoverError::Answer(_) => K::Transport,
            FailoverError::Refused(_) => K::Refused,
            FailoverError::Invalid(_) => K::Invalid,
            FailoverError::Differs(_) => K::Differs,
            FailoverError::Store(_) | FailoverError::Boot(_) => K::Local,
            FailoverError::NotReady { .. } => K::NotReady,
            FailoverError::Noted { source, .. } => source.kind(),
        }
    }

    /// This error with `note` (what state it left things in) on the next
    /// line of its message.
    pub fn noted(self, note: String) -> FailoverError {
        FailoverError::Noted {
            source: Box::new(self),
            note,
        }
    }

    /// [`Self::noted`], unless `note` is empty.
    pub fn noted_if(self, note: String) -> FailoverError {
        if note.is_empty() {
            self
        } else {
            self.noted(note)
        }
    }
}
