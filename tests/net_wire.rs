//! Property tests of the wire codec and of `safe_name`.

use proptest::prelude::*;
use std::path::{Component, Path};
use vdrep::hrl::Encoding;
use vdrep::wire::*;

fn disk_id() -> impl Strategy<Value = DiskId> {
    any::<[u8; 16]>()
}

fn site() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}"
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ._é-]{1,40}".prop_filter("not . or ..", |s| s != "." && s != ".."),
        Just("...".to_string()),
        Just(".hidden".to_string()),
    ]
}

fn rel_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(component(), 1..5).prop_map(|v| v.join("/"))
}

fn block_size() -> impl Strategy<Value = u32> {
    (9u32..=30).prop_map(|s| 1u32 << s)
}

fn size() -> impl Strategy<Value = u64> {
    0u64..=(1u64 << 60)
}

fn chunk() -> impl Strategy<Value = InitialChunk> {
    (
        disk_id(),
        0u64..(1u64 << 59),
        proptest::collection::vec(any::<u8>(), 1..3000),
        0u8..3,
    )
        .prop_map(|(id, offset, data, how)| match how {
            0 => InitialChunk {
                disk_id: id,
                offset,
                length: data.len() as u32,
                encoding: Encoding::Raw,
                data,
            },
            1 => InitialChunk {
                disk_id: id,
                offset,
                length: data.len() as u32,
                encoding: Encoding::Zero,
                data: Vec::new(),
            },
            _ => InitialChunk::from_block(id, offset, &data),
        })
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<u16>(), site(), "[ -~]{0,64}").prop_map(|(v, s, sw)| Msg::Hello(Hello {
            protocol_version: v,
            site_name: s,
            software_version: sw
        })),
        (any::<u16>(), site(), "[ -~]{0,64}", any::<u64>()).prop_map(|(v, s, sw, f)| {
            Msg::HelloOk(HelloOk {
                protocol_version: v,
                site_name: s,
                software_version: sw,
                store_free: f,
            })
        }),
        (any::<u16>(), any::<bool>(), "[^\0]{0,200}")
            .prop_map(|(c, r, m)| Msg::Error(ErrorMsg::new(ErrorCode::from_code(c), r, m))),
        (
            component(),
            rel_path(),
            disk_id(),
            block_size(),
            size(),
            any::<bool>()
        )
            .prop_map(
                |(vm, disk_name, disk_id, block_size, disk_size, vhd)| Msg::OpenDisk(OpenDisk {
                    vm,
                    disk_name,
                    disk_id,
                    block_size,
                    disk_size,
                    kind: if vhd { DiskKind::Vhd } else { DiskKind::Raw },
                })
            ),
        (
            disk_id(),
            any::<u64>(),
            size(),
            any::<u64>(),
            size(),
            "[a-zA-Z0-9 .:-]{0,60}"
        )
            .prop_map(|(d, rc, rs, cc, ro, why)| {
                Msg::DiskState(DiskState {
                    disk_id: d,
                    replica_cycle: rc,
                    replica_size: rs,
                    copy_cycle: cc,
                    resume_offset: ro,
                    needs_resync: why,
                })
            }),
        (
            disk_id(),
            any::<u64>(),
            9u32..=20,
            proptest::collection::vec((0u64..1000, 1u32..5000), 1..20)
        )
            .prop_map(|(d, rc, shift, gaps)| {
                let bs = 1u64 << shift;
                let mut at = 0u64;
                let runs = gaps
                    .into_iter()
                    .map(|(gap, blocks)| {
                        let r = HashRun {
                            offset: (at + gap) * bs,
                            blocks,
                        };
                        at += gap + u64::from(blocks);
                        r
                    })
                    .collect();
                Msg::BlockHashReq(BlockHashReq {
                    disk_id: d,
                    replica_cycle: rc,
                    block_size: 1 << shift,
                    runs,
                })
            }),
        (
            disk_id(),
            any::<u64>(),
            size(),
            proptest::collection::vec(any::<u128>(), 1..300)
        )
            .prop_map(|(d, rc, rs, hashes)| Msg::BlockHashes(BlockHashes {
                disk_id: d,
                replica_cycle: rc,
                replica_size: rs,
                hashes,
            })),
        (disk_id(), 0u64..u64::MAX, any::<u64>(), any::<u64>()).prop_map(|(d, rc, a, b)| {
            Msg::ResyncEnd(ResyncEnd {
                disk_id: d,
                replica_cycle: rc,
                cycle: rc + 1,
                blocks_compared: a.max(b),
                blocks_differ: a.min(b),
            })
        }),
        (disk_id(), any::<u64>(), size(), any::<u64>()).prop_map(|(d, c, s, o)| {
            Msg::InitialBegin(InitialBegin {
                disk_id: d,
                cycle: c,
                disk_size: s,
                start_offset: if s == 0 { 0 } else { o % (s + 1) },
            })
        }),
        chunk().prop_map(Msg::InitialChunk),
        (disk_id(), any::<u64>(), size()).prop_map(|(d, c, s)| Msg::InitialEnd(InitialEnd {
            disk_id: d,
            cycle: c,
            disk_size: s
        })),
        (
            disk_id(),
            rel_path(),
            0u64..u64::MAX,
            block_size(),
            size(),
            size(),
            any::<u64>(),
            1u64..=(1u64 << 60),
            any::<bool>()
        )
            .prop_map(
                |(d, n, base, bs, s0, s1, t, len, behind)| Msg::LogBegin(LogBegin {
                    disk_id: d,
                    disk_name: n,
                    cycle: base + 1,
                    base_cycle: base,
                    block_size: bs,
                    base_size: s0,
                    disk_size: s1,
                    cut_unix_ns: t,
                    total_len: len,
                    behind,
                })
            ),
        (
            disk_id(),
            any::<u64>(),
            0u64..(1u64 << 59),
            proptest::collection::vec(any::<u8>(), 1..3000)
        )
            .prop_map(|(d, c, o, data)| Msg::LogChunk(LogChunk {
                disk_id: d,
                cycle: c,
                offset_in_log: o,
                data
            })),
        (disk_id(), any::<u64>(), 1u64..=(1u64 << 60), any::<u128>()).prop_map(|(d, c, t, s)| {
            Msg::LogEnd(LogEnd {
                disk_id: d,
                cycle: c,
                total_len: t,
                log_checksum: s,
            })
        }),
        (disk_id(), any::<u64>(), any::<bool>(), any::<bool>()).prop_map(|(d, c, du, ap)| {
            Msg::Ack(Ack {
                disk_id: d,
                cycle: c,
                durable: du,
                applied: ap,
            })
        }),
        (
            component(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::btree_map(disk_id(), any::<u64>(), 1..20),
            proptest::option::of("<domain>.{0,300}</domain>"),
        )
            .prop_map(
                |(vm, cycle, app_consistent, m, definition)| Msg::PointCommit(PointCommit {
                    vm,
                    cycle,
                    app_consistent,
                    disks: m
                        .into_iter()
                        .map(|(disk_id, cycle)| DiskCycle { disk_id, cycle })
                        .collect(),
                    definition,
                    group: None,
                })
            ),
        (component(), any::<u64>()).prop_map(|(vm, cycle)| Msg::PointAck(PointAck { vm, cycle })),
        ".{0,200}".prop_map(Msg::Admin),
        ".{0,200}".prop_map(Msg::AdminOk),
    ]
}

/// Lexically, does this relative name stay below the directory it is
/// joined to?
fn stays_inside(name: &str) -> bool {
    let mut depth: i64 = 0;
    for c in Path::new(name).components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    depth > 0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decode_plausible_frames_never_panics(
        ty in prop_oneof![Just(1u8), Just(2), Just(3), 0x10u8..=0x14, 0x20u8..=0x23, 0x30u8..=0x31, 0x40u8..=0x42, any::<u8>()],
        payload in proptest::collection::vec(any::<u8>(), 0..512),
        len_delta in -3i64..3,
    ) {
        let len = (payload.len() as i64 + 1 + len_delta).max(0) as u32;
        let mut f = len.to_le_bytes().to_vec();
        f.push(ty);
        f.extend_from_slice(&payload);
        let _ = decode(&f);
    }

    #[test]
    fn round_trip(m in msg()) {
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        let (back, used) = decode(&buf).unwrap().unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(&back, &m);
        // Every strict prefix asks for more bytes.
        for cut in [0, 1, 3, 4, 5, buf.len() / 2, buf.len() - 1] {
            prop_assert!(matches!(decode(&buf[..cut.min(buf.len() - 1)]), Ok(None)));
        }
    }

    #[test]
    fn back_to_back_frames(ms in proptest::collection::vec(msg(), 1..6)) {
        let mut buf = Vec::new();
        for m in &ms {
            encode(m, &mut buf).unwrap();
        }
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((m, n)) = decode(&buf[at..]).unwrap() {
            got.push(m);
            at += n;
        }
        prop_assert_eq!(at, buf.len());
        prop_assert_eq!(got, ms);
    }

    /// A mutated frame either fails to decode or decodes to a message whose
    /// encoding is exactly those bytes (the encoding is canonical: no two
    /// byte strings mean the same message).
    #[test]
    fn mutations_fail_or_are_canonical(
        m in msg(),
        muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        for (at, v) in muts {
            let i = at % buf.len();
            buf[i] = v;
        }
        if let Ok(Some((back, used))) = decode(&buf) {
            let mut again = Vec::new();
            encode(&back, &mut again).unwrap();
            prop_assert_eq!(&again[..], &buf[..used]);
        }
    }

    /// Whatever safe_name accepts stays below the directory it is joined to.
    #[test]
    fn safe_names_never_escape(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("..".to_string()), Just(".".to_string()), Just("".to_string()),
                Just("/".to_string()), Just("\\".to_string()), Just("a".to_string()),
                Just("..\\..".to_string()), Just("\0".to_string()), Just("b.img".to_string()),
                "[a-z.]{1,4}",
            ],
            1..6,
        ),
        lead in prop_oneof![Just(""), Just("/"), Just("./"), Just("../")],
    ) {
        let name = format!("{lead}{}", parts.join("/"));
        if let Ok(n) = safe_name(&name) {
            prop_assert!(stays_inside(n), "{:?} accepted but escapes", n);
            prop_assert!(!n.contains('\\') && !n.contains('\0'));
            prop_assert!(n.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        }
    }

    #[test]
    fn generated_good_names_are_accepted(p in rel_path()) {
        prop_assert!(safe_name(&p).is_ok(), "{:?}", p);
    }
}

#[test]
fn safe_name_refuses_the_classics() {
    for bad in [
        "../x",
        "a/../../b",
        "/etc/passwd",
        "a\\..\\b",
        "a/./b",
        "..",
        "x/..",
        "x/../y",
        "//etc/passwd",
        "./../x",
        "a/\u{0}/b",
        "..\u{2f}x",
        "a\r/b",
        "",
    ] {
        assert!(safe_name(bad).is_err(), "{bad:?} accepted");
    }
    let e = safe_name("../x").unwrap_err().to_string();
    assert!(e.contains("..") && e.contains("escape"), "{e}");
}

/// Resync messages: every truncation of a valid frame asks for more bytes
/// or is refused with a clear error; counts beyond the caps and runs that
/// are unaligned, overlapping or empty are refused by both codecs.
#[test]
fn resync_messages_are_bounds_checked() {
    let req = BlockHashReq {
        disk_id: [3; 16],
        replica_cycle: 7,
        block_size: 4096,
        runs: vec![
            HashRun {
                offset: 0,
                blocks: 10,
            },
            HashRun {
                offset: 40960,
                blocks: 1,
            },
        ],
    };
    let mut buf = Vec::new();
    encode(&Msg::BlockHashReq(req.clone()), &mut buf).unwrap();
    // A frame whose length field is honest but whose payload is cut.
    for cut in 6..buf.len() {
        let mut f = buf[..cut].to_vec();
        let l = (cut - 4) as u32;
        f[..4].copy_from_slice(&l.to_le_bytes());
        match decode(&f) {
            Err(WireError::Malformed { msg, what }) => {
                assert_eq!(msg, "BlockHashReq");
                assert!(!what.is_empty());
            }
            other => panic!("truncated at {cut}: {other:?}"),
        }
    }
    let bad = |r: BlockHashReq| encode(&Msg::BlockHashReq(r), &mut Vec::new()).is_err();
    let mut r = req.clone();
    r.runs[1].offset = 4096; // overlaps the first run
    assert!(bad(r));
    let mut r = req.clone();
    r.runs[1].offset = 40961; // unaligned
    assert!(bad(r));
    let mut r = req.clone();
    r.runs[0].blocks = 0;
    assert!(bad(r));
    let mut r = req.clone();
    r.runs = vec![HashRun {
        offset: 0,
        blocks: MAX_HASHES as u32 + 1,
    }];
    assert!(bad(r));
    let mut r = req.clone();
    r.block_size = 3000;
    assert!(bad(r));
    // A digest count larger than the payload is refused, not allocated.
    let mut f = vec![0u8; 4];
    f.push(0x41);
    f.extend_from_slice(&[1u8; 16]);
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(&1u64.to_le_bytes());
    f.extend_from_slice(&(MAX_HASHES as u32).to_le_bytes());
    let l = (f.len() - 4) as u32;
    f[..4].copy_from_slice(&l.to_le_bytes());
    assert!(matches!(decode(&f), Err(WireError::Malformed { .. })));
    let hashes = BlockHashes {
        disk_id: [1; 16],
        replica_cycle: 1,
        replica_size: 1 << 30,
        hashes: vec![0; MAX_HASHES + 1],
    };
    assert!(encode(&Msg::BlockHashes(hashes), &mut Vec::new()).is_err());
    let end = ResyncEnd {
        disk_id: [1; 16],
        replica_cycle: 5,
        cycle: 5,
        blocks_compared: 1,
        blocks_differ: 0,
    };
    assert!(encode(&Msg::ResyncEnd(end), &mut Vec::new()).is_err());
}

#[test]
fn oversized_frames_are_refused_before_buffering() {
    for len in [MAX_FRAME as u32 + 1, u32::MAX] {
        let hdr = len.to_le_bytes();
        assert!(matches!(decode(&hdr), Err(WireError::FrameTooLarge { .. })));
    }
    // The largest legal chunk encodes and decodes.
    let big = InitialChunk {
        disk_id: [1; 16],
        offset: 0,
        length: MAX_DATA as u32,
        encoding: Encoding::Raw,
        data: vec![0xa5; MAX_DATA],
    };
    let mut buf = Vec::new();
    encode(&Msg::InitialChunk(big.clone()), &mut buf).unwrap();
    assert!(buf.len() <= MAX_FRAME + 4);
    assert_eq!(decode(&buf).unwrap().unwrap().0, Msg::InitialChunk(big));
    // One byte more is refused by the encoder.
    let too_big = LogChunk {
        disk_id: [1; 16],
        cycle: 1,
        offset_in_log: 0,
        data: vec![0; MAX_DATA + 1],
    };
    let mut buf = Vec::new();
    assert!(encode(&Msg::LogChunk(too_big), &mut buf).is_err());
    assert!(buf.is_empty());
}

/// Inputs the `wire_decode` fuzz target failed on, run through the same
/// checks (decode never panics; a decoded frame re-encodes to exactly its
/// bytes).
#[test]
fn fuzz_finds_stay_fixed() {
    // 2026-12-03: a PointCommit without a group ended after its definition
    // (a version-5 point) but re-encoded with an explicit "no group" byte.
    let finds: [&[u8]; 1] = [&[
        43, 0, 0, 0, 48, 4, 0, 119, 101, 98, 49, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 102, 117, 122,
        122, 45, 115, 101, 101, 100, 45, 100, 105, 115, 107, 45, 48, 57, 4, 0, 0, 0, 0, 0, 0, 0, 1,
        45, 0, 0, 0, 60, 100, 111, 109, 97, 105, 110, 32, 116, 121, 112, 101, 61, 39, 107, 118,
        109, 39, 36, 60, 110, 97, 109, 101, 62, 119, 101, 98, 49, 60, 47, 126, 97, 109, 101, 62,
        60, 122, 0, 0, 50, 0, 48, 4, 0, 119, 101, 98, 49, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 4, 1, 0, 0, 0, 0, 0, 0, 8, 0, 119, 101, 98, 50,
    ]];
    for data in finds {
        let mut at = 0;
        while at < data.len() {
            match decode(&data[at..]) {
                Ok(Some((msg, used))) => {
                    let mut again = Vec::new();
                    encode(&msg, &mut again).expect("a decoded message re-encodes");
                    assert_eq!(&again[..], &data[at..at + used], "{msg:?}");
                    at += used;
                }
                Ok(None) | Err(_) => break,
            }
        }
    }
}
