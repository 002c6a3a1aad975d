//! Writer fencing by generation, designed for the weakest conditional
//! semantics measured (Garage 2.5: no conditional PUT or DELETE; a
//! completed PUT is seen by every later GET and LIST). Only unique names are
//! ever written, nothing is overwritten, so no compare-and-swap is needed.
//!
//! Objects under one fence folder `DIR/` (one per VM of a site), empty
//! bodies, everything in the name:
//!
//! ```text
//! DIR/g<gen:016x>-<writer:32 hex>              a claim of generation gen
//! DIR/g<gen:016x>-<writer:32 hex>.s<start:016x> its start: gen owns cycles >= start
//! ```
//!
//! # Claiming ([`Writer::claim`])
//!
//! 1. list `DIR/`; `gen` = highest generation seen + 1;
//! 2. put the claim (a name no one else writes);
//! 3. list again: if any *other* claim of `gen` or higher is there, delete
//!    ours, wait a random while and start over. Of two racing claimers the
//!    one whose put completed second sees the other's claim (a listing
//!    after a completed put includes it), so at most one passes step 3;
//! 4. compute `start` (the caller: the newest visible cycle + 1, read
//!    *after* step 3) and put the start marker. The claim is now *valid*.
//!
//! # Who owns a cycle ([`FenceView::owner_of`])
//!
//! The owner of generation `g` is its valid claim (with a start marker);
//! claims without one (a claimer that lost or died) own nothing. Cycle `c`
//! belongs to the valid claim with the highest `g` whose start <= `c`. A
//! manifest (the object that makes a point visible) names its generation
//! and writer; readers show it only if that writer owns its cycle. So a
//! stale writer's late manifest is invisible, whatever it wrote.
//!
//! # Before acknowledging ([`Writer::check`])
//!
//! After writing a manifest and before telling anyone it is durable, the
//! writer lists `DIR/` again: any claim of a higher generation (valid or
//! not yet) means it is fenced, and it stops without acknowledging. A
//! manifest it wrote may still be visible (if the newer writer's start is
//! above it): that is a complete, unacknowledged point, which is harmless.
//! An acknowledged manifest stays visible: a newer claimer reads the newest
//! visible cycle only after its claim is listed (step 4), so its start is
//! above every manifest acknowledged by an older writer.

use super::{ObjectClient, ObjectError};
use crate::util::hex;
use std::time::Duration;

/// A writer's identity (random per process run).
pub type WriterId = [u8; 16];

/// One claim seen in a fence folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub gen: u64,
    pub writer: WriterId,
    /// The first cycle it owns, once the claim is valid.
    pub start: Option<u64>,
}

/// Why fencing refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceErrorKind {
    /// A newer writer took over: stop, acknowledge nothing.
    Fenced,
    /// The VM was failed over from the bucket (a failover record is in the
    /// fence folder): no writer may continue its history.
    FailedOver,
    /// Claiming kept losing races.
    Contended,
    /// The object store failed.
    Store,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("{dir}: fenced: writer {writer} of generation {gen} was superseded by generation {newer}; this writer stops (nothing more is acknowledged)")]
    Fenced {
        dir: String,
        writer: String,
        gen: u64,
        newer: u64,
    },
    #[error("{dir}: the VM was failed over from the bucket (record {record}); this writer stops (nothing more is acknowledged)")]
    FailedOver { dir: String, record: String },
    #[error("{dir}: could not claim a generation after {attempts} attempts (other writers keep claiming); is another receiver or sender writing this VM?")]
    Contended { dir: String, attempts: u32 },
    #[error(transparent)]
    Store(#[from] ObjectError),
}

impl FenceError {
    pub fn kind(&self) -> FenceErrorKind {
        match self {
            FenceError::Fenced { .. } => FenceErrorKind::Fenced,
            FenceError::FailedOver { .. } => FenceErrorKind::FailedOver,
            FenceError::Contended { .. } => FenceErrorKind::Contended,
            FenceError::Store(_) => FenceErrorKind::Store,
        }
    }
}

fn parse_writer(s: &str) -> Option<WriterId> {
    if s.len() != 32 {
        return None;
    }
    let mut w = [0u8; 16];
    for (i, b) in w.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(w)
}

/// (gen, writer, start marker) of one name under the fence folder.
fn parse_name(name: &str) -> Option<(u64, WriterId, Option<u64>)> {
    let rest = name.strip_prefix('g')?;
    let gen = u64::from_str_radix(rest.get(..16)?, 16).ok()?;
    let rest = rest.get(16..)?.strip_prefix('-')?;
    let writer = parse_writer(rest.get(..32)?)?;
    match rest.get(32..)? {
        "" => Some((gen, writer, None)),
        s => {
            let start = s.strip_prefix(".s")?;
            (start.len() == 16)
                .then(|| u64::from_str_radix(start, 16).ok())
                .flatten()
                .map(|st| (gen, writer, Some(st)))
        }
    }
}

fn claim_name(dir: &str, gen: u64, writer: &WriterId) -> String {
    format!("{dir}/g{gen:016x}-{}", hex(writer))
}

/// The leaf-name prefix of a failover record in a fence folder
/// (`objstore::failedover`): `failedover-<time ns:016x>-<id:32 hex>`.
pub const FAILED_OVER: &str = "failedover-";

/// Every claim in a fence folder, as one listing saw them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FenceView {
    /// Sorted by (gen, writer).
    pub claims: Vec<Claim>,
    /// Leaf names of failover records, sorted (oldest first).
    pub failovers: Vec<String>,
}

impl FenceView {
    /// List `dir/` (names that are not fence objects are ignored).
    pub fn load(c: &dyn ObjectClient, dir: &str) -> Result<FenceView, ObjectError> {
        let prefix = format!("{dir}/");
        let mut claims: Vec<Claim> = Vec::new();
        let mut starts = Vec::new();
        let mut failovers = Vec::new();
        for m in c.list(&prefix)? {
            let leaf = m.key.strip_prefix(&prefix).unwrap_or("");
            if leaf.starts_with(FAILED_OVER) {
                failovers.push(leaf.to_string());
                continue;
            }
            let Some((gen, writer, start)) = parse_name(leaf) else {
                continue;
            };
            match start {
                None => claims.push(Claim {
                    gen,
                    writer,
                    start: None,
                }),
                Some(s) => starts.push((gen, writer, s)),
            }
        }
        for (gen, writer, s) in starts {
            if let Some(cl) = claims
                .iter_mut()
                .find(|c| c.gen == gen && c.writer == writer)
            {
                cl.start = Some(cl.start.map_or(s, |o| o.min(s)));
            }
        }
        claims.sort_by_key(|c| (c.gen, c.writer));
        failovers.sort();
        Ok(FenceView { claims, failovers })
    }

    /// [`FenceErrorKind::FailedOver`] naming the newest failover record, if
    /// there is one.
    fn failed_over(&self, dir: &str) -> Result<(), FenceError> {
        match self.failovers.last() {
            Some(r) => Err(FenceError::FailedOver {
                dir: dir.to_string(),
                record: r.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The highest generation claimed (valid or not); 0 if none.
    pub fn max_gen(&self) -> u64 {
        self.claims.iter().map(|c| c.gen).max().unwrap_or(0)
    }

    /// The valid claim of `gen` (the lowest writer id if, against the
    /// protocol, two are valid).
    pub fn valid(&self, gen: u64) -> Option<&Claim> {
        self.claims
            .iter()
            .find(|c| c.gen == gen && c.start.is_some())
    }

    /// The valid claim owning `cycle`, if any.
    pub fn owner_of(&self, cycle: u64) -> Option<&Claim> {
        let mut best: Option<&Claim> = None;
        for c in &self.claims {
            if c.start.is_some_and(|s| s <= cycle)
                && self.valid(c.gen) == Some(c)
                && best.is_none_or(|b| c.gen > b.gen)
            {
                best = Some(c);
            }
        }
        best
    }

    /// Whether a manifest of `cycle` written by `writer` in `gen` is
    /// visible.
    pub fn visible(&self, gen: u64, writer: &WriterId, cycle: u64) -> bool {
        self.owner_of(cycle)
            .is_some_and(|o| o.gen == gen && &o.writer == writer)
    }
}

/// A writer holding a valid claim.
#[derive(Debug, Clone)]
pub struct Writer {
    pub dir: String,
    pub gen: u64,
    pub writer: WriterId,
    pub start: u64,
}

const ATTEMPTS: u32 = 8;

impl Writer {
    /// Claim the next generation of `dir` (see the module documentation).
    /// `start` is called once the claim is uncontested and returns the first
    /// cycle this writer will own (the newest visible cycle + 1).
    pub fn claim(
        c: &dyn ObjectClient,
        dir: &str,
        writer: WriterId,
        start: impl Fn() -> Result<u64, ObjectError>,
    ) -> Result<Writer, FenceError> {
        for attempt in 0..ATTEMPTS {
            let view = FenceView::load(c, dir)?;
            view.failed_over(dir)?;
            let gen = view.max_gen() + 1;
            let name = claim_name(dir, gen, &writer);
            c.put(&name, b"", super::PutMode::Overwrite)?;
            let after = FenceView::load(c, dir)?;
            let contested = after
                .claims
                .iter()
                .any(|cl| cl.gen >= gen && cl.writer != writer);
            if !contested {
                let s = start()?;
                c.put(&format!("{name}.s{s:016x}"), b"", super::PutMode::Overwrite)?;
                return Ok(Writer {
                    dir: dir.to_string(),
                    gen,
                    writer,
                    start: s,
                });
            }
            c.delete(&name)?;
            // Random back-off (up to 50 ms << attempt) so racers spread out.
            let r = u64::from_le_bytes(crate::util::random_id()[..8].try_into().unwrap_or([0; 8]));
            std::thread::sleep(Duration::from_millis(r % (50 << attempt.min(5)) + 1));
        }
        Err(FenceError::Contended {
            dir: dir.to_string(),
            attempts: ATTEMPTS,
        })
    }

    /// Fail with [`FenceErrorKind::Fenced`] if a newer generation was
    /// claimed, or [`FenceErrorKind::FailedOver`] if the VM was failed
    /// over (call after writing a manifest, before acknowledging it).
    pub fn check(&self, c: &dyn ObjectClient) -> Result<(), FenceError> {
        let view = FenceView::load(c, &self.dir)?;
        view.failed_over(&self.dir)?;
        let newer = view.max_gen();
        if newer > self.gen || view.valid(self.gen).map(|v| v.writer) != Some(self.writer) {
            return Err(FenceError::Fenced {
                dir: self.dir.clone(),
                writer: hex(&self.writer),
                gen: self.gen,
                newer,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::MemClient;

    #[test]
    fn names_round_trip() {
        let w = [0xab; 16];
        let n = claim_name("d", 5, &w);
        let leaf = n.strip_prefix("d/").unwrap();
        assert_eq!(parse_name(leaf), Some((5, w, None)));
        assert_eq!(
            parse_name(&format!("{leaf}.s{:016x}", 9)),
            Some((5, w, Some(9)))
        );
        for bad in ["", "g", "gzz", &format!("{leaf}x"), &format!("{leaf}.s1")] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_new_writer_fences_the_old_one() {
        let c = MemClient::new();
        let a = Writer::claim(&c, "f", [1; 16], || Ok(1)).unwrap();
        assert_eq!((a.gen, a.start), (1, 1));
        a.check(&c).unwrap();
        let v = FenceView::load(&c, "f").unwrap();
        assert!(v.visible(1, &[1; 16], 5));
        let b = Writer::claim(&c, "f", [2; 16], || Ok(7)).unwrap();
        assert_eq!(b.gen, 2);
        assert_eq!(a.check(&c).unwrap_err().kind(), FenceErrorKind::Fenced);
        b.check(&c).unwrap();
        let v = FenceView::load(&c, "f").unwrap();
        // The old writer keeps what it had before the new start, nothing after.
        assert!(v.visible(1, &[1; 16], 6));
        assert!(!v.visible(1, &[1; 16], 7));
        assert!(v.visible(2, &[2; 16], 7));
        assert!(!v.visible(2, &[2; 16], 6));
    }

    #[test]
    fn a_claim_without_start_owns_nothing_but_fences() {
        let c = MemClient::new();
        let a = Writer::claim(&c, "f", [1; 16], || Ok(1)).unwrap();
        c.put(
            &claim_name("f", 2, &[9; 16]),
            b"",
            crate::objstore::PutMode::Overwrite,
        )
        .unwrap();
        let v = FenceView::load(&c, "f").unwrap();
        assert!(v.visible(1, &[1; 16], 100));
        assert_eq!(a.check(&c).unwrap_err().kind(), FenceErrorKind::Fenced);
        // The next claimer goes past the dead claim.
        let b = Writer::claim(&c, "f", [3; 16], || Ok(50)).unwrap();
        assert_eq!(b.gen, 3);
    }

    #[test]
    fn racing_claimers_one_wins() {
        let c = std::sync::Arc::new(MemClient::new());
        let handles: Vec<_> = (1..=4u8)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || Writer::claim(&*c, "f", [i; 16], || Ok(1)))
            })
            .collect();
        let won: Vec<Writer> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().ok())
            .collect();
        assert!(!won.is_empty());
        let v = FenceView::load(&*c, "f").unwrap();
        // Exactly the newest winner passes its check; every generation has
        // at most one valid claim.
        let ok: Vec<_> = won.iter().filter(|w| w.check(&*c).is_ok()).collect();
        assert_eq!(ok.len(), 1);
        for g in 1..=v.max_gen() {
            assert!(
                v.claims
                    .iter()
                    .filter(|cl| cl.gen == g && cl.start.is_some())
                    .count()
                    <= 1
            );
        }
    }
}
