//! Writes the fuzzers' seed corpora (`fuzz/seeds/TARGET/`) with the
//! project's own encoders, so each fuzz target starts from valid inputs:
//! small `.hrl` logs from [`HrlWriter`], VHD footers from [`Footer::encode`],
//! and one frame of each wire message from [`encode`].
//!
//! `cargo run --example fuzz_seeds [OUT_DIR]` (default `fuzz/seeds`). The
//! output is deterministic.

use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};

use vdrep::hrl::format::parse_header;
use vdrep::hrl::{HrlHeader, HrlWriter};
use vdrep::objstore::EncryptionKey;
use vdrep::vhd::footer::{Footer, DISK_TYPE_DYNAMIC, DISK_TYPE_FIXED};
use vdrep::wire::{
    encode, Ack, BlockHashReq, BlockHashes, DiskCycle, DiskKind, DiskState, ErrorCode, ErrorMsg,
    HashRun, Hello, HelloOk, InitialBegin, InitialChunk, InitialEnd, LogBegin, LogChunk, LogEnd,
    Msg, OpenDisk, PointAck, PointCommit, ResyncEnd,
};

type Res<T> = Result<T, Box<dyn Error>>;

const DISK: [u8; 16] = *b"fuzz-seed-disk-1";
const BLOCK: usize = 512;

fn main() -> Res<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds".into()),
    );
    let scratch = std::env::temp_dir().join(format!("vdrep-fuzz-seeds-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    let result = write_all(&out, &scratch);
    let _ = fs::remove_dir_all(&scratch);
    result
}

fn write_all(out: &Path, scratch: &Path) -> Res<()> {
    hrl_seeds(&out.join("hrl_parse"), scratch)?;
    vhd_seeds(&out.join("vhd_parse"))?;
    wire_seeds(&out.join("wire_decode"))?;
    envelope_seeds(&out.join("envelope_open"))?;
    Ok(())
}

/// Envelopes sealed with the fuzz target's fixed key: input = name length,
/// name, object (compressible and incompressible plaintexts, an empty one).
fn envelope_seeds(dir: &Path) -> Res<()> {
    let key = EncryptionKey::from_bytes(&[7u8; 32]);
    let plains: [(&str, Vec<u8>); 3] = [
        ("vm1/chunks/0", vec![0x5a; 4 * BLOCK]),
        ("vm1/log/7", noise(2 * BLOCK, 9)),
        ("empty", Vec::new()),
    ];
    for (i, (name, plain)) in plains.iter().enumerate() {
        let mut input = vec![name.len() as u8];
        input.extend_from_slice(name.as_bytes());
        input.extend_from_slice(&key.seal_with_nonce(name, plain, [i as u8; 12])?);
        put(dir, &format!("sealed-{i}"), &input)?;
    }
    Ok(())
}

fn put(dir: &Path, name: &str, bytes: &[u8]) -> Res<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    println!("{} ({} bytes)", dir.join(name).display(), bytes.len());
    Ok(())
}

/// A block whose bytes do not compress (stored RAW).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn hrl_header(cycle: u64, app_consistent: bool) -> HrlHeader {
    HrlHeader {
        disk_id: DISK,
        disk_name: "vm/disk.img".into(),
        cycle,
        base_cycle: cycle - 1,
        block_size: BLOCK as u32,
        base_size: 8 * BLOCK as u64,
        disk_size: 8 * BLOCK as u64 + 100,
        cut_unix_ns: 1_700_000_000_000_000_000,
        app_consistent,
    }
}

/// Writes a log of `blocks` (offset, bytes) and returns its bytes.
fn hrl_log(
    scratch: &Path,
    name: &str,
    header: &HrlHeader,
    blocks: &[(u64, Vec<u8>)],
) -> Res<Vec<u8>> {
    let path = scratch.join(name);
    let mut w = HrlWriter::create(&path, header)?;
    for (offset, data) in blocks {
        w.append(*offset, data)?;
    }
    w.finish()?;
    Ok(fs::read(&path)?)
}

fn hrl_seeds(dir: &Path, scratch: &Path) -> Res<()> {
    let empty = hrl_log(scratch, "empty.hrl", &hrl_header(1, false), &[])?;
    put(dir, "empty", &empty)?;
    let b = BLOCK as u64;
    let blocks = vec![
        (0, noise(BLOCK, 7)),           // RAW
        (b, vec![0; BLOCK]),            // ZERO
        (2 * b, vec![b'v'; 2 * BLOCK]), // LZ4
        (8 * b, noise(100, 9)),         // the short last block
    ];
    let mixed = hrl_log(scratch, "mixed.hrl", &hrl_header(5, true), &blocks)?;
    put(dir, "mixed", &mixed)?;
    // The same log from its first record frame on: the target also feeds its
    // input to the frame parser directly.
    let (_, head_len) = parse_header(&mixed).map_err(|e| format!("{e:?}"))?;
    put(dir, "mixed-frames", &mixed[head_len..])?;
    Ok(())
}

fn vhd_seeds(dir: &Path) -> Res<()> {
    // A fixed disk's footer and a dynamic disk's (the target parses both
    // at the start of its input and at its end).
    let fixed = Footer::new(DISK_TYPE_FIXED, 8 << 20, 0x2e00_0000, DISK).encode();
    put(dir, "footer-fixed", &fixed)?;
    let dynamic = Footer::new(DISK_TYPE_DYNAMIC, 3 << 30, 0x2e00_0000, DISK).encode();
    put(dir, "footer-dynamic", &dynamic)?;
    // A tiny fixed image: 4 sectors of data, then its footer.
    let mut image = noise(4 * BLOCK, 3);
    image.extend_from_slice(&Footer::new(DISK_TYPE_FIXED, 4 * BLOCK as u64, 0, DISK).encode());
    put(dir, "fixed-image", &image)?;
    Ok(())
}

fn wire_seeds(dir: &Path) -> Res<()> {
    let mut all = Vec::new();
    for (i, msg) in messages().iter().enumerate() {
        let mut frame = Vec::new();
        encode(msg, &mut frame)?;
        put(dir, &format!("{:02}-{}", i, msg.name()), &frame)?;
        all.extend_from_slice(&frame);
    }
    put(dir, "all", &all)?;
    Ok(())
}

/// One small, valid instance of every message.
fn messages() -> Vec<Msg> {
    let name = |s: &str| s.to_string();
    vec![
        Msg::Hello(Hello {
            protocol_version: vdrep::wire::PROTOCOL_VERSION,
            site_name: name("site-a"),
            software_version: name("0.1.0"),
        }),
        Msg::HelloOk(HelloOk {
            protocol_version: vdrep::wire::PROTOCOL_VERSION,
            site_name: name("site-b"),
            software_version: name("0.1.0"),
            store_free: 1 << 40,
        }),
        Msg::Error(ErrorMsg::new(
            ErrorCode::Protocol,
            true,
            "unexpected message",
        )),
        Msg::OpenDisk(OpenDisk {
            vm: name("web1"),
            disk_name: name("web1/os.img"),
            disk_id: DISK,
            block_size: 65536,
            disk_size: 1 << 30,
            kind: DiskKind::Raw,
        }),
        Msg::DiskState(DiskState {
            disk_id: DISK,
            replica_cycle: 3,
            replica_size: 1 << 30,
            copy_cycle: 0,
            resume_offset: 0,
            needs_resync: String::new(),
        }),
        Msg::InitialBegin(InitialBegin {
            disk_id: DISK,
            cycle: 1,
            disk_size: 1 << 20,
            start_offset: 0,
        }),
        Msg::InitialChunk(InitialChunk::from_block(DISK, 0, &noise(64, 5))),
        Msg::InitialChunk(InitialChunk::from_block(DISK, 4096, &[b'z'; 256])),
        Msg::InitialEnd(InitialEnd {
            disk_id: DISK,
            cycle: 1,
            disk_size: 1 << 20,
        }),
        Msg::LogBegin(LogBegin {
            disk_id: DISK,
            disk_name: name("web1/os.img"),
            cycle: 4,
            base_cycle: 3,
            block_size: 65536,
            base_size: 1 << 30,
            disk_size: 1 << 30,
            cut_unix_ns: 1_700_000_000_000_000_000,
            total_len: 96,
            behind: false,
        }),
        Msg::LogChunk(LogChunk {
            disk_id: DISK,
            cycle: 4,
            offset_in_log: 0,
            data: noise(48, 11),
        }),
        Msg::LogEnd(LogEnd {
            disk_id: DISK,
            cycle: 4,
            total_len: 96,
            log_checksum: 0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        }),
        Msg::Ack(Ack {
            disk_id: DISK,
            cycle: 4,
            durable: true,
            applied: true,
        }),
        Msg::PointCommit(PointCommit {
            vm: name("web1"),
            cycle: 4,
            app_consistent: false,
            disks: vec![DiskCycle {
                disk_id: DISK,
                cycle: 4,
            }],
            definition: Some("<domain type='kvm'><name>web1</name></domain>".into()),
            group: Some(Box::new(vdrep::wire::PointGroup {
                name: name("erp"),
                origin: name("0a1b2c3d"),
                members: vec![name("web1"), name("web2")],
            })),
        }),
        Msg::PointAck(PointAck {
            vm: name("web1"),
            cycle: 4,
        }),
        Msg::Admin(name(r#"{"op":"status"}"#)),
        Msg::AdminOk(name(r#"{"ok":true}"#)),
        Msg::BlockHashReq(BlockHashReq {
            disk_id: DISK,
            replica_cycle: 3,
            block_size: 65536,
            runs: vec![
                HashRun {
                    offset: 0,
                    blocks: 2,
                },
                HashRun {
                    offset: 5 * 65536,
                    blocks: 1,
                },
            ],
        }),
        Msg::BlockHashes(BlockHashes {
            disk_id: DISK,
            replica_cycle: 3,
            replica_size: 1 << 30,
            hashes: vec![1, 2, 3],
        }),
        Msg::ResyncEnd(ResyncEnd {
            disk_id: DISK,
            replica_cycle: 3,
            cycle: 4,
            blocks_compared: 3,
            blocks_differ: 1,
        }),
        // Protocol 8: a log sent behind the one before it (last: the
        // older seeds keep their numbers).
        Msg::LogBegin(LogBegin {
            disk_id: DISK,
            disk_name: name("web1/os.img"),
            cycle: 5,
            base_cycle: 4,
            block_size: 65536,
            base_size: 1 << 30,
            disk_size: 1 << 30,
            cut_unix_ns: 1_700_000_000_000_000_001,
            total_len: 96,
            behind: true,
        }),
    ]
}
