//! Unit tests of the sessions: the rules of each end, one at a time. The
//! conversation under faults is `tests/session_sim.rs`'s.
//!
//! Tests here open alike (`opened`, `feed`, `refusal`, `has_action!`) on
//! purpose: each states its whole scenario, so neighbours share lines.

use super::*;
use crate::wire::{
    self, Ack, DiskKind, DiskState, Hello, LogBegin, LogChunk, LogEnd, LogHasher, OpenDisk,
};

const ID: DiskId = [7u8; 16];
const NOW: u64 = 1_000;

fn bytes(msgs: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        encode(m, &mut out).expect("test messages encode");
    }
    out
}

fn hello() -> Msg {
    Msg::Hello(Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        site_name: "primary".into(),
        software_version: "t".into(),
    })
}

fn open() -> OpenDisk {
    OpenDisk {
        vm: "vm1".into(),
        disk_name: "d0.img".into(),
        disk_id: ID,
        block_size: 4096,
        disk_size: 1 << 20,
        kind: DiskKind::Raw,
    }
}

fn drain<A>(poll: impl FnMut() -> Option<Output<A>>) -> Vec<Output<A>> {
    std::iter::from_fn(poll).collect()
}

/// Messages sent in `outs` (decoded).
fn sent<A>(outs: &[Output<A>]) -> Vec<Msg> {
    let mut v = Vec::new();
    for o in outs {
        if let Output::Send { bytes, .. } = o {
            let mut at = 0;
            while let Ok(Some((m, n))) = decode(&bytes[at..]) {
                v.push(m);
                at += n;
            }
        }
    }
    v
}

/// Whether an action of `outs` (receiver outputs) matches the pattern.
macro_rules! has_action {
    ($outs:expr, $p:pat) => {
        actions($outs).iter().any(|a| matches!(a, $p))
    };
}

fn actions(outs: &[Output<ReceiverAction>]) -> Vec<&ReceiverAction> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Action(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn receiver() -> Receiver {
    receiver_with(false)
}

/// A receiver for a store that commits points on durable logs or not.
fn receiver_with(commit_stored: bool) -> Receiver {
    Receiver::new(ReceiverConfig {
        site_name: "secondary".into(),
        software_version: "t".into(),
        store_free: 0,
        newest_version: crate::wire::PROTOCOL_VERSION,
        commit_stored,
    })
}

/// A receiver after `Hello` and `OpenDisk` of [`ID`], replica at `at`.
fn opened(at: u64) -> Receiver {
    opened_in(at, wire::PROTOCOL_VERSION)
}

/// [`opened`], the sender speaking protocol `version`.
fn opened_in(at: u64, version: u16) -> Receiver {
    opened_with(receiver(), at, version)
}

fn opened_with(mut r: Receiver, at: u64, version: u16) -> Receiver {
    let b = bytes(&[Msg::Hello(Hello {
        protocol_version: version,
        site_name: "primary".into(),
        software_version: "t".into(),
    })]);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(0),
            bytes: &b,
        },
    );
    let b = bytes(&[Msg::OpenDisk(open())]);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(1),
            bytes: &b,
        },
    );
    let outs = drain(|| r.poll());
    let op = actions(&outs)
        .iter()
        .find_map(|a| match a {
            ReceiverAction::LoadDisk { op, .. } => Some(*op),
            _ => None,
        })
        .expect("OpenDisk asks the store");
    let st = DiskStatus {
        replica_cycle: at,
        replica_size: 1 << 20,
        ..DiskStatus::default()
    };
    r.complete(NOW, op, StoreDone::DiskLoaded(Ok(st)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::DiskState(DiskState { replica_cycle, .. })] if *replica_cycle == at)
    );
    r
}

fn log_msgs(cycle: u64, base: u64, data: &[u8]) -> (LogBegin, Vec<Msg>) {
    let begin = LogBegin {
        disk_id: ID,
        disk_name: "d0.img".into(),
        cycle,
        base_cycle: base,
        block_size: 4096,
        base_size: 1 << 20,
        disk_size: 1 << 20,
        cut_unix_ns: 0,
        total_len: data.len() as u64,
        behind: false,
    };
    let mut h = LogHasher::new();
    h.update(data);
    let mut msgs = vec![Msg::LogBegin(begin.clone())];
    let mut off = 0;
    for c in data.chunks(3) {
        msgs.push(Msg::LogChunk(LogChunk {
            disk_id: ID,
            cycle,
            offset_in_log: off,
            data: c.to_vec(),
        }));
        off += c.len() as u64;
    }
    msgs.push(Msg::LogEnd(LogEnd {
        disk_id: ID,
        cycle,
        total_len: data.len() as u64,
        log_checksum: h.digest128(),
    }));
    (begin, msgs)
}

/// [`log_msgs`] of a log sent behind its base (protocol 8).
fn behind_msgs(cycle: u64, base: u64, data: &[u8]) -> Vec<Msg> {
    let (begin, mut msgs) = log_msgs(cycle, base, data);
    msgs[0] = Msg::LogBegin(LogBegin {
        behind: true,
        ..begin
    });
    msgs
}

fn acks(outs: &[Output<ReceiverAction>]) -> Vec<Ack> {
    sent(outs)
        .into_iter()
        .filter_map(|m| match m {
            Msg::Ack(a) => Some(a),
            _ => None,
        })
        .collect()
}

#[test]
fn a_log_is_acked_durable_then_applied_after_the_store_says_so() {
    let mut r = opened(5);
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let b = bytes(&msgs);
    // Byte by byte: frames are reassembled.
    for x in &b {
        r.handle(
            NOW,
            Event::Data {
                stream: StreamId(2),
                bytes: std::slice::from_ref(x),
            },
        );
    }
    let outs = drain(|| r.poll());
    assert!(
        acks(&outs).is_empty(),
        "nothing is acknowledged before the store stored it"
    );
    let op = actions(&outs)
        .iter()
        .find_map(|a| match a {
            ReceiverAction::StoreLogDurably { op, cycle: 6, .. } => Some(*op),
            _ => None,
        })
        .expect("a verified log is stored durably");
    r.complete(NOW, op, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert_eq!(acks(&outs).len(), 1);
    assert!(acks(&outs)[0].durable && !acks(&outs)[0].applied);
    let op = actions(&outs)
        .iter()
        .find_map(|a| match a {
            ReceiverAction::ApplyLog { op, cycle: 6, .. } => Some(*op),
            _ => None,
        })
        .expect("then applied");
    r.complete(NOW, op, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(acks(&outs)[0].applied);
    assert!(outs.contains(&Output::Finish(StreamId(2))));
}

/// Feed a whole log, return the outputs.
fn feed(r: &mut Receiver, msgs: &[Msg]) -> Vec<Output<ReceiverAction>> {
    let b = bytes(msgs);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(2),
            bytes: &b,
        },
    );
    drain(|| r.poll())
}

fn assert_refused_and_discarded(outs: &[Output<ReceiverAction>]) {
    assert!(acks(outs).is_empty(), "{outs:?}");
    assert!(has_action!(outs, ReceiverAction::DiscardLog { .. }));
    assert!(!has_action!(outs, ReceiverAction::StoreLogDurably { .. }));
    assert!(sent(outs).iter().any(|m| matches!(m, Msg::Error(_))));
}

#[test]
fn a_log_with_a_wrong_checksum_is_discarded_never_acked() {
    let mut r = opened(5);
    let (_, mut msgs) = log_msgs(6, 5, b"0123456789");
    if let Some(Msg::LogEnd(e)) = msgs.last_mut() {
        e.log_checksum ^= 1;
    }
    let outs = feed(&mut r, &msgs);
    assert_refused_and_discarded(&outs);
    let refused = actions(&outs).into_iter().find_map(|a| match a {
        ReceiverAction::Refused { error, .. } => Some(error.kind()),
        _ => None,
    });
    assert_eq!(refused, Some(ErrorKind::Corrupt));
}

#[test]
fn a_log_with_a_gap_a_duplicate_or_a_short_end_is_refused() {
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let mut gap = msgs.clone();
    gap.remove(2);
    let mut dup = msgs.clone();
    dup.insert(2, msgs[2].clone());
    let mut short = msgs.clone();
    short.remove(msgs.len() - 2);
    for bad in [gap, dup, short] {
        let mut r = opened(5);
        assert_refused_and_discarded(&feed(&mut r, &bad));
    }
}

#[test]
fn a_log_cut_short_by_the_peer_is_discarded() {
    let mut r = opened(5);
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let outs = feed(&mut r, &msgs[..3]);
    assert!(acks(&outs).is_empty());
    r.handle(NOW, Event::Finished(StreamId(2)));
    assert_refused_and_discarded(&drain(|| r.poll()));
}

#[test]
fn a_resend_of_an_applied_log_is_acked_without_the_store() {
    let mut r = opened(6);
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let outs = feed(&mut r, &msgs);
    let a = acks(&outs);
    assert_eq!(a.len(), 1);
    assert!(a[0].durable && a[0].applied);
    assert!(actions(&outs).is_empty(), "{outs:?}");
}

#[test]
fn a_log_out_of_order_marks_the_replica_for_resync() {
    let mut r = opened(5);
    let (_, msgs) = log_msgs(8, 7, b"0123456789");
    let outs = feed(&mut r, &msgs);
    assert!(acks(&outs).is_empty());
    assert!(has_action!(&outs, ReceiverAction::MarkNeedsResync { .. }));
}

/// The op of the `StoreLogDurably` in `outs`.
fn stored_op(outs: &[Output<ReceiverAction>]) -> OpId {
    op_of(outs, "a verified log is stored durably", |a| match a {
        ReceiverAction::StoreLogDurably { op, .. } => Some(*op),
        _ => None,
    })
}

/// The op `pick` finds in the actions of `outs` (`must` says why one is there).
fn op_of(
    outs: &[Output<ReceiverAction>],
    must: &str,
    pick: impl Fn(&ReceiverAction) -> Option<OpId>,
) -> OpId {
    actions(outs)
        .iter()
        .find_map(|a| pick(a))
        .unwrap_or_else(|| panic!("no such action: {must}"))
}

/// The code of the `Error` answer in `outs`.
fn refusal(outs: &[Output<ReceiverAction>]) -> Option<(ErrorCode, bool)> {
    sent(outs).into_iter().find_map(|m| match m {
        Msg::Error(e) => Some((e.code, e.retryable)),
        _ => None,
    })
}

#[test]
fn a_log_out_of_order_is_answered_resync_required() {
    let mut r = opened(5);
    let (_, msgs) = log_msgs(8, 7, b"0123456789");
    let outs = feed(&mut r, &msgs);
    assert_eq!(refusal(&outs), Some((ErrorCode::ResyncRequired, true)));
    // And so is the next log, until a resync heals the replica.
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let b = bytes(&msgs);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(3),
            bytes: &b,
        },
    );
    let outs = drain(|| r.poll());
    assert_eq!(refusal(&outs), Some((ErrorCode::ResyncRequired, true)));
}

/// A receiver at cycle 5 is sent `msgs`; its store fails to keep the log
/// with `code`. Returns what the receiver does then.
fn store_fails(msgs: &[Msg], code: ErrorCode, retryable: bool) -> Vec<Output<ReceiverAction>> {
    let mut r = opened(5);
    let outs = feed(&mut r, msgs);
    let op = stored_op(&outs);
    let failure = StoreFailure {
        code,
        retryable,
        message: format!("the store failed with {code:?}"),
    };
    r.complete(NOW, op, StoreDone::LogStored(Err(failure)));
    drain(|| r.poll())
}

#[test]
fn a_log_the_store_cannot_apply_in_order_marks_the_replica_and_asks_for_a_resync() {
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    // Out of order ("log 6 does not follow cycle 4").
    let outs = store_fails(&msgs, ErrorCode::InvalidState, false);
    assert!(has_action!(&outs, ReceiverAction::MarkNeedsResync { .. }));
    assert_eq!(refusal(&outs), Some((ErrorCode::ResyncRequired, true)));
    // Any other store failure is answered as the store said.
    let outs = store_fails(&msgs, ErrorCode::NoSpace, true);
    assert!(!has_action!(&outs, ReceiverAction::MarkNeedsResync { .. }));
    assert_eq!(refusal(&outs), Some((ErrorCode::NoSpace, true)));
}

#[test]
fn without_a_known_cycle_the_store_decides_about_a_log() {
    // Cycle 0: no replica, or an apply the store rolls forward.
    let mut r = opened(0);
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let outs = feed(&mut r, &msgs);
    assert!(refusal(&outs).is_none(), "{outs:?}");
    assert!(has_action!(
        &outs,
        ReceiverAction::StoreLogDurably { cycle: 6, .. }
    ));
}

#[test]
fn digests_name_the_cycle_the_sender_compared_against() {
    let mut r = opened(5);
    let req = wire::BlockHashReq {
        disk_id: ID,
        replica_cycle: 4,
        block_size: 4096,
        runs: vec![wire::HashRun {
            offset: 0,
            blocks: 2,
        }],
    };
    let outs = feed(&mut r, &[Msg::BlockHashReq(req)]);
    let op = actions(&outs)
        .iter()
        .find_map(|a| match a {
            ReceiverAction::HashBlocks { op, .. } => Some(*op),
            _ => None,
        })
        .expect("the store digests the blocks");
    r.complete(NOW, op, StoreDone::Hashed(Ok((1 << 20, vec![1, 2]))));
    let answer = sent(&drain(|| r.poll()));
    assert!(
        matches!(&answer[..], [Msg::BlockHashes(h)] if h.replica_cycle == 4 && h.hashes == [1, 2]),
        "{answer:?}"
    );
}

fn on(r: &mut Receiver, stream: u64, msgs: &[Msg]) -> Vec<Output<ReceiverAction>> {
    let b = bytes(msgs);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(stream),
            bytes: &b,
        },
    );
    drain(|| r.poll())
}

/// The messages `outs` sends on `stream`.
fn sent_on<A>(outs: &[Output<A>], stream: u64) -> Vec<Msg> {
    let mine: Vec<Output<A>> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Send { stream: s, bytes } if s.0 == stream => Some(Output::Send {
                stream: *s,
                bytes: bytes.clone(),
            }),
            _ => None,
        })
        .collect();
    sent(&mine)
}

#[test]
fn hello_comes_first_and_versions_must_match() {
    // Only an `OpenDisk` may come before the `Hello` (protocol 7).
    let mut r = receiver();
    let (_, log) = log_msgs(6, 5, b"0123456789");
    let outs = on(&mut r, 0, &log[..1]);
    assert!(matches!(&sent(&outs)[..], [Msg::Error(_)]), "{outs:?}");
    let mut r = receiver();
    let old = Msg::Hello(Hello {
        protocol_version: wire::PROTOCOL_VERSION + 1,
        site_name: "primary".into(),
        software_version: "t".into(),
    });
    let outs = on(&mut r, 0, &[old]);
    assert!(matches!(&sent(&outs)[..], [Msg::Error(e)] if e.code == ErrorCode::Version));
}

#[test]
fn an_open_disk_sent_with_the_hello_waits_for_it() {
    let mut r = receiver();
    // Stream 1's `OpenDisk` overtook stream 0's `Hello`.
    let outs = on(&mut r, 1, &[Msg::OpenDisk(open())]);
    assert!(outs.is_empty(), "nothing before the Hello: {outs:?}");
    assert!(!r.wants_data(StreamId(1)));
    r.handle(NOW, Event::Finished(StreamId(1)));
    assert!(drain(|| r.poll()).is_empty());
    let outs = on(&mut r, 0, &[hello()]);
    assert!(
        matches!(&sent_on(&outs, 0)[..], [Msg::HelloOk(_)]),
        "{outs:?}"
    );
    let op = op_of(&outs, "the held OpenDisk asks the store", |a| match a {
        ReceiverAction::LoadDisk { op, .. } => Some(*op),
        _ => None,
    });
    r.complete(NOW, op, StoreDone::DiskLoaded(Ok(DiskStatus::default())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent_on(&outs, 1)[..], [Msg::DiskState(_)]),
        "{outs:?}"
    );
}

#[test]
fn a_refused_hello_refuses_the_disks_opened_with_it_and_nothing_reaches_the_store() {
    let mut r = receiver();
    on(&mut r, 1, &[Msg::OpenDisk(open())]);
    let old = Msg::Hello(Hello {
        protocol_version: wire::MIN_PROTOCOL_VERSION - 1,
        site_name: "primary".into(),
        software_version: "t".into(),
    });
    let mut outs = on(&mut r, 0, &[old]);
    // A later `OpenDisk` and a log are refused too.
    outs.extend(on(&mut r, 2, &[Msg::OpenDisk(open())]));
    outs.extend(on(&mut r, 3, &log_msgs(6, 5, b"0123456789").1));
    for stream in [0, 1] {
        assert!(
            matches!(&sent_on(&outs, stream)[..], [Msg::Error(e)] if e.code == ErrorCode::Version),
            "stream {stream}: {outs:?}"
        );
    }
    for stream in [2, 3] {
        assert!(
            matches!(&sent_on(&outs, stream)[..], [Msg::Error(_)]),
            "{outs:?}"
        );
    }
    assert!(
        actions(&outs)
            .iter()
            .all(|a| matches!(a, ReceiverAction::Refused { .. })),
        "{outs:?}"
    );
}

#[test]
fn garbage_is_refused_without_panicking() {
    let mut x = 0x1234_5678_9abc_def1u64;
    for round in 0..2000u64 {
        let mut r = opened(5);
        let mut b = bytes(&log_msgs(6, 5, b"0123456789").1);
        for _ in 0..(1 + round % 5) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % b.len();
            b[at] ^= (x >> 32) as u8 | 1;
        }
        r.handle(
            NOW,
            Event::Data {
                stream: StreamId(2),
                bytes: &b,
            },
        );
        let outs = drain(|| r.poll());
        // Whatever happened, nothing reached the durable store unverified.
        for a in actions(&outs) {
            if let ReceiverAction::StoreLogDurably { log_checksum, .. } = a {
                let mut h = LogHasher::new();
                h.update(b"0123456789");
                assert_eq!(*log_checksum, h.digest128());
            }
        }
    }
}

fn sender(timeout_ns: u64) -> Sender {
    Sender::new(sender_config(timeout_ns), NOW)
}

fn sender_config(timeout_ns: u64) -> SenderConfig {
    SenderConfig {
        site_name: "primary".into(),
        software_version: "t".into(),
        vm: "vm1".into(),
        disks: vec![open()],
        last_point: 0,
        timeout_ns,
        chunk_size: 4,
        commit_ahead: true,
        open_with_hello: true,
        follow: true,
        protocol_version: crate::wire::PROTOCOL_VERSION,
    }
}

/// Hand `o` to the peer (`handle`) if it is stream traffic; otherwise
/// give back what the caller decides on: the action, or the close error.
fn deliver<A>(o: Output<A>, handle: impl FnOnce(Event<'_>)) -> Result<(), Result<A, SessionError>> {
    match o {
        Output::Send { stream, bytes } => handle(Event::Data {
            stream,
            bytes: &bytes,
        }),
        Output::Finish(x) => handle(Event::Finished(x)),
        Output::Reset(x) => handle(Event::Reset(x)),
        Output::Close(e) => return Err(Err(e)),
        Output::Action(a) => return Err(Ok(a)),
        // A read buffer back to the reader: no traffic.
        Output::Spent { .. } => {}
    }
    Ok(())
}

/// Connect a sender and a receiver directly; the receiver's store actions
/// are answered by `store`, the sender's reads by `read`.
fn pump(
    s: &mut Sender,
    r: &mut Receiver,
    store: &mut dyn FnMut(&ReceiverAction) -> Option<(OpId, StoreDone)>,
    read: &mut dyn FnMut(ReadWhat, u64, usize) -> ReadData,
) -> Vec<SenderAction> {
    try_pump(s, r, store, read).unwrap_or_else(|e| panic!("closed: {e}"))
}

/// [`pump`]; Err: the sender's close, or else the receiver's (once all
/// that was sent before it is delivered).
fn try_pump(
    s: &mut Sender,
    r: &mut Receiver,
    store: &mut dyn FnMut(&ReceiverAction) -> Option<(OpId, StoreDone)>,
    read: &mut dyn FnMut(ReadWhat, u64, usize) -> ReadData,
) -> Result<Vec<SenderAction>, SessionError> {
    let mut seen = Vec::new();
    let mut receiver_closed = None;
    loop {
        let mut moved = false;
        while let Some(o) = s.poll() {
            moved = true;
            match deliver(o, |e| r.handle(NOW, e)) {
                Ok(()) => {}
                Err(Err(e)) => return Err(e),
                Err(Ok(SenderAction::Read {
                    id,
                    what,
                    offset,
                    max,
                    ..
                })) => s.complete_read(NOW, id, Ok(read(what, offset, max))),
                Err(Ok(a)) => seen.push(a),
            }
        }
        while let Some(o) = r.poll() {
            moved = true;
            match deliver(o, |e| s.handle(NOW, e)) {
                Ok(()) => {}
                Err(Err(e)) => {
                    receiver_closed.get_or_insert(e);
                }
                Err(Ok(a)) => {
                    if let Some((op, d)) = store(&a) {
                        r.complete(NOW, op, d);
                    }
                }
            }
        }
        if !moved {
            return match receiver_closed {
                Some(e) => Err(e),
                None => Ok(seen),
            };
        }
    }
}

#[test]
fn a_pair_copies_ships_a_log_and_commits_both_points() {
    let mut s = sender(1 << 40);
    let mut r = receiver();
    let log = b"a sealed log".to_vec();
    let mut image = vec![0u8; 1 << 20];
    let mut written = Vec::new();
    let mut defs = Vec::new();
    let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, .. } => {
                Some((*op, StoreDone::DiskLoaded(Ok(DiskStatus::default()))))
            }
            ReceiverAction::BeginInitial { op, .. } => Some((*op, StoreDone::InitialBegun(Ok(0)))),
            ReceiverAction::WriteInitial { offset, data, .. } => {
                written.push((*offset, data.clone()));
                None
            }
            ReceiverAction::FinishInitial { op, .. } => {
                Some((*op, StoreDone::InitialFinished(Ok(()))))
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                Some((*op, StoreDone::LogStored(Ok(LogStored::Stored))))
            }
            ReceiverAction::ApplyLog { op, .. } => Some((*op, StoreDone::LogApplied(Ok(())))),
            ReceiverAction::CommitPoint {
                op,
                cycle,
                definition,
                group,
                ..
            } => {
                defs.push((*cycle, definition.clone(), group.clone()));
                Some((*op, StoreDone::PointCommitted(Ok(true))))
            }
            _ => None,
        }
    };
    image[4096..4100].copy_from_slice(b"data");
    let mut read = |what: ReadWhat, offset: u64, max: usize| match what {
        ReadWhat::Log { .. } => {
            let e = (offset as usize + max).min(log.len());
            ReadData {
                offset,
                data: log[offset as usize..e].to_vec(),
                end: e == log.len(),
            }
        }
        ReadWhat::Initial { .. } => {
            // Only the non-zero block; the rest is a hole.
            if offset <= 4096 {
                ReadData {
                    offset: 4096,
                    data: image[4096..4100].to_vec(),
                    end: true,
                }
            } else {
                ReadData {
                    offset,
                    data: Vec::new(),
                    end: true,
                }
            }
        }
    };
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(matches!(&seen[..], [SenderAction::Ready { states }] if states[0].replica_cycle == 0));
    // The domain definition read at the copy's cut goes with its point,
    // and with the next one (unchanged: not noted again).
    s.note_definition(3, "<domain>v1</domain>".into());
    s.submit(Job::Initial(wire::InitialBegin {
        disk_id: ID,
        cycle: 3,
        disk_size: 1 << 20,
        start_offset: 0,
    }))
    .expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(seen.contains(&SenderAction::InitialApplied {
        disk_id: ID,
        cycle: 3
    }));
    assert!(seen.contains(&SenderAction::PointCommitted {
        cycle: 3,
        app_consistent: false
    }));
    // Cycle 4 was a consistency group's cut: its point (only) says so.
    let group = wire::PointGroup {
        name: "erp".into(),
        origin: "m1".into(),
        members: vec!["vm1".into(), "vm2".into()],
    };
    s.note_group(4, group.clone());
    let (begin, _) = log_msgs(4, 3, &log);
    s.submit(Job::Log {
        begin,
        app_consistent: true,
    })
    .expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert_eq!(
        seen,
        vec![
            SenderAction::LogDurable {
                disk_id: ID,
                cycle: 4
            },
            SenderAction::LogApplied {
                disk_id: ID,
                cycle: 4
            },
            SenderAction::PointCommitted {
                cycle: 4,
                app_consistent: true
            },
        ]
    );
    let v1 = Some("<domain>v1</domain>".to_string());
    assert_eq!(defs, vec![(3, v1.clone(), None), (4, v1, Some(group))]);
    assert_eq!(s.last_point(), 4);
    assert_eq!(written, vec![(4096, b"data".to_vec())]);
}

/// `settled`: with a store that commits durable logs, a sender is settled
/// once its log is durable and its point committed, while the apply is
/// still running (what a resync and `vdrep sync` wait for); with one that
/// commits only applied logs, not before the apply.
#[test]
fn a_sender_is_settled_once_its_logs_are_durable_and_points_committed() {
    for commit_stored in [true, false] {
        let mut s = sender(1 << 40);
        let mut r = receiver_with(commit_stored);
        let log = b"a sealed log".to_vec();
        // The apply never completes here.
        let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
            match a {
                ReceiverAction::LoadDisk { op, .. } => Some((
                    *op,
                    StoreDone::DiskLoaded(Ok(DiskStatus {
                        replica_cycle: 3,
                        replica_size: 1 << 20,
                        ..Default::default()
                    })),
                )),
                ReceiverAction::StoreLogDurably { op, .. } => {
                    Some((*op, StoreDone::LogStored(Ok(LogStored::Stored))))
                }
                ReceiverAction::CommitPoint { op, .. } => {
                    Some((*op, StoreDone::PointCommitted(Ok(true))))
                }
                _ => None,
            }
        };
        let mut read = |_: ReadWhat, offset: u64, max: usize| {
            let e = (offset as usize + max).min(log.len());
            ReadData {
                offset,
                data: log[offset as usize..e].to_vec(),
                end: e == log.len(),
            }
        };
        pump(&mut s, &mut r, &mut store, &mut read);
        assert!(s.is_idle() && s.settled(), "nothing submitted yet");
        let (begin, _) = log_msgs(4, 3, &log);
        s.submit(Job::Log {
            begin,
            app_consistent: false,
        })
        .expect("submit");
        assert!(!s.settled(), "queued");
        let seen = pump(&mut s, &mut r, &mut store, &mut read);
        assert!(!s.is_idle(), "the apply is not acknowledged");
        assert!(seen.contains(&SenderAction::LogDurable {
            disk_id: ID,
            cycle: 4
        }));
        let committed = seen.contains(&SenderAction::PointCommitted {
            cycle: 4,
            app_consistent: false,
        });
        assert_eq!(committed, commit_stored, "{seen:?}");
        assert_eq!(s.settled(), commit_stored, "{seen:?}");
    }
}

#[test]
fn a_sender_without_answers_times_out() {
    let mut s = sender(1_000);
    drain(|| s.poll());
    assert_eq!(s.poll_timeout(), Some(NOW + 1_000));
    s.handle(NOW + 999, Event::Tick);
    assert!(!s.is_closed());
    s.handle(NOW + 1_000, Event::Tick);
    let outs = drain(|| s.poll());
    assert!(s.is_closed());
    assert!(matches!(outs.last(), Some(Output::Close(e)) if e.kind() == ErrorKind::Transport));
}

#[test]
fn a_sender_refuses_garbage_from_the_receiver_without_panicking() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..500 {
        let mut s = sender(1 << 40);
        drain(|| s.poll());
        let mut b = Vec::new();
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.push(x as u8);
        }
        s.handle(
            NOW,
            Event::Data {
                stream: StreamId(0),
                bytes: &b,
            },
        );
        let outs = drain(|| s.poll());
        assert!(!outs
            .iter()
            .any(|o| matches!(o, Output::Action(SenderAction::LogApplied { .. }))));
    }
}

#[test]
fn a_replica_needing_resync_takes_only_the_log_its_compare_announced() {
    let mut s = sender(1 << 40);
    let mut r = receiver();
    let log = b"healing blocks".to_vec();
    let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, .. } => Some((
                *op,
                StoreDone::DiskLoaded(Ok(DiskStatus {
                    replica_cycle: 5,
                    replica_size: 1 << 20,
                    needs_resync: Some("adopted after a failover".into()),
                    ..DiskStatus::default()
                })),
            )),
            ReceiverAction::HashBlocks { op, req, .. } => Some((
                *op,
                StoreDone::Hashed(Ok((1 << 20, vec![42; req.total_blocks() as usize]))),
            )),
            ReceiverAction::PrepareResync { op, .. } => {
                Some((*op, StoreDone::ResyncPrepared(Ok(()))))
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                Some((*op, StoreDone::LogStored(Ok(LogStored::Stored))))
            }
            ReceiverAction::ApplyLog { op, .. } => Some((*op, StoreDone::LogApplied(Ok(())))),
            ReceiverAction::CommitPoint { op, .. } => {
                Some((*op, StoreDone::PointCommitted(Ok(true))))
            }
            _ => None,
        }
    };
    let mut read = |_: ReadWhat, offset: u64, max: usize| {
        let e = (offset as usize + max).min(log.len());
        ReadData {
            offset,
            data: log[offset as usize..e].to_vec(),
            end: e == log.len(),
        }
    };
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(
        matches!(seen.first(), Some(SenderAction::Ready { states }) if !states[0].needs_resync.is_empty())
    );
    // A delta before the compare is refused: the replica is not trusted.
    let (begin, _) = log_msgs(6, 5, &log);
    let job = Job::Log {
        begin,
        app_consistent: false,
    };
    s.submit(job.clone()).expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(matches!(&seen[..], [SenderAction::JobFailed { error, .. }]
        if error.kind() == ErrorKind::Refused { retryable: true }));
    // Compare, announce the healing log, then it is taken.
    let c = s.start_compare(ID, 5).expect("compare");
    let runs = vec![wire::HashRun {
        offset: 0,
        blocks: 3,
    }];
    s.request_hashes(c, 4096, runs.clone()).expect("request");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(
        matches!(&seen[..], [SenderAction::Hashes { hashes, runs: r2, .. }]
        if *hashes == vec![42; 3] && *r2 == runs)
    );
    let end = wire::ResyncEnd {
        disk_id: ID,
        replica_cycle: 5,
        cycle: 6,
        blocks_compared: 3,
        blocks_differ: 1,
    };
    s.finish_compare(c, Some(end)).expect("finish");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(seen.contains(&SenderAction::ResyncPrepared {
        disk_id: ID,
        cycle: 6
    }));
    s.submit(job).expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(seen.contains(&SenderAction::LogApplied {
        disk_id: ID,
        cycle: 6
    }));
    assert!(seen.contains(&SenderAction::PointCommitted {
        cycle: 6,
        app_consistent: false
    }));
}

/// A sender driven by hand up to `Ready`: the receiver's answers are fed
/// as bytes. `state` answers the `OpenDisk`.
fn ready_sender(chunk_size: usize, disks: Vec<OpenDisk>, state: DiskState) -> Sender {
    ready_sender_follow(chunk_size, disks, state, true)
}

/// [`ready_sender`] with [`SenderConfig::follow`] as given.
fn ready_sender_follow(
    chunk_size: usize,
    disks: Vec<OpenDisk>,
    state: DiskState,
    follow: bool,
) -> Sender {
    let states = disks
        .iter()
        .map(|d| DiskState {
            disk_id: d.disk_id,
            ..state.clone()
        })
        .collect();
    ready_sender_with(chunk_size, disks, states, follow, true)
}

/// [`ready_sender`] with one state per disk (in disk order) and
/// [`SenderConfig::follow`] and [`SenderConfig::commit_ahead`] as given.
fn ready_sender_with(
    chunk_size: usize,
    disks: Vec<OpenDisk>,
    states: Vec<DiskState>,
    follow: bool,
    commit_ahead: bool,
) -> Sender {
    let mut s = Sender::new(
        SenderConfig {
            site_name: "primary".into(),
            software_version: "t".into(),
            vm: "vm1".into(),
            disks,
            last_point: 0,
            timeout_ns: 1 << 40,
            chunk_size,
            commit_ahead,
            open_with_hello: true,
            follow,
            protocol_version: wire::PROTOCOL_VERSION,
        },
        NOW,
    );
    let ok = bytes(&[Msg::HelloOk(wire::HelloOk {
        protocol_version: wire::PROTOCOL_VERSION,
        site_name: "secondary".into(),
        software_version: "t".into(),
        store_free: 12345,
    })]);
    s.handle(
        NOW,
        Event::Data {
            stream: StreamId(0),
            bytes: &ok,
        },
    );
    for (i, state) in states.into_iter().enumerate() {
        let st = bytes(&[Msg::DiskState(state)]);
        s.handle(
            NOW,
            Event::Data {
                stream: StreamId(1 + i as u64),
                bytes: &st,
            },
        );
    }
    s
}

fn state(replica_cycle: u64, needs_resync: &str) -> DiskState {
    DiskState {
        disk_id: ID,
        replica_cycle,
        replica_size: 1 << 20,
        copy_cycle: 0,
        resume_offset: 0,
        needs_resync: needs_resync.into(),
    }
}

fn sender_actions(outs: &[Output<SenderAction>]) -> Vec<&SenderAction> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Action(a) => Some(a),
            _ => None,
        })
        .collect()
}

#[test]
fn a_probe_without_disks_is_ready_after_hello_and_keeps_the_peers_answer() {
    let mut s = ready_sender(4, Vec::new(), state(0, ""));
    let outs = drain(|| s.poll());
    assert!(s.is_ready() && s.is_idle());
    assert_eq!(s.peer().map(|h| h.store_free), Some(12345));
    assert!(
        !sent(&outs).iter().any(|m| matches!(m, Msg::OpenDisk(_))),
        "a probe opens no disk"
    );
    assert!(
        matches!(&sender_actions(&outs)[..], [SenderAction::Ready { states }] if states.is_empty())
    );
}

#[test]
fn reopen_asks_every_disk_again_and_reports_ready_again() {
    let mut s = ready_sender(4, vec![open()], state(5, ""));
    drain(|| s.poll());
    s.reopen().expect("reopen");
    assert!(!s.is_ready());
    let outs = drain(|| s.poll());
    assert!(matches!(&sent(&outs)[..], [Msg::OpenDisk(o)] if o.disk_id == ID));
    let Some(Output::Send { stream, .. }) = outs.first() else {
        panic!("no OpenDisk sent: {outs:?}");
    };
    let st = bytes(&[Msg::DiskState(state(6, ""))]);
    s.handle(
        NOW,
        Event::Data {
            stream: *stream,
            bytes: &st,
        },
    );
    let outs = drain(|| s.poll());
    assert!(
        sender_actions(&outs)
            .iter()
            .any(|a| matches!(a, SenderAction::Ready { states } if states[0].replica_cycle == 6)),
        "{outs:?}"
    );
    assert!(s.is_ready());
}

#[test]
fn a_replica_the_receiver_does_not_trust_is_no_points_base() {
    // Trusted: the replicas' cycle is committed again (its PointAck may
    // have been lost).
    let mut s = ready_sender(4, vec![open()], state(5, ""));
    let outs = drain(|| s.poll());
    assert!(sent(&outs)
        .iter()
        .any(|m| matches!(m, Msg::PointCommit(p) if p.cycle == 5)));
    // Not trusted: no point until a resync heals it.
    let mut s = ready_sender(4, vec![open()], state(5, "a crash mid-apply"));
    let outs = drain(|| s.poll());
    assert!(!sent(&outs).iter().any(|m| matches!(m, Msg::PointCommit(_))));
    assert!(s.is_idle());
}

#[test]
fn a_replica_a_copy_is_overwriting_is_no_points_base() {
    // The receiver reports a copy of cycle 7 under way over the replica of
    // cycle 5: the store would refuse a point at 5, and the session fail.
    let mut s = ready_sender(
        4,
        vec![open()],
        DiskState {
            copy_cycle: 7,
            resume_offset: 4096,
            ..state(5, "")
        },
    );
    let outs = drain(|| s.poll());
    assert!(!sent(&outs).iter().any(|m| matches!(m, Msg::PointCommit(_))));
    assert!(s.is_idle());
}

/// The stream of the `PointCommit` of `cycle` in `outs`.
fn point_stream<A>(outs: &[Output<A>], cycle: u64) -> Option<StreamId> {
    outs.iter().find_map(|o| match o {
        Output::Send { stream, bytes } => match wire::decode(bytes) {
            Ok(Some((Msg::PointCommit(p), _))) if p.cycle == cycle => Some(*stream),
            _ => None,
        },
        _ => None,
    })
}

#[test]
fn a_copy_withdraws_the_point_of_an_earlier_cycle_and_commits_its_own() {
    // Reconnected: the replica reached 5 but its point was never
    // acknowledged, so the session commits it again. The driver then
    // copies the disk again at 9 (its changes since 5 are lost): the
    // store drops the disk's points when the copy begins, and would hold
    // the point at 5 behind the whole copy (the session timed out on it,
    // the copy started over, 113 times in seed 7798 of the simulation).
    const CHUNK: usize = 4096;
    let mut s = ready_sender(CHUNK, vec![open()], state(5, ""));
    let outs = drain(|| s.poll());
    let p5 = point_stream(&outs, 5).expect("the point at 5 is committed again");
    s.submit(Job::Initial(wire::InitialBegin {
        disk_id: ID,
        cycle: 9,
        disk_size: 2 * CHUNK as u64,
        start_offset: 0,
    }))
    .expect("submit");
    let mut outs = drain(|| s.poll());
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Reset(x) if *x == p5)),
        "the point at 5 is withdrawn: {outs:?}"
    );
    // Its late answer is ignored, not taken for a violation or a point.
    let late = bytes(&[Msg::PointAck(wire::PointAck {
        vm: "vm1".into(),
        cycle: 5,
    })]);
    s.handle(
        NOW,
        Event::Data {
            stream: p5,
            bytes: &late,
        },
    );
    assert!(!s.is_closed());
    assert_eq!(s.last_point(), 0);
    let mut all = Vec::new();
    for _ in 0..10 {
        all.append(&mut outs);
        let Some((id, offset)) = sender_actions(&all).iter().rev().find_map(|a| match a {
            SenderAction::Read { id, offset, .. } => Some((*id, *offset)),
            _ => None,
        }) else {
            break;
        };
        let end = offset + CHUNK as u64 >= 2 * CHUNK as u64;
        s.complete_read(
            NOW,
            id,
            Ok(ReadData {
                offset,
                data: vec![1; CHUNK],
                end,
            }),
        );
        outs = drain(|| s.poll());
        if end {
            all.append(&mut outs);
            break;
        }
    }
    assert!(
        sent(&all)
            .iter()
            .any(|m| matches!(m, Msg::InitialEnd(e) if e.cycle == 9)),
        "the copy is sent: {all:?}"
    );
    assert!(
        point_stream(&all, 9).is_some(),
        "the copy's point goes with its last bytes: {all:?}"
    );
    assert!(
        !sent(&all)
            .iter()
            .any(|m| matches!(m, Msg::PointCommit(p) if p.cycle < 9)),
        "no point below the copy is asked for again: {all:?}"
    );
}

/// `n` bytes lz4 cannot shrink (xorshift from `seed`).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A sender copying a disk of `chunks` chunks of `chunk` bytes from
/// chunk `start` on, as cycle 3, its first outputs drained.
fn copying_sender(chunk: usize, chunks: u64, start: u64) -> Sender {
    let mut s = ready_sender(chunk, vec![open()], state(0, ""));
    drain(|| s.poll());
    s.submit(Job::Initial(wire::InitialBegin {
        disk_id: ID,
        cycle: 3,
        disk_size: chunks * chunk as u64,
        start_offset: start * chunk as u64,
    }))
    .expect("submit");
    s
}

#[test]
fn a_copy_is_read_from_zero_and_tries_lz4_on_every_16th_chunk_after_eight_that_did_not_compress() {
    const CHUNK: usize = 4096;
    // Resumed at 64 KiB: what changed below is read (and sent) too.
    let mut s = copying_sender(CHUNK, 40, 16);
    let chunk = |i: usize| -> Vec<u8> {
        if i < 20 {
            noise(CHUNK, 0x9e37_79b9_7f4a_7c15 ^ i as u64)
        } else {
            b"abcd".repeat(CHUNK / 4)
        }
    };
    let mut encodings = Vec::new();
    let mut first_read = None;
    for _ in 0..100 {
        let outs = drain(|| s.poll());
        for m in sent(&outs) {
            if let Msg::InitialChunk(c) = m {
                encodings.push(c.encoding);
            }
        }
        let Some((id, offset)) = sender_actions(&outs).iter().find_map(|a| match a {
            SenderAction::Read { id, offset, .. } => Some((*id, *offset)),
            _ => None,
        }) else {
            break;
        };
        first_read.get_or_insert(offset);
        let i = offset as usize / CHUNK;
        s.complete_read(
            NOW,
            id,
            Ok(ReadData {
                offset,
                data: chunk(i),
                end: false,
            }),
        );
    }
    assert_eq!(first_read, Some(0));
    assert_eq!(encodings.len(), 40);
    use crate::hrl::Encoding::{Lz4, Raw};
    assert!(encodings[..20].iter().all(|e| *e == Raw));
    // Compressible from chunk 20 on, but lz4 is only tried again at 32.
    assert!(encodings[20..32].iter().all(|e| *e == Raw), "{encodings:?}");
    assert!(encodings[32..].iter().all(|e| *e == Lz4), "{encodings:?}");
}

#[test]
fn a_raw_chunks_read_buffer_is_handed_back_once_framed() {
    const CHUNK: usize = 4096;
    let mut s = copying_sender(CHUNK, 2, 0);
    let noise = noise(CHUNK, 0x2545_f491_4f6c_dd1d);
    let mut outs = drain(|| s.poll());
    let (mut spent, mut chunks) = (Vec::new(), Vec::new());
    // Chunk 0 random (RAW), chunk 1 a repeated byte (LZ4).
    for data in [noise.clone(), vec![7u8; CHUNK]] {
        let (id, offset) = sender_actions(&outs)
            .iter()
            .find_map(|a| match a {
                SenderAction::Read { id, offset, .. } => Some((*id, *offset)),
                _ => None,
            })
            .expect("the copy asks for its next piece");
        let ptr = data.as_ptr() as usize;
        s.complete_read(
            NOW,
            id,
            Ok(ReadData {
                offset,
                data,
                end: false,
            }),
        );
        outs = drain(|| s.poll());
        for o in &outs {
            if let Output::Spent {
                disk_id,
                cycle,
                buf,
            } = o
            {
                // The very buffer that was read into.
                assert_eq!(buf.as_ptr() as usize, ptr);
                spent.push((*disk_id, *cycle, buf.clone()));
            }
        }
        chunks.extend(sent(&outs).into_iter().filter_map(|m| match m {
            Msg::InitialChunk(c) => Some(c.encoding),
            _ => None,
        }));
    }
    use crate::hrl::Encoding::{Lz4, Raw};
    assert_eq!(chunks, vec![Raw, Lz4]);
    // Only the RAW chunk's buffer comes back (an LZ4 chunk sent a new
    // one), tagged with its job.
    assert_eq!(spent, vec![(ID, 3, noise)]);
}

/// The op of the `BeginInitial` in `outs`.
fn begin_op(outs: &[Output<ReceiverAction>]) -> OpId {
    op_of(outs, "InitialBegin asks the store", |a| match a {
        ReceiverAction::BeginInitial { op, .. } => Some(*op),
        _ => None,
    })
}

fn chunk(offset: u64, fill: u8) -> Msg {
    Msg::InitialChunk(wire::InitialChunk::from_block(ID, offset, &[fill; 4096]))
}

fn initial_begin(start_offset: u64) -> Msg {
    Msg::InitialBegin(wire::InitialBegin {
        disk_id: ID,
        cycle: 9,
        disk_size: 1 << 20,
        start_offset,
    })
}

#[test]
fn a_resumed_copy_takes_the_changed_blocks_below_its_start_offset() {
    // The store has 64 KiB of the interrupted copy durable; the sender
    // resumes there and first sends what changed below it since (block 1),
    // then the rest. Refusing block 1 made the sender reconnect and send
    // it again, forever (tests/session_sim.rs `resumed copies`).
    let mut r = opened(0);
    let outs = feed(&mut r, &[initial_begin(65536)]);
    r.complete(NOW, begin_op(&outs), StoreDone::InitialBegun(Ok(65536)));
    let outs = feed(
        &mut r,
        &[
            chunk(4096, 1),
            chunk(65536, 2),
            chunk(69632, 3),
            Msg::InitialEnd(wire::InitialEnd {
                disk_id: ID,
                cycle: 9,
                disk_size: 1 << 20,
            }),
        ],
    );
    assert!(refusal(&outs).is_none(), "{outs:?}");
    let writes: Vec<u64> = actions(&outs)
        .iter()
        .filter_map(|a| match a {
            ReceiverAction::WriteInitial { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![4096, 65536, 69632]);
    assert!(has_action!(
        &outs,
        ReceiverAction::FinishInitial { cycle: 9, .. }
    ));
}

#[test]
fn a_resumed_copy_still_refuses_chunks_out_of_order() {
    let mut r = opened(0);
    let outs = feed(&mut r, &[initial_begin(65536)]);
    r.complete(NOW, begin_op(&outs), StoreDone::InitialBegun(Ok(65536)));
    let outs = feed(&mut r, &[chunk(65536, 2), chunk(4096, 1)]);
    assert_eq!(
        actions(&outs)
            .iter()
            .filter(|a| matches!(a, ReceiverAction::WriteInitial { .. }))
            .count(),
        1
    );
    assert!(refusal(&outs).is_some(), "{outs:?}");
}

#[test]
fn a_copy_resumed_at_another_offset_than_the_store_has_is_retried_not_applied() {
    // Behind the store (a lagging write moved its offset) or ahead of it:
    // no chunk is written, and the refusal is retryable, so the sender
    // opens the disk again and learns the store's offset.
    for (start, durable) in [(4096u64, 65536u64), (65536, 4096), (0, 65536)] {
        let mut r = opened(0);
        let outs = feed(&mut r, &[initial_begin(start)]);
        r.complete(NOW, begin_op(&outs), StoreDone::InitialBegun(Ok(durable)));
        let outs = drain(|| r.poll());
        assert_eq!(
            refusal(&outs),
            Some((ErrorCode::InvalidState, true)),
            "{start} vs {durable}: {outs:?}"
        );
        let outs = feed(&mut r, &[chunk(start, 1)]);
        assert!(
            !has_action!(&outs, ReceiverAction::WriteInitial { .. }),
            "{outs:?}"
        );
    }
}

fn point_commit(cycle: u64) -> Msg {
    Msg::PointCommit(wire::PointCommit {
        vm: "vm1".into(),
        cycle,
        app_consistent: false,
        disks: vec![wire::DiskCycle { disk_id: ID, cycle }],
        definition: None,
        group: None,
    })
}

/// A receiver that got a cycle-6 log on stream 3 and, right behind its last
/// bytes, the cycle's point (commit-ahead); and the op of the log's store.
fn log_then_point_ahead() -> (Receiver, OpId) {
    log_then_point_ahead_in(opened(5))
}

fn log_then_point_ahead_in(mut r: Receiver) -> (Receiver, OpId) {
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let outs = feed(&mut r, &msgs);
    let stored = stored_op(&outs);
    let b = bytes(&[point_commit(6)]);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(3),
            bytes: &b,
        },
    );
    (r, stored)
}

/// The log staged in `outs` is stored and applied: the receiver answers
/// exactly one `Ack` of `cycle`, applied.
fn store_apply_and_ack(r: &mut Receiver, outs: &[Output<ReceiverAction>], cycle: u64) {
    let stored = stored_op(outs);
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    let apply = apply_op(&outs).unwrap_or_else(|| panic!("log {cycle} is applied: {outs:?}"));
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&acks(&outs)[..], [Ack { cycle: c, applied: true, .. }] if *c == cycle),
        "{outs:?}"
    );
}

fn apply_op(outs: &[Output<ReceiverAction>]) -> Option<OpId> {
    actions(outs).iter().find_map(|a| match a {
        ReceiverAction::ApplyLog { op, .. } => Some(*op),
        _ => None,
    })
}

fn commit_op(outs: &[Output<ReceiverAction>], want: u64) -> Option<OpId> {
    actions(outs).iter().find_map(|a| match a {
        ReceiverAction::CommitPoint { op, cycle, .. } if *cycle == want => Some(*op),
        _ => None,
    })
}

#[test]
fn a_point_sent_with_its_log_is_held_until_the_log_is_applied_then_committed() {
    // The commit arrives with the log's last bytes, before the store is done.
    let (mut r, stored) = log_then_point_ahead();
    r.handle(NOW, Event::Finished(StreamId(3)));
    let outs = drain(|| r.poll());
    assert_eq!(commit_op(&outs, 6), None, "held: the log is not applied");
    assert!(sent(&outs).is_empty(), "{outs:?}");
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert_eq!(commit_op(&outs, 6), None, "durable is not applied");
    let apply = apply_op(&outs).expect("apply");
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(acks(&outs).iter().any(|a| a.applied));
    let op = commit_op(&outs, 6).expect("committed once the log is applied");
    r.complete(NOW, op, StoreDone::PointCommitted(Ok(true)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::PointAck(p)] if p.cycle == 6),
        "acknowledged only after the store recorded it: {outs:?}"
    );
}

/// With a store that commits points on durable logs, the point sent with
/// a log's last bytes is asked for as soon as the log is stored, beside
/// its apply, and acknowledged before the apply ends.
#[test]
fn a_point_is_committed_once_its_log_is_durable_when_the_store_allows_it() {
    let (mut r, stored) =
        log_then_point_ahead_in(opened_with(receiver_with(true), 5, wire::PROTOCOL_VERSION));
    r.handle(NOW, Event::Finished(StreamId(3)));
    let outs = drain(|| r.poll());
    assert_eq!(
        commit_op(&outs, 6),
        None,
        "held: the log is not durable yet"
    );
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 6,
                durable: true,
                applied: false,
                ..
            }]
        ),
        "{outs:?}"
    );
    let apply = apply_op(&outs).expect("the log is still applied");
    let op = commit_op(&outs, 6).expect("asked once the log is durable");
    r.complete(NOW, op, StoreDone::PointCommitted(Ok(true)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::PointAck(p)] if p.cycle == 6),
        "acknowledged before the apply ended: {outs:?}"
    );
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 6,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
    assert_eq!(commit_op(&outs, 6), None, "committed once");
}

/// The same store refusing the point (a log between the replica and the
/// point is missing): it is held while the disk's log is applied and asked
/// again when the apply ends, not refused.
#[test]
fn a_point_the_store_does_not_find_durable_is_asked_again_after_the_apply() {
    let (mut r, stored) =
        log_then_point_ahead_in(opened_with(receiver_with(true), 5, wire::PROTOCOL_VERSION));
    r.handle(NOW, Event::Finished(StreamId(3)));
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    let apply = apply_op(&outs).expect("apply");
    let op = commit_op(&outs, 6).expect("asked once durable");
    r.complete(NOW, op, StoreDone::PointCommitted(Ok(false)));
    let outs = drain(|| r.poll());
    assert_eq!(refusal(&outs), None, "held, not refused: {outs:?}");
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    let op = commit_op(&outs, 6).expect("asked again once applied");
    r.complete(NOW, op, StoreDone::PointCommitted(Ok(true)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::PointAck(p)] if p.cycle == 6),
        "{outs:?}"
    );
}

#[test]
fn a_held_point_the_sender_resets_is_never_committed() {
    let (mut r, stored) = log_then_point_ahead();
    r.handle(NOW, Event::Reset(StreamId(3)));
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    let apply = apply_op(&outs).expect("apply");
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert_eq!(commit_op(&outs, 6), None);
}

/// Drive `s`'s reads of a log of `len` bytes; the outputs.
fn send_log(s: &mut Sender, len: usize) -> Vec<Output<SenderAction>> {
    let mut all = Vec::new();
    loop {
        let outs = drain(|| s.poll());
        if outs.is_empty() {
            return all;
        }
        for o in &outs {
            if let Output::Action(SenderAction::Read {
                id, offset, max, ..
            }) = o
            {
                let e = (*offset as usize + max).min(len);
                let data = vec![1u8; e - *offset as usize];
                s.complete_read(
                    NOW,
                    *id,
                    Ok(ReadData {
                        offset: *offset,
                        data,
                        end: e == len,
                    }),
                );
            }
        }
        all.extend(outs);
    }
}

#[test]
fn a_sender_commits_with_the_last_bytes_and_withdraws_the_point_if_the_log_fails() {
    let mut s = ready_sender(4, vec![open()], state(5, ""));
    // The replica's cycle is committed again first (stream 2).
    assert!(sent(&drain(|| s.poll()))
        .iter()
        .any(|m| matches!(m, Msg::PointCommit(p) if p.cycle == 5)));
    let ack = bytes(&[Msg::PointAck(wire::PointAck {
        vm: "vm1".into(),
        cycle: 5,
    })]);
    s.handle(
        NOW,
        Event::Data {
            stream: StreamId(2),
            bytes: &ack,
        },
    );
    drain(|| s.poll());
    let (mut begin, _) = log_msgs(6, 5, b"0123456789");
    begin.total_len = 10;
    s.submit(Job::Log {
        begin,
        app_consistent: false,
    })
    .expect("submit");
    let outs = send_log(&mut s, 10);
    let msgs = sent(&outs);
    let end = msgs.iter().position(|m| matches!(m, Msg::LogEnd(_)));
    let commit = msgs
        .iter()
        .position(|m| matches!(m, Msg::PointCommit(p) if p.cycle == 6));
    assert!(
        matches!((end, commit), (Some(e), Some(c)) if c > e),
        "the commit follows the log's end, before any Ack: {msgs:?}"
    );
    let point_stream = outs
        .iter()
        .find_map(|o| match o {
            Output::Send { stream, bytes } => match decode(bytes) {
                Ok(Some((Msg::PointCommit(_), _))) => Some(*stream),
                _ => None,
            },
            _ => None,
        })
        .expect("the commit's stream");
    assert!(!s.is_idle());
    // The receiver refuses the log: the point is withdrawn, not failed.
    let log_stream = StreamId(point_stream.0 - 1);
    let err = bytes(&[Msg::Error(wire::ErrorMsg::new(
        wire::ErrorCode::Internal,
        true,
        "disk full",
    ))]);
    s.handle(
        NOW,
        Event::Data {
            stream: log_stream,
            bytes: &err,
        },
    );
    let outs = drain(|| s.poll());
    assert!(outs.contains(&Output::Reset(point_stream)), "{outs:?}");
    let acts = sender_actions(&outs);
    assert!(
        matches!(acts[..], [SenderAction::JobFailed { .. }]),
        "{acts:?}"
    );
    assert!(s.is_idle());
}

/// Stream 2 carries log 6 (applied: the replica is at 6), stream 5 carries
/// log 7, stored and being applied; the point of cycle 6 comes on stream 7
/// behind it (pipelined cycles). Returns the receiver, the apply op of log
/// 7 and the first commit op of point 6.
fn point_behind_a_pipelined_apply() -> (Receiver, OpId, OpId) {
    let mut r = opened(5);
    let (_, msgs) = log_msgs(6, 5, b"0123456789");
    let outs = feed(&mut r, &msgs);
    r.complete(
        NOW,
        stored_op(&outs),
        StoreDone::LogStored(Ok(LogStored::Stored)),
    );
    let outs = drain(|| r.poll());
    let apply6 = apply_op(&outs).expect("apply 6");
    r.complete(NOW, apply6, StoreDone::LogApplied(Ok(())));
    let _ = drain(|| r.poll());
    let (_, msgs) = log_msgs(7, 6, b"abcdefgh");
    let b = bytes(&msgs);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(5),
            bytes: &b,
        },
    );
    let outs = drain(|| r.poll());
    r.complete(
        NOW,
        stored_op(&outs),
        StoreDone::LogStored(Ok(LogStored::Stored)),
    );
    let outs = drain(|| r.poll());
    let apply7 = apply_op(&outs).expect("apply 7");
    let b = bytes(&[point_commit(6)]);
    r.handle(
        NOW,
        Event::Data {
            stream: StreamId(7),
            bytes: &b,
        },
    );
    let outs = drain(|| r.poll());
    let commit = commit_op(&outs, 6).expect("point 6: its log is applied");
    (r, apply7, commit)
}

#[test]
fn a_point_the_store_refuses_behind_a_later_apply_is_held_then_committed() {
    // Seen at 256 VMs: the store will not record point 6 while log 7 is
    // mid-apply; the session refused the point (a lost session and a 1 s
    // retry). It must wait for the apply and ask again.
    let (mut r, apply7, commit) = point_behind_a_pipelined_apply();
    r.complete(NOW, commit, StoreDone::PointCommitted(Ok(false)));
    let outs = drain(|| r.poll());
    assert_eq!(
        refusal(&outs),
        None,
        "refused while log 7 applies: {outs:?}"
    );
    assert!(sent(&outs).is_empty(), "{outs:?}");
    r.complete(NOW, apply7, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    let again = commit_op(&outs, 6).expect("asked again once log 7 is applied");
    r.complete(NOW, again, StoreDone::PointCommitted(Ok(true)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::PointAck(p)] if p.cycle == 6),
        "{outs:?}"
    );
}

#[test]
fn a_point_the_store_refused_while_a_later_apply_ended_first_is_asked_again() {
    // The store saw log 7 mid-apply and answered "not there", but the end
    // of that apply reached the session before the answer (store threads
    // complete in any order): nothing is in flight any more. The session
    // refused the point here ("not every disk of VM reached cycle 6",
    // retryable: a lost session). It asks again; refused only when the
    // store says no with nothing having ended since the question.
    let (mut r, apply7, commit) = point_behind_a_pipelined_apply();
    r.complete(NOW, apply7, StoreDone::LogApplied(Ok(())));
    let _ = drain(|| r.poll());
    r.complete(NOW, commit, StoreDone::PointCommitted(Ok(false)));
    let outs = drain(|| r.poll());
    assert_eq!(refusal(&outs), None, "{outs:?}");
    let again = commit_op(&outs, 6).expect("asked again: log 7 ended meanwhile");
    r.complete(NOW, again, StoreDone::PointCommitted(Ok(false)));
    let outs = drain(|| r.poll());
    assert_eq!(
        refusal(&outs),
        Some((ErrorCode::InvalidState, true)),
        "{outs:?}"
    );
}

#[test]
fn a_point_held_behind_a_log_that_fails_is_asked_again_and_refused() {
    // Log 7's apply fails: its disk is free again, the held point is asked
    // for again, and the store's answer decides (never held forever).
    let (mut r, apply7, commit) = point_behind_a_pipelined_apply();
    r.complete(NOW, commit, StoreDone::PointCommitted(Ok(false)));
    let _ = drain(|| r.poll());
    r.handle(NOW, Event::Reset(StreamId(5)));
    let outs = drain(|| r.poll());
    let again = commit_op(&outs, 6).expect("asked again once log 7's stream is gone");
    let _ = apply7;
    r.complete(NOW, again, StoreDone::PointCommitted(Ok(false)));
    let outs = drain(|| r.poll());
    assert_eq!(
        refusal(&outs),
        Some((ErrorCode::InvalidState, true)),
        "{outs:?}"
    );
}

fn hello_ok() -> Msg {
    Msg::HelloOk(wire::HelloOk {
        protocol_version: wire::PROTOCOL_VERSION,
        site_name: "secondary".into(),
        software_version: "t".into(),
        store_free: 0,
    })
}

fn to_sender(s: &mut Sender, stream: u64, msgs: &[Msg]) -> Vec<Output<SenderAction>> {
    let b = bytes(msgs);
    s.handle(
        NOW,
        Event::Data {
            stream: StreamId(stream),
            bytes: &b,
        },
    );
    drain(|| s.poll())
}

#[test]
fn a_sender_opens_its_disks_with_the_hello_and_is_ready_once_both_are_answered() {
    let mut s = sender(1 << 40);
    let outs = drain(|| s.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::Hello(_), Msg::OpenDisk(o)] if o.disk_id == ID),
        "one flight: {outs:?}"
    );
    // The disk's answer may come first (streams are not ordered).
    let outs = to_sender(&mut s, 1, &[Msg::DiskState(state(5, ""))]);
    assert!(
        sender_actions(&outs).is_empty() && !s.is_ready(),
        "{outs:?}"
    );
    let outs = to_sender(&mut s, 0, &[hello_ok()]);
    assert!(
        matches!(&sender_actions(&outs)[..], [SenderAction::Ready { states }] if states[0].replica_cycle == 5),
        "{outs:?}"
    );
    // The other order.
    let mut s = sender(1 << 40);
    drain(|| s.poll());
    assert!(sender_actions(&to_sender(&mut s, 0, &[hello_ok()])).is_empty());
    let outs = to_sender(&mut s, 1, &[Msg::DiskState(state(5, ""))]);
    assert!(matches!(
        &sender_actions(&outs)[..],
        [SenderAction::Ready { .. }]
    ));
}

#[test]
fn without_open_with_hello_the_disks_are_opened_after_the_hellos_answer() {
    let mut s = Sender::new(
        SenderConfig {
            site_name: "primary".into(),
            software_version: "t".into(),
            vm: "vm1".into(),
            disks: vec![open()],
            last_point: 0,
            timeout_ns: 1 << 40,
            chunk_size: 4,
            commit_ahead: true,
            open_with_hello: false,
            follow: true,
            protocol_version: crate::wire::PROTOCOL_VERSION,
        },
        NOW,
    );
    let outs = drain(|| s.poll());
    assert!(matches!(&sent(&outs)[..], [Msg::Hello(_)]), "{outs:?}");
    let outs = to_sender(&mut s, 0, &[hello_ok()]);
    assert!(matches!(&sent(&outs)[..], [Msg::OpenDisk(_)]), "{outs:?}");
    let outs = to_sender(&mut s, 1, &[Msg::DiskState(state(5, ""))]);
    assert!(matches!(
        &sender_actions(&outs)[..],
        [SenderAction::Ready { .. }]
    ));
}

#[test]
fn an_old_receivers_refusal_of_the_early_open_disk_is_reported_as_the_version_mismatch() {
    let mut s = sender(1 << 40);
    drain(|| s.poll());
    // A version-6 receiver: the `OpenDisk` may be refused first ...
    let early = Msg::Error(wire::ErrorMsg::new(
        ErrorCode::Protocol,
        false,
        "stream 1: expected Hello, the peer sent OpenDisk",
    ));
    let outs = to_sender(&mut s, 1, &[early]);
    assert!(!s.is_closed(), "{outs:?}");
    // ... the `Hello`'s answer decides.
    let version = Msg::Error(wire::ErrorMsg::new(
        ErrorCode::Version,
        false,
        "protocol version mismatch: this side speaks 6, the peer 7",
    ));
    let outs = to_sender(&mut s, 0, &[version]);
    assert!(
        outs.iter().any(|o| matches!(
            o,
            Output::Close(e @ SessionError::Peer { code: ErrorCode::Version, .. })
                if e.kind() == ErrorKind::Refused { retryable: false }
        )),
        "{outs:?}"
    );
    // Accepted `Hello`, refused `OpenDisk`: that refusal closes it.
    let mut s = sender(1 << 40);
    drain(|| s.poll());
    let busy = Msg::Error(wire::ErrorMsg::new(ErrorCode::Internal, true, "no store"));
    to_sender(&mut s, 1, &[busy]);
    let outs = to_sender(&mut s, 0, &[hello_ok()]);
    assert!(
        outs.iter().any(|o| matches!(
            o,
            Output::Close(SessionError::Peer {
                code: ErrorCode::Internal,
                ..
            })
        )),
        "{outs:?}"
    );
    assert!(!s.is_ready());
}

/// A receiver with log 6 (base 5) on stream 2 and log 7 (base 6) behind
/// it on stream 3, both complete; the store op of log 6.
fn two_logs() -> (Receiver, OpId, Vec<Output<ReceiverAction>>) {
    let mut r = opened(5);
    let outs = on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1);
    let stored = stored_op(&outs);
    let outs = on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    (r, stored, outs)
}

fn staged(outs: &[Output<ReceiverAction>], cycle: u64) -> bool {
    actions(outs)
        .iter()
        .any(|a| matches!(a, ReceiverAction::StageLog { begin, .. } if begin.cycle == cycle))
}

/// The log of `cycle`'s `ApplyLog` op in `outs`.
fn apply_of(outs: &[Output<ReceiverAction>], want: u64) -> Option<OpId> {
    actions(outs).iter().find_map(|a| match a {
        ReceiverAction::ApplyLog { op, cycle, .. } if *cycle == want => Some(*op),
        _ => None,
    })
}

/// With a store that commits durable logs, the log behind a stored log is
/// staged and stored while that one is applied, acknowledged durable, and
/// applied only after it: never two applies of a disk at once.
#[test]
fn with_durable_commits_a_log_behind_is_stored_while_its_base_is_applied() {
    let mut r = opened_with(receiver_with(true), 5, wire::PROTOCOL_VERSION);
    let outs = on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1);
    let stored6 = stored_op(&outs);
    let outs = on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    assert!(
        outs.is_empty(),
        "log 7 waits while log 6 is stored: {outs:?}"
    );
    r.complete(NOW, stored6, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    let apply6 = apply_of(&outs, 6).expect("log 6 is applied");
    assert!(
        staged(&outs, 7),
        "log 7 is staged beside log 6's apply: {outs:?}"
    );
    // Everything of log 7 was there already: it is handed to the store.
    let stored7 = stored_op(&outs);
    r.complete(NOW, stored7, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 7,
                durable: true,
                applied: false,
                ..
            }]
        ),
        "{outs:?}"
    );
    assert_eq!(apply_of(&outs, 7), None, "not while log 6 is applied");
    assert!(!r.wants_data(StreamId(3)));
    // A third log waits until one of the two is applied.
    let outs = on(&mut r, 4, &behind_msgs(8, 7, b"klmnopqrst"));
    assert!(!staged(&outs, 8), "{outs:?}");
    r.complete(NOW, apply6, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    let a = acks(&outs);
    assert!(
        matches!(
            &a[..],
            [Ack {
                cycle: 6,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
    let apply7 = apply_of(&outs, 7).expect("log 7 is applied after log 6");
    assert!(staged(&outs, 8), "log 8 goes on: {outs:?}");
    r.complete(NOW, apply7, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 7,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
}

/// Directory store, trusted replica: log 6 stored and its apply asked
/// for, log 7 sent behind it and being stored. The receiver, the apply's
/// op and log 7's store op.
fn log_6_applying_with_7_behind() -> (Receiver, OpId, OpId) {
    let mut r = opened_with(receiver_with(true), 5, wire::PROTOCOL_VERSION);
    let outs = on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1);
    let stored6 = stored_op(&outs);
    on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    r.complete(NOW, stored6, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    let apply6 = apply_of(&outs, 6).expect("log 6 is applied");
    let stored7 = stored_op(&outs);
    (r, apply6, stored7)
}

fn disk_full() -> StoreFailure {
    StoreFailure {
        code: ErrorCode::NoSpace,
        retryable: true,
        message: "the disk is full".into(),
    }
}

/// Log `cycle` was not applied, and no replica was marked for a resync.
fn assert_neither_applied_nor_resynced(outs: &[Output<ReceiverAction>], cycle: u64) {
    assert_eq!(apply_of(outs, cycle), None, "{outs:?}");
    assert!(
        !actions(outs)
            .iter()
            .any(|a| matches!(a, ReceiverAction::MarkNeedsResync { .. })),
        "{outs:?}"
    );
}

/// When the apply of the stored base fails, the log stored behind it is
/// refused `Busy` (retryable: the sender sends both again), never applied
/// out of order (which would mark the replica for a resync).
#[test]
fn with_durable_commits_a_log_stored_behind_a_failed_apply_is_refused_busy() {
    let (mut r, apply6, stored7) = log_6_applying_with_7_behind();
    r.complete(NOW, stored7, StoreDone::LogStored(Ok(LogStored::Stored)));
    drain(|| r.poll());
    r.complete(NOW, apply6, StoreDone::LogApplied(Err(disk_full())));
    let outs = drain(|| r.poll());
    assert_neither_applied_nor_resynced(&outs, 7);
    let err = |stream| {
        sent_on(&outs, stream).into_iter().find_map(|m| match m {
            Msg::Error(e) => Some((e.code, e.retryable)),
            _ => None,
        })
    };
    assert_eq!(err(2), Some((ErrorCode::NoSpace, true)), "{outs:?}");
    assert_eq!(err(3), Some((ErrorCode::Busy, true)), "{outs:?}");
}

/// The same, with the base's apply failing while the log behind it is
/// still being stored: once stored it is refused `Busy`, not applied (the
/// store would find it out of order and the replica be marked for a
/// resync).
#[test]
fn with_durable_commits_a_log_stored_after_its_base_failed_is_refused_busy() {
    let (mut r, apply6, stored7) = log_6_applying_with_7_behind();
    r.complete(NOW, apply6, StoreDone::LogApplied(Err(disk_full())));
    drain(|| r.poll());
    r.complete(NOW, stored7, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert_neither_applied_nor_resynced(&outs, 7);
    assert_eq!(refusal(&outs), Some((ErrorCode::Busy, true)), "{outs:?}");
}

#[test]
fn a_second_log_waits_behind_the_first_and_is_applied_after_it() {
    let (mut r, stored, outs) = two_logs();
    assert!(
        outs.is_empty(),
        "nothing of log 7 before log 6 is applied: {outs:?}"
    );
    assert!(!r.wants_data(StreamId(3)));
    // A third log of the disk is refused (one waits at most), and a log
    // without the mark does not wait at all.
    let outs = on(&mut r, 4, &behind_msgs(8, 7, b"klmnopqrst"));
    assert_eq!(refusal(&outs), Some((ErrorCode::Busy, true)));
    let outs = on(&mut r, 5, &log_msgs(8, 7, b"klmnopqrst").1);
    assert_eq!(refusal(&outs), Some((ErrorCode::Busy, true)));
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert!(!staged(&outs, 7), "{outs:?}");
    let apply = apply_op(&outs).expect("log 6 is applied");
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    let a = acks(&outs);
    assert!(
        matches!(
            &a[..],
            [Ack {
                cycle: 6,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
    // Now log 7, as if it had just begun, after log 6's Ack.
    let ack_at = outs
        .iter()
        .position(|o| matches!(o, Output::Send { stream, .. } if stream.0 == 2))
        .expect("log 6's Ack");
    let stage_at = outs
        .iter()
        .position(|o| matches!(o, Output::Action(ReceiverAction::StageLog { begin, .. }) if begin.cycle == 7))
        .expect("log 7 staged");
    assert!(ack_at < stage_at);
    store_apply_and_ack(&mut r, &outs, 7);
}

#[test]
fn a_log_behind_one_of_another_cycle_or_behind_a_copy_is_refused_busy() {
    let mut r = opened(5);
    let stored = stored_op(&on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1));
    // Based on 5, not on the running log's 6.
    let outs = on(&mut r, 3, &behind_msgs(7, 5, b"abcdefghij"));
    assert_eq!(refusal(&outs), Some((ErrorCode::Busy, true)));
    assert!(!staged(&outs, 7));
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    assert!(apply_op(&drain(|| r.poll())).is_some());
}

#[test]
fn a_refused_first_log_refuses_the_one_behind_it_which_never_reaches_the_store() {
    // The store fails the first log.
    let (mut r, stored, _) = two_logs();
    let fail = crate::wire::session::StoreFailure {
        code: ErrorCode::Internal,
        retryable: true,
        message: "disk full".into(),
    };
    r.complete(NOW, stored, StoreDone::LogStored(Err(fail)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent_on(&outs, 2)[..], [Msg::Error(e)] if e.code == ErrorCode::Internal),
        "{outs:?}"
    );
    assert!(
        matches!(&sent_on(&outs, 3)[..], [Msg::Error(e)] if e.code == ErrorCode::Busy && e.retryable),
        "{outs:?}"
    );
    assert!(!staged(&outs, 7) && acks(&outs).is_empty(), "{outs:?}");
    // The sender resets the first log's stream (or the connection dies).
    let (mut r, _, _) = two_logs();
    r.handle(NOW, Event::Reset(StreamId(2)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent_on(&outs, 3)[..], [Msg::Error(_)]),
        "{outs:?}"
    );
    assert!(!staged(&outs, 7), "{outs:?}");
    // Then the disk takes log 6 again.
    let outs = on(&mut r, 4, &log_msgs(6, 5, b"0123456789").1);
    assert!(staged(&outs, 6), "{outs:?}");
}

#[test]
fn a_sender_sends_the_next_log_behind_one_all_sent_and_hands_both_back_if_the_first_fails() {
    let mut s = ready_sender(4, vec![open()], state(5, ""));
    drain(|| s.poll());
    for (cycle, base) in [(6, 5), (7, 6), (8, 7)] {
        let (mut begin, _) = log_msgs(cycle, base, b"0123456789");
        begin.total_len = 10;
        s.submit(Job::Log {
            begin,
            app_consistent: false,
        })
        .expect("submit");
    }
    let outs = send_log(&mut s, 10);
    let msgs = sent(&outs);
    let ends: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            Msg::LogEnd(e) => Some(e.cycle),
            _ => None,
        })
        .collect();
    assert_eq!(
        ends,
        vec![6, 7],
        "one log behind the first, not two: {msgs:?}"
    );
    assert!(!s.all_sent() && s.jobs_pending() == 3, "log 8 waits here");
    let stream_of = |cycle: u64| {
        outs.iter()
            .find_map(|o| match o {
                Output::Send { stream, bytes } => match decode(bytes) {
                    Ok(Some((Msg::LogBegin(b), _))) if b.cycle == cycle => Some(stream.0),
                    _ => None,
                },
                _ => None,
            })
            .expect("the log's stream")
    };
    let (s6, s7) = (stream_of(6), stream_of(7));
    // Only the log sent behind another carries the mark.
    let marks: Vec<(u64, bool)> = msgs
        .iter()
        .filter_map(|m| match m {
            Msg::LogBegin(b) => Some((b.cycle, b.behind)),
            _ => None,
        })
        .collect();
    assert_eq!(marks, vec![(6, false), (7, true)]);
    let err = Msg::Error(wire::ErrorMsg::new(ErrorCode::Internal, true, "disk full"));
    let outs = to_sender(&mut s, s6, &[err]);
    assert!(outs.contains(&Output::Reset(StreamId(s7))), "{outs:?}");
    let failed: Vec<(u64, Vec<u64>)> = sender_actions(&outs)
        .iter()
        .filter_map(|a| match a {
            SenderAction::JobFailed { job, rest, .. } => {
                Some((job.cycle(), rest.iter().map(Job::cycle).collect()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![(6, vec![7, 8])]);
    assert_eq!(s.jobs_pending(), 0, "{outs:?}");
}

#[test]
fn without_follow_a_sender_sends_the_next_log_only_after_the_ack() {
    let mut s = ready_sender_follow(4, vec![open()], state(5, ""), false);
    drain(|| s.poll());
    for (cycle, base) in [(6, 5), (7, 6)] {
        let (mut begin, _) = log_msgs(cycle, base, b"0123456789");
        begin.total_len = 10;
        s.submit(Job::Log {
            begin,
            app_consistent: false,
        })
        .expect("submit");
    }
    let outs = send_log(&mut s, 10);
    let begun: Vec<u64> = sent(&outs)
        .iter()
        .filter_map(|m| match m {
            Msg::LogBegin(b) => Some(b.cycle),
            _ => None,
        })
        .collect();
    assert_eq!(begun, vec![6], "{outs:?}");
}

#[test]
fn a_log_sent_behind_that_arrives_before_its_base_waits_for_it() {
    let mut r = opened(5);
    // QUIC does not order streams: log 7 (behind 6) comes first.
    let outs = on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    assert!(outs.is_empty(), "no refusal, nothing staged: {outs:?}");
    assert!(!r.wants_data(StreamId(3)));
    let outs = on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1);
    assert!(staged(&outs, 6) && !staged(&outs, 7), "{outs:?}");
    let stored = stored_op(&outs);
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let outs = drain(|| r.poll());
    assert!(!staged(&outs, 7), "{outs:?}");
    let apply = apply_op(&outs).expect("log 6 is applied");
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 6,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
    assert!(staged(&outs, 7), "log 7 begins once 6 is applied: {outs:?}");
    store_apply_and_ack(&mut r, &outs, 7);
}

/// A log 6 (base 5) whose chunk comes twice: refused.
fn refused_log_6(r: &mut Receiver) {
    let (_, mut msgs) = log_msgs(6, 5, b"0123456789");
    let dup = msgs[1].clone();
    msgs.insert(2, dup);
    let outs = on(r, 2, &msgs);
    assert!(
        matches!(refusal(&outs), Some((code, _)) if code != ErrorCode::ResyncRequired),
        "{outs:?}"
    );
}

fn marked_for_resync(outs: &[Output<ReceiverAction>]) -> bool {
    actions(outs)
        .iter()
        .any(|a| matches!(a, ReceiverAction::MarkNeedsResync { .. }))
}

#[test]
fn a_log_sent_behind_a_refused_base_is_busy_never_a_resync() {
    // tests/session_sim seed 3 of protocol 7: the base is refused, then
    // the log sent behind it arrives, the disk idle, the replica at 5.
    let mut r = opened(5);
    refused_log_6(&mut r);
    let outs = on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    assert_eq!(refusal(&outs), Some((ErrorCode::Busy, true)), "{outs:?}");
    assert!(!staged(&outs, 7) && !marked_for_resync(&outs), "{outs:?}");
    // Both are sent again and go in order.
    let outs = on(&mut r, 4, &log_msgs(6, 5, b"0123456789").1);
    assert!(staged(&outs, 6), "{outs:?}");
    // The same log without the mark is a chain the replica never had:
    // what the mark tells apart.
    let mut r = opened(5);
    refused_log_6(&mut r);
    let outs = on(&mut r, 3, &log_msgs(7, 6, b"abcdefghij").1);
    assert_eq!(refusal(&outs), Some((ErrorCode::ResyncRequired, true)));
    assert!(marked_for_resync(&outs));
}

#[test]
fn a_log_waiting_for_a_base_that_fails_or_never_comes_never_reaches_the_store() {
    // Log 7 waits for 6, then 6 arrives with a bad checksum.
    let mut r = opened(5);
    assert!(on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij")).is_empty());
    let (_, mut msgs) = log_msgs(6, 5, b"0123456789");
    if let Some(Msg::LogEnd(e)) = msgs.last_mut() {
        e.log_checksum ^= 1;
    }
    let outs = on(&mut r, 2, &msgs);
    assert!(
        matches!(&sent_on(&outs, 3)[..], [Msg::Error(e)] if e.code == ErrorCode::Busy && e.retryable),
        "{outs:?}"
    );
    assert!(!staged(&outs, 7) && !marked_for_resync(&outs), "{outs:?}");
    // The connection is lost with log 6 applied and log 7 waiting: nothing
    // of 7 reaches the store.
    let mut r = opened(5);
    assert!(on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij")).is_empty());
    let stored = stored_op(&on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1));
    r.complete(NOW, stored, StoreDone::LogStored(Ok(LogStored::Stored)));
    let apply = apply_op(&drain(|| r.poll())).expect("log 6 is applied");
    r.handle(NOW, Event::ConnectionLost);
    let mut outs = drain(|| r.poll());
    r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
    outs.extend(drain(|| r.poll()));
    assert!(!staged(&outs, 7) && acks(&outs).is_empty(), "{outs:?}");
    // The next connection finds the replica at 6 (or at 5 had the crash
    // come before the apply): both logs are sent again, 6 is applied at
    // most once and 7 goes on from it.
    for at in [6, 5] {
        let mut r = opened(at);
        let outs = on(&mut r, 2, &log_msgs(6, 5, b"0123456789").1);
        let outs = if at == 6 {
            assert!(
                matches!(
                    &acks(&outs)[..],
                    [Ack {
                        cycle: 6,
                        applied: true,
                        ..
                    }]
                ),
                "{outs:?}"
            );
            on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"))
        } else {
            assert!(on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij")).is_empty());
            r.complete(
                NOW,
                stored_op(&outs),
                StoreDone::LogStored(Ok(LogStored::Stored)),
            );
            let apply = apply_op(&drain(|| r.poll())).expect("log 6 is applied");
            r.complete(NOW, apply, StoreDone::LogApplied(Ok(())));
            drain(|| r.poll())
        };
        assert!(staged(&outs, 7), "replica at {at}: {outs:?}");
    }
}

#[test]
fn a_version_7_sender_is_answered_in_version_7() {
    let mut r = receiver();
    let v7 = Msg::Hello(Hello {
        protocol_version: 7,
        site_name: "primary".into(),
        software_version: "t".into(),
    });
    let outs = on(&mut r, 0, &[v7]);
    assert!(
        matches!(&sent(&outs)[..], [Msg::HelloOk(h)] if h.protocol_version == 7),
        "{outs:?}"
    );
}

#[test]
fn a_pair_ships_three_logs_of_a_disk_back_to_back_and_applies_them_in_order() {
    let mut s = sender(1 << 40);
    let mut r = receiver();
    let mut order = Vec::new();
    let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, .. } => Some((
                *op,
                StoreDone::DiskLoaded(Ok(DiskStatus {
                    replica_cycle: 5,
                    replica_size: 1 << 20,
                    ..DiskStatus::default()
                })),
            )),
            ReceiverAction::StageLog { begin, .. } => {
                order.push(("stage", begin.cycle));
                None
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                Some((*op, StoreDone::LogStored(Ok(LogStored::Stored))))
            }
            ReceiverAction::ApplyLog { op, cycle, .. } => {
                order.push(("apply", *cycle));
                Some((*op, StoreDone::LogApplied(Ok(()))))
            }
            ReceiverAction::CommitPoint { op, .. } => {
                Some((*op, StoreDone::PointCommitted(Ok(true))))
            }
            _ => None,
        }
    };
    let log = b"a sealed log".to_vec();
    let mut read = |_: ReadWhat, offset: u64, max: usize| {
        let e = (offset as usize + max).min(log.len());
        ReadData {
            offset,
            data: log[offset as usize..e].to_vec(),
            end: e == log.len(),
        }
    };
    pump(&mut s, &mut r, &mut store, &mut read);
    for (cycle, base) in [(6, 5), (7, 6), (8, 7)] {
        let (begin, _) = log_msgs(cycle, base, &log);
        s.submit(Job::Log {
            begin,
            app_consistent: false,
        })
        .expect("submit");
    }
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert_eq!(
        order,
        vec![
            ("stage", 6),
            ("apply", 6),
            ("stage", 7),
            ("apply", 7),
            ("stage", 8),
            ("apply", 8)
        ]
    );
    let applied: Vec<u64> = seen
        .iter()
        .filter_map(|a| match a {
            SenderAction::LogApplied { cycle, .. } => Some(*cycle),
            _ => None,
        })
        .collect();
    assert_eq!(applied, vec![6, 7, 8]);
    assert_eq!(s.last_point(), 8);
    assert!(s.is_idle());
}

/// The copy of cycle `cycle` of [`ID`], from `start_offset`.
fn copy_job(cycle: u64, start_offset: u64) -> Job {
    Job::Initial(wire::InitialBegin {
        disk_id: ID,
        cycle,
        disk_size: 1 << 20,
        start_offset,
    })
}

/// Where the messages of `outs` go: (stream, message), in order.
fn sent_with_streams<A>(outs: &[Output<A>]) -> Vec<(StreamId, Msg)> {
    let mut v = Vec::new();
    for o in outs {
        if let Output::Send { stream, bytes } = o {
            let mut at = 0;
            while let Ok(Some((m, n))) = decode(&bytes[at..]) {
                v.push((*stream, m));
                at += n;
            }
        }
    }
    v
}

#[test]
fn a_copys_point_leaves_with_its_end_before_its_ack() {
    // A new copy and a resumed one (read from 0 too).
    for start in [0u64, 8] {
        let mut s = ready_sender(4, vec![open()], state(0, ""));
        drain(|| s.poll());
        s.submit(copy_job(3, start)).expect("submit");
        let msgs = sent(&send_log(&mut s, 10));
        let end = msgs.iter().position(|m| matches!(m, Msg::InitialEnd(_)));
        let commit = msgs
            .iter()
            .position(|m| matches!(m, Msg::PointCommit(p) if p.cycle == 3 && !p.app_consistent));
        assert!(
            matches!((end, commit), (Some(e), Some(c)) if c > e),
            "the commit follows the copy's end, before its Ack: {msgs:?}"
        );
        assert!(!s.is_idle());
    }
    // `commit_ahead: false` (the measurement switch): after the Ack only.
    let mut s = ready_sender_with(4, vec![open()], vec![state(0, "")], true, false);
    drain(|| s.poll());
    s.submit(copy_job(3, 0)).expect("submit");
    let outs = send_log(&mut s, 10);
    assert!(
        !sent(&outs).iter().any(|m| matches!(m, Msg::PointCommit(_))),
        "{outs:?}"
    );
    let copy_stream = sent_with_streams(&outs)
        .iter()
        .find_map(|(sid, m)| matches!(m, Msg::InitialEnd(_)).then_some(*sid))
        .expect("the copy's stream");
    let outs = to_sender(
        &mut s,
        copy_stream.0,
        &[Msg::Ack(wire::Ack {
            disk_id: ID,
            cycle: 3,
            durable: true,
            applied: true,
        })],
    );
    assert!(
        sent(&outs)
            .iter()
            .any(|m| matches!(m, Msg::PointCommit(p) if p.cycle == 3)),
        "{outs:?}"
    );
}

#[test]
fn a_point_waits_for_a_copy_and_a_log_of_its_cycle_on_two_disks_and_is_not_app_consistent() {
    // A disk added to the VM (no replica) is copied; the other keeps its
    // replica (cycle 2) and sends the log of the copy's cut.
    const ID2: DiskId = [8u8; 16];
    let disk2 = OpenDisk {
        disk_name: "d1.img".into(),
        disk_id: ID2,
        ..open()
    };
    let states = vec![
        state(0, ""),
        DiskState {
            disk_id: ID2,
            ..state(2, "")
        },
    ];
    let mut s = ready_sender_with(4, vec![open(), disk2], states, true, true);
    let outs = drain(|| s.poll());
    assert!(!sent(&outs).iter().any(|m| matches!(m, Msg::PointCommit(_))));
    s.submit(copy_job(3, 0)).expect("submit");
    let outs = send_log(&mut s, 10);
    assert!(
        !sent(&outs).iter().any(|m| matches!(m, Msg::PointCommit(_))),
        "the other disk has not sent cycle 3: {outs:?}"
    );
    let (mut begin, _) = log_msgs(3, 2, b"0123456789");
    begin.disk_id = ID2;
    s.submit(Job::Log {
        begin,
        app_consistent: true,
    })
    .expect("submit");
    let msgs = sent(&send_log(&mut s, 10));
    let end = msgs.iter().position(|m| matches!(m, Msg::LogEnd(_)));
    let commit = msgs.iter().position(|m| {
        matches!(m, Msg::PointCommit(p)
            if p.cycle == 3 && !p.app_consistent && p.disks.len() == 2)
    });
    assert!(
        matches!((end, commit), (Some(e), Some(c)) if c > e),
        "the commit follows the last end of cycle 3, crash-consistent: {msgs:?}"
    );
}

/// A receiver (replica at 0) that got the whole copy of cycle 9 on stream
/// 2 and its point right behind it on stream 3; the op of the copy's
/// `FinishInitial`.
fn copy_then_point_ahead() -> (Receiver, OpId) {
    let mut r = opened(0);
    let outs = feed(&mut r, &[initial_begin(0)]);
    r.complete(NOW, begin_op(&outs), StoreDone::InitialBegun(Ok(0)));
    let outs = feed(
        &mut r,
        &[
            chunk(0, 1),
            Msg::InitialEnd(wire::InitialEnd {
                disk_id: ID,
                cycle: 9,
                disk_size: 1 << 20,
            }),
        ],
    );
    let finish = op_of(&outs, "the copy is finished", |a| match a {
        ReceiverAction::FinishInitial { op, cycle: 9, .. } => Some(*op),
        _ => None,
    });
    let outs = on(&mut r, 3, &[point_commit(9)]);
    r.handle(NOW, Event::Finished(StreamId(3)));
    let outs = [outs, drain(|| r.poll())].concat();
    assert_eq!(commit_op(&outs, 9), None, "held: the copy is not durable");
    assert!(sent(&outs).is_empty(), "{outs:?}");
    (r, finish)
}

#[test]
fn a_point_sent_with_a_copys_end_is_held_until_the_copy_is_finished_and_durable() {
    let (mut r, finish) = copy_then_point_ahead();
    r.complete(NOW, finish, StoreDone::InitialFinished(Ok(())));
    let outs = drain(|| r.poll());
    assert!(
        matches!(
            &acks(&outs)[..],
            [Ack {
                cycle: 9,
                applied: true,
                ..
            }]
        ),
        "{outs:?}"
    );
    let op = commit_op(&outs, 9).expect("committed once the copy is durable");
    r.complete(NOW, op, StoreDone::PointCommitted(Ok(true)));
    let outs = drain(|| r.poll());
    assert!(
        matches!(&sent(&outs)[..], [Msg::PointAck(p)] if p.cycle == 9),
        "{outs:?}"
    );
}

#[test]
fn a_point_held_behind_a_copy_that_fails_or_is_superseded_is_never_committed() {
    let superseded = StoreFailure {
        code: ErrorCode::InvalidState,
        retryable: true,
        message: "a newer copy of this disk began on another connection".into(),
    };
    let disk_full = StoreFailure {
        code: ErrorCode::Internal,
        retryable: true,
        message: "no space left".into(),
    };
    for f in [superseded, disk_full] {
        let (mut r, finish) = copy_then_point_ahead();
        r.complete(NOW, finish, StoreDone::InitialFinished(Err(f)));
        let outs = drain(|| r.poll());
        assert!(refusal(&outs).is_some(), "{outs:?}");
        assert_eq!(commit_op(&outs, 9), None, "{outs:?}");
        // The copy is resumed on the same connection before the sender's
        // reset of the point arrives (streams are not ordered): finished
        // at a newer cut, it does not commit the held point of cycle 9.
        let outs = on(
            &mut r,
            4,
            &[Msg::InitialBegin(wire::InitialBegin {
                disk_id: ID,
                cycle: 11,
                disk_size: 1 << 20,
                start_offset: 4096,
            })],
        );
        r.complete(NOW, begin_op(&outs), StoreDone::InitialBegun(Ok(4096)));
        let outs = on(
            &mut r,
            4,
            &[Msg::InitialEnd(wire::InitialEnd {
                disk_id: ID,
                cycle: 11,
                disk_size: 1 << 20,
            })],
        );
        let finish = op_of(&outs, "the resumed copy is finished", |a| match a {
            ReceiverAction::FinishInitial { op, cycle: 11, .. } => Some(*op),
            _ => None,
        });
        r.complete(NOW, finish, StoreDone::InitialFinished(Ok(())));
        let outs = drain(|| r.poll());
        // The disk moved past 9, so the store is asked; it decides (the
        // replica went from nothing to 11: no point at 9 can be made).
        // (Asked once more: a transfer ended after the first ask.)
        let mut outs = outs;
        let mut asked = 0;
        while let Some(op) = commit_op(&outs, 9) {
            asked += 1;
            assert!(asked <= 2, "asked again and again: {outs:?}");
            r.complete(NOW, op, StoreDone::PointCommitted(Ok(false)));
            outs = drain(|| r.poll());
        }
        assert!(
            matches!(&sent_on(&outs, 3)[..], [Msg::Error(_)]),
            "refused, never acknowledged: {outs:?}"
        );
        r.handle(NOW, Event::Reset(StreamId(3)));
        let outs = on(&mut r, 5, &[point_commit(11)]);
        let op = commit_op(&outs, 11).expect("the resumed copy's point");
        r.complete(NOW, op, StoreDone::PointCommitted(Ok(true)));
        let outs = drain(|| r.poll());
        assert!(
            matches!(&sent_on(&outs, 5)[..], [Msg::PointAck(p)] if p.cycle == 11),
            "{outs:?}"
        );
    }
}

#[test]
fn a_pair_withdraws_the_point_of_a_copy_that_fails_resumes_the_copy_and_commits_its_point() {
    let mut s = sender(1 << 40);
    let mut r = receiver();
    let mut fail_first = true;
    let mut commits = Vec::new();
    let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, .. } => {
                Some((*op, StoreDone::DiskLoaded(Ok(DiskStatus::default()))))
            }
            ReceiverAction::BeginInitial { op, begin, .. } => {
                Some((*op, StoreDone::InitialBegun(Ok(begin.start_offset))))
            }
            ReceiverAction::FinishInitial { op, .. } if fail_first => {
                fail_first = false;
                let f = StoreFailure {
                    code: ErrorCode::InvalidState,
                    retryable: true,
                    message: "superseded by a newer copy".into(),
                };
                Some((*op, StoreDone::InitialFinished(Err(f))))
            }
            ReceiverAction::FinishInitial { op, .. } => {
                Some((*op, StoreDone::InitialFinished(Ok(()))))
            }
            ReceiverAction::CommitPoint { op, cycle, .. } => {
                commits.push(*cycle);
                Some((*op, StoreDone::PointCommitted(Ok(true))))
            }
            _ => None,
        }
    };
    let mut read = |_: ReadWhat, offset: u64, max: usize| {
        let e = (offset as usize + max).min(10);
        ReadData {
            offset,
            data: vec![1u8; e - offset as usize],
            end: e == 10,
        }
    };
    pump(&mut s, &mut r, &mut store, &mut read);
    s.submit(copy_job(3, 0)).expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert!(
        matches!(&seen[..], [SenderAction::JobFailed { job, .. }] if job.cycle() == 3),
        "{seen:?}"
    );
    assert!(s.is_idle(), "the point went with the copy");
    // Resumed at a newer cut.
    s.submit(copy_job(4, 8)).expect("submit");
    let seen = pump(&mut s, &mut r, &mut store, &mut read);
    assert_eq!(
        seen,
        vec![
            SenderAction::InitialApplied {
                disk_id: ID,
                cycle: 4
            },
            SenderAction::PointCommitted {
                cycle: 4,
                app_consistent: false
            },
        ]
    );
    assert_eq!(commits, vec![4], "never a point of the failed copy");
    assert_eq!(s.last_point(), 4);
}

/// A pair whose receiver accepts protocol `newest` at most, the sender
/// speaking `version`: ships logs 6, 7 and 8 of one disk (each based on the
/// one before) and gives, per log staged, whether it came marked behind
/// another; and the sender's last point. Err: the sender's close.
fn three_logs_between(version: u16, newest: u16) -> Result<(Vec<bool>, u64), SessionError> {
    let mut s = Sender::new(
        SenderConfig {
            protocol_version: version,
            ..sender_config(1 << 40)
        },
        NOW,
    );
    let mut r = Receiver::new(ReceiverConfig {
        site_name: "secondary".into(),
        software_version: "t".into(),
        store_free: 0,
        newest_version: newest,
        commit_stored: false,
    });
    let mut behind = Vec::new();
    let mut store = |a: &ReceiverAction| -> Option<(OpId, StoreDone)> {
        match a {
            ReceiverAction::LoadDisk { op, .. } => Some((
                *op,
                StoreDone::DiskLoaded(Ok(DiskStatus {
                    replica_cycle: 5,
                    replica_size: 1 << 20,
                    ..DiskStatus::default()
                })),
            )),
            ReceiverAction::StageLog { begin, .. } => {
                behind.push(begin.behind);
                None
            }
            ReceiverAction::StoreLogDurably { op, .. } => {
                Some((*op, StoreDone::LogStored(Ok(LogStored::Stored))))
            }
            ReceiverAction::ApplyLog { op, .. } => Some((*op, StoreDone::LogApplied(Ok(())))),
            // The replicas' cycle 5 is committed again (last point 0),
            // then the logs' points.
            ReceiverAction::CommitPoint { op, .. } => {
                Some((*op, StoreDone::PointCommitted(Ok(true))))
            }
            _ => None,
        }
    };
    let log = b"a sealed log of a few chunks".to_vec();
    let mut read = |_: ReadWhat, offset: u64, max: usize| {
        let e = (offset as usize + max).min(log.len());
        ReadData {
            offset,
            data: log[offset as usize..e].to_vec(),
            end: e == log.len(),
        }
    };
    // The hand-shake first: a refused `Hello` closes the sender.
    try_pump(&mut s, &mut r, &mut store, &mut read)?;
    assert!(s.is_ready());
    for (cycle, base) in [(6, 5), (7, 6), (8, 7)] {
        let (begin, _) = log_msgs(cycle, base, &log);
        s.submit(Job::Log {
            begin,
            app_consistent: false,
        })
        .expect("submit");
    }
    try_pump(&mut s, &mut r, &mut store, &mut read)?;
    Ok((behind, s.last_point()))
}

#[test]
fn a_receiver_of_protocol_7_refuses_8_and_a_sender_speaking_7_sends_no_log_behind_another() {
    // An older receiver refuses the newest `Hello` by its code.
    match three_logs_between(wire::PROTOCOL_VERSION, 7) {
        Err(SessionError::Peer {
            code: ErrorCode::Version,
            ..
        }) => {}
        other => panic!("expected the receiver's version refusal, got {other:?}"),
    }
    // Protocol 8 end to end sends logs behind one another ...
    let (behind, last) = three_logs_between(wire::PROTOCOL_VERSION, wire::PROTOCOL_VERSION)
        .expect("protocol 8 pair");
    assert_eq!(behind.len(), 3);
    assert!(behind.iter().any(|b| *b), "{behind:?}");
    assert_eq!(last, 8);
    // ... a sender speaking 7 (asked to follow) never does: a version-7
    // receiver could not read the mark.
    let (behind, last) = three_logs_between(7, 7).expect("protocol 7 pair");
    assert_eq!(behind, vec![false, false, false]);
    assert_eq!(last, 8);
}

#[test]
fn a_sender_asked_for_a_protocol_it_does_not_speak_closes_at_once() {
    for v in [wire::MIN_PROTOCOL_VERSION - 1, wire::PROTOCOL_VERSION + 1] {
        let mut s = Sender::new(
            SenderConfig {
                protocol_version: v,
                ..sender_config(1 << 40)
            },
            NOW,
        );
        let outs = drain(|| s.poll());
        assert!(
            matches!(&outs[..], [Output::Close(SessionError::Misuse(_))]),
            "{v}: {outs:?}"
        );
    }
}

#[test]
fn a_log_marked_behind_on_a_version_7_connection_is_a_violation() {
    // Replica at 6: on a version-8 connection this log would be staged.
    let mut r = opened_in(6, 7);
    let outs = on(&mut r, 3, &behind_msgs(7, 6, b"abcdefghij"));
    assert!(
        !actions(&outs)
            .iter()
            .any(|a| matches!(a, ReceiverAction::StageLog { .. })),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Close(SessionError::Violation { .. })))
            || sent(&outs).iter().any(|m| matches!(m, Msg::Error(_))),
        "{outs:?}"
    );
}
