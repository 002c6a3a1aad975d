//! Pins: a recovery point in a bucket that a failover on some machine is
//! using (`failover --test | --unplanned --store s3://…`), so a prune run
//! by another machine (the still-running sender's embedded receiver, or a
//! receiver) keeps it and every object it reads.
//!
//! One sealed object per pin, everything that matters in its name (a
//! prune reads no body), a name no one else writes (like every other
//! object: no overwrite, no conditional put needed):
//!
//! ```text
//! sites/<site>/vms/<vm>/pins/<cycle:016x>-<expires unix s:016x>-<pinner:32 hex>
//! ```
//!
//! The body (sealed JSON: host, pid, purpose) is for people. A pin is
//! *live* until its expiry: the view process writes it with
//! [`PIN_TTL`] ahead and renews it every [`PIN_RENEW`] (new name first, the
//! old one deleted after), and deletes it when it stops (`--cleanup`,
//! `--commit`); `--cleanup`/`--commit` delete it too if the view process
//! died. So a pin whose machine is gone for good expires by itself at most
//! [`PIN_TTL`] after its last renewal; deleting its object releases it at
//! once (`vdrep points --store s3://… --json` lists the pins by name).
//!
//! What a prune does with a live pin (`objstore::replica`): retention keeps
//! the point whatever the policy, and its manifest is not rewritten to a
//! newer base, so every object it names stays referenced and collection
//! keeps it. Pins are listed at the start of a prune and again before its
//! rewrites and collection; a view re-reads the point after pinning it.

use super::bucket::{BucketError, SealedBucket};
use std::time::Duration;

/// How long a pin lives past its last renewal.
pub const PIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// How often a live view renews its pin.
pub const PIN_RENEW: Duration = Duration::from_secs(3600);

/// One pin, as its name says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pin {
    pub cycle: u64,
    /// Seconds since the Unix epoch.
    pub expires_unix_s: u64,
    /// The pinner (32 hex digits, one per view).
    pub pinner: String,
    /// The object's name (relative to the bucket prefix).
    pub name: String,
}

impl Pin {
    /// Whether retention must still honour it at `now_s`.
    pub fn live(&self, now_s: u64) -> bool {
        self.expires_unix_s > now_s
    }
}

fn pins_dir(site: &str, vm: &str) -> String {
    format!("sites/{site}/vms/{vm}/pins/")
}

/// The name of a pin.
pub fn pin_name(site: &str, vm: &str, cycle: u64, expires_unix_s: u64, pinner: &str) -> String {
    format!(
        "{}{cycle:016x}-{expires_unix_s:016x}-{pinner}",
        pins_dir(site, vm)
    )
}

fn parse(name: &str, leaf: &str) -> Option<Pin> {
    let (cycle, rest) = leaf.split_once('-')?;
    let (exp, pinner) = rest.split_once('-')?;
    let ok = cycle.len() == 16
        && exp.len() == 16
        && pinner.len() == 32
        && pinner.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then_some(Pin {
        cycle: u64::from_str_radix(cycle, 16).ok()?,
        expires_unix_s: u64::from_str_radix(exp, 16).ok()?,
        pinner: pinner.to_string(),
        name: name.to_string(),
    })
}

/// Every pin of `vm` (live or not; names that are not pins are ignored).
pub fn list(b: &SealedBucket, site: &str, vm: &str) -> Result<Vec<Pin>, BucketError> {
    let dir = pins_dir(site, vm);
    Ok(b.list(&dir)?
        .into_iter()
        .filter_map(|n| {
            let leaf = n.strip_prefix(&dir)?.to_string();
            parse(&n, &leaf)
        })
        .collect())
}

/// The cycles pinned by live pins at `now_s`, sorted, unique.
pub fn live_cycles(pins: &[Pin], now_s: u64) -> Vec<u64> {
    let mut v: Vec<u64> = pins
        .iter()
        .filter(|p| p.live(now_s))
        .map(|p| p.cycle)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    crate::util::now_ns() / 1_000_000_000
}

/// Pin `cycle` of `vm` for `pinner` until `PIN_TTL` from now: put the new
/// pin, then delete `pinner`'s older pins of that VM (a renewal). Returns
/// the new pin.
pub fn put(
    b: &SealedBucket,
    site: &str,
    vm: &str,
    cycle: u64,
    pinner: &str,
    purpose: &str,
) -> Result<Pin, BucketError> {
    let expires = now_s() + PIN_TTL.as_secs();
    let name = pin_name(site, vm, cycle, expires, pinner);
    let body = serde_json::json!({
        "host": crate::util::hostname(),
        "pid": std::process::id(),
        "purpose": purpose,
    });
    b.put(&name, body.to_string().as_bytes())?;
    for old in list(b, site, vm)? {
        if old.pinner == pinner && old.name != name {
            b.delete(&old.name)?;
        }
    }
    Ok(Pin {
        cycle,
        expires_unix_s: expires,
        pinner: pinner.to_string(),
        name,
    })
}

/// Delete every pin of `pinner` on `vm` (absent is fine). Returns how many.
pub fn release(b: &SealedBucket, site: &str, vm: &str, pinner: &str) -> Result<usize, BucketError> {
    let mut n = 0;
    for p in list(b, site, vm)? {
        if p.pinner == pinner {
            b.delete(&p.name)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::{EncryptionKey, MemClient, StoreUrl};
    use std::sync::Arc;

    #[test]
    fn pins_renew_release_and_expire() {
        let url = StoreUrl::parse("s3://bkt/p").unwrap().unwrap();
        let b = SealedBucket::open(
            Arc::new(MemClient::new()),
            url,
            EncryptionKey::from_bytes(&[3; 32]),
        )
        .unwrap();
        let a = "a".repeat(32);
        let p1 = put(&b, "s", "vm", 4, &a, "test").unwrap();
        assert!(p1.live(now_s()) && !p1.live(p1.expires_unix_s));
        // A renewal of the same pinner replaces its pin.
        let p2 = put(&b, "s", "vm", 4, &a, "test").unwrap();
        let all = list(&b, "s", "vm").unwrap();
        assert_eq!(all, [p2]);
        // An expired pin of another pinner is listed but not live.
        let old = pin_name("s", "vm", 2, now_s() - 1, &"b".repeat(32));
        b.put(&old, b"{}").unwrap();
        b.put("sites/s/vms/vm/pins/garbage", b"{}").unwrap();
        let all = list(&b, "s", "vm").unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(live_cycles(&all, now_s()), [4]);
        assert_eq!(release(&b, "s", "vm", &a).unwrap(), 1);
        assert_eq!(
            live_cycles(&list(&b, "s", "vm").unwrap(), now_s()),
            [0u64; 0]
        );
    }
}
