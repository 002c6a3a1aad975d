//! Failure injection for replica stores: [`FailStore`] wraps any
//! [`ReplicaStore`] and fails chosen operations (mountpoint-s3's
//! `FailureClient` model), and `crash_point` is the one hook for crash
//! steps that lie *inside* a single store operation.
//!
//! # Two kinds of crash step (`VDREP_CRASH_AT=<step>`)
//!
//! - **Between operations** — `before-<op>` / `after-<op>`, e.g.
//!   `after-apply` (the apply finished, its outcome was never reported) or
//!   `before-commit-point`: [`FailStore::from_env`] wraps the store so the
//!   first such call aborts the process. The receiver wraps its store this
//!   way; the store itself knows nothing of it.
//! - **Inside one operation** (between two fsyncs of one apply, …): the
//!   store calls `crash_point` at each step; it aborts the process when
//!   `VDREP_CRASH_AT` names that step. Steps: `log-tmp-synced`,
//!   `log-renamed` (store_log); `undo-written`, `state-applying`,
//!   `replica-half`, `replica-synced`, `state-applied` (apply);
//!   `initial-progress` (write_initial); `point-before-commit`
//!   (commit_point, after its checks, before the points file is written);
//!   `undo-merged` (prune); `forget-moved` (forget, the VM folder moved
//!   away, not yet deleted); `promote-intent`, `rollback-step`,
//!   `cancel-moved`, `cancel-redo-step`, `adopt-moved` (failover role
//!   changes of the directory store).
//!
//! Aborting is what `kill -9` does: no destructors, no flush of user-space
//! buffers; the kernel keeps what was written. In-process tests use
//! [`Fault::Crash`] instead: the wrapper stops at the chosen point, drops
//! its inner store (its in-memory state is gone) and fails every later call;
//! the test reopens the store from its durable state.

use super::api::{DigestCache, DiskRef, PointRead, ReplicaStore};
use super::error::StoreError;
use super::group::{GroupPoint, GroupRecord};
use super::store::{
    ApplyOutcome, Consistency, DiskInfo, ForgetReport, InitialData, InitialState, LiveInfo, Point,
    PruneReport, RecoveryReport, ReplicaState, RetentionPolicy, StoreOutcome,
};
use super::summary::PointsSummary;
use parking_lot::Mutex;
use std::io::Read;
use std::sync::Arc;

type Result<T> = std::result::Result<T, StoreError>;

/// The environment variable naming a crash step (tests only).
pub const CRASH_AT_ENV: &str = "VDREP_CRASH_AT";

/// The environment variable naming a step `before-<op>` / `after-<op>` at
/// which every call waits [`STALL_MS_ENV`] milliseconds (tests only: an
/// apply that takes long, without timing anything).
pub const STALL_AT_ENV: &str = "VDREP_STALL_AT";

/// How long a [`STALL_AT_ENV`] step waits, in milliseconds (default 60 s).
pub const STALL_MS_ENV: &str = "VDREP_STALL_MS";

/// The hook for crash steps inside one store operation (see the module
/// documentation): aborts the process if `VDREP_CRASH_AT` equals `step`.
pub(crate) fn crash_point(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_AT_ENV).ok());
    if at.as_deref() == Some(step) {
        eprintln!("vdrep: {CRASH_AT_ENV}={step}: aborting");
        std::process::abort();
    }
}

/// A test's pause at one step inside a store operation
/// ([`Store::pause_at`](super::Store::pause_at)): the first call that
/// reaches the step waits there (holding whatever the operation holds,
/// e.g. the disk's lock in the middle of an apply) until the test
/// releases it, so a test can run another operation against that exact
/// moment. Dropping the `Pause` releases it.
pub struct Pause {
    pub(crate) inner: Arc<PauseState>,
}

/// The shared side of a [`Pause`].
pub(crate) struct PauseState {
    pub(crate) step: String,
    /// (reached, released)
    at: Mutex<(bool, bool)>,
    cv: parking_lot::Condvar,
}

impl PauseState {
    pub(crate) fn new(step: &str) -> Arc<PauseState> {
        Arc::new(PauseState {
            step: step.to_string(),
            at: Mutex::new((false, false)),
            cv: parking_lot::Condvar::new(),
        })
    }

    /// Called by the store at `step`: the first arrival waits until
    /// released; true if this call took the pause.
    pub(crate) fn hold(&self, step: &str) -> bool {
        if self.step != step {
            return false;
        }
        let mut g = self.at.lock();
        if g.0 || g.1 {
            return false;
        }
        g.0 = true;
        self.cv.notify_all();
        while !g.1 {
            self.cv.wait(&mut g);
        }
        true
    }

    fn release(&self) {
        self.at.lock().1 = true;
        self.cv.notify_all();
    }
}

impl Pause {
    /// Wait until an operation reached the step (false: not within `limit`).
    pub fn wait_reached(&self, limit: std::time::Duration) -> bool {
        let end = std::time::Instant::now() + limit;
        let mut g = self.inner.at.lock();
        while !g.0 {
            if self.inner.cv.wait_until(&mut g, end).timed_out() {
                return g.0;
            }
        }
        true
    }

    /// Let the paused operation go on (and any later one pass the step).
    pub fn release(&self) {
        self.inner.release();
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.inner.release();
    }
}

/// Spread a seed over the generator's state (neighbouring seeds give
/// unrelated sequences).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A [`ReplicaStore`] operation, as failure rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Recover,
    FailedOver,
    ReplicaState,
    BeginInitial,
    RebaseInitial,
    WriteInitial,
    FinishInitial,
    StoreLog,
    Apply,
    Drain,
    SetNeedsResync,
    ResyncPrepared,
    BlockHashes,
    CommitPoint,
    Points,
    ReadPoint,
    Prune,
    Forget,
}

impl Op {
    /// Every operation, in the order above.
    pub const ALL: [Op; 18] = [
        Op::Recover,
        Op::FailedOver,
        Op::ReplicaState,
        Op::BeginInitial,
        Op::RebaseInitial,
        Op::WriteInitial,
        Op::FinishInitial,
        Op::StoreLog,
        Op::Apply,
        Op::Drain,
        Op::SetNeedsResync,
        Op::ResyncPrepared,
        Op::BlockHashes,
        Op::CommitPoint,
        Op::Points,
        Op::ReadPoint,
        Op::Prune,
        Op::Forget,
    ];

    /// The operation's name in crash steps: `store-log`, `commit-point`, …
    pub fn name(self) -> &'static str {
        match self {
            Op::Recover => "recover",
            Op::FailedOver => "failed-over",
            Op::ReplicaState => "replica-state",
            Op::BeginInitial => "begin-initial",
            Op::RebaseInitial => "rebase-initial",
            Op::WriteInitial => "write-initial",
            Op::FinishInitial => "finish-initial",
            Op::StoreLog => "store-log",
            Op::Apply => "apply",
            Op::Drain => "drain",
            Op::SetNeedsResync => "set-needs-resync",
            Op::ResyncPrepared => "resync-prepared",
            Op::BlockHashes => "block-hashes",
            Op::CommitPoint => "commit-point",
            Op::Points => "points",
            Op::ReadPoint => "read-point",
            Op::Prune => "prune",
            Op::Forget => "forget",
        }
    }
}

/// Before the inner store runs the operation, or after it returned (its
/// outcome is then lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Before,
    After,
}

impl When {
    /// Parse a crash step `before-<op>` / `after-<op>`.
    pub fn parse_step(step: &str) -> Option<(When, Op)> {
        let (when, op) = if let Some(op) = step.strip_prefix("before-") {
            (When::Before, op)
        } else {
            (When::After, step.strip_prefix("after-")?)
        };
        Op::ALL.iter().find(|o| o.name() == op).map(|&o| (when, o))
    }
}

/// Which calls of the operation a rule hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The n-th call (1-based), once.
    Nth(u64),
    /// Each call with this probability (per million), from the wrapper's
    /// seeded generator: a seed replays the same failures.
    PerMillion(u32),
}

/// What an injected failure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with a retryable [`StoreError::Injected`].
    Error,
    /// Stop here: the inner store is dropped (its in-memory state is lost)
    /// and this and every later call fail; reopen the store to go on.
    Crash,
    /// Abort the process (what `kill -9` does), for process-level tests.
    Abort,
    /// Wait this many milliseconds, then go on (a slow disk or a long
    /// apply, for process-level tests: `VDREP_STALL_AT`).
    Stall(u64),
}

/// One failure rule of a [`FailStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub op: Op,
    pub when: When,
    pub trigger: Trigger,
    pub fault: Fault,
}

/// An injected failure that happened (for the test's bookkeeping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    pub op: Op,
    pub when: When,
    pub fault: Fault,
}

struct State {
    inner: Option<Arc<dyn ReplicaStore>>,
    calls: Vec<u64>,
    rng: u64,
    injected: Vec<Injected>,
}

/// A [`ReplicaStore`] that passes calls to an inner store and fails the
/// ones its [`Rule`]s choose.
pub struct FailStore {
    rules: Vec<Rule>,
    state: Mutex<State>,
}

impl FailStore {
    /// Wrap `inner` with `rules`; `seed` drives [`Trigger::PerMillion`].
    pub fn new(inner: Arc<dyn ReplicaStore>, rules: Vec<Rule>, seed: u64) -> FailStore {
        FailStore {
            rules,
            state: Mutex::new(State {
                inner: Some(inner),
                calls: vec![0; Op::ALL.len()],
                rng: splitmix64(seed) | 1,
                injected: Vec::new(),
            }),
        }
    }

    /// `inner` as is, or wrapped to abort at the `before-<op>` /
    /// `after-<op>` step `VDREP_CRASH_AT` names (the first such call).
    pub fn from_env(inner: Arc<dyn ReplicaStore>) -> Arc<dyn ReplicaStore> {
        let mut rules = Vec::new();
        let step = std::env::var(CRASH_AT_ENV).ok();
        if let Some((when, op)) = step.as_deref().and_then(When::parse_step) {
            rules.push(Rule {
                op,
                when,
                trigger: Trigger::Nth(1),
                fault: Fault::Abort,
            });
        }
        let stall = std::env::var(STALL_AT_ENV).ok();
        if let Some((when, op)) = stall.as_deref().and_then(When::parse_step) {
            let ms = std::env::var(STALL_MS_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60_000);
            rules.push(Rule {
                op,
                when,
                trigger: Trigger::PerMillion(1_000_000),
                fault: Fault::Stall(ms),
            });
        }
        if rules.is_empty() {
            return inner;
        }
        Arc::new(FailStore::new(inner, rules, 0))
    }

    /// The failures injected so far, oldest first.
    pub fn injected(&self) -> Vec<Injected> {
        self.state.lock().injected.clone()
    }

    /// How many calls of `op` began so far (for the test's bookkeeping).
    pub fn calls(&self, op: Op) -> u64 {
        let idx = Op::ALL.iter().position(|&o| o == op).unwrap_or(0);
        self.state.lock().calls[idx]
    }

    /// True once a [`Fault::Crash`] happened.
    pub fn crashed(&self) -> bool {
        self.state.lock().inner.is_none()
    }

    /// Count the call and pick the rule (if any) that hits it `when`.
    fn decide(&self, op: Op, when: When) -> Result<Arc<dyn ReplicaStore>> {
        let mut st = self.state.lock();
        let Some(inner) = st.inner.clone() else {
            return Err(StoreError::Injected {
                op: op.name(),
                crashed: true,
            });
        };
        let idx = Op::ALL.iter().position(|&o| o == op).unwrap_or(0);
        if when == When::Before {
            st.calls[idx] += 1;
        }
        let n = st.calls[idx];
        let mut hit = None;
        for r in self.rules.iter().filter(|r| r.op == op && r.when == when) {
            let fires = match r.trigger {
                Trigger::Nth(k) => k == n,
                Trigger::PerMillion(p) => {
                    // xorshift64*: small, seeded, reproducible.
                    st.rng ^= st.rng >> 12;
                    st.rng ^= st.rng << 25;
                    st.rng ^= st.rng >> 27;
                    let x = st.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
                    (x % 1_000_000) < u64::from(p)
                }
            };
            if fires && hit.is_none() {
                hit = Some(r.fault);
            }
        }
        let Some(fault) = hit else {
            return Ok(inner);
        };
        st.injected.push(Injected { op, when, fault });
        match fault {
            Fault::Error => Err(StoreError::Injected {
                op: op.name(),
                crashed: false,
            }),
            Fault::Crash => {
                st.inner = None;
                drop(st);
                drop(inner); // the in-memory state goes with it
                Err(StoreError::Injected {
                    op: op.name(),
                    crashed: true,
                })
            }
            Fault::Abort => {
                let w = if when == When::Before {
                    "before"
                } else {
                    "after"
                };
                eprintln!("vdrep: {CRASH_AT_ENV}={w}-{}: aborting", op.name());
                std::process::abort();
            }
            Fault::Stall(ms) => {
                drop(st);
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(inner)
            }
        }
    }

    /// Run `f` on the inner store unless a rule fails the call before or
    /// after it.
    fn call<T>(&self, op: Op, f: impl FnOnce(&dyn ReplicaStore) -> Result<T>) -> Result<T> {
        let inner = self.decide(op, When::Before)?;
        let out = f(inner.as_ref());
        drop(inner);
        self.decide(op, When::After)?;
        out
    }
}

impl ReplicaStore for FailStore {
    fn recover(&self) -> Result<RecoveryReport> {
        self.call(Op::Recover, |s| s.recover())
    }
    fn free_bytes(&self) -> u64 {
        self.state
            .lock()
            .inner
            .as_ref()
            .map_or(0, |s| s.free_bytes())
    }
    fn vms(&self) -> Vec<(String, String)> {
        let inner = self.state.lock().inner.clone();
        inner.map(|s| s.vms()).unwrap_or_default()
    }
    fn failed_over(&self, site: &str, vm: &str) -> Result<Option<LiveInfo>> {
        self.call(Op::FailedOver, |s| s.failed_over(site, vm))
    }
    fn replica_state(&self, d: DiskRef<'_>) -> Result<ReplicaState> {
        self.call(Op::ReplicaState, |s| s.replica_state(d))
    }
    fn begin_initial(&self, site: &str, vm: &str, info: &DiskInfo) -> Result<InitialState> {
        self.call(Op::BeginInitial, |s| s.begin_initial(site, vm, info))
    }
    fn rebase_initial(&self, d: DiskRef<'_>, new_cycle: u64) -> Result<u64> {
        self.call(Op::RebaseInitial, |s| s.rebase_initial(d, new_cycle))
    }
    fn write_initial(&self, d: DiskRef<'_>, offset: u64, data: InitialData<'_>) -> Result<()> {
        self.call(Op::WriteInitial, |s| s.write_initial(d, offset, data))
    }
    fn finish_initial(&self, d: DiskRef<'_>, cycle: u64, time_ns: u64) -> Result<()> {
        self.call(Op::FinishInitial, |s| s.finish_initial(d, cycle, time_ns))
    }
    fn store_log(&self, d: DiskRef<'_>, log: &mut dyn Read) -> Result<StoreOutcome> {
        self.call(Op::StoreLog, |s| s.store_log(d, log))
    }
    fn apply(&self, d: DiskRef<'_>, cycle: u64) -> Result<ApplyOutcome> {
        self.call(Op::Apply, |s| s.apply(d, cycle))
    }
    fn commits_durable_logs(&self) -> bool {
        let inner = self.state.lock().inner.clone();
        inner.is_some_and(|s| s.commits_durable_logs())
    }
    fn drain(&self, d: DiskRef<'_>, upto: Option<u64>) -> Result<u64> {
        self.call(Op::Drain, |s| s.drain(d, upto))
    }
    fn set_needs_resync(&self, d: DiskRef<'_>, reason: Option<&str>) -> Result<()> {
        self.call(Op::SetNeedsResync, |s| s.set_needs_resync(d, reason))
    }
    fn resync_prepared(&self, d: DiskRef<'_>, replica_cycle: u64, cycle: u64) -> Result<()> {
        self.call(Op::ResyncPrepared, |s| {
            s.resync_prepared(d, replica_cycle, cycle)
        })
    }
    // The trait's signature: the wrapper forwards each method (one `call` each).
    fn block_hashes(
        &self,
        d: DiskRef<'_>,
        replica_cycle: u64,
        block_size: u32,
        runs: &[(u64, u32)],
        cache: &mut DigestCache,
    ) -> Result<(u64, Vec<u128>)> {
        self.call(Op::BlockHashes, |s| {
            s.block_hashes(d, replica_cycle, block_size, runs, cache)
        })
    }
    fn commit_point(
        &self,
        site: &str,
        vm: &str,
        cycle: u64,
        disks: &[[u8; 16]],
        consistency: Consistency,
    ) -> Result<Option<Point>> {
        self.call(Op::CommitPoint, |s| {
            s.commit_point(site, vm, cycle, disks, consistency)
        })
    }
    fn save_definition(&self, site: &str, vm: &str, cycle: u64, xml: &str) -> Result<()> {
        // Not an injection point of its own: the commit that follows is.
        let inner = self.state.lock().inner.clone();
        match inner {
            Some(s) => s.save_definition(site, vm, cycle, xml),
            None => self.call(Op::CommitPoint, |s| s.save_definition(site, vm, cycle, xml)),
        }
    }
    fn definition(&self, site: &str, vm: &str, cycle: u64) -> Result<Option<String>> {
        self.call(Op::Points, |s| s.definition(site, vm, cycle))
    }
    fn save_group(&self, site: &str, vm: &str, cycle: u64, rec: &GroupRecord) -> Result<()> {
        self.call(Op::CommitPoint, |s| s.save_group(site, vm, cycle, rec))
    }
    fn group_points(&self, site: &str, group: &str) -> Result<Vec<GroupPoint>> {
        self.call(Op::Points, |s| s.group_points(site, group))
    }
    fn points(&self, site: &str, vm: &str) -> Result<Vec<Point>> {
        self.call(Op::Points, |s| s.points(site, vm))
    }
    fn newest_point(&self, site: &str, vm: &str) -> Result<Option<Point>> {
        self.call(Op::Points, |s| s.newest_point(site, vm))
    }
    fn points_summary(&self, site: &str, vm: &str) -> Result<PointsSummary> {
        self.call(Op::Points, |s| s.points_summary(site, vm))
    }
    fn read_point(&self, d: DiskRef<'_>, cycle: u64) -> Result<Box<dyn PointRead>> {
        self.call(Op::ReadPoint, |s| s.read_point(d, cycle))
    }
    fn prune(&self, site: &str, vm: &str, keep: &RetentionPolicy) -> Result<PruneReport> {
        self.call(Op::Prune, |s| s.prune(site, vm, keep))
    }
    fn forget(&self, site: &str, vm: &str) -> Result<ForgetReport> {
        self.call(Op::Forget, |s| s.forget(site, vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse() {
        assert_eq!(
            When::parse_step("after-apply"),
            Some((When::After, Op::Apply))
        );
        assert_eq!(
            When::parse_step("before-commit-point"),
            Some((When::Before, Op::CommitPoint))
        );
        assert_eq!(When::parse_step("state-applying"), None, "an in-op step");
        assert_eq!(When::parse_step("after-nothing"), None);
        for op in Op::ALL {
            assert_eq!(
                When::parse_step(&format!("before-{}", op.name())),
                Some((When::Before, op))
            );
        }
    }
}
