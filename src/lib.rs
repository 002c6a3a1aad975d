//! vdrep — virtual-disk replicator.
//!
//! A FUSE mount over a VM disk folder records every write to a disk image in
//! per-disk dirty-block bitmaps; `cut` seals a cycle of every disk at one
//! instant and materialises it as a change log (`.hrl`) that brings a copy of
//! the disk from the previous cut to this one.
//!
//! Module map (one concern each; layers import downwards only, checked by
//! `scripts/check-layers.sh`):
//! - [`cli`]: the `vdrep` command line (clap definitions and thin
//!   handlers, one file per command family). Nothing else imports it.
//! - [`config`]: the declarative configuration file (`/etc/vdrep/vdrep.toml`):
//!   schema, parsing and checks (FILE:LINE:KEY problems); no clap.
//! - [`failover`]: failover as the operator runs it: test failover,
//!   planned/unplanned failover, commit, cancel, reverse, recovery plans.
//! - [`receiver`]: the secondary site's QUIC server in front of [`replica`],
//!   and its control socket (protocol and client in `receiver::control`,
//!   server in `receiver::control_server`).
//! - [`roles`]: the steps of a role change one site takes itself (adopt,
//!   promote, cancel) and the site-to-site administrative request.
//! - [`testview`]: test-failover views (a recovery point as bootable VHD
//!   files over FUSE, inside the receiver, or served from a bucket by a
//!   view process of its own: `testview::bucket`).
//! - [`daemon`]: mount lifecycle (open the folder, mount over it, shut down
//!   cleanly) and its control protocol and client (`daemon::control`).
//! - [`sender`]: protected VMs at the primary: initial copy, deltas, points, retries,
//!   consistency groups (one cut of every disk of a group's VMs: `sender::group`).
//! - [`fs`]: the FUSE passthrough file system that feeds [`tracking`].
//! - [`fuse`]: the FUSE connection as an object that outlives a worker:
//!   `/dev/fuse` and its clones, the supervisor that holds them and
//!   restarts the worker, descriptor handover, `FUSE_NOTIFY_RESEND`.
//! - [`tracking`]: dirty-block bitmaps, cycles, copy-before-write, cuts,
//!   seeding, the activity log and the sealed logs until they are shipped.
//! - [`replica`]: the replica store (namespaces, durable logs, undo history,
//!   group points and their retention: `replica::group`).
//! - [`objstore`]: object stores (S3 API) as replica targets: the object
//!   client seam and its clients, the encryption envelope, the bounded
//!   local cache of lazy reads.
//! - [`resync`]: checksum resync and online verify (digests, progress, window).
//! - [`schedule`]: calendar windows (`mon..fri 22:00-06:00`) and bandwidth
//!   schedules, on local time (a leaf).
//! - [`hrl`]: the versioned `.hrl` change-log format (write, verify, apply).
//! - [`vhd`]: the VHD footer (replicas of raw disks are fixed VHDs).
//! - [`sys`]: fd-relative system-call wrappers (a leaf under [`fs`] and
//!   [`tracking`]).
//! - [`transport`]: site identities, pinned-certificate mutual TLS over QUIC.
//! - [`wire`]: the replication protocol's messages, sans-IO codec and the
//!   sans-IO session state machines of both ends (`wire::session`).
//! - [`util`]: wall-clock nanoseconds, hex, random ids, full positional
//!   reads, and one bounded run of an administrator's command
//!   (`util::command`: `notify_command`, the app hook) (a leaf).
//! - [`service`]: running as a managed service: the systemd notify
//!   protocol (ready, status, reload, watchdog) and the daemons' logging
//!   (a leaf).
//! - [`metrics`]: the Prometheus/OpenMetrics endpoint's mechanics (HTTP
//!   server, lock-free histograms, FUSE and receiver hot-path counters,
//!   scrape-time collectors); the collectors live with their state.
//! - [`events`]: state-change events (`vdrep events`): the event type, the
//!   in-daemon broadcast ring and the `notify_command` runner.
//! - [`libvirt`]: libvirt domains through `virsh`: a definition's disks,
//!   NICs and guest agent channel, and its rewrite for a failed-over copy
//!   (a leaf over [`util`]).
//! - [`ipc`]: one JSON-line request/response exchange over a local Unix
//!   socket, generic over the messages (used by [`daemon`] and [`receiver`]).

pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod failover;
pub mod fs;
pub mod fuse;
pub mod hrl;
pub mod ipc;
pub mod libvirt;
pub mod metrics;
pub mod objstore;
pub mod receiver;
pub mod replica;
pub mod resync;
pub mod roles;
pub mod schedule;
pub mod sender;
pub mod service;
pub mod sys;
pub mod testview;
pub mod tracking;
pub mod transport;
pub mod util;
pub mod vhd;
pub mod wire;
