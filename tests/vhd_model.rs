//! Dynamic (and fixed) VHDs against an in-memory model: random writes,
//! zeroing, reads, flushes, reopens and resizes must always read back what
//! the model holds.

mod skip;
use proptest::prelude::*;
use vdrep::vhd::{Vhd, VhdKind};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u8 },
    WriteZeros { off: u64, len: usize },
    ZeroApi { off: u64, len: u64 },
    Read { off: u64, len: usize },
    Flush,
    Reopen,
    Resize { sectors: u64 },
}

/// Offsets biased towards block boundaries (2 MiB) and the end of the disk.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..(12 * MIB),
        (0u64..6, -600i64..600).prop_map(|(b, d)| (b * 2 * MIB).saturating_add_signed(d)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(), 1usize..300_000, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (offset(), 1usize..3_000_000).prop_map(|(off, len)| Op::WriteZeros { off, len }),
        1 => (offset(), 1u64..3_000_000).prop_map(|(off, len)| Op::ZeroApi { off, len }),
        3 => (offset(), 1usize..3_000_000).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => (1u64..(14 * MIB / 512)).prop_map(|sectors| Op::Resize { sectors }),
    ]
}

fn clamp(off: u64, len: u64, size: u64) -> Option<(u64, u64)> {
    if off >= size {
        return None;
    }
    Some((off, len.min(size - off)))
}

fn fill(len: usize, seed: u8) -> Vec<u8> {
    // Never all zero, so every write allocates.
    (0..len)
        .map(|i| ((i as u64 * 2654435761) >> 7) as u8 ^ seed | 0x10)
        .collect()
}

fn check_all(v: &Vhd, model: &[u8]) -> Result<(), TestCaseError> {
    prop_assert_eq!(v.virtual_size(), model.len() as u64);
    let mut buf = vec![0u8; model.len()];
    v.read_at(&mut buf, 0).unwrap();
    prop_assert!(buf == model, "full read differs from the model");
    // Everything outside the allocated ranges is zero.
    let mut covered = vec![false; model.len()];
    for (o, l) in v.allocated_ranges() {
        for c in &mut covered[o as usize..(o + l) as usize] {
            *c = true;
        }
    }
    prop_assert!(model.iter().zip(&covered).all(|(b, c)| *c || *b == 0));
    Ok(())
}

fn run(kind: VhdKind, initial_sectors: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.vhd");
    let mut model = vec![0u8; (initial_sectors * 512) as usize];
    let mut v = Vhd::create(&path, kind, model.len() as u64).unwrap();
    for op in ops {
        let size = model.len() as u64;
        match op {
            Op::Write { off, len, seed } => {
                if let Some((o, l)) = clamp(off, len as u64, size) {
                    let data = fill(l as usize, seed);
                    v.write_at(&data, o).unwrap();
                    model[o as usize..(o + l) as usize].copy_from_slice(&data);
                } else {
                    prop_assert!(v.write_at(&[1], size).is_err());
                }
            }
            Op::WriteZeros { off, len } => {
                if let Some((o, l)) = clamp(off, len as u64, size) {
                    let before = v.allocated_ranges();
                    v.write_at(&vec![0u8; l as usize], o).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                    // All-zero writes never allocate.
                    prop_assert_eq!(before, v.allocated_ranges());
                }
            }
            Op::ZeroApi { off, len } => {
                if let Some((o, l)) = clamp(off, len, size) {
                    let before = v.allocated_ranges();
                    v.write_zeroes(o, l).unwrap();
                    model[o as usize..(o + l) as usize].fill(0);
                    prop_assert_eq!(before, v.allocated_ranges());
                } else {
                    prop_assert!(v.write_zeroes(size, 1).is_err());
                }
            }
            Op::Read { off, len } => {
                if let Some((o, l)) = clamp(off, len as u64, size) {
                    let mut buf = vec![0xabu8; l as usize];
                    v.read_at(&mut buf, o).unwrap();
                    prop_assert!(
                        buf[..] == model[o as usize..(o + l) as usize],
                        "read {o}+{l}"
                    );
                }
            }
            Op::Flush => v.flush().unwrap(),
            Op::Reopen => {
                v.flush().unwrap();
                drop(v);
                v = Vhd::open(&path, true).unwrap();
                prop_assert_eq!(v.kind(), kind);
                check_all(&v, &model)?;
            }
            Op::Resize { sectors } => {
                let new = sectors * 512;
                v.resize(new).unwrap();
                model.resize(new as usize, 0);
            }
        }
    }
    v.flush().unwrap();
    drop(v);
    let v = Vhd::open(&path, false).unwrap();
    check_all(&v, &model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(initial in 1u64..(12 * MIB / 512), ops in prop::collection::vec(op(), 1..40)) {
        run(VhdKind::Dynamic, initial, ops)?;
    }

    #[test]
    fn fixed_matches_model(initial in 1u64..(12 * MIB / 512), ops in prop::collection::vec(op(), 1..20)) {
        run(VhdKind::Fixed, initial, ops)?;
    }
}

/// Drop without flush still leaves a readable image (best-effort flush in
/// Drop), and an unflushed allocation is invisible in a copy of the file
/// taken before the flush (the BAT is only written by flush).
#[test]
fn unflushed_allocations_are_not_in_the_bat() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.vhd");
    let copy = dir.path().join("crash.vhd");
    let mut v = Vhd::create(&path, VhdKind::Dynamic, 8 * MIB).unwrap();
    v.write_at(&[1u8; 4096], 0).unwrap();
    v.flush().unwrap();
    v.write_at(&[2u8; 4096], 4 * MIB).unwrap();
    v.write_at(&[3u8; 512], 512).unwrap();
    // "Crash" now: the file as it is, without the pending BAT update.
    std::fs::copy(&path, &copy).unwrap();
    v.flush().unwrap();
    drop(v);
    let mut c = Vhd::open(&copy, true).unwrap();
    let mut b = vec![0u8; 4096];
    c.read_at(&mut b, 4 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 0), "unflushed block visible");
    c.read_at(&mut b, 0).unwrap();
    assert!(b[..512].iter().all(|&x| x == 1));
    // In-place write to an already allocated block is not ordered: it is
    // data, durable at the next flush.
    assert!(b[512..1024].iter().all(|&x| x == 3));
    assert_eq!(c.allocated_ranges(), vec![(0, 2 * MIB)]);
    // The crashed copy keeps working: allocate again, flush, reopen.
    c.write_at(&[4u8; 4096], 6 * MIB).unwrap();
    c.flush().unwrap();
    drop(c);
    let c = Vhd::open(&copy, false).unwrap();
    c.read_at(&mut b, 6 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 4));

    // Drop without flush: the BAT still gets written.
    let p2 = dir.path().join("d.vhd");
    let mut v = Vhd::create(&p2, VhdKind::Dynamic, 8 * MIB).unwrap();
    v.write_at(&[5u8; 100], 3 * MIB).unwrap();
    drop(v);
    let v = Vhd::open(&p2, false).unwrap();
    let mut b = vec![0u8; 100];
    v.read_at(&mut b, 3 * MIB).unwrap();
    assert!(b.iter().all(|&x| x == 5));
}

/// Losing the trailing footer (crash while a block was being appended) is
/// survivable: open uses the copy at offset 0 and the next flush restores
/// the trailing footer.
#[test]
fn lost_trailing_footer_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.vhd");
    let mut v = Vhd::create(&path, VhdKind::Dynamic, 8 * MIB).unwrap();
    v.write_at(&[7u8; 1000], 100).unwrap();
    v.flush().unwrap();
    drop(v);
    let len = std::fs::metadata(&path).unwrap().len();
    // Append half a block of junk: no footer at the end any more.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![0x33u8; 70_000], len).unwrap();
    }
    let info = vdrep::vhd::probe(&path).unwrap().unwrap();
    assert_eq!(info.virtual_size, 8 * MIB);
    let mut v = Vhd::open(&path, true).unwrap();
    let mut b = vec![0u8; 1000];
    v.read_at(&mut b, 100).unwrap();
    assert!(b.iter().all(|&x| x == 7));
    v.write_at(&[8u8; 10], 5 * MIB).unwrap();
    v.flush().unwrap();
    drop(v);
    // Trailing footer is back and matches the copy at 0.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[bytes.len() - 512..bytes.len() - 504], b"conectix");
    assert_eq!(bytes[..512], bytes[bytes.len() - 512..]);
    let v = Vhd::open(&path, false).unwrap();
    let mut b = vec![0u8; 10];
    v.read_at(&mut b, 5 * MIB).unwrap();
    assert_eq!(b, [8u8; 10]);
}

/// Child of `flush_writes_data_before_bat` (run under strace).
#[test]
#[ignore]
fn io_order_child() {
    let Ok(path) = std::env::var("VDREP_VHD_IO_ORDER_PATH") else {
        return;
    };
    let mut v = Vhd::open(std::path::Path::new(&path), true).unwrap();
    v.write_at(&[0x5a; 65536], 3 * MIB).unwrap();
    v.flush().unwrap();
}

/// The system calls of an allocating write + flush, as strace sees them:
/// the block data is written and synced before the BAT entry is written,
/// and the BAT is synced before flush returns.
#[test]
fn flush_writes_data_before_bat() {
    use std::process::Command;
    if Command::new("strace").arg("-V").output().is_err() {
        skip::skip("SKIP: strace not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.vhd");
    drop(Vhd::create(&path, VhdKind::Dynamic, 8 * MIB).unwrap());
    let log = dir.path().join("strace.log");
    let out = Command::new("strace")
        .args(["-f", "-e", "trace=pwrite64,fdatasync,fsync,ftruncate", "-o"])
        .arg(&log)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "io_order_child", "--ignored", "--test-threads=1"])
        .env("VDREP_VHD_IO_ORDER_PATH", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    // (kind, offset): kind 'w' = pwrite64 at offset, 's' = sync.
    let mut events: Vec<(char, u64)> = Vec::new();
    for line in text.lines() {
        if line.contains("pwrite64(") {
            let args = line.rsplit_once(')').unwrap().0;
            let off: u64 = args.rsplit(", ").next().unwrap().trim().parse().unwrap();
            events.push(('w', off));
        } else if line.contains("fdatasync(") || line.contains("fsync(") {
            events.push(('s', 0));
        }
    }
    let bat = events
        .iter()
        .position(|e| *e == ('w', 1536))
        .unwrap_or_else(|| panic!("no BAT write in {events:?}"));
    // Bitmap, data and footer writes of the new block (all past the BAT),
    // then a sync, then the BAT.
    let last_data = events[..bat]
        .iter()
        .rposition(|e| e.0 == 'w')
        .unwrap_or_else(|| panic!("no data write before the BAT: {events:?}"));
    assert!(events[..bat]
        .iter()
        .filter(|e| e.0 == 'w')
        .all(|e| e.1 > 2048));
    assert!(
        events[last_data..bat].iter().any(|e| e.0 == 's'),
        "no sync between data and BAT: {events:?}"
    );
    assert_eq!(events.last().unwrap().0, 's', "{events:?}");
}
