//! `history_scale`: how a replica's history costs grow with its length.
//! Run by `scripts/bench-history.sh` (release build).
//!
//! For each history length N it builds a directory store holding one disk
//! with N cycles, a point at each, 1 s apart (closer past 7,000 points,
//! so that all are inside 2 h) and ending now (a continuous VM's last N
//! seconds), then times, on that store:
//! - **prune, nothing to drop**: the default retention (every point for
//!   2 h) when every point is younger: what the receiver's retention pass
//!   does every minute for every VM;
//! - **newest point** and **list the points**: what the receiver's
//!   drainer asks of every VM every 10 s, and a metrics scrape;
//! - **a metrics scrape's work per VM**, as it was (every point, and
//!   `applied_flags` over them) and as it is (the points summary, and
//!   which of them are applied), medians of [`SCRAPE_REPS`] alternating
//!   runs, the results compared, and the first scrape after the store
//!   is opened again (the summary read from the files);
//! - **read the oldest point**: open it and read the whole disk (part of a
//!   failover's RTO), on a thread with the default 2 MiB stack (as a test
//!   failover's FUSE threads read it), and count the files its reader
//!   keeps open (`READER_CHUNK=N` in the environment: the records a
//!   reader keeps open before it merges them);
//! - **thinning prune**: of the older half of the points, one per
//!   quarter of the history is kept: the undo records between two kept
//!   points (about N/4 of them) are merged into one.
//!
//! Prints one JSON line per N on stdout; the script makes the table.
//! With `--walk N` instead of history lengths, it times the walk that
//! measures the store's size (`allocated_bytes`) over N small files in
//! folders of 1,000 (undo records), median of 3 walks after a first one
//! (warm caches), and deletes them.
//!
//! ```text
//! cargo run --release --example history_scale -- DIR 500 1000 2000 4000
//! cargo run --release --example history_scale -- DIR --walk 200000
//! ```

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use vdrep::hrl::{HrlHeader, HrlWriter};
use vdrep::receiver::store_size::allocated_bytes;
use vdrep::replica::{
    applied_flags, Consistency, DiskInfo, DiskRef, InitialData, ReplicaStore, RetentionPolicy,
    Store,
};

/// Timed runs of each way of a scrape's work, alternating.
const SCRAPE_REPS: usize = 7;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const BS: u64 = 4096;
/// The disk: 16 MiB; each cycle rewrites 8 random blocks of it.
const DISK_BLOCKS: u64 = 4096;
const BLOCKS_PER_CYCLE: usize = 8;
const ID: [u8; 16] = [0x5a; 16];
const SITE: &str = "site";
const VM: &str = "vm";
const DISK: DiskRef<'static> = DiskRef {
    site: SITE,
    vm: VM,
    disk_id: &ID,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn write_log(path: &Path, cycle: u64, cut_ns: u64, disk: &[u8], dirty: &BTreeSet<u64>) -> Res<()> {
    let h = HrlHeader {
        disk_id: ID,
        disk_name: "disk.img".into(),
        cycle,
        base_cycle: cycle - 1,
        block_size: BS as u32,
        base_size: disk.len() as u64,
        disk_size: disk.len() as u64,
        cut_unix_ns: cut_ns,
        app_consistent: false,
    };
    let mut w = HrlWriter::create(path, &h)?;
    for &b in dirty {
        let s = (b * BS) as usize;
        w.append(b * BS, &disk[s..s + BS as usize])?;
    }
    w.finish()?;
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (points, newest cut, pending apply, newest applied cut): what the
/// metrics scrape reports of a VM.
type Scraped = (usize, Option<u64>, usize, Option<u64>);

/// The replica cycle of the disk of hex id `hex`, as the scrape asks it.
fn replica_cycle(store: &Store, hex: &str) -> Option<u64> {
    let id: String = ID.iter().map(|b| format!("{b:02x}")).collect();
    if hex != id {
        return None;
    }
    store.replica_state(DISK).ok()?.cycle
}

/// The scrape's work per VM before session 34: every point, and
/// `applied_flags` over them.
fn scrape_by_points(store: &Store) -> Res<Scraped> {
    let p = store.points(SITE, VM)?;
    let flags = applied_flags(&p, |hex| replica_cycle(store, hex));
    let applied: Vec<&vdrep::replica::Point> = p
        .iter()
        .zip(flags)
        .filter_map(|(p, a)| a.then_some(p))
        .collect();
    Ok((
        p.len(),
        p.iter().map(|p| p.time_unix_ns).max(),
        p.len() - applied.len(),
        applied.iter().map(|p| p.time_unix_ns).max(),
    ))
}

/// The scrape's work per VM now: the points summary.
fn scrape_by_summary(store: &Store) -> Res<Scraped> {
    let s = store.points_summary(SITE, VM)?;
    let a = s.applied(|hex| replica_cycle(store, hex));
    Ok((s.len(), s.newest_time_ns(), a.pending, a.newest_time_ns))
}

fn one(dir: &Path, n: u64) -> Res<String> {
    let root = dir.join(format!("store-{n}"));
    let _ = std::fs::remove_dir_all(&root);
    let store = Store::open(&root)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n);
    let mut disk = vec![0u8; (DISK_BLOCKS * BS) as usize];
    // 1 s apart, closer for histories longer than 7,000 points: all of
    // them inside the default retention's 2 h.
    let step_ns = 1_000_000_000u64.min(7_000_000_000_000 / n);
    let t0 = now_ns() - n * step_ns;
    let info = DiskInfo {
        disk_id: ID,
        name: "disk.img".into(),
        size: disk.len() as u64,
        block_size: BS as u32,
        cycle: 1,
    };
    store.begin_initial(SITE, VM, &info)?;
    store.write_initial(DISK, 0, InitialData::Zeroes(disk.len() as u64))?;
    store.finish_initial(DISK, 1, t0)?;
    store.commit_point(SITE, VM, 1, &[ID], Consistency::Crash)?;
    let log = dir.join("cycle.hrl");
    let built = Instant::now();
    for c in 2..=n {
        let mut dirty = BTreeSet::new();
        while dirty.len() < BLOCKS_PER_CYCLE {
            let b = rng.next() % DISK_BLOCKS;
            let v = rng.next().to_le_bytes();
            let s = (b * BS) as usize;
            for (i, x) in disk[s..s + BS as usize].iter_mut().enumerate() {
                *x = v[i % 8] ^ (i as u8);
            }
            dirty.insert(b);
        }
        write_log(&log, c, t0 + (c - 1) * step_ns, &disk, &dirty)?;
        store.store_log(DISK, &mut std::fs::File::open(&log)?)?;
        store.apply(DISK, c)?;
        store.commit_point(SITE, VM, c, &[ID], Consistency::Crash)?;
    }
    let build_s = built.elapsed().as_secs_f64();

    // The receiver's default retention; every point is younger than 2 h.
    let default = RetentionPolicy {
        keep_last: None,
        max_age: Some(Duration::from_secs(72 * 3600)),
        thin_after: Some(Duration::from_secs(2 * 3600)),
        thin_every: Some(Duration::from_secs(3600)),
    };
    let t = Instant::now();
    let r = store.prune(SITE, VM, &default)?;
    let prune_keep = t.elapsed();
    if !r.dropped_points.is_empty() {
        return Err(format!("the default retention dropped {:?}", r.dropped_points).into());
    }

    // What the receiver's drainer asks of every VM every 10 s, and what
    // a metrics scrape asks (every point of every VM).
    let t = Instant::now();
    let newest = store.newest_point(SITE, VM)?.map(|p| p.cycle);
    let newest_ms = ms(t.elapsed());
    if newest != Some(n) {
        return Err(format!("the newest point is {newest:?}, not {n}").into());
    }
    let t = Instant::now();
    let listed = store.points(SITE, VM)?.len();
    let points_ms = ms(t.elapsed());
    if listed as u64 != n {
        return Err(format!("{listed} points listed, not {n}").into());
    }

    // A metrics scrape's work for this VM, old and new, alternating.
    let (mut old, mut new) = (Vec::new(), Vec::new());
    for _ in 0..SCRAPE_REPS {
        let t = Instant::now();
        let o = scrape_by_points(&store)?;
        old.push(ms(t.elapsed()));
        let t = Instant::now();
        let s = scrape_by_summary(&store)?;
        new.push(ms(t.elapsed()));
        if o != s || o.0 as u64 != n {
            return Err(format!("the scrape differs: by points {o:?}, by summary {s:?}").into());
        }
    }
    let (scrape_old_ms, scrape_new_ms) = (median(old), median(new));
    // The first scrape after the receiver starts: nothing cached, the
    // summary is read from the files (and cached).
    drop(store);
    let store = Store::open(&root)?;
    // READER_CHUNK=N: how many undo records the point reader keeps open
    // before it merges them (the store's default otherwise).
    if let Some(k) = std::env::var("READER_CHUNK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        store.set_reader_chunk(k);
    }
    let t = Instant::now();
    let cold = scrape_by_summary(&store)?;
    let scrape_cold_ms = ms(t.elapsed());
    if cold.0 as u64 != n {
        return Err(format!("the first scrape after opening says {cold:?}").into());
    }

    // On a thread of its own, with the default 2 MiB stack, as the FUSE
    // threads of a test failover's view read it; the files it keeps open
    // counted in /proc/self/fd.
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let fds_before = fds();
    let t = Instant::now();
    let (read_oldest, reader_fds) = std::thread::scope(|s| {
        s.spawn(|| -> Result<(Duration, usize), String> {
            let reader = store.read_point(DISK, 1).map_err(|e| e.to_string())?;
            let open = fds().saturating_sub(fds_before);
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < reader.len() {
                let k = (reader.len() - off).min(buf.len() as u64) as usize;
                reader
                    .read_at(&mut buf[..k], off)
                    .map_err(|e| e.to_string())?;
                off += k as u64;
            }
            drop(reader);
            Ok((t.elapsed(), open))
        })
        .join()
        .map_err(|_| "the reading thread panicked".to_string())?
    })?;

    let thin = RetentionPolicy {
        thin_after: Some(Duration::from_nanos(n / 2 * step_ns)),
        thin_every: Some(Duration::from_nanos(n / 4 * step_ns)),
        ..default
    };
    let t = Instant::now();
    let r = store.prune(SITE, VM, &thin)?;
    let prune_thin = t.elapsed();
    let left = store.points(SITE, VM)?.len();
    let _ = std::fs::remove_dir_all(&root);
    Ok(format!(
        "{{\"points\": {n}, \"build_s\": {build_s:.1}, \"prune_keep_ms\": {:.2}, \"newest_ms\": {newest_ms:.2}, \"points_ms\": {points_ms:.2}, \"scrape_old_ms\": {scrape_old_ms:.3}, \"scrape_new_ms\": {scrape_new_ms:.4}, \"scrape_cold_ms\": {scrape_cold_ms:.2}, \"read_oldest_ms\": {:.1}, \"reader_fds\": {reader_fds}, \"prune_thin_ms\": {:.1}, \"dropped\": {}, \"merged\": {}, \"left\": {left}}}",
        ms(prune_keep),
        ms(read_oldest),
        ms(prune_thin),
        r.dropped_points.len(),
        r.merged
    ))
}

/// Time [`allocated_bytes`] over `n` files of 1 KiB, 1,000 per folder.
fn walk(dir: &Path, n: u64) -> Res<String> {
    let root = dir.join(format!("walk-{n}"));
    let _ = std::fs::remove_dir_all(&root);
    let made = Instant::now();
    for i in 0..n {
        let d = root.join(format!("d{}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir_all(&d)?;
        }
        std::fs::write(d.join(format!("{i}.undo")), [0u8; 1024])?;
    }
    let make_s = made.elapsed().as_secs_f64();
    let first = allocated_bytes(&root);
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let b = allocated_bytes(&root);
        times.push(ms(t.elapsed()));
        if b != first || b < n * 1024 {
            return Err(format!("walks say {first} then {b} bytes for {n} files").into());
        }
    }
    std::fs::remove_dir_all(&root)?;
    Ok(format!(
        "{{\"walk_files\": {n}, \"make_s\": {make_s:.1}, \"bytes\": {first}, \"walk_ms\": {:.1}}}",
        median(times)
    ))
}

fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: history_scale DIR N [N ...] (history lengths) | DIR --walk N")?;
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir)?;
    let args: Vec<String> = args.collect();
    if let [flag, n] = &args[..] {
        if flag == "--walk" {
            let n: u64 = n.parse().map_err(|_| format!("not a file count: {n}"))?;
            println!("{}", walk(dir, n)?);
            return Ok(());
        }
    }
    for a in &args {
        let n: u64 = a
            .parse()
            .map_err(|_| format!("not a history length: {a}"))?;
        if n < 4 {
            return Err(format!("a history length must be at least 4: {a}").into());
        }
        println!("{}", one(dir, n)?);
    }
    Ok(())
}
