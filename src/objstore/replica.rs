//! [`BucketStore`]: the object-store implementation of the store seam
//! ([`ReplicaStore`]): replicas, logs and recovery points of many VMs in one
//! `s3://bucket/prefix`, every object sealed ([`SealedBucket`]), writers
//! fenced by generation ([`super::fence`]). The design and its argument are
//! in `kernel-notes/s3.md` ("The object-store ReplicaStore").
//!
//! ```text
//! vmreg/<site>/<vm>                                   the VM exists (vms())
//! sites/<site>/vms/<vm>/fence/…                       writer generations
//! sites/<site>/vms/<vm>/reg/<disk hex>                the disk exists
//! sites/<site>/vms/<vm>/points/<cycle>-g<gen>-<writer> point manifests (last)
//! sites/<site>/vms/<vm>/disks/<hex>/head/<gen>-<seq>  the disk's state (newest wins)
//! sites/<site>/vms/<vm>/disks/<hex>/chunks/<i>.v<cycle>-g<gen>-<n>  base chunks
//! sites/<site>/vms/<vm>/disks/<hex>/logs/<cycle>-g<gen>-<n>/<seg>   a log's bytes
//! sites/<site>/vms/<vm>/disks/<hex>/logs/<cycle>-g<gen>-<n>.done    its index (last)
//! ```
//!
//! Nothing is overwritten: every name is unique to its writer, generation
//! and a per-writer counter, so a put either happened or not and a crash
//! leaves only orphans (deleted by [`prune`](ReplicaStore::prune)'s
//! collection). The disk head is the replica: apply writes a new head
//! listing the log, a point's manifest lists per disk the base chunks and
//! the logs up to it. A log is durable once its index object is stored;
//! a writer taking over a VM (after a crash, or another receiver) rolls
//! durable logs that chain on into the heads and re-writes every head in
//! its generation, so a stale writer's late head can never win.
//!
//! Local state: only caches (log indexes, manifests) and a spool folder
//! for the log being received. A store opened on another machine with the
//! same bucket and key sees the same replicas.

use super::bucket::{BucketError, BucketErrorKind, SealedBucket};
use super::cache::ObjectCache;
use super::fence::{FenceError, FenceErrorKind, Writer, WriterId};
use super::layered::{IndexCache, Layered, Layers, LogIndex, LogRef, RecordRef, SEGMENT};
use super::point::{self, DiskManifest, Manifest, CHUNK};
use super::{ObjectError, ObjectErrorKind};
use crate::hrl::{HrlError, HrlReader};
use crate::replica::{
    retention_keep, validate_name, ApplyOutcome, Consistency, Ctx, DigestCache, DiskInfo, DiskRef,
    DropReason, ForgetReport, InitialData, InitialState, LiveInfo, Point, PointRead, PointsDropped,
    PruneReport, RecoveryReport, ReplicaFormat, ReplicaState, ReplicaStore, RetentionPolicy,
    StoreError, StoreOutcome, INITIAL_SYNC_EVERY,
};
use crate::util::{hex, now_ns, random_id};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type Result<T> = std::result::Result<T, StoreError>;

/// The base image of a disk head.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Base {
    cycle: u64,
    size: u64,
    time_unix_ns: u64,
    chunks: Vec<Option<String>>,
    /// Set by a compaction: the chunks of the base it folded into this
    /// one. Kept points still naming them are re-pointed here by the next
    /// prune too, so a compaction killed between the new head and the
    /// manifests' new versions is finished later (else those points would
    /// keep the old chunks and the folded logs alive for good).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    folded_from: Option<Vec<Option<String>>>,
}

/// An initial copy in progress: chunks below `offset` are stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Initial {
    cycle: u64,
    offset: u64,
    chunks: Vec<Option<String>>,
}

/// The state of one replica (the newest `head/` object of the disk).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Head {
    version: u32,
    name: String,
    size: u64,
    block_size: u32,
    vhd_id: String,
    vhd_time: u32,
    initial: Option<Initial>,
    cycle: Option<u64>,
    cycle_time_ns: u64,
    base: Option<Base>,
    /// The logs after the base, oldest first (the chain up to `cycle`).
    logs: Vec<LogRef>,
    needs_resync: Option<String>,
    resync_cycle: Option<u64>,
}

impl Head {
    /// What a reader of the disk as of `cycle` reads (`None`: not there).
    fn layers_at(&self, cycle: u64) -> Option<Layers> {
        let base = self.base.as_ref()?;
        if cycle < base.cycle || self.cycle.is_none_or(|c| c < cycle) || self.initial.is_some() {
            return None;
        }
        let logs: Vec<LogRef> = self
            .logs
            .iter()
            .filter(|l| l.cycle <= cycle)
            .cloned()
            .collect();
        Some(Layers {
            size: logs.last().map_or(base.size, |l| l.disk_size),
            base_size: base.size,
            chunks: base.chunks.clone(),
            logs,
        })
    }

    fn state(&self, disk_id: &[u8; 16]) -> ReplicaState {
        let (format, replica_file) = ReplicaFormat::for_source(&self.name);
        ReplicaState {
            version: 1,
            disk_id: hex(disk_id),
            name: self.name.clone(),
            replica_file,
            format,
            size: self.size,
            block_size: self.block_size,
            vhd_id: self.vhd_id.clone(),
            vhd_time: self.vhd_time,
            initial_offset: self.initial.as_ref().map(|i| i.offset),
            initial_cycle: self.initial.as_ref().map(|i| i.cycle),
            cycle: self.cycle,
            cycle_time_ns: self.cycle_time_ns,
            applying: None,
            needs_resync: self.needs_resync.clone(),
            resync_cycle: self.resync_cycle,
        }
    }
}

/// An initial copy being received: the chunk being filled is in memory.
struct Session {
    cycle: u64,
    /// Index of the buffered chunk, and its bytes.
    cur: u64,
    buf: Vec<u8>,
    chunks: Vec<Option<String>>,
    /// Bytes stored since the head last recorded progress.
    unsynced: u64,
}

/// What this store holds for a VM it writes.
struct VmState {
    fence: Writer,
    heads: HashMap<[u8; 16], Head>,
    /// Makes every object name this writer puts unique.
    seq: u64,
    sessions: HashMap<[u8; 16], Session>,
}

/// One VM's writer slot, shared by the operations on it.
type SlotRef = Arc<Mutex<Slot>>;

enum Slot {
    Unclaimed,
    Claimed(Box<VmState>),
    /// A newer writer took over: every write is refused.
    Fenced(String),
}

/// The object-store replica store (see the module documentation).
pub struct BucketStore {
    bucket: Arc<SealedBucket>,
    spool: PathBuf,
    writer: WriterId,
    vms: Mutex<HashMap<(String, String), SlotRef>>,
    indexes: Arc<IndexCache>,
    manifests: Mutex<HashMap<String, Manifest>>,
    spool_seq: AtomicU64,
    /// Point reads fetch through it (a test failover from the bucket).
    objects: Option<Arc<ObjectCache>>,
}

fn vm_dir(site: &str, vm: &str) -> String {
    format!("sites/{site}/vms/{vm}")
}

fn disk_dir(site: &str, vm: &str, id: &[u8; 16]) -> String {
    format!("{}/disks/{}", vm_dir(site, vm), hex(id))
}

/// Parse `<cycle:016x>-g<gen:016x>-<n:016x>.done` → cycle.
fn done_cycle(leaf: &str) -> Option<u64> {
    let stem = leaf.strip_suffix(".done")?;
    (stem.len() == 16 + 2 + 16 + 1 + 16)
        .then(|| u64::from_str_radix(stem.get(..16)?, 16).ok())
        .flatten()
}

/// A point's domain definition: `<vm>/definitions/<cycle:016x>.xml`, one
/// sealed object per point that has one (unlike the directory store's hard
/// links, an unchanged definition is stored again: objects are encrypted
/// one by one, and a definition is a few KiB per point).
fn definition_name(site: &str, vm: &str, cycle: u64) -> String {
    format!("{}/definitions/{cycle:016x}.xml", vm_dir(site, vm))
}

/// `…/definitions/<cycle:016x>.xml` → cycle.
fn definition_cycle(name: &str) -> Option<u64> {
    let leaf = name.rsplit('/').next()?.strip_suffix(".xml")?;
    (leaf.len() == 16)
        .then(|| u64::from_str_radix(leaf, 16).ok())
        .flatten()
}

fn ctx_of(d: DiskRef<'_>) -> Ctx {
    Ctx::new(d.site, d.vm, &hex(d.disk_id))
}

impl BucketStore {
    /// A store over an opened bucket; `spool` is a local folder for logs
    /// being received (created if missing; holds no state).
    pub fn open(bucket: Arc<SealedBucket>, spool: &Path) -> Result<BucketStore> {
        std::fs::create_dir_all(spool).map_err(|e| StoreError::Io {
            ctx: Ctx::default(),
            doing: "creating the spool folder of the object store".into(),
            path: spool.to_path_buf(),
            retryable: false,
            source: e,
        })?;
        Ok(BucketStore {
            bucket,
            spool: spool.to_path_buf(),
            writer: random_id(),
            vms: Mutex::new(HashMap::new()),
            indexes: Arc::new(IndexCache::default()),
            manifests: Mutex::new(HashMap::new()),
            spool_seq: AtomicU64::new(0),
            objects: None,
        })
    }

    /// Point reads ([`read_point`](ReplicaStore::read_point)) fetch chunks
    /// and log segments through `cache` (bounded, shared by the readers).
    pub fn with_object_cache(mut self, cache: Arc<ObjectCache>) -> BucketStore {
        self.objects = Some(cache);
        self
    }

    /// The sites that replicate a VM named `vm` into the bucket: from the
    /// `vmreg/` registrations (no listing of the data), else (points
    /// written by [`point::VmWriter`], which registers nothing) from the
    /// manifests' folders.
    pub fn sites_of(&self, vm: &str) -> Result<Vec<String>> {
        let mut sites: Vec<String> = self
            .vms()
            .into_iter()
            .filter(|(_, v)| v == vm)
            .map(|(s, _)| s)
            .collect();
        if sites.is_empty() {
            sites = point::sites_of(&self.bucket, vm).map_err(|e| match e {
                point::PointError::Bucket(b) => {
                    self.obj_err(&Ctx::default(), &format!("listing the sites of {vm}"), b)
                }
                e => StoreError::BadState {
                    path: PathBuf::from(self.bucket.url().to_string()),
                    what: format!("listing the sites of {vm}: {e}"),
                },
            })?;
        }
        sites.sort();
        sites.dedup();
        Ok(sites)
    }

    /// The bucket (for readers that share it).
    pub fn bucket(&self) -> &Arc<SealedBucket> {
        &self.bucket
    }

    /// Delete the definitions of points that no longer exist (below the
    /// newest point; a definition above it belongs to a point being made).
    fn drop_definitions(&self, ctx: &Ctx, site: &str, vm: &str, points: &[u64]) -> Result<()> {
        let Some(&newest) = points.iter().max() else {
            return Ok(());
        };
        for name in self.list(ctx, &format!("{}/definitions/", vm_dir(site, vm)))? {
            if let Some(c) = definition_cycle(&name) {
                if c < newest && !points.contains(&c) {
                    self.delete(ctx, &name)?;
                }
            }
        }
        Ok(())
    }

    fn obj_err(&self, ctx: &Ctx, doing: &str, e: BucketError) -> StoreError {
        // The bucket opened (its start-up checks passed): a refusal now
        // is a change at the object store, retried until it is undone.
        let gone = match e.kind() {
            BucketErrorKind::Object(ObjectErrorKind::Denied) => Some(false),
            BucketErrorKind::Object(ObjectErrorKind::NoSuchBucket) => Some(true),
            _ => None,
        };
        if let Some(bucket_gone) = gone {
            return StoreError::Access {
                ctx: ctx.clone(),
                doing: doing.to_string(),
                bucket_gone,
                why: e.to_string(),
            };
        }
        let retryable = e.retryable();
        StoreError::Io {
            ctx: ctx.clone(),
            doing: doing.to_string(),
            path: PathBuf::from(self.bucket.url().to_string()),
            retryable,
            source: std::io::Error::other(e),
        }
    }

    fn fence_err(&self, ctx: &Ctx, e: FenceError) -> StoreError {
        match e.kind() {
            FenceErrorKind::Fenced => StoreError::Fenced {
                ctx: ctx.clone(),
                what: format!("{e}; another receiver or sender now writes this VM"),
            },
            FenceErrorKind::FailedOver => {
                // Say where and when the VM went (the record's body).
                let what = match &e {
                    FenceError::FailedOver { dir, record } => {
                        let prefix = self.bucket.url().key("");
                        let name = format!("{}/{record}", dir.strip_prefix(&prefix).unwrap_or(dir));
                        match self.bucket.get(&name).ok().and_then(|b| {
                            serde_json::from_slice::<super::failedover::FailoverRecord>(&b).ok()
                        }) {
                            Some(r) => r.message(&self.bucket.url().to_string()),
                            None => e.to_string(),
                        }
                    }
                    _ => e.to_string(),
                };
                StoreError::Fenced {
                    ctx: ctx.clone(),
                    what,
                }
            }
            FenceErrorKind::Contended => StoreError::Busy {
                ctx: ctx.clone(),
                what: e.to_string(),
            },
            FenceErrorKind::Store => match e {
                FenceError::Store(o) => self.obj_err(ctx, "checking the writer fence", o.into()),
                other => self.obj_err(
                    ctx,
                    "checking the writer fence",
                    ObjectError::BadResponse {
                        op: "list",
                        key: String::new(),
                        why: other.to_string(),
                    }
                    .into(),
                ),
            },
        }
    }

    fn put(&self, ctx: &Ctx, name: &str, body: &[u8]) -> Result<()> {
        self.bucket
            .put(name, body)
            .map_err(|e| self.obj_err(ctx, &format!("storing {name}"), e))
    }

    fn get(&self, ctx: &Ctx, name: &str) -> Result<Vec<u8>> {
        self.bucket
            .get(name)
            .map_err(|e| self.obj_err(ctx, &format!("reading {name}"), e))
    }

    fn list(&self, ctx: &Ctx, dir: &str) -> Result<Vec<String>> {
        self.bucket
            .list(dir)
            .map_err(|e| self.obj_err(ctx, &format!("listing {dir}"), e))
    }

    fn delete(&self, ctx: &Ctx, name: &str) -> Result<()> {
        self.bucket
            .delete(name)
            .map_err(|e| self.obj_err(ctx, &format!("deleting {name}"), e))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, name: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| StoreError::BadState {
            path: PathBuf::from(self.bucket.url().key(name)),
            what: e.to_string(),
        })
    }

    fn to_json<T: serde::Serialize>(&self, name: &str, v: &T) -> Result<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| StoreError::BadState {
            path: PathBuf::from(self.bucket.url().key(name)),
            what: e.to_string(),
        })
    }

    fn slot(&self, site: &str, vm: &str) -> Arc<Mutex<Slot>> {
        self.vms
            .lock()
            .entry((site.to_string(), vm.to_string()))
            .or_insert_with(|| Arc::new(Mutex::new(Slot::Unclaimed)))
            .clone()
    }

    // ---------------------------------------------------------------
    // Reading state (no writer needed)

    /// The disks registered for `vm`.
    fn disks_of(&self, ctx: &Ctx, site: &str, vm: &str) -> Result<Vec<[u8; 16]>> {
        let dir = format!("{}/reg/", vm_dir(site, vm));
        Ok(self
            .list(ctx, &dir)?
            .iter()
            .filter_map(|n| crate::replica::parse_hex_id(n.strip_prefix(&dir)?))
            .collect())
    }

    /// The newest head of a disk as stored (`None`: unknown disk).
    fn stored_head(&self, ctx: &Ctx, site: &str, vm: &str, id: &[u8; 16]) -> Result<Option<Head>> {
        let dir = format!("{}/head/", disk_dir(site, vm, id));
        let Some(newest) = self.list(ctx, &dir)?.into_iter().max() else {
            return Ok(None);
        };
        let body = self.get(ctx, &newest)?;
        Ok(Some(self.json(&newest, &body)?))
    }

    /// The durable logs of a disk: (cycle, index name), ascending.
    fn durable_logs(
        &self,
        ctx: &Ctx,
        site: &str,
        vm: &str,
        id: &[u8; 16],
    ) -> Result<Vec<(u64, String)>> {
        let dir = format!("{}/logs/", disk_dir(site, vm, id));
        let mut v: Vec<(u64, String)> = self
            .list(ctx, &dir)?
            .into_iter()
            .filter_map(|n| Some((done_cycle(n.strip_prefix(&dir)?)?, n)))
            .collect();
        v.sort();
        Ok(v)
    }

    fn index(&self, ctx: &Ctx, name: &str) -> Result<Arc<LogIndex>> {
        self.indexes
            .get(&self.bucket, name)
            .map_err(|e| self.obj_err(ctx, &format!("reading the log index {name}"), e))
    }

    /// Roll `head` forward over the durable logs that chain on (what a
    /// crash between storing and applying a log left). Returns how many.
    fn roll_forward(
        &self,
        ctx: &Ctx,
        site: &str,
        vm: &str,
        id: &[u8; 16],
        head: &mut Head,
    ) -> Result<usize> {
        let (Some(mut rc), None) = (head.cycle, &head.initial) else {
            return Ok(0);
        };
        let mut n = 0;
        let logs = self.durable_logs(ctx, site, vm, id)?;
        // The lowest cycle above the replica's, if its log chains on (the
        // newest index of that cycle).
        while let Some(next) = logs.iter().map(|(c, _)| *c).filter(|&c| c > rc).min() {
            let Some((_, name)) = logs.iter().rev().find(|(c, _)| *c == next) else {
                break;
            };
            let idx = self.index(ctx, name)?;
            let resync_blocks = head.needs_resync.is_some() && head.resync_cycle != Some(idx.cycle);
            if idx.base_cycle != rc || resync_blocks {
                break;
            }
            push_log(head, &idx, name);
            rc = idx.cycle;
            n += 1;
        }
        Ok(n)
    }

    /// The replica's state as a crash recovery would leave it (read only).
    fn effective_head(&self, d: DiskRef<'_>) -> Result<Head> {
        let ctx = ctx_of(d);
        let slot = self.slot(d.site, d.vm);
        if let Slot::Claimed(st) = &*slot.lock() {
            return st
                .heads
                .get(d.disk_id)
                .cloned()
                .ok_or_else(|| unknown(&ctx));
        }
        let mut h = self
            .stored_head(&ctx, d.site, d.vm, d.disk_id)?
            .ok_or_else(|| unknown(&ctx))?;
        self.roll_forward(&ctx, d.site, d.vm, d.disk_id, &mut h)?;
        Ok(h)
    }

    /// The visible points of `vm`, oldest first: the listing and the
    /// newest manifest (cached by name: names are never rewritten).
    fn manifests(&self, ctx: &Ctx, site: &str, vm: &str) -> Result<Vec<(point::Listed, Manifest)>> {
        let perr = |e: point::PointError| match e {
            point::PointError::Bucket(b) => self.obj_err(ctx, "listing the points", b),
            other => StoreError::BadState {
                path: PathBuf::from(
                    self.bucket
                        .url()
                        .key(&format!("{}/points/", vm_dir(site, vm))),
                ),
                what: other.to_string(),
            },
        };
        let mut out = Vec::new();
        for l in point::list_points(&self.bucket, site, vm).map_err(perr)? {
            let cached = self.manifests.lock().get(&l.newest).cloned();
            let m = match cached {
                Some(m) => m,
                None => {
                    let body = match self.bucket.get(&l.newest) {
                        Ok(b) => b,
                        // Deleted by a prune since the listing.
                        Err(BucketError::Object(o))
                            if o.kind() == super::ObjectErrorKind::NotFound =>
                        {
                            continue
                        }
                        Err(e) => {
                            return Err(self.obj_err(ctx, &format!("reading {}", l.newest), e))
                        }
                    };
                    let m = point::parse_manifest(&l.newest, &body).map_err(perr)?;
                    self.manifests.lock().insert(l.newest.clone(), m.clone());
                    m
                }
            };
            out.push((l, m));
        }
        Ok(out)
    }

    // ---------------------------------------------------------------
    // Writing (a fenced writer per VM)

    /// Run `f` as this VM's writer, claiming a generation first if needed.
    fn with_vm<T>(
        &self,
        site: &str,
        vm: &str,
        f: impl FnOnce(&mut VmState, &Ctx) -> Result<T>,
    ) -> Result<T> {
        validate_name("site", site)?;
        validate_name("vm", vm)?;
        let ctx = Ctx::new(site, vm, "");
        let slot = self.slot(site, vm);
        let mut g = slot.lock();
        if let Slot::Fenced(why) = &*g {
            return Err(StoreError::Fenced {
                ctx,
                what: why.clone(),
            });
        }
        if matches!(&*g, Slot::Unclaimed) {
            *g = Slot::Claimed(Box::new(self.claim(&ctx, site, vm)?));
        }
        let Slot::Claimed(st) = &mut *g else {
            return Err(StoreError::NotReady {
                ctx,
                what: "the VM's writer state is missing: retry".into(),
            });
        };
        let r = f(st, &ctx);
        if let Err(StoreError::Fenced { what, .. }) = &r {
            *g = Slot::Fenced(what.clone());
        }
        r
    }

    /// Claim the next generation of a VM: roll durable logs forward and
    /// re-write every disk head in the new generation.
    fn claim(&self, ctx: &Ctx, site: &str, vm: &str) -> Result<VmState> {
        let dir = vm_dir(site, vm);
        let fence_dir = self.bucket.url().key(&format!("{dir}/fence"));
        let fence = Writer::claim(self.bucket.client(), &fence_dir, self.writer, || {
            Ok(point::newest_visible_cycle(&self.bucket, site, vm)? + 1)
        })
        .map_err(|e| self.fence_err(ctx, e))?;
        let mut st = VmState {
            fence,
            heads: HashMap::new(),
            seq: 0,
            sessions: HashMap::new(),
        };
        for id in self.disks_of(ctx, site, vm)? {
            let Some(mut h) = self.stored_head(ctx, site, vm, &id)? else {
                continue;
            };
            self.roll_forward(ctx, site, vm, &id, &mut h)?;
            self.write_head(ctx, &mut st, site, vm, &id, h)?;
        }
        Ok(st)
    }

    fn next_seq(st: &mut VmState) -> u64 {
        st.seq += 1;
        st.seq
    }

    /// Store `h` as the disk's newest head (then it is the replica).
    fn write_head(
        &self,
        ctx: &Ctx,
        st: &mut VmState,
        site: &str,
        vm: &str,
        id: &[u8; 16],
        h: Head,
    ) -> Result<()> {
        let seq = Self::next_seq(st);
        let name = format!(
            "{}/head/{:016x}-{seq:016x}",
            disk_dir(site, vm, id),
            st.fence.gen
        );
        let body = self.to_json(&name, &h)?;
        self.put(ctx, &name, &body)?;
        st.heads.insert(*id, h);
        Ok(())
    }

    /// Fail with [`StoreError::Fenced`] if a newer writer took over (call
    /// before acknowledging anything).
    fn check(&self, ctx: &Ctx, st: &VmState) -> Result<()> {
        st.fence
            .check(self.bucket.client())
            .map_err(|e| self.fence_err(ctx, e))
    }

    fn chunk_name(&self, st: &mut VmState, d: DiskRef<'_>, index: u64, cycle: u64) -> String {
        let seq = Self::next_seq(st);
        format!(
            "{}/chunks/{index:08x}.v{cycle:016x}-g{:016x}-{seq:016x}",
            disk_dir(d.site, d.vm, d.disk_id),
            st.fence.gen
        )
    }

    /// Store one chunk (`None` for zeros: nothing stored).
    fn put_chunk(
        &self,
        ctx: &Ctx,
        st: &mut VmState,
        d: DiskRef<'_>,
        index: u64,
        cycle: u64,
        data: &[u8],
    ) -> Result<Option<String>> {
        if crate::hrl::format::is_all_zero(data) {
            return Ok(None);
        }
        let name = self.chunk_name(st, d, index, cycle);
        self.put(ctx, &name, data)?;
        Ok(Some(name))
    }

    /// Flush the buffered chunk of an initial copy.
    fn flush_session(&self, ctx: &Ctx, st: &mut VmState, d: DiskRef<'_>) -> Result<()> {
        let Some(mut s) = st.sessions.remove(d.disk_id) else {
            return Ok(());
        };
        let r = self.put_chunk(ctx, st, d, s.cur, s.cycle, &s.buf);
        match r {
            Ok(name) => {
                let i = s.cur as usize;
                if s.chunks.len() <= i {
                    s.chunks.resize(i + 1, None);
                }
                s.chunks[i] = name;
                s.unsynced += s.buf.len() as u64;
                st.sessions.insert(*d.disk_id, s);
                Ok(())
            }
            Err(e) => Err(e), // the session is dropped: resume from the head
        }
    }

    /// Make the buffered chunk of the session `index` (flushing the one
    /// before, loading a stored version if there is one).
    fn session_at(
        &self,
        ctx: &Ctx,
        st: &mut VmState,
        d: DiskRef<'_>,
        index: u64,
        size: u64,
    ) -> Result<()> {
        let cur = st.sessions.get(d.disk_id).map(|s| s.cur);
        if cur == Some(index) {
            return Ok(());
        }
        self.flush_session(ctx, st, d)?;
        let Some(s) = st.sessions.get_mut(d.disk_id) else {
            return Err(StoreError::NotReady {
                ctx: ctx.clone(),
                what: "the initial copy's session was lost: resume it (begin_initial)".into(),
            });
        };
        let len = (size - index * CHUNK).min(CHUNK) as usize;
        let stored = s.chunks.get(index as usize).cloned().flatten();
        s.cur = index;
        s.buf = vec![0; len];
        if let Some(name) = stored {
            let data = self.get(ctx, &name)?;
            if let Some(s) = st.sessions.get_mut(d.disk_id) {
                let n = data.len().min(len);
                s.buf[..n].copy_from_slice(&data[..n]);
            }
        }
        Ok(())
    }

    /// Record the progress of an initial copy in the head (everything
    /// below the buffered chunk is stored).
    fn sync_initial(&self, ctx: &Ctx, st: &mut VmState, d: DiskRef<'_>) -> Result<()> {
        let Some(s) = st.sessions.get_mut(d.disk_id) else {
            return Ok(());
        };
        s.unsynced = 0;
        let offset = s.cur * CHUNK;
        let chunks: Vec<Option<String>> = s.chunks.iter().take(s.cur as usize).cloned().collect();
        let cycle = s.cycle;
        let Some(mut h) = st.heads.get(d.disk_id).cloned() else {
            return Err(unknown(ctx));
        };
        h.initial = Some(Initial {
            cycle,
            offset: offset.min(h.size),
            chunks,
        });
        self.write_head(ctx, st, d.site, d.vm, d.disk_id, h)
    }

    /// Spool `src` to a local file, verify it completely, and index it.
    fn spool_and_index(
        &self,
        ctx: &Ctx,
        src: &mut dyn Read,
    ) -> Result<(PathBuf, crate::hrl::HrlHeader, LogIndex)> {
        let n = self.spool_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .spool
            .join(format!(".log-{}-{n}.hrl.tmp", std::process::id()));
        let io = |doing: &str, e: std::io::Error| StoreError::Io {
            ctx: ctx.clone(),
            doing: doing.to_string(),
            path: path.clone(),
            retryable: true,
            source: e,
        };
        let res = (|| {
            let mut f = std::fs::File::create(&path).map_err(|e| io("spooling a log", e))?;
            std::io::copy(src, &mut f).map_err(|e| io("receiving a log", e))?;
            f.flush().map_err(|e| io("spooling a log", e))?;
            drop(f);
            let hrl = |e: HrlError| match e {
                HrlError::Io { path, source } => StoreError::Io {
                    ctx: ctx.clone(),
                    doing: "reading a spooled log".into(),
                    path,
                    retryable: true,
                    source,
                },
                other => StoreError::CorruptLog {
                    ctx: ctx.clone(),
                    cycle: 0,
                    source: other,
                },
            };
            let mut r = HrlReader::open(&path).map_err(hrl)?;
            let header = r.header().clone();
            let mut records: Vec<RecordRef> = Vec::new();
            let mut data_bytes = 0;
            let mut fail = None;
            loop {
                match r.next_record() {
                    Ok(Some(rec)) => {
                        data_bytes += u64::from(rec.length);
                        records.push((
                            rec.offset,
                            rec.length,
                            rec.file_offset,
                            (crate::hrl::format::RECORD_HEADER_LEN + rec.stored.len()) as u32,
                            rec.data.is_none(),
                        ));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        fail = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = fail {
                return Err(match hrl(e) {
                    StoreError::CorruptLog { ctx, source, .. } => StoreError::CorruptLog {
                        ctx,
                        cycle: header.cycle,
                        source,
                    },
                    other => other,
                });
            }
            let sum = r.finish().map_err(hrl)?;
            let idx = LogIndex {
                version: 1,
                cycle: header.cycle,
                base_cycle: header.base_cycle,
                base_size: header.base_size,
                disk_size: header.disk_size,
                cut_unix_ns: header.cut_unix_ns,
                app_consistent: header.app_consistent,
                file_bytes: sum.file_bytes,
                data_bytes,
                checksum: sum.log_checksum,
                segments: Vec::new(),
                records,
            };
            Ok((header, idx))
        })();
        match res {
            Ok((h, idx)) => Ok((path, h, idx)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Whether a log of `h` is a resend (the outcome), storable (`None`)
    /// or refused.
    fn log_fits(ctx: &Ctx, head: &Head, cycle: u64, base: u64) -> Result<Option<StoreOutcome>> {
        let Some(rc) = head.cycle.filter(|_| head.initial.is_none()) else {
            return Ok(None); // initial copy running: keep the log for later
        };
        if cycle <= rc {
            return Ok(Some(StoreOutcome::AlreadyApplied {
                cycle,
                replica_cycle: rc,
            }));
        }
        if let Some(why) = &head.needs_resync {
            if head.resync_cycle != Some(cycle) {
                return Err(StoreError::NeedsResync {
                    ctx: ctx.clone(),
                    why: why.clone(),
                });
            }
        }
        if base < rc {
            return Err(StoreError::OutOfOrder {
                ctx: ctx.clone(),
                cycle,
                base_cycle: base,
                replica_cycle: rc,
                applying: None,
                what: "the log starts before the replica's cycle and ends after it: the chains diverged; resync the disk".into(),
            });
        }
        Ok(None)
    }

    /// Fold the logs of a disk up to `k0` into new base chunks (only the
    /// chunks those logs touched are written): a new head whose base
    /// names the old base's chunks (`folded_from`) for
    /// [`rebase_kept`](Self::rebase_kept). Returns whether it folded.
    fn compact(&self, ctx: &Ctx, st: &mut VmState, d: DiskRef<'_>, k0: u64) -> Result<bool> {
        let Some(h) = st.heads.get(d.disk_id).cloned() else {
            return Ok(false);
        };
        let Some(base) = h.base.clone() else {
            return Ok(false);
        };
        if base.cycle >= k0 || h.initial.is_some() || h.cycle.is_none_or(|c| c < k0) {
            return Ok(false);
        }
        let Some(layers) = h.layers_at(k0) else {
            return Ok(false);
        };
        let size = layers.size;
        let nchunks = size.div_ceil(CHUNK) as usize;
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        let mut min_size = base.size;
        for l in &layers.logs {
            let idx = self.index(ctx, &l.index)?;
            min_size = min_size.min(idx.disk_size);
            for r in &idx.records {
                let first = r.0 / CHUNK;
                let last = (r.0 + u64::from(r.1)).saturating_sub(1) / CHUNK;
                touched.extend(first..=last);
            }
        }
        // Chunks a shrink or grow cut through change too.
        touched.extend(min_size / CHUNK..nchunks as u64);
        let reader = Layered::new(self.bucket.clone(), layers.clone(), self.indexes.clone());
        let mut chunks: Vec<Option<String>> = base.chunks.clone();
        chunks.resize(nchunks, None);
        for &i in touched.iter().filter(|&&i| (i as usize) < nchunks) {
            let len = (size - i * CHUNK).min(CHUNK) as usize;
            let mut buf = vec![0u8; len];
            reader
                .read_at(&mut buf, i * CHUNK)
                .map_err(|e| StoreError::Io {
                    ctx: ctx.clone(),
                    doing: "reading the replica to compact it".into(),
                    path: PathBuf::from(self.bucket.url().to_string()),
                    retryable: true,
                    source: e,
                })?;
            chunks[i as usize] = self.put_chunk(ctx, st, d, i, k0, &buf)?;
        }
        let time = layers.logs.last().map_or(Ok(base.time_unix_ns), |l| {
            self.index(ctx, &l.index).map(|i| i.cut_unix_ns)
        })?;
        let nb = Base {
            cycle: k0,
            size,
            time_unix_ns: time,
            chunks,
            folded_from: Some(base.chunks.clone()),
        };
        let mut nh = h.clone();
        nh.base = Some(nb);
        nh.logs.retain(|l| l.cycle > k0);
        self.write_head(ctx, st, d.site, d.vm, d.disk_id, nh)?;
        self.check(ctx, st)?;
        Ok(true)
    }

    /// Point every kept manifest that still names the base a disk head's
    /// compaction folded (`folded_from`) at that head's base: a new
    /// manifest version (its logs up to the base's cycle dropped), put
    /// and fence-checked before the old versions are deleted. `kept` is
    /// updated to the new versions. A `pinned` point keeps its manifest
    /// (a failover reads the objects it names).
    fn rebase_kept(
        &self,
        ctx: &Ctx,
        st: &mut VmState,
        kept: &mut [(point::Listed, Manifest)],
        pinned: &[u64],
    ) -> Result<()> {
        let folded: HashMap<String, Base> = st
            .heads
            .iter()
            .filter_map(|(id, h)| {
                let b = h.base.as_ref()?;
                b.folded_from.as_ref().map(|_| (hex(id), b.clone()))
            })
            .collect();
        if folded.is_empty() {
            return Ok(());
        }
        for (l, m) in kept.iter_mut().filter(|(_, m)| !pinned.contains(&m.cycle)) {
            let mut nm = m.clone();
            let mut changed = false;
            for dm in &mut nm.disks {
                let Some(base) = folded.get(&dm.disk_id) else {
                    continue;
                };
                if base.folded_from.as_ref() != Some(&dm.chunks) || m.cycle < base.cycle {
                    continue; // another base (or older than the fold)
                }
                dm.chunks = base.chunks.clone();
                dm.base_size = Some(base.size);
                dm.logs.retain(|x| x.cycle > base.cycle);
                changed = true;
            }
            if !changed {
                continue;
            }
            let seq = Self::next_seq(st);
            let name = point::manifest_version_name(&l.newest, (st.fence.gen, seq));
            let body = self.to_json(&name, &nm)?;
            self.put(ctx, &name, &body)?;
            self.check(ctx, st)?;
            self.manifests.lock().insert(name.clone(), nm.clone());
            for old in &l.all {
                self.delete(ctx, old)?;
                self.manifests.lock().remove(old);
            }
            l.newest = name.clone();
            l.all = vec![name];
            *m = nm;
        }
        Ok(())
    }

    /// The cycles of `vm` that live pins hold ([`super::pin`]).
    fn pinned(&self, ctx: &Ctx, site: &str, vm: &str) -> Result<Vec<u64>> {
        let pins = super::pin::list(&self.bucket, site, vm)
            .map_err(|e| self.obj_err(ctx, "listing the pins of failovers", e))?;
        Ok(super::pin::live_cycles(&pins, super::pin::now_s()))
    }

    /// Delete every object of `vm` that neither a visible point, a disk
    /// head nor a pending log needs. Returns bytes deleted (as stored).
    fn collect(&self, ctx: &Ctx, st: &VmState, site: &str, vm: &str) -> Result<u64> {
        let mut keep: HashSet<String> = HashSet::new();
        let mut stems: HashSet<String> = HashSet::new();
        let mut add_layers =
            |chunks: &[Option<String>], logs: &[LogRef], keep: &mut HashSet<String>| {
                keep.extend(chunks.iter().flatten().cloned());
                for l in logs {
                    keep.insert(l.index.clone());
                    if let Some(s) = l.index.strip_suffix(".done") {
                        stems.insert(s.to_string());
                    }
                }
            };
        for (_, m) in self.manifests(ctx, site, vm)? {
            for dm in &m.disks {
                add_layers(&dm.chunks, &dm.logs, &mut keep);
            }
        }
        for h in st.heads.values() {
            if let Some(b) = &h.base {
                add_layers(&b.chunks, &h.logs, &mut keep);
            }
            if let Some(i) = &h.initial {
                add_layers(&i.chunks, &[], &mut keep);
            }
        }
        for s in st.sessions.values() {
            add_layers(&s.chunks, &[], &mut keep);
        }
        let mut freed = 0;
        let prefix = self.bucket.url().key("");
        for (id, h) in &st.heads {
            let dir = disk_dir(site, vm, id);
            let rc = h.cycle.filter(|_| h.initial.is_none()).unwrap_or(0);
            let listed = self
                .bucket
                .client()
                .list(&self.bucket.url().key(&format!("{dir}/")))
                .map_err(|e| self.obj_err(ctx, "listing a disk's objects", e.into()))?;
            let heads: Vec<&str> = listed
                .iter()
                .filter_map(|m| m.key.strip_prefix(&prefix))
                .filter(|n| n.starts_with(&format!("{dir}/head/")))
                .collect();
            let newest_head = heads.iter().max().copied().unwrap_or("");
            for m in &listed {
                let Some(name) = m.key.strip_prefix(&prefix) else {
                    continue;
                };
                let Some(rest) = name.strip_prefix(&format!("{dir}/")) else {
                    continue;
                };
                let drop = if rest.starts_with("head/") {
                    name != newest_head
                } else if rest.starts_with("chunks/") {
                    !keep.contains(name)
                } else if let Some(leaf) = rest.strip_prefix("logs/") {
                    let cycle = leaf
                        .get(..16)
                        .and_then(|c| u64::from_str_radix(c, 16).ok())
                        .unwrap_or(u64::MAX);
                    let stem = match leaf.split_once('/') {
                        Some((s, _)) => format!("{dir}/logs/{s}"),
                        None => name.strip_suffix(".done").unwrap_or(name).to_string(),
                    };
                    // Logs above the replica's cycle may still be applied.
                    cycle <= rc && !stems.contains(&stem)
                } else {
                    false
                };
                if drop {
                    self.bucket
                        .client()
                        .delete(&m.key)
                        .map_err(|e| self.obj_err(ctx, "deleting an unneeded object", e.into()))?;
                    self.indexes.remove(name);
                    freed += m.size;
                }
            }
        }
        Ok(freed)
    }
}

fn unknown(ctx: &Ctx) -> StoreError {
    StoreError::NotReady {
        ctx: ctx.clone(),
        what: "this disk is unknown to the receiver: start its initial replication".into(),
    }
}

fn push_log(head: &mut Head, idx: &LogIndex, name: &str) {
    head.logs.push(LogRef {
        cycle: idx.cycle,
        index: name.to_string(),
        bytes: idx.file_bytes,
        disk_size: idx.disk_size,
        cut_unix_ns: idx.cut_unix_ns,
    });
    head.cycle = Some(idx.cycle);
    head.cycle_time_ns = idx.cut_unix_ns;
    head.size = idx.disk_size;
    if head.resync_cycle == Some(idx.cycle) {
        head.needs_resync = None;
        head.resync_cycle = None;
    }
}

/// The per-compare scratch state of [`ReplicaStore::block_hashes`].
#[derive(Default)]
struct DigestScratch {
    open: Option<(String, Layers, Arc<Layered>)>,
    buf: Vec<u8>,
}

impl ReplicaStore for BucketStore {
    fn recover(&self) -> Result<RecoveryReport> {
        let mut rep = RecoveryReport::default();
        for e in std::fs::read_dir(&self.spool)
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name();
            if n.to_string_lossy().starts_with(".log-") {
                let _ = std::fs::remove_file(e.path());
                rep.actions
                    .push(format!("removed a spooled log {}", e.path().display()));
            }
        }
        // Interrupted applies need nothing: a durable log that chains on
        // is rolled into the head by the next writer of its VM (a claim),
        // and read as applied meanwhile.
        Ok(rep)
    }

    fn free_bytes(&self) -> u64 {
        0
    }

    fn vms(&self) -> Vec<(String, String)> {
        let Ok(names) = self.bucket.list("vmreg/") else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|n| {
                let (site, vm) = n.strip_prefix("vmreg/")?.split_once('/')?;
                Some((site.to_string(), vm.to_string()))
            })
            .collect()
    }

    fn failed_over(&self, _site: &str, _vm: &str) -> Result<Option<LiveInfo>> {
        Ok(None)
    }

    fn replica_state(&self, d: DiskRef<'_>) -> Result<ReplicaState> {
        validate_name("vm", d.vm)?;
        Ok(self.effective_head(d)?.state(d.disk_id))
    }

    fn begin_initial(&self, site: &str, vm: &str, info: &DiskInfo) -> Result<InitialState> {
        validate_name("disk", &info.name)?;
        let d = DiskRef {
            site,
            vm,
            disk_id: &info.disk_id,
        };
        self.with_vm(site, vm, |st, vctx| {
            let ctx = ctx_of(d);
            st.sessions.remove(&info.disk_id);
            let old = st.heads.get(&info.disk_id).cloned();
            if let Some(h) = &old {
                if h.name != info.name {
                    return Err(StoreError::IdentityMismatch {
                        ctx,
                        what: format!(
                            "disk {} is replicated here as {:?}, the sender now calls it {:?}; use a new disk id or remove the old replica",
                            hex(&info.disk_id), h.name, info.name
                        ),
                    });
                }
                if let Some(i) = &h.initial {
                    if h.size == info.size && i.cycle == info.cycle {
                        return Ok(InitialState {
                            resume_offset: i.offset.min(info.size),
                            dropped: None,
                        });
                    }
                }
            }
            // The points that include this disk cannot be rebuilt once a
            // full copy starts (its history cannot chain through it, or is
            // gone with its replica); the VM's other points stay whole.
            let idh = hex(&info.disk_id);
            let mut cycles = Vec::new();
            for (l, m) in self.manifests(vctx, site, vm)? {
                if m.disks.iter().any(|dm| dm.disk_id == idh) {
                    for name in &l.all {
                        self.delete(vctx, name)?;
                    }
                    cycles.push(m.cycle);
                }
            }
            let dropped = (!cycles.is_empty()).then(|| PointsDropped {
                vm: vm.to_string(),
                disk_id: idh.clone(),
                disk: info.name.clone(),
                cycles,
                why: match old.as_ref().and_then(|h| h.cycle) {
                    Some(replica_cycle) => DropReason::ReCopy { replica_cycle },
                    None => DropReason::ReplicaLost,
                },
            });
            self.put(vctx, &format!("vmreg/{site}/{vm}"), b"")?;
            self.put(
                vctx,
                &format!("{}/reg/{}", vm_dir(site, vm), hex(&info.disk_id)),
                b"",
            )?;
            let h = Head {
                version: 1,
                name: info.name.clone(),
                size: info.size,
                block_size: info.block_size,
                vhd_id: old
                    .as_ref()
                    .map_or_else(|| hex(&random_id()), |o| o.vhd_id.clone()),
                vhd_time: old
                    .as_ref()
                    .map_or_else(crate::vhd::footer::vhd_timestamp_now, |o| o.vhd_time),
                initial: Some(Initial {
                    cycle: info.cycle,
                    offset: 0,
                    chunks: Vec::new(),
                }),
                cycle: None,
                cycle_time_ns: 0,
                base: None,
                logs: Vec::new(),
                needs_resync: None,
                resync_cycle: None,
            };
            self.write_head(&ctx, st, site, vm, &info.disk_id, h)?;
            self.check(&ctx, st)?;
            Ok(InitialState {
                resume_offset: 0,
                dropped,
            })
        })
    }

    fn rebase_initial(&self, d: DiskRef<'_>, new_cycle: u64) -> Result<u64> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            st.sessions.remove(d.disk_id);
            let mut h = st
                .heads
                .get(d.disk_id)
                .cloned()
                .ok_or_else(|| unknown(&ctx))?;
            let Some(i) = h.initial.as_mut() else {
                return Err(StoreError::NotReady {
                    ctx,
                    what: "no initial copy is in progress for this disk: nothing to resume".into(),
                });
            };
            i.cycle = new_cycle;
            let off = i.offset;
            self.write_head(&ctx, st, d.site, d.vm, d.disk_id, h)?;
            self.check(&ctx, st)?;
            Ok(off)
        })
    }

    fn write_initial(&self, d: DiskRef<'_>, offset: u64, data: InitialData<'_>) -> Result<()> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            let h = st.heads.get(d.disk_id).cloned().ok_or_else(|| unknown(&ctx))?;
            let Some(init) = &h.initial else {
                return Err(StoreError::NotReady {
                    ctx,
                    what: "no initial copy is in progress for this disk: call begin_initial first".into(),
                });
            };
            let len = match data {
                InitialData::Data(b) => b.len() as u64,
                InitialData::Zeroes(n) => n,
            };
            let end = offset.saturating_add(len);
            if end > h.size {
                return Err(StoreError::IdentityMismatch {
                    ctx,
                    what: format!(
                        "initial data at offset {offset} ({len} bytes) runs past the disk size {}: restart the initial copy with the right size",
                        h.size
                    ),
                });
            }
            if !st.sessions.contains_key(d.disk_id) {
                let cur = init.offset / CHUNK;
                st.sessions.insert(
                    *d.disk_id,
                    Session {
                        cycle: init.cycle,
                        cur,
                        buf: vec![0; (h.size.saturating_sub(cur * CHUNK)).min(CHUNK) as usize],
                        chunks: init.chunks.clone(),
                        unsynced: 0,
                    },
                );
            }
            let mut pos = offset;
            while pos < end {
                let index = pos / CHUNK;
                let within = (pos % CHUNK) as usize;
                let n = ((end - pos) as usize).min(CHUNK as usize - within);
                let skip_zeros = matches!(data, InitialData::Zeroes(_))
                    && st.sessions.get(d.disk_id).is_some_and(|s| {
                        s.cur != index
                            && s.chunks.get(index as usize).is_none_or(|c| c.is_none())
                    })
                    && within == 0
                    && n as u64 == CHUNK.min(h.size - index * CHUNK);
                if !skip_zeros {
                    if let Err(e) = self.session_at(&ctx, st, d, index, h.size) {
                        st.sessions.remove(d.disk_id);
                        return Err(e);
                    }
                    if let Some(s) = st.sessions.get_mut(d.disk_id) {
                        let dst = &mut s.buf[within..within + n];
                        match data {
                            InitialData::Data(b) => {
                                let from = (pos - offset) as usize;
                                dst.copy_from_slice(&b[from..from + n]);
                            }
                            InitialData::Zeroes(_) => dst.fill(0),
                        }
                    }
                }
                pos += n as u64;
            }
            if st
                .sessions
                .get(d.disk_id)
                .is_some_and(|s| s.unsynced >= INITIAL_SYNC_EVERY)
            {
                self.sync_initial(&ctx, st, d)?;
            }
            Ok(())
        })
    }

    fn finish_initial(&self, d: DiskRef<'_>, cycle: u64, time_ns: u64) -> Result<()> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            let h = st.heads.get(d.disk_id).cloned().ok_or_else(|| unknown(&ctx))?;
            let Some(init) = h.initial.clone() else {
                if h.cycle == Some(cycle) {
                    return Ok(());
                }
                return Err(StoreError::NotReady {
                    ctx,
                    what: format!(
                        "no initial copy is in progress (the replica is at cycle {:?}): cannot finish one at cycle {cycle}",
                        h.cycle
                    ),
                });
            };
            if init.cycle != cycle {
                return Err(StoreError::IdentityMismatch {
                    ctx,
                    what: format!(
                        "the initial copy was started as of cycle {} but is finished as cycle {cycle}: restart it (begin_initial) with the cycle it is read at",
                        init.cycle
                    ),
                });
            }
            let mut chunks = init.chunks.clone();
            if st.sessions.contains_key(d.disk_id) {
                let r = self.flush_session(&ctx, st, d);
                if let Err(e) = r {
                    st.sessions.remove(d.disk_id);
                    return Err(e);
                }
                if let Some(s) = st.sessions.remove(d.disk_id) {
                    chunks = s.chunks;
                }
            }
            chunks.resize(h.size.div_ceil(CHUNK) as usize, None);
            let mut nh = h;
            nh.initial = None;
            nh.base = Some(Base {
                cycle,
                size: nh.size,
                time_unix_ns: time_ns,
                chunks,
                folded_from: None,
            });
            nh.logs.clear();
            nh.cycle = Some(cycle);
            nh.cycle_time_ns = time_ns;
            nh.needs_resync = None;
            nh.resync_cycle = None;
            self.write_head(&ctx, st, d.site, d.vm, d.disk_id, nh)?;
            self.check(&ctx, st)
        })
    }

    fn store_log(&self, d: DiskRef<'_>, log: &mut dyn Read) -> Result<StoreOutcome> {
        let ctx = ctx_of(d);
        validate_name("vm", d.vm)?;
        let (path, header, mut idx) = self.spool_and_index(&ctx, log)?;
        let res = self.with_vm(d.site, d.vm, |st, _| {
            let cycle = header.cycle;
            if header.disk_id != *d.disk_id {
                return Err(StoreError::IdentityMismatch {
                    ctx: ctx.clone(),
                    what: format!(
                        "the log for cycle {cycle} is for disk {} ({}), not this disk: the sender mixed up its disks",
                        hex(&header.disk_id),
                        header.disk_name
                    ),
                });
            }
            let h = st.heads.get(d.disk_id).cloned().ok_or_else(|| unknown(&ctx))?;
            if let Some(done) = Self::log_fits(&ctx, &h, cycle, header.base_cycle)? {
                // A fenced writer acknowledges nothing, resends included.
                self.check(&ctx, st)?;
                return Ok(done);
            }
            for (c, name) in self.durable_logs(&ctx, d.site, d.vm, d.disk_id)? {
                if c != cycle {
                    continue;
                }
                if self.index(&ctx, &name)?.checksum == idx.checksum {
                    self.check(&ctx, st)?;
                    return Ok(StoreOutcome::AlreadyStored { cycle });
                }
                // Another log for the same cycle replaces it.
                self.delete(&ctx, &name)?;
                self.indexes.remove(&name);
            }
            let seq = Self::next_seq(st);
            let stem = format!(
                "{}/logs/{cycle:016x}-g{:016x}-{seq:016x}",
                disk_dir(d.site, d.vm, d.disk_id),
                st.fence.gen
            );
            let mut f = std::fs::File::open(&path).map_err(|e| StoreError::Io {
                ctx: ctx.clone(),
                doing: "reading a spooled log".into(),
                path: path.clone(),
                retryable: true,
                source: e,
            })?;
            let mut buf = vec![0u8; SEGMENT as usize];
            let mut n = 0u32;
            loop {
                let mut got = 0;
                while got < buf.len() {
                    match f.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(StoreError::Io {
                                ctx: ctx.clone(),
                                doing: "reading a spooled log".into(),
                                path: path.clone(),
                                retryable: true,
                                source: e,
                            })
                        }
                    }
                }
                if got == 0 {
                    break;
                }
                let name = format!("{stem}/{n:08x}");
                self.put(&ctx, &name, &buf[..got])?;
                idx.segments.push(name);
                n += 1;
            }
            let done = format!("{stem}.done");
            let body = self.to_json(&done, &idx)?;
            self.put(&ctx, &done, &body)?;
            self.check(&ctx, st)?;
            Ok(StoreOutcome::Stored {
                cycle,
                base_cycle: header.base_cycle,
                bytes: idx.file_bytes,
            })
        });
        let _ = std::fs::remove_file(&path);
        res
    }

    fn apply(&self, d: DiskRef<'_>, cycle: u64) -> Result<ApplyOutcome> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            let mut h = st.heads.get(d.disk_id).cloned().ok_or_else(|| unknown(&ctx))?;
            let Some(rc) = h.cycle.filter(|_| h.initial.is_none()) else {
                return Err(StoreError::NotReady {
                    ctx,
                    what: "the initial copy of this disk has not finished: no log can be applied yet".into(),
                });
            };
            if cycle <= rc {
                self.check(&ctx, st)?;
                return Ok(ApplyOutcome::AlreadyApplied {
                    cycle,
                    replica_cycle: rc,
                });
            }
            let logs = self.durable_logs(&ctx, d.site, d.vm, d.disk_id)?;
            let Some((_, name)) = logs.iter().rev().find(|(c, _)| *c == cycle) else {
                return Err(StoreError::NotReady {
                    ctx,
                    what: format!("no durable log of cycle {cycle} in the store: send it first"),
                });
            };
            let idx = self.index(&ctx, name)?;
            if let Some(why) = &h.needs_resync {
                if h.resync_cycle != Some(cycle) {
                    return Err(StoreError::NeedsResync {
                        ctx,
                        why: why.clone(),
                    });
                }
            }
            if idx.base_cycle != rc {
                return Err(StoreError::OutOfOrder {
                    ctx,
                    cycle,
                    base_cycle: idx.base_cycle,
                    replica_cycle: rc,
                    applying: None,
                    what: if idx.base_cycle > rc {
                        format!("the logs of cycles {}..={} are missing: the sender must send them first (or resync)", rc + 1, idx.base_cycle)
                    } else {
                        "the log starts before the replica's cycle: the chains diverged; resync the disk".into()
                    },
                });
            }
            push_log(&mut h, &idx, name);
            self.write_head(&ctx, st, d.site, d.vm, d.disk_id, h)?;
            self.check(&ctx, st)?;
            Ok(ApplyOutcome::Applied {
                cycle,
                bytes: idx.data_bytes,
                undo_bytes: idx.file_bytes,
                rolled_forward: false,
            })
        })
    }

    fn set_needs_resync(&self, d: DiskRef<'_>, reason: Option<&str>) -> Result<()> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            let mut h = st
                .heads
                .get(d.disk_id)
                .cloned()
                .ok_or_else(|| unknown(&ctx))?;
            h.needs_resync = reason.map(str::to_string);
            h.resync_cycle = None;
            self.write_head(&ctx, st, d.site, d.vm, d.disk_id, h)?;
            self.check(&ctx, st)
        })
    }

    fn resync_prepared(&self, d: DiskRef<'_>, replica_cycle: u64, cycle: u64) -> Result<()> {
        self.with_vm(d.site, d.vm, |st, _| {
            let ctx = ctx_of(d);
            let mut h = st.heads.get(d.disk_id).cloned().ok_or_else(|| unknown(&ctx))?;
            if h.cycle != Some(replica_cycle) || h.initial.is_some() {
                return Err(StoreError::NotReady {
                    ctx,
                    what: format!(
                        "the resync compared against cycle {replica_cycle} but the replica is at {:?}: compare again",
                        h.cycle
                    ),
                });
            }
            if h.needs_resync.is_some() {
                h.resync_cycle = Some(cycle);
                self.write_head(&ctx, st, d.site, d.vm, d.disk_id, h)?;
                self.check(&ctx, st)?;
            }
            Ok(())
        })
    }

    fn block_hashes(
        &self,
        d: DiskRef<'_>,
        replica_cycle: u64,
        block_size: u32,
        runs: &[(u64, u32)],
        cache: &mut DigestCache,
    ) -> Result<(u64, Vec<u128>)> {
        let ctx = ctx_of(d);
        let h = self.effective_head(d)?;
        let layers = h
            .layers_at(replica_cycle)
            .filter(|_| h.cycle == Some(replica_cycle))
            .ok_or_else(|| StoreError::NotReady {
                ctx: ctx.clone(),
                what: format!(
                    "digests of cycle {replica_cycle} were asked for, but the replica is at {:?}: open the disk again and restart the compare",
                    h.cycle
                ),
            })?;
        let scratch = cache.get::<DigestScratch>();
        let key = format!("{}/{}", d.vm, hex(d.disk_id));
        let reader = match &scratch.open {
            Some((k, l, r)) if *k == key && *l == layers => r.clone(),
            _ => {
                let r = Arc::new(Layered::new(
                    self.bucket.clone(),
                    layers.clone(),
                    self.indexes.clone(),
                ));
                scratch.open = Some((key, layers, r.clone()));
                r
            }
        };
        let size = reader.len();
        let bs = u64::from(block_size.max(1));
        let piece = (crate::resync::BATCH_BYTES / bs).max(1) * bs;
        let threads = crate::resync::hash_threads();
        let mut out = Vec::new();
        for &(off, n) in runs {
            let end = off.saturating_add(u64::from(n) * bs);
            let mut at = off;
            while at < end {
                let stop = (at + piece).min(end);
                let have_end = stop.min(size).max(at);
                let len = (have_end - at) as usize;
                if len > 0 {
                    scratch.buf.resize(len, 0);
                    reader
                        .read_at(&mut scratch.buf[..len], at)
                        .map_err(|e| StoreError::Io {
                            ctx: ctx.clone(),
                            doing: "reading the replica for a resync".into(),
                            path: PathBuf::from(self.bucket.url().to_string()),
                            retryable: true,
                            source: e,
                        })?;
                    out.extend(crate::resync::digest_blocks(
                        &scratch.buf[..len],
                        bs as usize,
                        threads,
                    ));
                }
                crate::resync::pad_missing(&mut out, len as u64, stop - at, bs);
                at = stop;
            }
        }
        Ok((size, out))
    }

    fn commit_point(
        &self,
        site: &str,
        vm: &str,
        cycle: u64,
        disks: &[[u8; 16]],
        consistency: Consistency,
    ) -> Result<Option<Point>> {
        self.with_vm(site, vm, |st, vctx| {
            let mut dms = Vec::new();
            let mut time = 0;
            for id in disks {
                let ctx = Ctx::new(site, vm, &hex(id));
                let h = st.heads.get(id).ok_or_else(|| unknown(&ctx))?;
                let Some(rc) = h.cycle.filter(|_| h.initial.is_none()) else {
                    return Ok(None);
                };
                if rc < cycle {
                    return Ok(None);
                }
                let Some(layers) = h.layers_at(cycle) else {
                    return Err(StoreError::NoSuchPoint {
                        ctx,
                        cycle,
                        what: format!("this disk went from an earlier cycle past {cycle} (replica at {rc}): no consistent point can be made there"),
                    });
                };
                time = time.max(
                    layers
                        .logs
                        .last()
                        .map_or(h.base.as_ref().map_or(0, |b| b.time_unix_ns), |l| l.cut_unix_ns),
                );
                dms.push(DiskManifest {
                    disk_id: hex(id),
                    size: layers.size,
                    chunks: layers.chunks,
                    base_size: Some(layers.base_size),
                    logs: layers.logs,
                });
            }
            let existing = self.manifests(vctx, site, vm)?;
            if let Some((_, m)) = existing.iter().find(|(_, m)| m.cycle == cycle) {
                self.check(vctx, st)?;
                return Ok(Some(point_of(m, 0)));
            }
            if cycle < st.fence.start {
                return Err(StoreError::NoSuchPoint {
                    ctx: vctx.clone(),
                    cycle,
                    what: format!(
                        "an earlier writer of this VM went past cycle {cycle} without committing it; points continue from cycle {}",
                        st.fence.start
                    ),
                });
            }
            let m = Manifest {
                version: 1,
                cycle,
                time_unix_ns: time,
                consistency,
                gen: st.fence.gen,
                writer: hex(&st.fence.writer),
                disks: dms,
            };
            let name = point::manifest_name(site, vm, cycle, m.gen, &m.writer);
            let body = self.to_json(&name, &m)?;
            self.put(vctx, &name, &body)?;
            self.check(vctx, st)?;
            self.manifests.lock().insert(name, m.clone());
            Ok(Some(point_of(&m, 0)))
        })
    }

    fn save_definition(&self, site: &str, vm: &str, cycle: u64, xml: &str) -> Result<()> {
        self.with_vm(site, vm, |st, ctx| {
            let name = definition_name(site, vm, cycle);
            self.put(ctx, &name, xml.as_bytes())?;
            // A fenced writer's definition is not trusted: the newer
            // writer stores its own before its point.
            self.check(ctx, st)
        })
    }

    fn definition(&self, site: &str, vm: &str, cycle: u64) -> Result<Option<String>> {
        validate_name("site", site)?;
        validate_name("vm", vm)?;
        let ctx = Ctx::new(site, vm, "");
        let name = definition_name(site, vm, cycle);
        let listed = self.list(&ctx, &format!("{}/definitions/", vm_dir(site, vm)))?;
        if !listed.iter().any(|n| n == &name) {
            return Ok(None);
        }
        let body = self.get(&ctx, &name)?;
        String::from_utf8(body)
            .map(Some)
            .map_err(|e| StoreError::BadState {
                path: PathBuf::from(self.bucket.url().key(&name)),
                what: format!("the domain definition is not UTF-8: {e}"),
            })
    }

    fn points(&self, site: &str, vm: &str) -> Result<Vec<Point>> {
        validate_name("site", site)?;
        validate_name("vm", vm)?;
        let ms = self.manifests(&Ctx::new(site, vm, ""), site, vm)?;
        let mut out = Vec::with_capacity(ms.len());
        for (i, (_, m)) in ms.iter().enumerate() {
            // The history this point costs: the logs leading to the next one.
            let bytes = ms.get(i + 1).map_or(0, |(_, next)| {
                next.disks
                    .iter()
                    .flat_map(|d| d.logs.iter())
                    .filter(|l| l.cycle > m.cycle)
                    .map(|l| l.bytes)
                    .sum()
            });
            out.push(point_of(m, bytes));
        }
        Ok(out)
    }

    fn read_point(&self, d: DiskRef<'_>, cycle: u64) -> Result<Box<dyn PointRead>> {
        validate_name("vm", d.vm)?;
        let ctx = ctx_of(d);
        let id = hex(d.disk_id);
        let dm = self
            .manifests(&ctx, d.site, d.vm)?
            .into_iter()
            .find(|(_, m)| m.cycle == cycle)
            .and_then(|(_, m)| m.disks.into_iter().find(|x| x.disk_id == id))
            .ok_or_else(|| StoreError::NoSuchPoint {
                ctx,
                cycle,
                what: "it was never committed for this disk or was pruned; list the points with `vdrep points`".into(),
            })?;
        Ok(Box::new(
            Layered::new(self.bucket.clone(), dm.layers(), self.indexes.clone())
                .with_cache(self.objects.clone()),
        ))
    }

    fn prune(&self, site: &str, vm: &str, keep: &RetentionPolicy) -> Result<PruneReport> {
        self.with_vm(site, vm, |st, ctx| {
            let ms = self.manifests(ctx, site, vm)?;
            let mut report = PruneReport::default();
            if ms.is_empty() {
                return Ok(report);
            }
            let pts: Vec<Point> = ms.iter().map(|(_, m)| point_of(m, 0)).collect();
            // Points a failover uses somewhere (objstore::pin) are kept.
            let pinned = self.pinned(ctx, site, vm)?;
            let flags = retention_keep(&pts, keep, now_ns(), &pinned);
            let mut kept = Vec::new();
            for ((l, m), k) in ms.into_iter().zip(flags) {
                if k {
                    kept.push((l, m));
                    continue;
                }
                for name in &l.all {
                    self.delete(ctx, name)?;
                    self.manifests.lock().remove(name);
                }
                report.dropped_points.push(m.cycle);
            }
            // Logs need no merging: the history across a dropped point
            // simply stays part of the next kept point's chain.
            let oldest = kept.first().map_or(0, |(_, m)| m.cycle);
            report.merged = report
                .dropped_points
                .iter()
                .filter(|&&c| c > oldest)
                .count() as u64;
            // Finish a compaction a crash interrupted (kept points still on
            // the base a head folded), fold each disk's logs up to the
            // oldest kept point into its base, then point the kept
            // manifests at the new bases (a new manifest version, put
            // before the old ones are deleted).
            self.rebase_kept(ctx, st, &mut kept, &pinned)?;
            let ids: Vec<[u8; 16]> = st.heads.keys().copied().collect();
            for id in ids {
                let d = DiskRef {
                    site,
                    vm,
                    disk_id: &id,
                };
                self.compact(ctx, st, d, oldest)?;
            }
            // Pins written since the start are honoured from here on.
            let pinned = self.pinned(ctx, site, vm)?;
            self.rebase_kept(ctx, st, &mut kept, &pinned)?;
            report.freed_bytes = self.collect(ctx, st, site, vm)?;
            let cycles: Vec<u64> = kept.iter().map(|(_, m)| m.cycle).collect();
            self.drop_definitions(ctx, site, vm, &cycles)?;
            Ok(report)
        })
    }

    fn forget(&self, site: &str, vm: &str) -> Result<ForgetReport> {
        validate_name("site", site)?;
        validate_name("vm", vm)?;
        let ctx = Ctx::new(site, vm, "");
        let ids = self.disks_of(&ctx, site, vm)?;
        if ids.is_empty() {
            return Err(StoreError::NotReady {
                ctx,
                what: format!("the store holds no replica of {vm} from this site"),
            });
        }
        // A failover record would refuse the claim below; forgetting the
        // VM ends that failover's hold on its history too.
        super::failedover::remove(&self.bucket, site, vm, None)
            .map_err(|e| self.obj_err(&ctx, "deleting the failover records", e))?;
        let r = self.with_vm(site, vm, |st, ctx| {
            let ms = self.manifests(ctx, site, vm)?;
            let mut report = ForgetReport {
                disks: ids.len(),
                points: ms.len(),
                bytes: 0,
            };
            for h in st.heads.values() {
                report.bytes += h.size + h.logs.iter().map(|l| l.bytes).sum::<u64>();
            }
            // Points first (nothing shows the VM any more), then its
            // registration, then the data. The fence stays: generations
            // keep increasing if the VM comes back.
            for (l, _) in &ms {
                for name in &l.all {
                    self.delete(ctx, name)?;
                    self.manifests.lock().remove(name);
                }
            }
            self.delete(ctx, &format!("vmreg/{site}/{vm}"))?;
            let dir = vm_dir(site, vm);
            for id in &ids {
                self.delete(ctx, &format!("{dir}/reg/{}", hex(id)))?;
            }
            for name in self.list(ctx, &format!("{dir}/definitions/"))? {
                self.delete(ctx, &name)?;
            }
            for name in self.list(ctx, &format!("{dir}/disks/"))? {
                self.delete(ctx, &name)?;
                self.indexes.remove(&name);
            }
            st.heads.clear();
            st.sessions.clear();
            Ok(report)
        })?;
        // The next write of this VM claims a new generation.
        *self.slot(site, vm).lock() = Slot::Unclaimed;
        Ok(r)
    }
}

fn point_of(m: &Manifest, bytes: u64) -> Point {
    let mut disks: Vec<String> = m.disks.iter().map(|d| d.disk_id.clone()).collect();
    disks.sort();
    Point {
        cycle: m.cycle,
        time_unix_ns: m.time_unix_ns,
        bytes,
        consistency: m.consistency,
        disks,
    }
}
