//! `vdrep keys init`, `vdrep keys rotate` and `vdrep keys show`: create a
//! site identity, replace its key pair keeping the old one, or list the
//! certificates in use with their expiry (see [`crate::transport::keys`]);
//! `vdrep keys encryption-key`: a key for encryption at rest
//! ([`crate::objstore::EncryptionKey`]).

use std::path::PathBuf;

use crate::config::Config;
use crate::transport::keys::{self, Validity, EXPIRY_WARN_DAYS};

/// Create this site's identity: NAME.crt (give it to peers, who pass it with
/// --trust) and NAME.key (private, mode 0600).
#[derive(Debug, clap::Args)]
pub struct KeysInitArgs {
    /// Site name: certificate CN and file name (letters, digits, '.', '_', '-').
    #[arg(long)]
    pub name: String,
    /// Directory to write NAME.crt and NAME.key to (created, mode 0700, if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing NAME.key (peers trusting the old certificate must
    /// be given the new one).
    #[arg(long)]
    pub force: bool,
}

/// Replace this site's key pair: the new NAME.crt/NAME.key take the old
/// ones' place, which move to KEYDIR/retired/ (peers keep trusting the old
/// certificate until they have the new one).
#[derive(Debug, clap::Args)]
pub struct KeysRotateArgs {
    /// The identity folder (`vdrep keys init --out`).
    #[arg(long)]
    pub dir: PathBuf,
    /// The site name (default: the only identity in the folder).
    #[arg(long)]
    pub name: Option<String>,
}

/// Run `vdrep keys rotate`: the new and retired certificates with their
/// fingerprints, and the steps that change peers without downtime.
pub fn run_keys_rotate(a: &KeysRotateArgs) -> i32 {
    let r = match crate::transport::keys::rotate(&a.dir, a.name.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vdrep keys rotate: {e}");
            return 1;
        }
    };
    println!("new certificate: {}", r.crt.display());
    println!("new private key: {}", r.key.display());
    println!("new fingerprint (SHA-256): {}", r.fingerprint);
    println!("retired certificate: {}", r.retired_crt.display());
    println!("retired fingerprint (SHA-256): {}", r.retired_fingerprint);
    println!("next, without downtime:");
    println!(
        "  1. on every peer, trust {} next to the old certificate and reload it (systemctl reload, or SIGHUP);",
        r.crt.display()
    );
    println!(
        "  2. restart this site's vdrep daemons: they present the new certificate from then on;"
    );
    println!("  3. on every peer, drop the retired certificate from the trust and reload.");
    0
}

#[derive(clap::Args, Debug)]
pub struct EncryptionKeyArgs {
    /// The key file to create (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
}

/// Run `vdrep keys encryption-key`: print the file and the key's id.
pub fn run_encryption_key(a: &EncryptionKeyArgs) -> i32 {
    match crate::objstore::EncryptionKey::generate_file(&a.out) {
        Ok(k) => {
            println!(
                "encryption key: {} (key id {}, mode 0600)",
                a.out.display(),
                crate::util::hex(&k.id())
            );
            0
        }
        Err(e) => {
            eprintln!("vdrep keys encryption-key: {e}");
            1
        }
    }
}

/// Run `vdrep keys init`: print the two paths and the certificate's SHA-256
/// fingerprint; exit status 0 on success, 1 on failure (reason on stderr).
pub fn run_keys_init(a: &KeysInitArgs) -> i32 {
    let (crt, key) = match crate::transport::keys::init(&a.name, &a.out, a.force) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vdrep keys init: {e}");
            return 1;
        }
    };
    let fp = match crate::transport::keys::load_cert(&crt) {
        Ok(der) => crate::transport::Fingerprint::of_der(&der),
        Err(e) => {
            eprintln!("vdrep keys init: {e}");
            return 1;
        }
    };
    println!("certificate: {}", crt.display());
    println!("private key: {}", key.display());
    println!("fingerprint (SHA-256): {fp}");
    0
}

/// List the certificates of this site and of the peers it trusts.
#[derive(Debug, clap::Args)]
pub struct KeysShowArgs {
    /// The identity folder (default: the configuration's `[site] keys`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A trusted peer certificate (repeatable; default: the configuration's
    /// `[site] trust` and the VMs' `trust`).
    #[arg(long)]
    pub trust: Vec<PathBuf>,
}

/// Run `vdrep keys show`: one line per certificate; 1 if any expires
/// within [`EXPIRY_WARN_DAYS`] (or is expired or unreadable).
pub fn run_keys_show(a: &KeysShowArgs, cfg: Option<&Config>) -> i32 {
    let dir = a.dir.clone().or(cfg.and_then(|c| c.site.keys.clone()));
    let mut own: Vec<PathBuf> = Vec::new();
    if let Some(d) = &dir {
        match keys::certs_in(d) {
            Ok(v) => own = v,
            Err(e) => {
                eprintln!("vdrep keys show: {}: {e}", d.display());
                return 2;
            }
        }
    }
    let mut trusted: Vec<PathBuf> = a.trust.clone();
    if trusted.is_empty() {
        if let Some(c) = cfg {
            trusted.extend(c.site.trust.iter().cloned());
            trusted.extend(c.vms.iter().flat_map(|v| v.trust.iter().cloned()));
        }
    }
    trusted.sort();
    trusted.dedup();
    if own.is_empty() && trusted.is_empty() {
        eprintln!("vdrep keys show: no certificate: give --dir KEYDIR or --trust CERT, or a configuration with [site] keys/trust");
        return 2;
    }
    let now = jiff::Timestamp::now();
    let mut bad = 0;
    for (role, list) in [("own", &own), ("trusted", &trusted)] {
        for p in list {
            let (line, warn) = cert_line(p, now);
            println!("{role:<8} {line}");
            if warn {
                bad += 1;
            }
        }
    }
    if bad > 0 {
        eprintln!(
            "vdrep keys show: warning: {bad} certificate(s) expired, unreadable or expiring within {EXPIRY_WARN_DAYS} days: rotate them (vdrep keys rotate) and update the peers"
        );
        return 1;
    }
    0
}

/// `PATH  CN  FINGERPRINT  expires DATE (N days)` and whether to warn.
fn cert_line(p: &std::path::Path, now: jiff::Timestamp) -> (String, bool) {
    let cert = match keys::load_cert(p) {
        Ok(c) => c,
        Err(e) => return (format!("{}  UNREADABLE: {e}", p.display()), true),
    };
    let cn = keys::subject_cn(&cert).unwrap_or_else(|| "-".into());
    let fp = keys::Fingerprint::of_der(&cert);
    let Some(v) = Validity::of_der(&cert) else {
        return (
            format!("{}  {cn}  {fp}  validity unreadable", p.display()),
            true,
        );
    };
    let days = v.days_left(now);
    let when = v.not_after.strftime("%Y-%m-%d %H:%M UTC");
    let state = if days < 0 {
        "EXPIRED".to_string()
    } else if v.expires_soon(now) {
        format!("WARNING: expires in {days} day(s)")
    } else {
        format!("{days} days left")
    };
    (
        format!("{}  {cn}  {fp}  expires {when}  {state}", p.display()),
        v.expires_soon(now),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PEM certificate valid from `from` to `to` days from now, by rcgen.
    fn pem_valid(dir: &std::path::Path, name: &str, from: i64, to: i64) -> PathBuf {
        let now = jiff::Timestamp::now().as_second();
        let cert =
            crate::transport::keys::self_signed_valid(name, now + from * 86_400, now + to * 86_400);
        let path = dir.join(format!("{name}.crt"));
        std::fs::write(&path, cert.pem()).unwrap();
        path
    }

    #[test]
    fn certificates_close_to_expiry_are_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let now = jiff::Timestamp::now();
        let (line, warn) = cert_line(&pem_valid(dir.path(), "soon", -1, 10), now);
        assert!(warn && line.contains("WARNING: expires in"), "{line}");
        let (line, warn) = cert_line(&pem_valid(dir.path(), "fine", -1, 100), now);
        assert!(
            !warn && line.contains("days left") && line.contains("fine"),
            "{line}"
        );
        let (line, warn) = cert_line(&pem_valid(dir.path(), "old", -10, -2), now);
        assert!(warn && line.contains("EXPIRED"), "{line}");
        let (_, warn) = cert_line(&dir.path().join("missing.crt"), now);
        assert!(warn);
        // The same rule for `vdrep status`: one warning per such certificate.
        let all = keys::certs_in(dir.path()).unwrap();
        assert_eq!(all.len(), 3);
        let w = keys::expiry_warnings(&all, now);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w
            .iter()
            .any(|l| l.contains("soon.crt") && l.contains("in ")));
        assert!(w
            .iter()
            .any(|l| l.contains("old.crt") && l.contains("EXPIRED")));
        let args = |dir: Option<PathBuf>, trust: Vec<PathBuf>| KeysShowArgs { dir, trust };
        let ok = tempfile::tempdir().unwrap();
        pem_valid(ok.path(), "site-a", -1, 3650);
        assert_eq!(
            run_keys_show(&args(Some(ok.path().into()), vec![]), None),
            0
        );
        let peer = pem_valid(dir.path(), "peer", -1, 5);
        assert_eq!(
            run_keys_show(&args(Some(ok.path().into()), vec![peer]), None),
            1
        );
        assert_eq!(run_keys_show(&args(None, vec![]), None), 2);
    }
}
