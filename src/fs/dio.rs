//! A small thread pool for I/O on `O_DIRECT` handles.
//!
//! Direct requests wait for the device; serving them on the FUSE worker
//! threads would cap the effective queue depth at the worker count. The
//! workers hand such requests (with their reply, which is `Send`) to this
//! pool and go back to reading `/dev/fuse`. Threads start on first use and
//! exit when the file system is dropped.

use std::sync::{Arc, OnceLock};

use crossbeam_channel::{Receiver, Sender};
use fuser::{Errno, ReplyData, ReplyWrite};

use super::handle::OpenFile;
use super::ops::{serve_read, write_handle};

/// Threads serving direct I/O (the largest useful queue depth).
pub(crate) const DIO_THREADS: usize = 16;

enum Job {
    Read {
        h: Arc<OpenFile>,
        offset: u64,
        size: usize,
        reply: ReplyData,
    },
    Write {
        h: Arc<OpenFile>,
        offset: u64,
        data: Vec<u8>,
        reply: ReplyWrite,
    },
}

fn run(job: Job) {
    match job {
        Job::Read {
            h,
            offset,
            size,
            reply,
        } => serve_read(&h, offset, size, reply),
        Job::Write {
            h,
            offset,
            data,
            reply,
        } => match write_handle(&h, offset, &data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(Errno::from(e)),
        },
    }
}

/// The pool (lazily started).
pub(crate) struct DirectPool {
    tx: OnceLock<Option<Sender<Job>>>,
}

impl DirectPool {
    pub(crate) fn new() -> Self {
        DirectPool {
            tx: OnceLock::new(),
        }
    }

    fn sender(&self) -> Option<&Sender<Job>> {
        self.tx
            .get_or_init(|| {
                let (tx, rx): (Sender<Job>, Receiver<Job>) = crossbeam_channel::unbounded();
                let mut started = 0;
                for i in 0..DIO_THREADS {
                    let rx = rx.clone();
                    let r = std::thread::Builder::new()
                        .name(format!("vdrep-dio-{i}"))
                        .spawn(move || {
                            while let Ok(job) = rx.recv() {
                                run(job);
                            }
                        });
                    if r.is_ok() {
                        started += 1;
                    }
                }
                (started > 0).then_some(tx)
            })
            .as_ref()
    }

    fn submit(&self, job: Job) {
        match self.sender() {
            Some(tx) => {
                if let Err(e) = tx.send(job) {
                    run(e.into_inner());
                }
            }
            None => run(job),
        }
    }

    pub(crate) fn read(&self, h: Arc<OpenFile>, offset: u64, size: usize, reply: ReplyData) {
        self.submit(Job::Read {
            h,
            offset,
            size,
            reply,
        });
    }

    pub(crate) fn write(&self, h: Arc<OpenFile>, offset: u64, data: &[u8], reply: ReplyWrite) {
        self.submit(Job::Write {
            h,
            offset,
            data: data.to_vec(),
            reply,
        });
    }
}
