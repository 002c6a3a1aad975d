//! Saves of a disk's meta from several threads at once: each save
//! is whole (the writers of one file go one at a time), and the copy saved last is the newest (a save copies the
//! meta when its turn comes, not before it waits). Without either, a
//! required resync could be missing from the saved meta, and lost if the
//! daemon then died (a clean stop saves every meta from memory again).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use parking_lot::Mutex;

use super::state::{DiskMeta, TrackState};
use super::Tracker;

fn tracker_with_disk() -> (tempfile::TempDir, Arc<Tracker>, Arc<super::TrackedDisk>) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path();
    File::create(dir.join("v.img"))
        .and_then(|f| f.set_len(1 << 20))
        .expect("disk");
    let t = Arc::new(super::stream_tests::tracker_at(dir));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("v.img"))
        .expect("open");
    let d = t
        .attach(Path::new("v.img"), &file)
        .expect("attach")
        .expect("tracked");
    (tmp, t, d)
}

fn saved(t: &Tracker, d: &super::TrackedDisk) -> DiskMeta {
    let folder = d.meta.lock().folder.clone();
    t.state
        .read_meta(&folder)
        .expect("whole meta")
        .expect("a saved meta")
}

/// A save that copied the meta and is slow to write it (paused by the
/// hook) while another caller changes the meta and saves: the newer
/// meta is on disk at the end. (Were the copy taken before the save's
/// turn, the paused save would land its older copy last.)
#[test]
fn a_slow_save_never_lands_an_older_meta_last() {
    let (_tmp, t, d) = tracker_with_disk();
    let (copied_tx, copied_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let first = std::sync::atomic::AtomicBool::new(true);
    let (copied_tx, go_rx) = (Mutex::new(copied_tx), Mutex::new(go_rx));
    *t.meta_copied.lock() = Some(Arc::new(move || {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let _ = copied_tx.lock().send(());
            let _ = go_rx.lock().recv_timeout(Duration::from_secs(60));
        }
    }));
    let slow = {
        let t = t.clone();
        std::thread::spawn(move || t.require_resync("v.img", "older"))
    };
    copied_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the first save copied its meta");
    let newer = {
        let t = t.clone();
        std::thread::spawn(move || t.require_resync("v.img", "newer"))
    };
    // The newer save either finishes (a save that copies early) or waits
    // for the slow one's turn to end: a bound, not a measured time.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !newer.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    go_tx.send(()).expect("release the slow save");
    slow.join().expect("slow save");
    newer.join().expect("newer save");
    let live = d.meta.lock().state.clone();
    assert_eq!(live, TrackState::ResyncRequired("newer".into()));
    assert_eq!(saved(&t, &d).state, live);
}

/// Two threads mark the disk resync-required with different reasons at
/// once, round after round: the saved meta always ends with the reason the
/// disk holds in memory.
#[test]
fn concurrent_saves_of_a_disk_leave_its_newest_meta() {
    let (_tmp, t, d) = tracker_with_disk();
    let gate = Arc::new(Barrier::new(2));
    for round in 0..500 {
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (t, gate) = (t.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    t.require_resync("v.img", &format!("round {round} thread {i}"));
                })
            })
            .collect();
        for th in threads {
            th.join().expect("thread");
        }
        let live = d.meta.lock().state.clone();
        assert!(matches!(live, TrackState::ResyncRequired(_)), "{live:?}");
        assert_eq!(saved(&t, &d).state, live, "round {round}");
    }
}

/// Writers of one state file at once all succeed, and the file is one of
/// their contents, whole.
#[test]
fn concurrent_writers_of_one_state_file_all_succeed() {
    let (_tmp, t, _d) = tracker_with_disk();
    let rel = PathBuf::from("disks/test-file");
    let contents: Vec<Vec<u8>> = (0..4u8).map(|i| vec![b'a' + i; 256 << 10]).collect();
    for round in 0..25 {
        let gate = Arc::new(Barrier::new(contents.len()));
        let threads: Vec<_> = contents
            .iter()
            .cloned()
            .map(|c| {
                let (t, gate, rel) = (t.clone(), gate.clone(), rel.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    t.state.write_atomic(&rel, &c)
                })
            })
            .collect();
        for th in threads {
            th.join().expect("thread").expect("write_atomic");
        }
        let now = t.state.read(&rel).expect("read").expect("present");
        assert!(contents.contains(&now), "round {round}: a mix of writers");
    }
}
