//! Many sessions on one connection (issue 12, target 6): the headers of
//! the `vdrep-mux/1` protocol ([`ALPN_MUX`]).
//!
//! With `vdrep/1` ([`super::ALPN`]) a connection carries one session (one
//! VM) and every stream is that session's. With `vdrep-mux/1` the sender
//! runs every VM's session to the same receiver on one connection, and:
//! - every bidirectional stream the sender opens starts with a
//!   [`StreamHeader`] naming its session by a tag the sender chose (unique
//!   on the connection, never reused); what follows is the session's own
//!   bytes, as on a `vdrep/1` stream. The receiver answers on the stream
//!   with no header.
//! - a session ends without ending the connection by a [`Control::End`]
//!   on a unidirectional stream (its only content), sent by either side:
//!   the sender when the VM's session is over (unprotected, error, probe
//!   done), the receiver when its session closed on a protocol error. The
//!   side that receives it drops the session's state as if its connection
//!   was lost ([`crate::wire::session::Event::ConnectionLost`]); streams of
//!   an ended tag that arrive later are reset, never applied.
//! - the end of the connection ends every session on it.
//!
//! A header that does not decode ([`MuxError`]: truncated, an unknown
//! version or kind) resets that stream (logged at WARN); nothing on it is
//! applied. Both sides offer `vdrep-mux/1` first and accept `vdrep/1`, so
//! a peer of an older build keeps working, one connection per session.
//! `VDREP_MUX=0` makes this build offer only `vdrep/1` (as an older peer
//! does; for A/B runs and the compatibility tests).

/// The ALPN of the multiplexed protocol, offered before [`super::ALPN`].
pub const ALPN_MUX: &[u8] = b"vdrep-mux/1";

/// The version byte of every header this build writes.
pub const VERSION: u8 = 1;

/// A bidirectional stream of a session.
const KIND_STREAM: u8 = 0;
/// A session ends (on a unidirectional stream).
const KIND_END: u8 = 1;

/// Bytes of a [`StreamHeader`]: version, kind, tag (u64, big-endian).
pub const STREAM_HEADER_LEN: usize = 10;

/// Streams a client may open at once on a receiver's connection (both
/// kinds), where the receiver offers [`ALPN_MUX`]: room for 256 VMs' with a
/// few logs in flight each.
pub const MAX_STREAMS: u32 = 4096;

/// Longest reason text a [`Control::End`] carries.
pub const MAX_REASON: usize = 1024;

/// Longest encoded [`Control`].
pub const MAX_CONTROL_LEN: usize = STREAM_HEADER_LEN + 4 + 2 + MAX_REASON;

/// A header that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The stream ended inside the header.
    #[error("mux header truncated: {got} of {need} bytes")]
    Truncated { got: usize, need: usize },
    /// A header version this build does not speak.
    #[error("mux header of unknown version {0} (this build speaks {VERSION})")]
    UnknownVersion(u8),
    /// A kind this build does not know, or one out of place (a control
    /// message on a session's stream, or the reverse).
    #[error("mux header of unknown or misplaced kind {0}")]
    UnknownKind(u8),
    /// A control message with bytes after its end.
    #[error("mux control message with {0} trailing bytes")]
    Trailing(usize),
    /// An end's reason is longer than [`MAX_REASON`] or not UTF-8.
    #[error("mux control message with an invalid reason ({0})")]
    BadReason(String),
}

/// The first bytes of a session's bidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// The session, as the sender named it.
    pub tag: u64,
}

impl StreamHeader {
    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut b = [0u8; STREAM_HEADER_LEN];
        b[0] = VERSION;
        b[1] = KIND_STREAM;
        b[2..].copy_from_slice(&self.tag.to_be_bytes());
        b
    }

    /// Decode the header from the first bytes of a stream (`buf` is what
    /// arrived, at most [`STREAM_HEADER_LEN`] bytes: fewer means the stream
    /// ended there).
    pub fn decode(buf: &[u8]) -> Result<StreamHeader, MuxError> {
        let (kind, tag) = prefix(buf)?;
        if kind != KIND_STREAM {
            return Err(MuxError::UnknownKind(kind));
        }
        Ok(StreamHeader { tag })
    }
}

/// What a unidirectional stream of a mux connection carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The session `tag` is over: the peer drops its state. `code` and
    /// `reason` say why, as a connection close would (code 0: done, 1: a
    /// protocol error).
    End { tag: u64, code: u32, reason: String },
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        let Control::End { tag, code, reason } = self;
        // Cut at a char boundary within MAX_REASON.
        let mut cut = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason.as_bytes()[..cut];
        let mut b = Vec::with_capacity(STREAM_HEADER_LEN + 6 + reason.len());
        b.push(VERSION);
        b.push(KIND_END);
        b.extend_from_slice(&tag.to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(reason.len() as u16).to_be_bytes());
        b.extend_from_slice(reason);
        b
    }

    /// Decode a whole unidirectional stream's content.
    pub fn decode(buf: &[u8]) -> Result<Control, MuxError> {
        let (kind, tag) = prefix(buf)?;
        if kind != KIND_END {
            return Err(MuxError::UnknownKind(kind));
        }
        let rest = &buf[STREAM_HEADER_LEN..];
        let need = STREAM_HEADER_LEN + 6;
        if rest.len() < 6 {
            return Err(MuxError::Truncated {
                got: buf.len(),
                need,
            });
        }
        let code = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let len = usize::from(u16::from_be_bytes([rest[4], rest[5]]));
        if len > MAX_REASON {
            return Err(MuxError::BadReason(format!(
                "{len} bytes, at most {MAX_REASON}"
            )));
        }
        let text = &rest[6..];
        if text.len() < len {
            return Err(MuxError::Truncated {
                got: buf.len(),
                need: need + len,
            });
        }
        if text.len() > len {
            return Err(MuxError::Trailing(text.len() - len));
        }
        let reason = std::str::from_utf8(text)
            .map_err(|e| MuxError::BadReason(e.to_string()))?
            .to_string();
        Ok(Control::End { tag, code, reason })
    }
}

/// The version, kind and tag every header starts with.
fn prefix(buf: &[u8]) -> Result<(u8, u64), MuxError> {
    // The version first: an unknown version may have another layout.
    match buf.first() {
        None => {
            return Err(MuxError::Truncated {
                got: 0,
                need: STREAM_HEADER_LEN,
            })
        }
        Some(&v) if v != VERSION => return Err(MuxError::UnknownVersion(v)),
        Some(_) => {}
    }
    if buf.len() < STREAM_HEADER_LEN {
        return Err(MuxError::Truncated {
            got: buf.len(),
            need: STREAM_HEADER_LEN,
        });
    }
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&buf[2..STREAM_HEADER_LEN]);
    Ok((buf[1], u64::from_be_bytes(tag)))
}

/// Whether this build offers [`ALPN_MUX`] (`VDREP_MUX=0`: no, only
/// [`super::ALPN`], as a build before it).
pub fn offered() -> bool {
    !matches!(std::env::var("VDREP_MUX").as_deref(), Ok("0") | Ok("off"))
}

/// The ALPNs to offer, most preferred first.
pub fn alpns() -> Vec<Vec<u8>> {
    if offered() {
        vec![ALPN_MUX.to_vec(), super::ALPN.to_vec()]
    } else {
        vec![super::ALPN.to_vec()]
    }
}

/// Whether the handshake of `conn` chose [`ALPN_MUX`].
pub fn negotiated(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN_MUX)
}

/// Read the [`StreamHeader`] of an accepted bidirectional stream.
pub async fn read_stream_header(rx: &mut quinn::RecvStream) -> Result<StreamHeader, MuxError> {
    let mut buf = [0u8; STREAM_HEADER_LEN];
    let got = read_up_to(rx, &mut buf).await;
    StreamHeader::decode(&buf[..got])
}

/// Read the [`Control`] of an accepted unidirectional stream (all of it).
pub async fn read_control(rx: &mut quinn::RecvStream) -> Result<Control, MuxError> {
    match rx.read_to_end(MAX_CONTROL_LEN).await {
        Ok(b) => Control::decode(&b),
        Err(quinn::ReadToEndError::TooLong) => Err(MuxError::Trailing(1)),
        Err(quinn::ReadToEndError::Read(_)) => Err(MuxError::Truncated {
            got: 0,
            need: STREAM_HEADER_LEN,
        }),
    }
}

/// Fill `buf` from `rx`; fewer bytes: the stream ended (or failed) there.
async fn read_up_to(rx: &mut quinn::RecvStream, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match rx.read(&mut buf[got..]).await {
            Ok(Some(n)) => got += n,
            Ok(None) | Err(_) => break,
        }
    }
    got
}

/// Send `c` on a new unidirectional stream of `conn` (best effort: a
/// connection that is gone ended the session anyway).
pub async fn send_control(conn: &quinn::Connection, c: &Control) {
    if let Ok(mut tx) = conn.open_uni().await {
        if tx.write_all(&c.encode()).await.is_ok() {
            let _ = tx.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_header_round_trips() {
        for tag in [0, 1, 255, u64::MAX] {
            let h = StreamHeader { tag };
            assert_eq!(StreamHeader::decode(&h.encode()), Ok(h));
        }
    }

    #[test]
    fn every_truncated_stream_header_is_refused() {
        let b = StreamHeader { tag: 7 }.encode();
        for n in 0..STREAM_HEADER_LEN {
            assert_eq!(
                StreamHeader::decode(&b[..n]),
                Err(MuxError::Truncated {
                    got: n,
                    need: STREAM_HEADER_LEN
                }),
                "{n} bytes"
            );
        }
    }

    #[test]
    fn unknown_versions_and_kinds_are_refused() {
        let mut b = StreamHeader { tag: 7 }.encode();
        for v in [0u8, 2, 0xff] {
            b[0] = v;
            assert_eq!(StreamHeader::decode(&b), Err(MuxError::UnknownVersion(v)));
            // Even when only the version byte arrived.
            assert_eq!(
                StreamHeader::decode(&b[..1]),
                Err(MuxError::UnknownVersion(v))
            );
            assert_eq!(Control::decode(&b), Err(MuxError::UnknownVersion(v)));
        }
        let mut b = StreamHeader { tag: 7 }.encode();
        for k in [KIND_END, 2, 0xff] {
            b[1] = k;
            assert_eq!(StreamHeader::decode(&b), Err(MuxError::UnknownKind(k)));
        }
        // A session's stream header is not a control message.
        let b = StreamHeader { tag: 7 }.encode();
        assert_eq!(Control::decode(&b), Err(MuxError::UnknownKind(KIND_STREAM)));
    }

    #[test]
    fn an_end_round_trips_and_every_malformed_one_is_refused() {
        let c = Control::End {
            tag: 42,
            code: 1,
            reason: "protocol error".into(),
        };
        let b = c.encode();
        assert_eq!(Control::decode(&b), Ok(c));
        for n in 0..b.len() {
            assert!(
                matches!(Control::decode(&b[..n]), Err(MuxError::Truncated { .. })),
                "{n} bytes: {:?}",
                Control::decode(&b[..n])
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(Control::decode(&long), Err(MuxError::Trailing(1)));
        // A reason longer than allowed, and one that is not UTF-8.
        let mut big = b[..STREAM_HEADER_LEN + 4].to_vec();
        big.extend_from_slice(&((MAX_REASON + 1) as u16).to_be_bytes());
        big.extend(std::iter::repeat_n(b'x', MAX_REASON + 1));
        assert!(matches!(Control::decode(&big), Err(MuxError::BadReason(_))));
        let mut bad = b[..STREAM_HEADER_LEN + 4].to_vec();
        bad.extend_from_slice(&2u16.to_be_bytes());
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(Control::decode(&bad), Err(MuxError::BadReason(_))));
    }

    #[test]
    fn a_long_reason_is_cut_to_fit() {
        let c = Control::End {
            tag: 1,
            code: 0,
            reason: "é".repeat(MAX_REASON),
        };
        match Control::decode(&c.encode()) {
            Ok(Control::End { reason, .. }) => {
                assert!(reason.len() <= MAX_REASON && reason.len() >= MAX_REASON - 1)
            }
            other => panic!("{other:?}"),
        }
    }
}
