//! Failover records: `failover --unplanned --store s3://…` writes one into
//! the VM's fence folder before the VM can run at the other site, so the
//! old primary's sender (or a receiver writing for it), if it comes back,
//! stops instead of extending a history the VM has left: every writer
//! lists the fence folder when it claims the VM and after every put it
//! acknowledges ([`super::fence`]), so the record costs no extra request.
//!
//! ```text
//! sites/<site>/vms/<vm>/fence/failedover-<time ns:016x>-<id:32 hex>   sealed JSON
//! ```
//!
//! The id is the failover view's (its pin's pinner id). `--cleanup` of the
//! unplanned failover (abandoned) deletes it; `--commit` keeps it (the VM
//! now runs there). `vdrep forget VM --store s3://…` deletes it with the
//! VM's history, after which the VM can be protected into the bucket anew.

use super::bucket::{BucketError, SealedBucket};
use super::fence::FAILED_OVER;

/// What a failover record says (for the refusal the old primary shows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailoverRecord {
    pub vm: String,
    /// The host the VM was failed over to.
    pub host: String,
    /// The recovery point it started from.
    pub cycle: u64,
    pub point_time_unix_ns: u64,
    /// When the failover started.
    pub time_unix_ns: u64,
}

impl FailoverRecord {
    /// The refusal a writer of the VM shows (what happened, what to do).
    pub fn message(&self, store: &str) -> String {
        let at = |ns: u64| {
            jiff::Timestamp::from_nanosecond(i128::from(ns))
                .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
                .unwrap_or_else(|_| format!("{ns} ns"))
        };
        format!(
            "{vm} was failed over to {host} at {t} from point {c} (of {pt}) by `vdrep failover {vm} --unplanned --store {store}`; this site stops replicating it. If that failover was abandoned, run `vdrep failover {vm} --cleanup --store {store}` on {host}; if it was committed, the VM lives there now: to protect it from here again, `vdrep forget {vm} --store {store}` (deletes its history in the bucket) and protect it anew",
            vm = self.vm,
            host = self.host,
            t = at(self.time_unix_ns),
            c = self.cycle,
            pt = at(self.point_time_unix_ns),
        )
    }
}

fn fence_dir(site: &str, vm: &str) -> String {
    format!("sites/{site}/vms/{vm}/fence/")
}

/// Write a record for the view `id` (32 hex digits). Returns its name.
pub fn write(
    b: &SealedBucket,
    site: &str,
    rec: &FailoverRecord,
    id: &str,
) -> Result<String, BucketError> {
    let name = format!(
        "{}{FAILED_OVER}{:016x}-{id}",
        fence_dir(site, &rec.vm),
        rec.time_unix_ns
    );
    let body = serde_json::to_vec(rec).unwrap_or_default();
    b.put(&name, &body)?;
    Ok(name)
}

/// The record `leaf` (a name under the fence folder).
pub fn read(
    b: &SealedBucket,
    site: &str,
    vm: &str,
    leaf: &str,
) -> Result<Option<FailoverRecord>, BucketError> {
    let body = b.get(&format!("{}{leaf}", fence_dir(site, vm)))?;
    Ok(serde_json::from_slice(&body).ok())
}

/// Delete the records of `vm` written by view `id`, or every record
/// (`None`). Returns how many.
pub fn remove(
    b: &SealedBucket,
    site: &str,
    vm: &str,
    id: Option<&str>,
) -> Result<usize, BucketError> {
    let dir = fence_dir(site, vm);
    let mut n = 0;
    for name in b.list(&format!("{dir}{FAILED_OVER}"))? {
        if id.is_none_or(|id| name.ends_with(&format!("-{id}"))) {
            b.delete(&name)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::fence::{FenceErrorKind, Writer};
    use crate::objstore::{EncryptionKey, MemClient, StoreUrl};
    use std::sync::Arc;

    #[test]
    fn a_record_refuses_claims_and_checks_until_removed() {
        let mem = Arc::new(MemClient::new());
        let url = StoreUrl::parse("s3://bkt/p").unwrap().unwrap();
        let b = SealedBucket::open(mem.clone(), url, EncryptionKey::from_bytes(&[7; 32])).unwrap();
        let dir = b.url().key("sites/s/vms/vm/fence");
        let w = Writer::claim(&*mem, &dir, [1; 16], || Ok(1)).unwrap();
        let rec = FailoverRecord {
            vm: "vm".into(),
            host: "dr1".into(),
            cycle: 7,
            point_time_unix_ns: 1_700_000_000_000_000_000,
            time_unix_ns: 1_700_000_100_000_000_000,
        };
        let id = "ab".repeat(16);
        write(&b, "s", &rec, &id).unwrap();
        let e = w.check(&*mem).unwrap_err();
        assert_eq!(e.kind(), FenceErrorKind::FailedOver);
        let e = Writer::claim(&*mem, &dir, [2; 16], || Ok(1)).unwrap_err();
        let crate::objstore::fence::FenceError::FailedOver { record, .. } = e else {
            panic!("{e}");
        };
        let got = read(&b, "s", "vm", &record).unwrap().unwrap();
        assert_eq!(got, rec);
        let m = got.message("s3://bkt/p");
        assert!(
            m.contains("failed over to dr1 at 2023-11-14T22:15:00Z from point 7"),
            "{m}"
        );
        assert_eq!(remove(&b, "s", "vm", Some(&"cd".repeat(16))).unwrap(), 0);
        assert_eq!(remove(&b, "s", "vm", Some(&id)).unwrap(), 1);
        Writer::claim(&*mem, &dir, [2; 16], || Ok(1)).unwrap();
    }
}
