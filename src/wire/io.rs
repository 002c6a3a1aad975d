//! The codec on quinn streams: one frame per call.

use super::codec::{check_frame_len, decode_body, encode};
use super::{Msg, WireError};

/// Read one message. `Ok(None)` if the stream ended cleanly before a new
/// frame; an end inside a frame is [`WireError::Truncated`]. The frame length
/// is checked against `MAX_FRAME` before anything is allocated for it, and
/// the buffer grows geometrically with the bytes that actually arrive, so a
/// peer announcing a large frame and sending little costs little memory.
pub async fn read_msg(recv: &mut quinn::RecvStream) -> Result<Option<Msg>, WireError> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv.read(&mut hdr[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(WireError::Truncated { got, need: 4 }),
        }
    }
    let len = u32::from_le_bytes(hdr) as usize;
    check_frame_len(len)?;
    const AHEAD: usize = 1 << 20;
    let mut frame: Vec<u8> = Vec::with_capacity(len.min(AHEAD));
    while frame.len() < len {
        let want = len - frame.len();
        match recv.read_chunk(want, true).await? {
            Some(chunk) => {
                let need = frame.len() + chunk.bytes.len();
                if need > frame.capacity() {
                    // Grow geometrically, never beyond the frame nor more
                    // than the bytes already received (plus 1 MiB) ahead.
                    let cap = need.max(frame.len() * 2).max(AHEAD).min(len);
                    frame.reserve_exact(cap - frame.len());
                }
                frame.extend_from_slice(&chunk.bytes);
            }
            None => {
                return Err(WireError::Truncated {
                    got: 4 + frame.len(),
                    need: 4 + len,
                })
            }
        }
    }
    decode_body(&frame).map(Some)
}

/// Write one message (encoded into a fresh buffer).
pub async fn write_msg(send: &mut quinn::SendStream, msg: &Msg) -> Result<(), WireError> {
    let mut buf = Vec::new();
    write_msg_buf(send, msg, &mut buf).await
}

/// Write one message, reusing `buf` for the encoding (saves an allocation
/// per chunk on bulk transfers).
pub async fn write_msg_buf(
    send: &mut quinn::SendStream,
    msg: &Msg,
    buf: &mut Vec<u8>,
) -> Result<(), WireError> {
    buf.clear();
    encode(msg, buf)?;
    send.write_all(buf).await?;
    Ok(())
}

/// Write one message after taking its size from a rate limiter
/// (`--max-rate`).
pub async fn write_msg_limited(
    send: &mut quinn::SendStream,
    msg: &Msg,
    buf: &mut Vec<u8>,
    limiter: &crate::transport::RateLimiter,
) -> Result<(), WireError> {
    buf.clear();
    encode(msg, buf)?;
    limiter.take(buf.len() as u64).await;
    send.write_all(buf).await?;
    Ok(())
}

/// Read the next message, which must be `expected` (a [`MsgType`] name,
/// checked by `pick`). An `Error` message from the peer becomes
/// [`WireError::Peer`], a clean end of stream [`WireError::Ended`], any
/// other message [`WireError::Unexpected`].
///
/// [`MsgType`]: super::MsgType
pub async fn expect<T>(
    recv: &mut quinn::RecvStream,
    expected: &'static str,
    pick: impl FnOnce(Msg) -> Result<T, Msg>,
) -> Result<T, WireError> {
    match read_msg(recv).await? {
        None => Err(WireError::Ended { expected }),
        Some(Msg::Error(e)) => Err(WireError::Peer {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
        }),
        Some(m) => pick(m).map_err(|m| WireError::Unexpected {
            expected,
            got: m.name(),
        }),
    }
}

/// Sender side of the opening exchange: open the control stream, send
/// `Hello`, and wait for `HelloOk`. Returns the control stream and the
/// receiver's greeting. A refusal of our certificate surfaces here as a
/// connection error (see [`WireError::explain`]).
pub async fn client_hello(
    conn: &quinn::Connection,
    site_name: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream, super::HelloOk), WireError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| WireError::Write(quinn::WriteError::ConnectionLost(e)))?;
    let hello = Msg::Hello(super::Hello {
        protocol_version: super::PROTOCOL_VERSION,
        site_name: site_name.to_string(),
        software_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    write_msg(&mut send, &hello).await?;
    let ok = expect(&mut recv, "HelloOk", |m| match m {
        Msg::HelloOk(h) => Ok(h),
        m => Err(m),
    })
    .await?;
    if ok.protocol_version != super::PROTOCOL_VERSION {
        return Err(WireError::Version {
            ours: super::PROTOCOL_VERSION,
            theirs: ok.protocol_version,
        });
    }
    Ok((send, recv, ok))
}

/// Receiver side of the opening exchange: accept the control stream, read
/// `Hello`, answer `HelloOk` (or `Error` with code `Version` and return
/// [`WireError::Version`] if this build does not speak the sender's
/// version, [`super::speaks`]).
pub async fn accept_hello(
    conn: &quinn::Connection,
    site_name: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream, super::Hello), WireError> {
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .map_err(|e| WireError::Read(quinn::ReadError::ConnectionLost(e)))?;
    let hello = expect(&mut recv, "Hello", |m| match m {
        Msg::Hello(h) => Ok(h),
        m => Err(m),
    })
    .await?;
    if !super::speaks(hello.protocol_version) {
        let err = WireError::Version {
            ours: super::PROTOCOL_VERSION,
            theirs: hello.protocol_version,
        };
        let reply = Msg::Error(super::ErrorMsg::new(
            super::ErrorCode::Version,
            false,
            format!(
                "the receiver speaks protocol version {}, this sender {}; upgrade the older side",
                super::PROTOCOL_VERSION,
                hello.protocol_version
            ),
        ));
        let _ = write_msg(&mut send, &reply).await;
        let _ = send.finish();
        return Err(err);
    }
    // The connection speaks the sender's version.
    let ok = Msg::HelloOk(super::HelloOk {
        protocol_version: hello.protocol_version,
        site_name: site_name.to_string(),
        software_version: env!("CARGO_PKG_VERSION").to_string(),
        store_free: 0,
    });
    write_msg(&mut send, &ok).await?;
    Ok((send, recv, hello))
}
