//! The receiver's replica store: durable logs, replicas, undo history and
//! recovery points, under one directory (`vdrep receive --store DIR`).
//!
//! The receiver server (network code lives elsewhere) drives it through the
//! [`ReplicaStore`] trait (the store seam, `api.rs`): [`Store`], the
//! directory store described here, is its first implementation, and
//! [`FailStore`] wraps any implementation to inject failures (`fault.rs`).
//! Per site, [`Site`] holds the same operations plus the local-directory
//! ones of failover (roles, undo journals, pins). Tests use both in-process.
//!
//! # On-disk layout
//!
//! ```text
//! DIR/.lock                                 flock: one receiver per store
//! DIR/sites/<site>/                         one namespace per sending site
//!   vms/<vm>/points.json                    the VM's recovery points (snapshot)
//!   vms/<vm>/points-<gen>.jsonl             points committed since (journal)
//!   vms/<vm>/disks/<disk_id hex>/
//!     state.json                            ReplicaState (atomic rewrite)
//!     .state.json.spare                     the previous state.json, rewritten next
//!     <name>.vhd | <name>                   the replica (see ReplicaFormat)
//!     incoming/<cycle>.hrl                  durable, verified, not yet applied logs
//!     incoming/<cycle>.<n>.hrl.tmp          a log being received
//!     incoming/.spare-<i>                   applied logs' files, reused for the next
//!     undo/<base>-<cycle>.undo              pre-images of what log <cycle> overwrote
//! DIR/verify/<site>/<vm>/<cycle>.json       boot checks of points ([`boot`])
//! ```
//!
//! Names from a peer (site, vm, disk file name) pass [`validate_name`]
//! (no `/`, `\`, NUL, control characters, `.`/`..`, leading dot, > 255
//! bytes, reserved names); disk directories are the disk id in hex. Every
//! directory on the way is created one component at a time and checked to
//! be a real directory (never a symlink), the resolved disk directory is
//! checked to lie inside the resolved site namespace, and files are opened
//! with `O_NOFOLLOW`. A refused name writes nothing. (This defends against
//! what a *peer* can say; the store directory itself must not be writable
//! by other local users — a new store is created mode 0700.)
//!
//! # Crash safety
//!
//! Every state file is replaced atomically (temp file, fsync, rename, fsync
//! of the directory). `state.json`, saved twice per cycle, is written to
//! its spare and swapped with it (`RENAME_EXCHANGE`), and an applied log's
//! file becomes a spare for the next stored log: no inode is allocated or
//! freed per cycle for either ([`crate::util::recycle`]). The chain for a
//! delta:
//!
//! 1. [`Site::store_log`] streams the log to `incoming/<cycle>.<n>.hrl.tmp`,
//!    fsyncs it, verifies it completely (every record checksum, the seal),
//!    renames it to `incoming/<cycle>.hrl` and fsyncs the directory. Only
//!    then is it *durable* (the sender may be told so).
//! 2. [`Site::apply`] verifies the log again, writes the undo record (the
//!    current content of every range the log will write) and publishes it
//!    durably, then marks `applying: cycle` in the state (fsync), writes the
//!    records into the replica, fsyncs the replica, then sets `cycle` and
//!    clears `applying` (fsync), and finally deletes the log.
//!
//! A crash before `applying` is durable leaves the replica untouched (an
//! orphan undo record is deleted by recovery). A crash after it leaves the
//! replica somewhere between the two cycles with both the log and the undo
//! record durable: [`Store::recover`] (and [`Site::apply`] itself) **roll
//! forward** by re-applying the log, which is idempotent because a log holds
//! absolute content and the length is set first. If the log were missing
//! the undo record rolls the replica back instead. An apply that fails in
//! process (e.g. `ENOSPC` writing into a sparse replica) rolls back at once
//! from the undo record, so the replica stays at its previous point and the
//! same log applies once space is freed. A log whose cycle is not above the
//! replica's is a resend: acknowledged, never applied twice.
//!
//! History merges ([`Site::prune`]) publish the merged undo record before
//! deleting the two it replaces, and point chains never jump over a point,
//! so a crash mid-prune leaves only redundant records (removed next time).
//!
//! Crash tests kill the process at each step (`VDREP_CRASH_AT=<step>`:
//! `fault::crash_point` inside an operation, [`FailStore::from_env`] between
//! operations); they test process crashes (kill -9), whose
//! written data the kernel keeps; the fsyncs are what extends the argument
//! to power loss.
//!
//! # Recovery points
//!
//! The replica is the newest point, or the newest point is the replica plus
//! durable logs not applied yet: [`Site::commit_point`] also records a point
//! once each disk's logs up to it are durable and chain from its replica's
//! cycle (the receiver applies them right after), and every reader of a
//! point applies them first ([`Site::drain`], called by
//! [`Site::read_point`], [`Site::promote`] and the receiver's `OpenDisk`).
//! Undo records are the history:
//! point `k` of a disk is the replica overlaid by the undo records of every
//! later cycle, oldest first ([`PointReader`]), so a point costs only the
//! blocks the next log changed. [`Site::commit_point`] records a VM point
//! only when every disk of the VM reached the cycle, applied or durable
//! (crash-consistent across disks). [`Site::prune`] drops the oldest points and their undo records
//! (by count and age) and thins older points out (one per interval),
//! merging the two undo records around each dropped point into one (where
//! both hold a pre-image of a byte, the older one wins).
//! [`PointsSummary`] (`summary.rs`) is what the receiver's metrics need of
//! a VM's points; the directory store keeps one per VM beside what a
//! commit needs, so a scrape does not read every point.

mod api;
pub mod boot;
mod error;
mod fault;
pub mod group;
mod names;
mod store;
mod summary;
mod target;
mod undo;

pub use api::{DigestCache, DiskRef, PointRead, ReplicaStore};
pub use error::{Ctx, StoreError};
pub use fault::{FailStore, Fault, Injected, Op, Pause, Rule, Trigger, When, CRASH_AT_ENV};
pub use group::{GroupPoint, GroupRecord};
pub use names::{validate_name, MAX_NAME_LEN};
pub(crate) use store::parse_hex_id;
pub use store::{applied_flags, points_in, retention_keep, POINTS_JOURNAL_MAX, READER_CHUNK};
pub use store::{
    AdoptDisk, ApplyOutcome, Consistency, DiskInfo, DropReason, ForgetReport, InitialData,
    InitialState, LiveDisk, LiveInfo, Point, PointsDropped, PruneReport, RecoveryReport,
    ReplicaState, RetentionPolicy, Site, Store, StoreOutcome, INITIAL_SYNC_EVERY,
};
pub use summary::{AppliedSummary, PointsSummary};
pub use target::{
    open_target, vhd_fixed_footer, FixedVhd, MappedRange, RawFile, ReplicaFormat, ReplicaTarget,
    VHD_FOOTER_LEN,
};
pub use undo::PointReader;
