//! Fuzz the replication sessions (`vdrep::wire::session`): arbitrary bytes
//! drive a receiver (or a sender) through stream data, stream ends and
//! resets, and completions of its actions. Neither may panic, the receiver
//! must never hand the store a log whose bytes do not match its checksum,
//! never acknowledge a log that did not verify, and never apply a log
//! before the one it is based on (protocol 8: a log sent behind another,
//! `LogBegin::behind`, may wait for it), and never refuse a log sent behind
//! a base the store does not have yet as a diverged chain
//! (`ResyncRequired`); the sender must never report a log applied that it
//! was not asked to send.
//!
//! Input: byte 0 picks the end (even: receiver, odd: sender) and, for the
//! receiver, whether the `OpenDisk` overtakes the `Hello` (bit 1); then
//! commands of `op:u8 stream:u8 len:u8 bytes[len]`.
#![no_main]

use std::collections::{HashMap, HashSet};

use libfuzzer_sys::fuzz_target;
use vdrep::wire::session::{
    DiskStatus, Event, Job, LogStored, OpId, Output, ReadData, Receiver, ReceiverAction,
    ReceiverConfig, Sender, SenderAction, SenderConfig, StoreDone, StoreFailure, StreamId,
};
use vdrep::wire::{
    decode, encode, Ack, DiskKind, DiskState, ErrorCode, ErrorMsg, Hello, HelloOk, LogBegin,
    LogChunk, LogEnd, LogHasher, Msg, OpenDisk, PointAck, PROTOCOL_VERSION,
};

const ID: [u8; 16] = [7; 16];
const LOG: &[u8] = b"the only log the sender was asked to send";

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

fn hash(b: &[u8]) -> u128 {
    let mut h = LogHasher::new();
    h.update(b);
    h.digest128()
}

/// Commands decoded from the input.
fn commands(data: &[u8]) -> Vec<(u8, u64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 3 <= data.len() {
        let (op, stream, len) = (data[at], u64::from(data[at + 1] % 8), data[at + 2] as usize);
        at += 3;
        let end = (at + len).min(data.len());
        out.push((op, stream, &data[at..end]));
        at = end;
    }
    out
}

/// The receiver's side: a store that answers every action, and the checks.
#[derive(Default)]
struct Store {
    staged: HashMap<OpId, (u64, Vec<u8>)>,
    /// The base cycle of each log staged.
    bases: HashMap<u64, u64>,
    /// Cycles whose log verified and was stored, or whose copy finished.
    good: HashSet<u64>,
    /// The replica's cycle as the store knows it.
    at: u64,
    pending: Vec<(OpId, StoreDone)>,
}

impl Store {
    fn perform(&mut self, a: ReceiverAction, fail: bool) {
        let err = || StoreFailure {
            code: ErrorCode::Io,
            retryable: true,
            message: "injected".into(),
        };
        match a {
            ReceiverAction::LoadDisk { op, .. } => {
                let st = DiskStatus {
                    replica_cycle: self.at,
                    replica_size: 1 << 20,
                    ..DiskStatus::default()
                };
                self.pending.push((op, StoreDone::DiskLoaded(Ok(st))));
            }
            ReceiverAction::BeginInitial { op, begin, .. } => {
                self.pending
                    .push((op, StoreDone::InitialBegun(Ok(begin.start_offset))));
            }
            ReceiverAction::FinishInitial { op, cycle, .. } => {
                self.good.insert(cycle);
                self.at = cycle;
                self.pending.push((op, StoreDone::InitialFinished(Ok(()))));
            }
            ReceiverAction::StageLog { op, begin, .. } => {
                self.bases.insert(begin.cycle, begin.base_cycle);
                self.staged.insert(op, (begin.cycle, Vec::new()));
            }
            ReceiverAction::StageLogData { op, offset, data } => {
                let s = self.staged.get_mut(&op).expect("data of a staged log");
                assert_eq!(s.1.len() as u64, offset, "staged data in order");
                s.1.extend_from_slice(&data);
            }
            ReceiverAction::StoreLogDurably {
                op,
                cycle,
                log_checksum,
                ..
            } => {
                let (c, bytes) = self.staged.remove(&op).expect("a staged log");
                assert_eq!(c, cycle);
                assert_eq!(
                    hash(&bytes),
                    log_checksum,
                    "an unverified log reached the store"
                );
                if fail {
                    self.pending.push((op, StoreDone::LogStored(Err(err()))));
                } else {
                    self.good.insert(cycle);
                    self.pending
                        .push((op, StoreDone::LogStored(Ok(LogStored::Stored))));
                }
            }
            ReceiverAction::DiscardLog { op } => {
                self.staged.remove(&op);
            }
            ReceiverAction::ApplyLog { op, cycle, .. } => {
                assert!(self.good.contains(&cycle), "applying a log never stored");
                let base = self.bases.get(&cycle).copied().unwrap_or(0);
                assert!(
                    self.at >= base,
                    "log {cycle} applied before its base {base} (replica at {})",
                    self.at
                );
                self.at = self.at.max(cycle);
                self.pending.push((op, StoreDone::LogApplied(Ok(()))));
            }
            ReceiverAction::CommitPoint { op, .. } => {
                self.pending
                    .push((op, StoreDone::PointCommitted(Ok(!fail))));
            }
            ReceiverAction::HashBlocks { op, req, .. } => {
                let n = req.total_blocks() as usize;
                self.pending
                    .push((op, StoreDone::Hashed(Ok((1 << 20, vec![0; n])))));
            }
            ReceiverAction::PrepareResync { op, .. } => {
                self.pending.push((op, StoreDone::ResyncPrepared(Ok(()))));
            }
            ReceiverAction::Admin { op, .. } => {
                self.pending.push((op, StoreDone::AdminDone(Err(err()))));
            }
            ReceiverAction::WriteInitial { .. }
            | ReceiverAction::MarkNeedsResync { .. }
            | ReceiverAction::Refused { .. } => {}
        }
    }
}

fn receiver(cmds: &[(u8, u64, &[u8])], open_first: bool, commit_stored: bool) {
    let mut r = Receiver::new(ReceiverConfig {
        site_name: "secondary".into(),
        software_version: "fuzz".into(),
        store_free: 0,
        newest_version: vdrep::wire::PROTOCOL_VERSION,
        commit_stored,
    });
    let mut store = Store {
        at: 5,
        ..Store::default()
    };
    // A valid start, so that the fuzzer begins inside the conversation
    // (the `OpenDisk` sent with the `Hello` may overtake it).
    let hello = Msg::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        site_name: "primary".into(),
        software_version: "fuzz".into(),
    });
    let mut start = [(100, hello), (101, Msg::OpenDisk(open()))];
    if open_first {
        start.reverse();
    }
    for (sid, m) in &start {
        send(&mut r, 0, StreamId(*sid), m);
    }
    while let Some(o) = r.poll() {
        if let Output::Action(a) = o {
            store.perform(a, false);
        }
    }
    for (o, d) in std::mem::take(&mut store.pending) {
        r.complete(0, o, d);
    }
    let mut now = 0;
    // Per stream: the cycle of the log begun on it and the bytes sent.
    // Per stream: the cycle and length of the log begun on it, and the
    // bytes sent of it.
    let mut logs: HashMap<u64, (u64, usize, Vec<u8>)> = HashMap::new();
    // Per stream: the base of its first log if that was sent behind
    // another.
    let mut behind: HashMap<u64, Option<u64>> = HashMap::new();
    for &(op, sid, bytes) in cmds {
        now += 1;
        let stream = StreamId(sid);
        let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
        match op % 10 {
            0..=2 => r.handle(now, Event::Data { stream, bytes }),
            // A stream that ended may begin afresh: its next first
            // message is no longer known here, not checked.
            3 => {
                behind.insert(sid, None);
                r.handle(now, Event::Finished(stream));
            }
            4 => {
                behind.insert(sid, None);
                r.handle(now, Event::Reset(stream));
            }
            5 => {
                if !store.pending.is_empty() {
                    let i = b(0) as usize % store.pending.len();
                    let (o, d) = store.pending.remove(i);
                    r.complete(now, o, d);
                }
            }
            6 => {
                if b(0) == 0xff {
                    r.handle(now, Event::ConnectionLost);
                }
            }
            // Well-formed log messages with fuzzed fields, so that the
            // fuzzer reaches logs that verify and logs that almost do.
            7 => {
                // Mostly 6 (the replica is at 5) and 7 (behind it),
                // sometimes a resend or a gap.
                let cycle = [6, 6, 5, 7, 7, 8][usize::from(b(0) % 6)];
                let base = if b(1) % 4 == 0 {
                    u64::from(b(1))
                } else {
                    cycle - 1
                };
                let begin = LogBegin {
                    disk_id: ID,
                    disk_name: "d0.img".into(),
                    cycle,
                    base_cycle: base.min(cycle - 1),
                    block_size: 4096,
                    base_size: 1 << 20,
                    disk_size: 1 << 20,
                    cut_unix_ns: 0,
                    total_len: 1 + u64::from(b(2) % 32),
                    behind: b(2) & 0x80 != 0,
                };
                // The receiver decides on a stream's first message: only
                // a first `LogBegin` sent behind is checked.
                behind
                    .entry(sid)
                    .or_insert(begin.behind.then_some(begin.base_cycle));
                logs.insert(sid, (cycle, begin.total_len as usize, Vec::new()));
                send(&mut r, now, stream, &Msg::LogBegin(begin));
            }
            8 => {
                let (cycle, total, sent) = logs.entry(sid).or_default();
                let mut data = bytes.get(1..).unwrap_or_default().to_vec();
                let offset = if b(0) % 8 == 0 {
                    u64::from(b(0))
                } else {
                    // Mostly the rest of the log, from the fuzzed bytes.
                    if b(0) % 2 == 1 {
                        data.resize(total.saturating_sub(sent.len()).max(1), 0);
                    }
                    sent.len() as u64
                };
                sent.extend_from_slice(&data);
                let c = LogChunk {
                    disk_id: ID,
                    cycle: *cycle,
                    offset_in_log: offset,
                    data,
                };
                send(&mut r, now, stream, &Msg::LogChunk(c));
            }
            _ => {
                let (cycle, _, sent) = logs.remove(&sid).unwrap_or_default();
                let good = hash(&sent);
                let e = LogEnd {
                    disk_id: ID,
                    cycle,
                    total_len: if b(0) % 8 == 1 {
                        u64::from(b(1))
                    } else {
                        sent.len() as u64
                    },
                    log_checksum: if b(0) % 8 == 2 { good ^ 1 } else { good },
                };
                send(&mut r, now, stream, &Msg::LogEnd(e));
            }
        }
        while let Some(o) = r.poll() {
            match o {
                Output::Action(a) => store.perform(a, bytes.last() == Some(&0xee)),
                Output::Send { stream, bytes } => {
                    if let Ok(Some((Msg::Error(e), _))) = decode(&bytes) {
                        if let Some(&Some(base)) = behind.get(&stream.0) {
                            assert!(
                                !(base > store.at && e.code == ErrorCode::ResyncRequired),
                                "a log sent behind log {base}, which the replica (at {}) does not have yet, was refused as a diverged chain: {}",
                                store.at,
                                e.message
                            );
                        }
                    }
                    if let Ok(Some((Msg::Ack(a), _))) = decode(&bytes) {
                        if a.durable {
                            assert!(
                                store.good.contains(&a.cycle) || a.cycle <= store.at,
                                "acknowledged log {} that did not verify",
                                a.cycle
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Feed one encoded message (nothing if the fields do not encode).
fn send(r: &mut Receiver, now: u64, stream: StreamId, msg: &Msg) {
    let mut b = Vec::new();
    if encode(msg, &mut b).is_ok() {
        r.handle(now, Event::Data { stream, bytes: &b });
    }
}

fn sender(cmds: &[(u8, u64, &[u8])]) {
    let mut s = Sender::new(
        SenderConfig {
            site_name: "primary".into(),
            software_version: "fuzz".into(),
            vm: "vm1".into(),
            disks: vec![open()],
            last_point: 0,
            timeout_ns: 50,
            chunk_size: 7,
            commit_ahead: true,
            open_with_hello: true,
            follow: true,
            protocol_version: vdrep::wire::PROTOCOL_VERSION,
        },
        0,
    );
    let begin = LogBegin {
        disk_id: ID,
        disk_name: "d0.img".into(),
        cycle: 6,
        base_cycle: 5,
        block_size: 4096,
        base_size: 1 << 20,
        disk_size: 1 << 20,
        cut_unix_ns: 0,
        total_len: LOG.len() as u64,
        behind: false,
    };
    // Two logs: the second goes behind the first once it is all sent.
    let next = LogBegin {
        cycle: 7,
        base_cycle: 6,
        ..begin.clone()
    };
    for begin in [begin, next] {
        let _ = s.submit(Job::Log {
            begin,
            app_consistent: false,
        });
    }
    let mut now = 0;
    for &(op, stream, bytes) in cmds {
        now += 1;
        let stream = StreamId(stream);
        let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
        match op % 7 {
            0..=2 => s.handle(now, Event::Data { stream, bytes }),
            3 => s.handle(now, Event::Finished(stream)),
            4 => s.handle(now, Event::Reset(stream)),
            5 => s.handle(now, Event::Tick),
            // Well-formed answers with fuzzed fields.
            _ => {
                let cycle = u64::from(b(1) % 8);
                let msg = match b(0) % 5 {
                    0 => Msg::HelloOk(HelloOk {
                        protocol_version: PROTOCOL_VERSION,
                        site_name: "secondary".into(),
                        software_version: "fuzz".into(),
                        store_free: 0,
                    }),
                    1 => Msg::DiskState(DiskState {
                        disk_id: ID,
                        replica_cycle: cycle,
                        replica_size: 1 << 20,
                        copy_cycle: 0,
                        resume_offset: 0,
                        needs_resync: String::new(),
                    }),
                    2 => Msg::Ack(Ack {
                        disk_id: ID,
                        cycle,
                        durable: b(2) & 1 != 0,
                        applied: b(2) & 2 != 0,
                    }),
                    3 => Msg::PointAck(PointAck {
                        vm: "vm1".into(),
                        cycle,
                    }),
                    // A refusal (of the `Hello`, an early `OpenDisk`, a log).
                    _ => Msg::Error(ErrorMsg::new(
                        [ErrorCode::Version, ErrorCode::Protocol, ErrorCode::Busy]
                            [usize::from(b(2) % 3)],
                        b(2) & 4 != 0,
                        "fuzz",
                    )),
                };
                let mut e = Vec::new();
                if encode(&msg, &mut e).is_ok() {
                    s.handle(now, Event::Data { stream, bytes: &e });
                }
            }
        }
        while let Some(o) = s.poll() {
            if let Output::Action(a) = o {
                match a {
                    SenderAction::Read {
                        id, offset, max, ..
                    } => {
                        let st = (offset as usize).min(LOG.len());
                        let e = (st + max).min(LOG.len());
                        s.complete_read(
                            now,
                            id,
                            Ok(ReadData {
                                offset,
                                data: LOG[st..e].to_vec(),
                                end: e == LOG.len(),
                            }),
                        );
                    }
                    SenderAction::LogApplied { disk_id, cycle }
                    | SenderAction::LogDurable { disk_id, cycle } => {
                        assert!(
                            disk_id == ID && (cycle == 6 || cycle == 7),
                            "a log nobody sent"
                        );
                    }
                    _ => {}
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cmds = commands(rest);
    if mode % 2 == 0 {
        receiver(&cmds, mode & 2 != 0, mode & 4 != 0);
    } else {
        sender(&cmds);
    }
});
