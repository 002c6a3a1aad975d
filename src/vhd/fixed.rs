//! Fixed VHDs: the raw disk bytes followed by a 512-byte footer. Reads and
//! writes below the virtual size are plain `pread`/`pwrite`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::footer::{Footer, FOOTER_SIZE};
use super::VhdError;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> VhdError + '_ {
    move |e| VhdError::io(path, e)
}

/// Lay out a new fixed disk in the empty `file`: a sparse data area of
/// `footer.current_size` bytes, then the footer.
pub(crate) fn create(file: &File, path: &Path, footer: &Footer) -> Result<(), VhdError> {
    let size = footer.current_size;
    file.set_len(size + FOOTER_SIZE as u64)
        .map_err(io_err(path))?;
    file.write_all_at(&footer.encode(), size)
        .map_err(io_err(path))
}

/// Check that the footer's size matches the file: data then one footer.
pub(crate) fn check(path: &Path, footer: &Footer, file_len: u64) -> Result<(), VhdError> {
    let data = file_len - FOOTER_SIZE as u64;
    if data != footer.current_size {
        return Err(VhdError::corrupt(
            path,
            file_len - FOOTER_SIZE as u64 + 48,
            format!(
                "fixed VHD footer says the disk is {} bytes but the file holds {data} bytes before the footer (truncated or appended to?)",
                footer.current_size
            ),
        ));
    }
    Ok(())
}

pub(crate) fn read(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
    file.read_exact_at(buf, offset).map_err(io_err(path))
}

pub(crate) fn write(file: &File, path: &Path, data: &[u8], offset: u64) -> Result<(), VhdError> {
    file.write_all_at(data, offset).map_err(io_err(path))
}

/// Zero a range: punch a hole (keeps the file size), or write zeros where
/// the file system cannot.
pub(crate) fn write_zeroes(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<(), VhdError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain fallocate(2) on an fd we own; offsets fit off_t (the
    // size is capped far below i64::MAX).
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut k = 0;
    while k < len {
        let m = (len - k).min(zeros.len() as u64);
        file.write_all_at(&zeros[..m as usize], offset + k)
            .map_err(io_err(path))?;
        k += m;
    }
    Ok(())
}

/// Move the footer to `new.current_size`. Growing: extend (zeros), write
/// the new footer, sync, then zero the old footer, which now lies inside the
/// data area. A crash in between leaves a valid disk of the new size whose
/// grown area holds the old footer's bytes. Shrinking: write the new footer,
/// then cut the file after it.
pub(crate) fn resize(
    file: &File,
    path: &Path,
    old_size: u64,
    new: &Footer,
) -> Result<(), VhdError> {
    let new_size = new.current_size;
    let footer = new.encode();
    if new_size > old_size {
        file.set_len(new_size + FOOTER_SIZE as u64)
            .map_err(io_err(path))?;
        file.write_all_at(&footer, new_size).map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))?;
        file.write_all_at(&[0u8; FOOTER_SIZE], old_size)
            .map_err(io_err(path))?;
        file.sync_data().map_err(io_err(path))
    } else {
        file.write_all_at(&footer, new_size).map_err(io_err(path))?;
        file.set_len(new_size + FOOTER_SIZE as u64)
            .map_err(io_err(path))?;
        file.sync_all().map_err(io_err(path))
    }
}
