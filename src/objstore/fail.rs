//! [`FailClient`]: wraps any [`ObjectClient`] and fails chosen calls
//! (mountpoint-s3's `FailureClient` model): the n-th call of an operation
//! fails once, either before it reaches the store or after (the store did
//! it, the answer was lost); a seeded rate fails calls at random; a crash
//! fails every call from a chosen one on (the process died).

use super::{GetIf, GetResult, ObjectClient, ObjectError, ObjectMeta, PutMode};
use parking_lot::Mutex;
use std::ops::Range;

/// An [`ObjectClient`] operation, as failure rules name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjOp {
    Put,
    Get,
    Head,
    List,
    Delete,
}

impl ObjOp {
    fn name(self) -> &'static str {
        match self {
            ObjOp::Put => "put",
            ObjOp::Get => "get",
            ObjOp::Head => "head",
            ObjOp::List => "list",
            ObjOp::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    op: ObjOp,
    nth: u64,
    after: bool,
    crash: bool,
}

#[derive(Default)]
struct State {
    calls: [u64; 5],
    rules: Vec<Rule>,
    /// (xorshift state, failures per thousand calls)
    random: Option<(u64, u64)>,
    crashed: bool,
    injected: u64,
}

/// A failure-injecting wrapper.
pub struct FailClient<C> {
    inner: C,
    state: Mutex<State>,
}

impl<C: ObjectClient> FailClient<C> {
    pub fn new(inner: C) -> FailClient<C> {
        FailClient {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// The wrapped client.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The `nth` (1-based) call of `op` fails once: before reaching the
    /// store, or (`after`) once the store did it.
    pub fn fail_nth(&self, op: ObjOp, nth: u64, after: bool) {
        self.state.lock().rules.push(Rule {
            op,
            nth,
            after,
            crash: false,
        });
    }

    /// From the `nth` call of `op` on, every call fails (the `nth` itself
    /// reaching the store first if `after`): a process that died there.
    pub fn crash_at(&self, op: ObjOp, nth: u64, after: bool) {
        self.state.lock().rules.push(Rule {
            op,
            nth,
            after,
            crash: true,
        });
    }

    /// Fail about `per_mille` of every thousand calls, before or after at
    /// random, from a seeded generator.
    pub fn random(&self, seed: u64, per_mille: u64) {
        self.state.lock().random = Some((seed | 1, per_mille));
    }

    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: ObjOp) -> u64 {
        self.state.lock().calls[op as usize]
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u64 {
        self.state.lock().injected
    }

    /// Whether a crash rule fired.
    pub fn crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Run one call under the rules.
    fn call<T>(
        &self,
        op: ObjOp,
        key: &str,
        f: impl FnOnce() -> Result<T, ObjectError>,
    ) -> Result<T, ObjectError> {
        let injected = || ObjectError::Injected {
            op: op.name(),
            key: key.to_string(),
        };
        {
            let mut s = self.state.lock();
            if s.crashed {
                s.injected += 1;
                return Err(injected());
            }
            s.calls[op as usize] += 1;
            let n = s.calls[op as usize];
            let hit = s.rules.iter().find(|r| r.op == op && r.nth == n).copied();
            let random_hit = match &mut s.random {
                Some((x, rate)) => {
                    *x ^= *x << 13;
                    *x ^= *x >> 7;
                    *x ^= *x << 17;
                    (*x % 1000 < *rate).then_some(*x & 1024 != 0)
                }
                None => None,
            };
            let (after, crash) = match (hit, random_hit) {
                (Some(r), _) => (r.after, r.crash),
                (None, Some(after)) => (after, false),
                (None, None) => return f(),
            };
            s.injected += 1;
            s.crashed |= crash;
            if !after {
                return Err(injected());
            }
        }
        // The store does it; the caller never hears.
        let _ = f();
        Err(injected())
    }
}

impl<C: ObjectClient> ObjectClient for FailClient<C> {
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<String, ObjectError> {
        self.call(ObjOp::Put, key, || self.inner.put(key, body, mode))
    }
    fn get(&self, key: &str, range: Option<Range<u64>>, cond: GetIf<'_>) -> GetResult {
        self.call(ObjOp::Get, key, || self.inner.get(key, range, cond))
    }
    fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        self.call(ObjOp::Head, key, || self.inner.head(key))
    }
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        self.call(ObjOp::List, prefix, || self.inner.list(prefix))
    }
    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.call(ObjOp::Delete, key, || self.inner.delete(key))
    }
}
