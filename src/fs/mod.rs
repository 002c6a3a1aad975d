//! FUSE passthrough file system over the folder it is mounted on (stub until
//! the fs module lands).
use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::tracking::Tracker;

#[derive(Debug, Clone)]
pub struct FsOptions {
    pub n_threads: usize,
    pub writeback_cache: bool,
    pub max_write: u32,
    pub allow_other: bool,
    pub fsname: String,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            n_threads: 4,
            writeback_cache: true,
            max_write: 1 << 20,
            allow_other: true,
            fsname: "vdrep".into(),
        }
    }
}

pub struct VdrepFs;
impl fuser::Filesystem for VdrepFs {}

pub fn mount(
    dir: &Path,
    tracker: Arc<Tracker>,
    opts: &FsOptions,
) -> io::Result<fuser::Session<VdrepFs>> {
    let _ = (dir, tracker, opts);
    Err(io::Error::other("fs not merged yet"))
}
