//! The VHD footer: the part of the VHD format (Microsoft "Virtual Hard Disk
//! Image Format Specification", version 1.0) vdrep writes. The receiver keeps
//! replicas of raw sources as *fixed* VHDs (the disk's bytes, then a footer);
//! the file itself is [`crate::replica::FixedVhd`], the one fixed-VHD
//! implementation, which takes its footer from here. Dynamic and
//! differencing VHDs are not read or written (VHD sources replicate byte for
//! byte, whatever their kind).
//!
//! It relies on these points of the spec:
//!
//! - **Footer** (512 bytes, big-endian, last sector of every VHD; dynamic
//!   disks also keep a copy at offset 0): cookie `conectix`, features
//!   (reserved bit `0x2` set), file format version `0x00010000`, data offset
//!   (`0xFFFFFFFFFFFFFFFF` for fixed disks, the dynamic header's offset
//!   otherwise), time stamp (seconds since 2000-01-01 UTC), creator
//!   application / version / host OS, original and current size, CHS disk
//!   geometry computed by the spec's algorithm, disk type (2 fixed,
//!   3 dynamic, 4 differencing), checksum (one's complement of the byte sum
//!   with the checksum field taken as zero), 16-byte unique id, saved state.
//!   See [`footer`].
//! - **Fixed disks**: the disk's bytes, then the footer.
//!
//! # QEMU compatibility (checked by `tests/vhd_qemu.rs` with QEMU 10.0)
//!
//! QEMU's `vpc` driver does not take the size from "current size" for every
//! image. QEMU 10.0 (installed here, and checked by the tests) uses
//! cylinders × heads × sectors × 512 when the creator application is `vpc `
//! or `qemu`, and current size otherwise; QEMU before 10.0 did the opposite:
//! current size only for `win `, `qem2`, `d2v `, `CTXS` and `tap\0`, CHS
//! for everything else. Both use current size when the geometry is the
//! maximum 65535/16/255. The spec's geometry algorithm rounds *down*
//! (10,486,272 bytes is 301/4/17 = 10,479,616 bytes by CHS), and
//! `qemu-img create -f vpc` without `force_size` rounds the requested size
//! *up* to a CHS product instead (10 MiB becomes 10,514,432 bytes). Replicas must have
//! the source's exact size, so vdrep writes creator application `qem2`
//! (what QEMU writes with `force_size=on`) with the spec's geometry: every
//! QEMU version, Hyper-V and Windows then see `current_size` exactly. A
//! vdrep-specific code (`vdrp`) would be mis-sized by QEMU < 10. Reading,
//! vdrep always uses current size (as Hyper-V does);
//! [`footer::Footer::qemu_visible_size`] says what QEMU 10 shows for foreign
//! images (`vpc `/`qemu` ones can differ). `qemu-img check` is not
//! implemented for `vpc` ("This image format does not support checks").

pub mod footer;
