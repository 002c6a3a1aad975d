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
