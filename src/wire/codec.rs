//! Sans-IO framing: [`encode`] a message into bytes, [`decode`] one from a
//! buffer. See the parent module for the layout.

use super::*;
use crate::hrl::format::{MAX_BLOCK_SIZE, MAX_DISK_SIZE, MIN_BLOCK_SIZE};
use xxhash_rust::xxh3::Xxh3;

/// Message type codes (the byte after the frame length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MsgType {
    Hello = 0x01,
    HelloOk = 0x02,
    Error = 0x03,
    OpenDisk = 0x10,
    DiskState = 0x11,
    InitialBegin = 0x12,
    InitialChunk = 0x13,
    InitialEnd = 0x14,
    LogBegin = 0x20,
    LogChunk = 0x21,
    LogEnd = 0x22,
    Ack = 0x23,
    PointCommit = 0x30,
    PointAck = 0x31,
    BlockHashReq = 0x40,
    BlockHashes = 0x41,
    /// A site-to-site administrative request (failover, reverse), JSON.
    Admin = 0x50,
    /// The JSON answer to an [`MsgType::Admin`] request.
    AdminOk = 0x51,
    ResyncEnd = 0x42,
}

impl MsgType {
    pub fn from_code(c: u8) -> Option<Self> {
        use MsgType::*;
        Some(match c {
            0x01 => Hello,
            0x02 => HelloOk,
            0x03 => Error,
            0x10 => OpenDisk,
            0x11 => DiskState,
            0x12 => InitialBegin,
            0x13 => InitialChunk,
            0x14 => InitialEnd,
            0x20 => LogBegin,
            0x21 => LogChunk,
            0x22 => LogEnd,
            0x23 => Ack,
            0x30 => PointCommit,
            0x31 => PointAck,
            0x40 => BlockHashReq,
            0x41 => BlockHashes,
            0x50 => Admin,
            0x51 => AdminOk,
            0x42 => ResyncEnd,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use MsgType::*;
        match self {
            Hello => "Hello",
            HelloOk => "HelloOk",
            Error => "Error",
            OpenDisk => "OpenDisk",
            DiskState => "DiskState",
            InitialBegin => "InitialBegin",
            InitialChunk => "InitialChunk",
            InitialEnd => "InitialEnd",
            LogBegin => "LogBegin",
            LogChunk => "LogChunk",
            LogEnd => "LogEnd",
            Ack => "Ack",
            PointCommit => "PointCommit",
            PointAck => "PointAck",
            BlockHashReq => "BlockHashReq",
            BlockHashes => "BlockHashes",
            Admin => "Admin",
            AdminOk => "AdminOk",
            ResyncEnd => "ResyncEnd",
        }
    }
}

// ---------------------------------------------------------------------------
// Writing

fn put_u16(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put_bool(o: &mut Vec<u8>, v: bool) {
    o.push(v as u8);
}
/// Caller has checked `s.len() <= u16::MAX` (validate runs first).
fn put_str(o: &mut Vec<u8>, s: &str) {
    put_u16(o, s.len() as u16);
    o.extend_from_slice(s.as_bytes());
}

fn malformed(msg: &'static str, what: impl Into<String>) -> WireError {
    WireError::Malformed {
        msg,
        what: what.into(),
    }
}

/// Checksum of a chunk: its fixed fields as encoded, then the data.
fn chunk_checksum(fixed: &[u8], data: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(fixed);
    h.update(data);
    h.digest()
}

/// Append `msg` as one frame to `out`. The message is validated with the
/// same rules as [`decode`] applies, so nothing is sent that the peer would
/// refuse; on error `out` is left as it was.
pub fn encode(msg: &Msg, out: &mut Vec<u8>) -> Result<(), WireError> {
    validate(msg)?;
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, msg.msg_type() as u8]);
    encode_payload(msg, out);
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(malformed(
            msg.name(),
            format!("encodes to {len} bytes, more than MAX_FRAME ({MAX_FRAME})"),
        ));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

fn encode_payload(msg: &Msg, o: &mut Vec<u8>) {
    match msg {
        Msg::Hello(h) => {
            put_u16(o, h.protocol_version);
            put_str(o, &h.site_name);
            put_str(o, &h.software_version);
        }
        Msg::HelloOk(h) => {
            put_u16(o, h.protocol_version);
            put_str(o, &h.site_name);
            put_str(o, &h.software_version);
            put_u64(o, h.store_free);
        }
        Msg::Error(e) => {
            put_u16(o, e.code.code());
            put_bool(o, e.retryable);
            put_str(o, &e.message);
        }
        Msg::OpenDisk(d) => {
            put_str(o, &d.vm);
            put_str(o, &d.disk_name);
            o.extend_from_slice(&d.disk_id);
            put_u32(o, d.block_size);
            put_u64(o, d.disk_size);
            o.push(d.kind.code());
        }
        Msg::DiskState(d) => {
            o.extend_from_slice(&d.disk_id);
            put_u64(o, d.replica_cycle);
            put_u64(o, d.replica_size);
            put_u64(o, d.copy_cycle);
            put_u64(o, d.resume_offset);
            put_str(o, &d.needs_resync);
        }
        Msg::InitialBegin(b) => {
            o.extend_from_slice(&b.disk_id);
            put_u64(o, b.cycle);
            put_u64(o, b.disk_size);
            put_u64(o, b.start_offset);
        }
        Msg::InitialChunk(c) => {
            let fixed_start = o.len();
            o.extend_from_slice(&c.disk_id);
            put_u64(o, c.offset);
            put_u32(o, c.length);
            o.push(c.encoding.code());
            let sum = chunk_checksum(&o[fixed_start..], &c.data);
            put_u64(o, sum);
            put_u32(o, c.data.len() as u32);
            o.extend_from_slice(&c.data);
        }
        Msg::InitialEnd(e) => {
            o.extend_from_slice(&e.disk_id);
            put_u64(o, e.cycle);
            put_u64(o, e.disk_size);
        }
        Msg::LogBegin(b) => {
            o.extend_from_slice(&b.disk_id);
            put_str(o, &b.disk_name);
            put_u64(o, b.cycle);
            put_u64(o, b.base_cycle);
            put_u32(o, b.block_size);
            put_u64(o, b.base_size);
            put_u64(o, b.disk_size);
            put_u64(o, b.cut_unix_ns);
            put_u64(o, b.total_len);
            // Trailing, only when set: any other log is a version-7 one.
            if b.behind {
                o.push(1);
            }
        }
        Msg::LogChunk(c) => {
            let fixed_start = o.len();
            o.extend_from_slice(&c.disk_id);
            put_u64(o, c.cycle);
            put_u64(o, c.offset_in_log);
            let sum = chunk_checksum(&o[fixed_start..], &c.data);
            put_u64(o, sum);
            put_u32(o, c.data.len() as u32);
            o.extend_from_slice(&c.data);
        }
        Msg::LogEnd(e) => {
            o.extend_from_slice(&e.disk_id);
            put_u64(o, e.cycle);
            put_u64(o, e.total_len);
            o.extend_from_slice(&e.log_checksum.to_le_bytes());
        }
        Msg::Ack(a) => {
            o.extend_from_slice(&a.disk_id);
            put_u64(o, a.cycle);
            put_bool(o, a.durable);
            put_bool(o, a.applied);
        }
        Msg::PointCommit(p) => {
            put_str(o, &p.vm);
            put_u64(o, p.cycle);
            put_bool(o, p.app_consistent);
            put_u16(o, p.disks.len() as u16);
            for d in &p.disks {
                o.extend_from_slice(&d.disk_id);
                put_u64(o, d.cycle);
            }
            put_bool(o, p.definition.is_some());
            if let Some(x) = &p.definition {
                put_u32(o, x.len() as u32);
                o.extend_from_slice(x.as_bytes());
            }
            // The group is a trailing field, present only for a group
            // point: a point without one is byte for byte a version-5
            // point (one encoding per message; old receivers accept it).
            if let Some(g) = &p.group {
                put_bool(o, true);
                put_str(o, &g.name);
                put_str(o, &g.origin);
                put_u16(o, g.members.len() as u16);
                for m in &g.members {
                    put_str(o, m);
                }
            }
        }
        Msg::PointAck(p) => {
            put_str(o, &p.vm);
            put_u64(o, p.cycle);
        }
        Msg::Admin(s) | Msg::AdminOk(s) => put_str(o, s),
        Msg::BlockHashReq(r) => {
            o.extend_from_slice(&r.disk_id);
            put_u64(o, r.replica_cycle);
            put_u32(o, r.block_size);
            put_u32(o, r.runs.len() as u32);
            for run in &r.runs {
                put_u64(o, run.offset);
                put_u32(o, run.blocks);
            }
        }
        Msg::BlockHashes(h) => {
            o.extend_from_slice(&h.disk_id);
            put_u64(o, h.replica_cycle);
            put_u64(o, h.replica_size);
            put_u32(o, h.hashes.len() as u32);
            o.reserve(h.hashes.len() * 16);
            for d in &h.hashes {
                o.extend_from_slice(&d.to_le_bytes());
            }
        }
        Msg::ResyncEnd(e) => {
            o.extend_from_slice(&e.disk_id);
            put_u64(o, e.replica_cycle);
            put_u64(o, e.cycle);
            put_u64(o, e.blocks_compared);
            put_u64(o, e.blocks_differ);
        }
    }
}

// ---------------------------------------------------------------------------
// Reading

struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
    msg: &'static str,
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        match end {
            Some(end) => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(malformed(
                self.msg,
                format!(
                    "payload ends inside {what} (needs {n} bytes at offset {}, has {})",
                    self.pos,
                    self.b.len().saturating_sub(self.pos)
                ),
            )),
        }
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], WireError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn u128(&mut self, what: &str) -> Result<u128, WireError> {
        Ok(u128::from_le_bytes(self.arr(what)?))
    }
    fn id(&mut self, what: &str) -> Result<DiskId, WireError> {
        self.arr(what)
    }
    fn bool(&mut self, what: &str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(malformed(self.msg, format!("{what} is {v}, not 0 or 1"))),
        }
    }
    fn str(&mut self, cap: usize, what: &str) -> Result<String, WireError> {
        let n = self.u16(what)? as usize;
        if n > cap {
            return Err(malformed(
                self.msg,
                format!("{what} is {n} bytes long; at most {cap} are allowed"),
            ));
        }
        let s = self.take(n, what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(malformed(self.msg, format!("{what} is not valid UTF-8"))),
        }
    }
    /// A domain definition: `u32 n | n bytes of UTF-8`, `n <= MAX_DEFINITION`.
    fn definition(&mut self) -> Result<String, WireError> {
        let n = self.u32("definition")? as usize;
        if n > MAX_DEFINITION {
            return Err(malformed(
                self.msg,
                format!("definition is {n} bytes long; at most {MAX_DEFINITION} are allowed"),
            ));
        }
        match std::str::from_utf8(self.take(n, "definition")?) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(malformed(self.msg, "definition is not valid UTF-8")),
        }
    }
    fn data(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let n = self.u32(what)? as usize;
        if n > MAX_DATA {
            return Err(malformed(
                self.msg,
                format!("{what} is {n} bytes long; at most {MAX_DATA} are allowed"),
            ));
        }
        self.take(n, what)
    }
    /// A chunk's checksum and data: the checksum covers the fixed fields
    /// read since `fixed_start`, then the data.
    fn checked_data(&mut self, fixed_start: usize) -> Result<&'a [u8], WireError> {
        let b = self.b;
        let fixed = &b[fixed_start..self.pos];
        let sum = self.u64("checksum")?;
        let data = self.data("data")?;
        if chunk_checksum(fixed, data) != sum {
            return Err(WireError::Checksum { msg: self.msg });
        }
        Ok(data)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(malformed(
                self.msg,
                format!(
                    "{} unexpected bytes after the message",
                    self.b.len() - self.pos
                ),
            ))
        }
    }
}

fn encoding_of(code: u8, msg: &'static str) -> Result<Encoding, WireError> {
    Encoding::from_code(code).ok_or_else(|| malformed(msg, format!("unknown data encoding {code}")))
}

/// Decode the first frame of `buf`.
///
/// `Ok(None)`: `buf` does not hold a whole frame yet (read more bytes).
/// `Ok(Some((msg, n)))`: a message and the number of bytes it used.
/// `Err`: the bytes are not a valid frame; the stream cannot be resumed.
/// An oversized length is refused as soon as its 4 bytes are present,
/// before anything is buffered for it. Never panics.
pub fn decode(buf: &[u8]) -> Result<Option<(Msg, usize)>, WireError> {
    let Some(len_bytes) = buf.get(..4) else {
        return Ok(None);
    };
    let mut l = [0u8; 4];
    l.copy_from_slice(len_bytes);
    let len = u32::from_le_bytes(l) as usize;
    check_frame_len(len)?;
    let total = 4 + len;
    let Some(frame) = buf.get(4..total) else {
        return Ok(None);
    };
    let msg = decode_body(frame)?;
    Ok(Some((msg, total)))
}

/// Check a frame length field (type + payload bytes).
pub(crate) fn check_frame_len(len: usize) -> Result<(), WireError> {
    if len == 0 {
        return Err(WireError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME,
        });
    }
    Ok(())
}

/// Decode a frame's type byte + payload (the length prefix removed).
pub(crate) fn decode_body(frame: &[u8]) -> Result<Msg, WireError> {
    let (&code, payload) = frame.split_first().ok_or(WireError::EmptyFrame)?;
    let ty = MsgType::from_code(code).ok_or(WireError::UnknownType(code))?;
    let name = ty.name();
    let mut r = Rd {
        b: payload,
        pos: 0,
        msg: name,
    };
    // One arm per message, field by field in wire order: a format table
    // (the arms look alike; `encode` is the mirror image).
    let msg = match ty {
        MsgType::Hello => Msg::Hello(Hello {
            protocol_version: r.u16("protocol_version")?,
            site_name: r.str(crate::transport::keys::MAX_SITE_NAME, "site_name")?,
            software_version: r.str(MAX_SOFTWARE_VERSION, "software_version")?,
        }),
        MsgType::HelloOk => Msg::HelloOk(HelloOk {
            protocol_version: r.u16("protocol_version")?,
            site_name: r.str(crate::transport::keys::MAX_SITE_NAME, "site_name")?,
            software_version: r.str(MAX_SOFTWARE_VERSION, "software_version")?,
            store_free: r.u64("store_free")?,
        }),
        MsgType::Error => Msg::Error(ErrorMsg {
            code: ErrorCode::from_code(r.u16("code")?),
            retryable: r.bool("retryable")?,
            message: r.str(MAX_ERROR_MESSAGE, "message")?,
        }),
        MsgType::OpenDisk => Msg::OpenDisk(OpenDisk {
            vm: r.str(MAX_NAME, "vm")?,
            disk_name: r.str(MAX_NAME, "disk_name")?,
            disk_id: r.id("disk_id")?,
            block_size: r.u32("block_size")?,
            disk_size: r.u64("disk_size")?,
            kind: {
                let k = r.u8("kind")?;
                DiskKind::from_code(k)
                    .ok_or_else(|| malformed(name, format!("unknown disk kind {k}")))?
            },
        }),
        MsgType::DiskState => Msg::DiskState(DiskState {
            disk_id: r.id("disk_id")?,
            replica_cycle: r.u64("replica_cycle")?,
            replica_size: r.u64("replica_size")?,
            copy_cycle: r.u64("copy_cycle")?,
            resume_offset: r.u64("resume_offset")?,
            needs_resync: r.str(MAX_ERROR_MESSAGE, "needs_resync")?,
        }),
        MsgType::InitialBegin => Msg::InitialBegin(InitialBegin {
            disk_id: r.id("disk_id")?,
            cycle: r.u64("cycle")?,
            disk_size: r.u64("disk_size")?,
            start_offset: r.u64("start_offset")?,
        }),
        MsgType::InitialChunk => {
            let fixed_start = r.pos;
            let disk_id = r.id("disk_id")?;
            let offset = r.u64("offset")?;
            let length = r.u32("length")?;
            let encoding = encoding_of(r.u8("encoding")?, name)?;
            let data = r.checked_data(fixed_start)?;
            Msg::InitialChunk(InitialChunk {
                disk_id,
                offset,
                length,
                encoding,
                data: data.to_vec(),
            })
        }
        MsgType::InitialEnd => Msg::InitialEnd(InitialEnd {
            disk_id: r.id("disk_id")?,
            cycle: r.u64("cycle")?,
            disk_size: r.u64("disk_size")?,
        }),
        MsgType::LogBegin => Msg::LogBegin(LogBegin {
            disk_id: r.id("disk_id")?,
            disk_name: r.str(MAX_NAME, "disk_name")?,
            cycle: r.u64("cycle")?,
            base_cycle: r.u64("base_cycle")?,
            block_size: r.u32("block_size")?,
            base_size: r.u64("base_size")?,
            disk_size: r.u64("disk_size")?,
            cut_unix_ns: r.u64("cut_unix_ns")?,
            total_len: r.u64("total_len")?,
            // Absent: not behind (a 0 flag would be a second encoding).
            behind: if r.pos < r.b.len() {
                if !r.bool("behind")? {
                    return Err(malformed(
                        name,
                        "a log not sent behind another ends after total_len (behind 0 is not allowed)",
                    ));
                }
                true
            } else {
                false
            },
        }),
        MsgType::LogChunk => {
            let fixed_start = r.pos;
            let disk_id = r.id("disk_id")?;
            let cycle = r.u64("cycle")?;
            let offset_in_log = r.u64("offset_in_log")?;
            let data = r.checked_data(fixed_start)?;
            Msg::LogChunk(LogChunk {
                disk_id,
                cycle,
                offset_in_log,
                data: data.to_vec(),
            })
        }
        MsgType::LogEnd => Msg::LogEnd(LogEnd {
            disk_id: r.id("disk_id")?,
            cycle: r.u64("cycle")?,
            total_len: r.u64("total_len")?,
            log_checksum: r.u128("log_checksum")?,
        }),
        MsgType::Ack => Msg::Ack(Ack {
            disk_id: r.id("disk_id")?,
            cycle: r.u64("cycle")?,
            durable: r.bool("durable")?,
            applied: r.bool("applied")?,
        }),
        MsgType::PointCommit => {
            let vm = r.str(MAX_NAME, "vm")?;
            let cycle = r.u64("cycle")?;
            let app_consistent = r.bool("app_consistent")?;
            let n = r.u16("disk count")? as usize;
            if n > MAX_POINT_DISKS {
                return Err(malformed(
                    name,
                    format!("{n} disks; at most {MAX_POINT_DISKS} are allowed"),
                ));
            }
            // n <= 4096 and every entry is checked against the bytes
            // present, so this allocation is bounded.
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskCycle {
                    disk_id: r.id("disk_id")?,
                    cycle: r.u64("disk cycle")?,
                });
            }
            let definition = if r.bool("has_definition")? {
                Some(r.definition()?)
            } else {
                None
            };
            // A point without a group ends here (as a version-5 point);
            // a group, when present, is flagged 1 (a 0 flag would be a
            // second encoding of "no group").
            let group = if r.pos < r.b.len() {
                if !r.bool("has_group")? {
                    return Err(malformed(
                        name,
                        "a point without a group ends after its definition (has_group 0 is not allowed)",
                    ));
                }
                let gname = r.str(MAX_COMPONENT, "group")?;
                let origin = r.str(MAX_COMPONENT, "group origin")?;
                let m = r.u16("member count")? as usize;
                if m == 0 || m > MAX_GROUP_MEMBERS {
                    return Err(malformed(
                        name,
                        format!("{m} group members; 1..={MAX_GROUP_MEMBERS} are allowed"),
                    ));
                }
                let mut members = Vec::with_capacity(m);
                for _ in 0..m {
                    members.push(r.str(MAX_NAME, "group member")?);
                }
                Some(Box::new(PointGroup {
                    name: gname,
                    origin,
                    members,
                }))
            } else {
                None
            };
            Msg::PointCommit(PointCommit {
                vm,
                cycle,
                app_consistent,
                disks,
                definition,
                group,
            })
        }
        MsgType::PointAck => Msg::PointAck(PointAck {
            vm: r.str(MAX_NAME, "vm")?,
            cycle: r.u64("cycle")?,
        }),
        MsgType::Admin => Msg::Admin(r.str(MAX_ADMIN, "request")?),
        MsgType::AdminOk => Msg::AdminOk(r.str(MAX_ADMIN, "answer")?),
        MsgType::BlockHashReq => {
            let disk_id = r.id("disk_id")?;
            let replica_cycle = r.u64("replica_cycle")?;
            let block_size = r.u32("block_size")?;
            let n = r.u32("run count")? as usize;
            if n == 0 || n > MAX_HASH_RUNS {
                return Err(malformed(
                    name,
                    format!("{n} runs; 1..={MAX_HASH_RUNS} are allowed"),
                ));
            }
            // Each run is 12 bytes: refuse a count the payload cannot hold
            // before allocating for it.
            if n.saturating_mul(12) > payload.len().saturating_sub(r.pos) {
                return Err(malformed(name, format!("{n} runs do not fit the payload")));
            }
            let mut runs = Vec::with_capacity(n);
            for _ in 0..n {
                runs.push(HashRun {
                    offset: r.u64("run offset")?,
                    blocks: r.u32("run blocks")?,
                });
            }
            Msg::BlockHashReq(BlockHashReq {
                disk_id,
                replica_cycle,
                block_size,
                runs,
            })
        }
        MsgType::BlockHashes => {
            let disk_id = r.id("disk_id")?;
            let replica_cycle = r.u64("replica_cycle")?;
            let replica_size = r.u64("replica_size")?;
            let n = r.u32("digest count")? as usize;
            if n == 0 || n > MAX_HASHES {
                return Err(malformed(
                    name,
                    format!("{n} digests; 1..={MAX_HASHES} are allowed"),
                ));
            }
            let raw = r.take(n * 16, "digests")?;
            let hashes = raw
                .chunks_exact(16)
                .map(|c| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(c);
                    u128::from_le_bytes(a)
                })
                .collect();
            Msg::BlockHashes(BlockHashes {
                disk_id,
                replica_cycle,
                replica_size,
                hashes,
            })
        }
        MsgType::ResyncEnd => Msg::ResyncEnd(ResyncEnd {
            disk_id: r.id("disk_id")?,
            replica_cycle: r.u64("replica_cycle")?,
            cycle: r.u64("cycle")?,
            blocks_compared: r.u64("blocks_compared")?,
            blocks_differ: r.u64("blocks_differ")?,
        }),
    };
    r.end()?;
    validate(&msg)?;
    Ok(msg)
}

// ---------------------------------------------------------------------------
// Validation shared by encode and decode

fn check_site(msg: &'static str, s: &str) -> Result<(), WireError> {
    crate::transport::keys::check_site_name(s).map_err(|e| malformed(msg, e.to_string()))?;
    Ok(())
}

fn check_text(msg: &'static str, what: &str, s: &str, cap: usize) -> Result<(), WireError> {
    if s.len() > cap {
        return Err(malformed(
            msg,
            format!(
                "{what} is {} bytes long; at most {cap} are allowed",
                s.len()
            ),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(malformed(
            msg,
            format!("{what} contains control characters"),
        ));
    }
    Ok(())
}

fn check_block_size(msg: &'static str, b: u32) -> Result<(), WireError> {
    if !b.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b) {
        return Err(malformed(
            msg,
            format!("block size {b} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"),
        ));
    }
    Ok(())
}

fn check_size(msg: &'static str, what: &str, v: u64) -> Result<(), WireError> {
    if v > MAX_DISK_SIZE {
        return Err(malformed(
            msg,
            format!("{what} {v} exceeds the largest disk size (2^60)"),
        ));
    }
    Ok(())
}

fn check_data_chunk(
    msg: &'static str,
    encoding: Encoding,
    length: u32,
    data: &[u8],
) -> Result<(), WireError> {
    let len = length as usize;
    if len == 0 || len > MAX_DATA {
        return Err(malformed(
            msg,
            format!("length {len} is not in 1..={MAX_DATA}"),
        ));
    }
    let ok = match encoding {
        Encoding::Raw => data.len() == len,
        Encoding::Zero => data.is_empty(),
        Encoding::Lz4 => !data.is_empty() && data.len() <= MAX_DATA,
    };
    if !ok {
        return Err(malformed(
            msg,
            format!(
                "{} data of {} bytes does not fit length {len}",
                encoding.name(),
                data.len()
            ),
        ));
    }
    Ok(())
}

/// Check a message against the protocol's rules (names, caps, ranges).
pub(crate) fn validate(msg: &Msg) -> Result<(), WireError> {
    let name = msg.name();
    match msg {
        Msg::Hello(Hello {
            site_name,
            software_version,
            ..
        })
        | Msg::HelloOk(HelloOk {
            site_name,
            software_version,
            ..
        }) => {
            check_site(name, site_name)?;
            check_text(
                name,
                "software_version",
                software_version,
                MAX_SOFTWARE_VERSION,
            )?;
        }
        Msg::Error(e) => {
            if e.message.len() > MAX_ERROR_MESSAGE
                || e.message
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                return Err(malformed(
                    name,
                    format!(
                        "message longer than {MAX_ERROR_MESSAGE} bytes or with control \
                         characters other than newline and tab (use ErrorMsg::new)"
                    ),
                ));
            }
        }
        Msg::OpenDisk(d) => {
            safe_component(&d.vm)?;
            safe_name(&d.disk_name)?;
            check_block_size(name, d.block_size)?;
            check_size(name, "disk_size", d.disk_size)?;
        }
        Msg::DiskState(d) => {
            check_size(name, "replica_size", d.replica_size)?;
            check_size(name, "resume_offset", d.resume_offset)?;
            check_text(name, "needs_resync", &d.needs_resync, MAX_ERROR_MESSAGE)?;
        }
        Msg::InitialBegin(b) => {
            check_size(name, "disk_size", b.disk_size)?;
            if b.start_offset > b.disk_size {
                return Err(malformed(
                    name,
                    format!(
                        "start_offset {} is beyond disk_size {}",
                        b.start_offset, b.disk_size
                    ),
                ));
            }
        }
        Msg::InitialChunk(c) => {
            check_data_chunk(name, c.encoding, c.length, &c.data)?;
            if c.offset
                .checked_add(u64::from(c.length))
                .is_none_or(|e| e > MAX_DISK_SIZE)
            {
                return Err(malformed(
                    name,
                    format!("offset {} + length {} exceeds 2^60", c.offset, c.length),
                ));
            }
        }
        Msg::InitialEnd(e) => check_size(name, "disk_size", e.disk_size)?,
        Msg::LogBegin(b) => {
            safe_name(&b.disk_name)?;
            check_block_size(name, b.block_size)?;
            check_size(name, "base_size", b.base_size)?;
            check_size(name, "disk_size", b.disk_size)?;
            if b.cycle <= b.base_cycle {
                return Err(malformed(
                    name,
                    format!("cycle {} is not after base_cycle {}", b.cycle, b.base_cycle),
                ));
            }
            if b.total_len == 0 || b.total_len > MAX_DISK_SIZE {
                return Err(malformed(
                    name,
                    format!("total_len {} is out of range", b.total_len),
                ));
            }
        }
        Msg::LogChunk(c) => {
            if c.data.is_empty() || c.data.len() > MAX_DATA {
                return Err(malformed(
                    name,
                    format!("data of {} bytes is not in 1..={MAX_DATA}", c.data.len()),
                ));
            }
            if c.offset_in_log
                .checked_add(c.data.len() as u64)
                .is_none_or(|e| e > MAX_DISK_SIZE)
            {
                return Err(malformed(name, "offset_in_log + data length exceeds 2^60"));
            }
        }
        Msg::LogEnd(e) => {
            if e.total_len == 0 || e.total_len > MAX_DISK_SIZE {
                return Err(malformed(
                    name,
                    format!("total_len {} is out of range", e.total_len),
                ));
            }
        }
        Msg::Ack(_) => {}
        Msg::PointCommit(p) => {
            safe_component(&p.vm)?;
            if p.disks.is_empty() || p.disks.len() > MAX_POINT_DISKS {
                return Err(malformed(
                    name,
                    format!("{} disks; 1..={MAX_POINT_DISKS} are allowed", p.disks.len()),
                ));
            }
            let mut ids: Vec<&DiskId> = p.disks.iter().map(|d| &d.disk_id).collect();
            ids.sort_unstable();
            if ids.windows(2).any(|w| w[0] == w[1]) {
                return Err(malformed(name, "a disk is listed twice"));
            }
            if let Some(x) = p.definition.as_ref().filter(|x| x.len() > MAX_DEFINITION) {
                return Err(malformed(
                    name,
                    format!(
                        "definition is {} bytes long; at most {MAX_DEFINITION} are allowed",
                        x.len()
                    ),
                ));
            }
            if let Some(g) = &p.group {
                safe_component(&g.name)?;
                safe_component(&g.origin)?;
                if g.members.is_empty() || g.members.len() > MAX_GROUP_MEMBERS {
                    return Err(malformed(
                        name,
                        format!(
                            "{} group members; 1..={MAX_GROUP_MEMBERS} are allowed",
                            g.members.len()
                        ),
                    ));
                }
                for m in &g.members {
                    safe_component(m)?;
                }
                if !g.members.contains(&p.vm) {
                    return Err(malformed(name, "the VM is not a member of its own group"));
                }
            }
        }
        Msg::PointAck(p) => {
            safe_component(&p.vm)?;
        }
        Msg::Admin(s) | Msg::AdminOk(s) => {
            if s.len() > MAX_ADMIN {
                return Err(malformed(
                    name,
                    format!("{} bytes; at most {MAX_ADMIN} are allowed", s.len()),
                ));
            }
        }
        Msg::BlockHashReq(r) => {
            if !r.block_size.is_power_of_two()
                || !(MIN_BLOCK_SIZE..=MAX_HASH_BLOCK).contains(&r.block_size)
            {
                return Err(malformed(
                    name,
                    format!(
                        "block size {} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_HASH_BLOCK}",
                        r.block_size
                    ),
                ));
            }
            if r.runs.is_empty() || r.runs.len() > MAX_HASH_RUNS {
                return Err(malformed(
                    name,
                    format!("{} runs; 1..={MAX_HASH_RUNS} are allowed", r.runs.len()),
                ));
            }
            let bs = u64::from(r.block_size);
            let mut prev_end = 0u64;
            let mut total = 0u64;
            for run in &r.runs {
                if run.blocks == 0 || run.offset % bs != 0 || run.offset < prev_end {
                    return Err(malformed(
                        name,
                        format!(
                            "run at {} of {} blocks is empty, unaligned or not ascending",
                            run.offset, run.blocks
                        ),
                    ));
                }
                total += u64::from(run.blocks);
                let end = u64::from(run.blocks)
                    .checked_mul(bs)
                    .and_then(|l| run.offset.checked_add(l))
                    .filter(|&e| e <= MAX_DISK_SIZE);
                match end {
                    Some(e) => prev_end = e,
                    None => return Err(malformed(name, "a run reaches past 2^60")),
                }
            }
            if total > MAX_HASHES as u64 {
                return Err(malformed(
                    name,
                    format!("{total} blocks requested; at most {MAX_HASHES} are allowed"),
                ));
            }
        }
        Msg::BlockHashes(h) => {
            check_size(name, "replica_size", h.replica_size)?;
            if h.hashes.is_empty() || h.hashes.len() > MAX_HASHES {
                return Err(malformed(
                    name,
                    format!("{} digests; 1..={MAX_HASHES} are allowed", h.hashes.len()),
                ));
            }
        }
        Msg::ResyncEnd(e) => {
            if e.cycle <= e.replica_cycle {
                return Err(malformed(
                    name,
                    format!(
                        "cycle {} is not after replica_cycle {}",
                        e.cycle, e.replica_cycle
                    ),
                ));
            }
            if e.blocks_differ > e.blocks_compared {
                return Err(malformed(name, "more blocks differ than were compared"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> DiskId {
        [b; 16]
    }

    #[test]
    fn oversized_length_is_refused_from_4_bytes() {
        let len = (MAX_FRAME as u32 + 1).to_le_bytes();
        assert!(matches!(decode(&len), Err(WireError::FrameTooLarge { .. })));
        assert!(matches!(decode(&[0, 0, 0, 0]), Err(WireError::EmptyFrame)));
        assert!(matches!(decode(&[1, 0, 0]), Ok(None)));
        assert!(matches!(decode(&[2, 0, 0, 0, 1]), Ok(None)));
    }

    #[test]
    fn unknown_and_reserved_types() {
        assert!(matches!(
            decode(&[1, 0, 0, 0, 0x7f]),
            Err(WireError::UnknownType(0x7f))
        ));
        // Resync messages with an empty payload are malformed, not reserved.
        for t in [0x40u8, 0x41, 0x42] {
            assert!(matches!(
                decode(&[1, 0, 0, 0, t]),
                Err(WireError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn chunk_checksum_catches_a_flipped_bit() {
        let m = Msg::InitialChunk(InitialChunk::from_block(id(1), 4096, &[7u8; 100]));
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().unwrap().0, m);
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(decode(&buf).is_err());
        let mut buf2 = Vec::new();
        encode(&m, &mut buf2).unwrap();
        buf2[5 + 16] ^= 1; // offset field
        assert!(matches!(decode(&buf2), Err(WireError::Checksum { .. })));
    }

    #[test]
    fn names_are_checked_both_ways() {
        let m = Msg::OpenDisk(OpenDisk {
            vm: "vm".into(),
            disk_name: "../x".into(),
            disk_id: id(2),
            block_size: 4096,
            disk_size: 1 << 20,
            kind: DiskKind::Raw,
        });
        let mut buf = Vec::new();
        assert!(matches!(
            encode(&m, &mut buf),
            Err(WireError::InvalidName { .. })
        ));
        assert!(buf.is_empty());
        // Hand-craft the frame: the decoder refuses it too.
        let mut p = vec![MsgType::OpenDisk as u8];
        put_str(&mut p, "vm");
        put_str(&mut p, "../x");
        p.extend_from_slice(&id(2));
        put_u32(&mut p, 4096);
        put_u64(&mut p, 1 << 20);
        p.push(2);
        let mut f = (p.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&p);
        assert!(matches!(decode(&f), Err(WireError::InvalidName { .. })));
    }

    #[test]
    fn trailing_bytes_and_bad_bools_are_refused() {
        let m = Msg::Ack(Ack {
            disk_id: id(3),
            cycle: 9,
            durable: true,
            applied: false,
        });
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        let mut longer = buf.clone();
        longer.push(0);
        longer[0] += 1;
        assert!(decode(&longer).is_err());
        let n = buf.len();
        buf[n - 1] = 2;
        assert!(decode(&buf).is_err());
    }

    #[test]
    fn point_group_round_trips_and_a_version_5_point_still_decodes() {
        let group = PointGroup {
            name: "erp".into(),
            origin: "0123abcd".into(),
            members: vec!["erp-app".into(), "erp-db".into()],
        };
        let point = |group: Option<PointGroup>, vm: &str| {
            Msg::PointCommit(PointCommit {
                vm: vm.into(),
                cycle: 9,
                app_consistent: true,
                disks: vec![DiskCycle {
                    disk_id: id(1),
                    cycle: 9,
                }],
                definition: Some("<domain/>".into()),
                group: group.map(Box::new),
            })
        };
        let m = point(Some(group.clone()), "erp-db");
        let mut buf = Vec::new();
        encode(&m, &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().unwrap().0, m);
        // A point without a group ends after the definition, as a
        // version-5 sender's point: one encoding, which decodes.
        let old = point(None, "erp-db");
        let mut buf = Vec::new();
        encode(&old, &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().unwrap(), (old.clone(), buf.len()));
        // An explicit "no group" flag would be a second encoding: refused
        // (the fuzz target's canonical check found it).
        let n = buf.len();
        buf.push(0);
        buf[..4].copy_from_slice(&((n + 1 - 4) as u32).to_le_bytes());
        assert!(decode(&buf).is_err());
        // A VM that is not a member of its own group, or a bad name.
        for g in [
            PointGroup {
                members: vec!["other".into()],
                ..group.clone()
            },
            PointGroup {
                name: "../x".into(),
                ..group.clone()
            },
            PointGroup {
                members: Vec::new(),
                ..group.clone()
            },
        ] {
            assert!(encode(&point(Some(g), "erp-db"), &mut Vec::new()).is_err());
        }
    }

    #[test]
    fn log_begin_behind_round_trips_and_a_version_7_log_begin_still_decodes() {
        let begin = |behind: bool| {
            Msg::LogBegin(LogBegin {
                disk_id: id(1),
                disk_name: "d.qcow2".into(),
                cycle: 7,
                base_cycle: 6,
                block_size: 4096,
                base_size: 1 << 20,
                disk_size: 1 << 20,
                cut_unix_ns: 5,
                total_len: 100,
                behind,
            })
        };
        let mut behind = Vec::new();
        encode(&begin(true), &mut behind).unwrap();
        assert_eq!(
            decode(&behind).unwrap().unwrap(),
            (begin(true), behind.len())
        );
        // Not behind: the flag is absent, the frame is a version-7 one
        // (one byte shorter) and decodes as such.
        let mut plain = Vec::new();
        encode(&begin(false), &mut plain).unwrap();
        assert_eq!(plain.len() + 1, behind.len());
        assert_eq!(
            decode(&plain).unwrap().unwrap(),
            (begin(false), plain.len())
        );
        // An explicit 0 flag would be a second encoding, 2 is no bool.
        for bad in [0u8, 2] {
            let mut b = behind.clone();
            let n = b.len();
            b[n - 1] = bad;
            assert!(decode(&b).is_err(), "flag {bad}");
        }
    }

    #[test]
    fn point_definition_round_trips_and_is_capped() {
        let point = |definition: Option<String>| {
            Msg::PointCommit(PointCommit {
                vm: "web1".into(),
                cycle: 7,
                app_consistent: false,
                disks: vec![DiskCycle {
                    disk_id: id(4),
                    cycle: 7,
                }],
                definition,
                group: None,
            })
        };
        for def in [None, Some(String::new()), Some("<domain>é</domain>".into())] {
            let m = point(def);
            let mut buf = Vec::new();
            encode(&m, &mut buf).unwrap();
            assert_eq!(decode(&buf).unwrap().unwrap().0, m);
        }
        // Too large: refused by the encoder, and by the decoder from the
        // length field (before it reads the bytes).
        let big = point(Some("x".repeat(MAX_DEFINITION + 1)));
        assert!(matches!(
            encode(&big, &mut Vec::new()),
            Err(WireError::Malformed { .. })
        ));
        let mut buf = Vec::new();
        encode(&point(Some("ab".into())), &mut buf).unwrap();
        let n = buf.len();
        buf[n - 6..n - 2].copy_from_slice(&(MAX_DEFINITION as u32 + 1).to_le_bytes());
        assert!(matches!(decode(&buf), Err(WireError::Malformed { .. })));
        // Not UTF-8.
        let mut buf = Vec::new();
        encode(&point(Some("ab".into())), &mut buf).unwrap();
        let n = buf.len();
        buf[n - 1] = 0xff;
        assert!(matches!(decode(&buf), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn error_text_is_made_printable_and_capped() {
        let e = ErrorMsg::new(ErrorCode::NoSpace, true, "\u{1b}[31mdisk\u{0} full\nretry");
        assert_eq!(e.message, "?[31mdisk? full\nretry");
        let long = ErrorMsg::new(ErrorCode::Io, false, "é".repeat(5000));
        assert!(long.message.len() <= MAX_ERROR_MESSAGE);
        let mut buf = Vec::new();
        encode(&Msg::Error(long.clone()), &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().unwrap().0, Msg::Error(long));
        let raw = Msg::Error(ErrorMsg {
            code: ErrorCode::Io,
            message: "\u{1b}]0;pwned\u{7}".into(),
            retryable: false,
        });
        assert!(encode(&raw, &mut Vec::new()).is_err());
    }

    #[test]
    fn compress_choices() {
        let (e, d) = compress(&[0u8; 4096]);
        assert_eq!((e, d.len()), (Encoding::Zero, 0));
        let (e, _) = compress(&[5u8; 4096]);
        assert_eq!(e, Encoding::Lz4);
        let mut x = 12345u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let c = InitialChunk::from_block(id(4), 0, &noise);
        assert_eq!(c.encoding, Encoding::Raw);
        let mut out = Vec::new();
        c.decode_into(&mut out).unwrap();
        assert_eq!(out, noise);
        let z = InitialChunk::from_block(id(4), 0, &[5u8; 4096]);
        z.decode_into(&mut out).unwrap();
        assert_eq!(out, vec![5u8; 4096]);
        // `into_data`: the same bytes, RAW moved as it is.
        assert_eq!(c.clone().into_data().unwrap(), noise);
        assert_eq!(z.into_data().unwrap(), vec![5u8; 4096]);
        let zero = InitialChunk::from_block(id(4), 0, &[0u8; 4096]);
        assert_eq!(zero.encoding, Encoding::Zero);
        assert_eq!(zero.into_data().unwrap(), vec![0u8; 4096]);
        // RAW data that does not match its length is refused, not passed on.
        let mut short = c;
        short.length += 1;
        assert!(short.into_data().is_err());
    }
}
