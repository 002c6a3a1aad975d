//! vdrep — virtual-disk replicator.
//!
//! A FUSE mount over a VM disk folder records every write to a disk image in
//! per-disk dirty-block bitmaps; `cut` seals a cycle of every disk at one
//! instant and materialises it as a change log (`.hrl`) that brings a copy of
//! the disk from the previous cut to this one.
//!
//! Module map (one concern each):
//! - [`tracking`]: dirty-block bitmaps, cycles, copy-before-write, cuts.
//! - [`hrl`]: the versioned `.hrl` change-log format (write, verify, apply).
//! - [`fs`]: the FUSE passthrough file system that feeds [`tracking`].
//! - [`daemon`]: mount lifecycle (open the folder, mount over it, shut down cleanly).
//! - [`control`]: the local control socket between the CLI and a running mount.
//! - [`sender`]: protected VMs at the primary: initial copy, deltas, points, retries.
//! - [`receiver`]: the secondary site's QUIC server in front of [`replica`].
//! - [`replica`]: the replica store (namespaces, durable logs, undo history).
//! - [`resync`]: checksum resync and online verify (digests, progress, window).
//! - [`vhd`]: the VHD disk format (fixed and dynamic).
//! - [`transport`]: site identities, pinned-certificate mutual TLS over QUIC.
//! - [`wire`]: the replication protocol's messages and sans-IO codec.
//! - [`cli`]: the `vdrep` command line.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod failover;
pub mod fs;
pub mod hrl;
pub mod receiver;
pub mod replica;
pub mod resync;
pub mod roles;
pub mod sender;
pub mod tracking;
pub mod transport;
pub mod vhd;
pub mod wire;
