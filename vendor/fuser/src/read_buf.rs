use std::mem::size_of;

use crate::ll::fuse_abi as abi;
use crate::session::MAX_WRITE_SIZE;

/// Page size the WRITE payload is aligned to (vdrep patch, see VDREP-PATCH.md).
const PAYLOAD_ALIGN: usize = 4096;

/// Offset of a WRITE request's data in the request: `fuse_in_header` then
/// `fuse_write_in` (protocol 7.9 and later).
const WRITE_PAYLOAD_OFFSET: usize = size_of::<abi::fuse_in_header>() + size_of::<abi::fuse_write_in>();

/// Size of the buffer for reading a request from the kernel. Since the kernel may send
/// up to `MAX_WRITE_SIZE` bytes in a write request, we use that value plus some extra space,
/// and one more page so that the start can be placed freely (see [`FuseReadBuf::as_mut`]).
const BUFFER_SIZE: usize = MAX_WRITE_SIZE + 4096 + PAYLOAD_ALIGN;

/// A buffer that provides an aligned sub-slice for FUSE operations.
///
/// This struct wraps a `Vec<u8>` and provides access to an aligned portion
/// of the buffer, ensuring proper alignment for `fuse_in_header`.
///
/// vdrep patch: the sub-slice starts `WRITE_PAYLOAD_OFFSET` bytes before a
/// page boundary, so the data of a WRITE request lands page-aligned and an
/// `O_DIRECT` file system can write it without copying it into a bounce
/// buffer first.
#[derive(Debug)]
pub(crate) struct FuseReadBuf {
    buffer: Vec<u8>,
}

impl FuseReadBuf {
    /// Creates a new `FuseReadBuf` with the default buffer size.
    ///
    /// The actual buffer may be slightly larger to accommodate alignment requirements.
    pub(crate) fn new() -> Self {
        Self {
            buffer: vec![0; BUFFER_SIZE],
        }
    }

    /// vdrep patch: write-touch the first `bytes` of the aligned portion
    /// (plus the page holding the request header), so the kernel's copy of
    /// a request into them never needs to fault a page in (see
    /// `Config::prefault_bytes`).
    pub(crate) fn prefault(&mut self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let region = self.as_mut();
        let end = bytes.saturating_add(WRITE_PAYLOAD_OFFSET + PAYLOAD_ALIGN).min(region.len());
        let mut i = 0;
        while i < end {
            // SAFETY: `i < region.len()`; a volatile write so the compiler
            // cannot drop the store into freshly zeroed memory.
            unsafe { std::ptr::write_volatile(region.as_mut_ptr().add(i), 0) };
            i += PAYLOAD_ALIGN;
        }
        if end > 0 {
            // SAFETY: `end - 1 < region.len()`.
            unsafe { std::ptr::write_volatile(region.as_mut_ptr().add(end - 1), 0) };
        }
    }

    /// Returns a mutable reference to the aligned portion of the buffer.
    pub(crate) fn as_mut(&mut self) -> &mut [u8] {
        let base = self.buffer.as_ptr() as usize;
        // First start >= base with (start + WRITE_PAYLOAD_OFFSET) % PAYLOAD_ALIGN == 0.
        // WRITE_PAYLOAD_OFFSET is a multiple of 8, so the header stays 8-aligned
        // when the Vec is (it always is for u8 allocations of this size).
        let target = (base + WRITE_PAYLOAD_OFFSET).next_multiple_of(PAYLOAD_ALIGN) - WRITE_PAYLOAD_OFFSET;
        let mut off = target - base;
        let align = std::mem::align_of::<abi::fuse_in_header>();
        if (base + off) % align != 0 {
            off += align - (base + off) % align;
        }
        &mut self.buffer[off..]
    }
}
