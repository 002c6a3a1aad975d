//! Site identity: a self-signed certificate and its private key.
//!
//! `vdrep keys init --name SITE --out KEYDIR` ([`init`]) writes
//! `KEYDIR/SITE.crt` (X.509, PEM, CN and DNS SAN = SITE, ECDSA P-256 with
//! SHA-256, valid for 10 years from yesterday) and `KEYDIR/SITE.key`
//! (PKCS#8 PEM, mode 0600). The key is written to a fresh temporary file
//! created with mode 0600 (never readable by others, not even briefly),
//! fsynced, then published under its final name with `link(2)`, which fails
//! rather than replace an existing key; with `force` it is published with
//! `rename(2)` instead. The certificate is published after the key, by
//! rename, so a visible certificate always has its key beside it.
//!
//! [`Identity`] is a loaded certificate + key pair (checked to belong
//! together); peers recognise each other by the certificate's SHA-256
//! [`Fingerprint`] (see [`super::trust`]).

use super::TransportError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest site name accepted by [`init`] and in `Hello`.
pub const MAX_SITE_NAME: usize = 64;

/// SHA-256 of a certificate's DER encoding: how vdrep names and pins peers.
///
/// Displayed like `openssl x509 -noout -fingerprint -sha256`: upper-case hex
/// byte pairs separated by colons, so an operator can compare the two.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_der(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }

    /// Lower-case hex without separators (64 characters), e.g. for file or
    /// directory names.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Check a site name: 1..=64 characters from `A-Z a-z 0-9 . _ -`, not
/// starting with `.` or `-`. Site names become file names (`SITE.crt`) and
/// certificate common names.
pub fn check_site_name(name: &str) -> Result<&str, SiteNameError> {
    if name.is_empty() {
        return Err(SiteNameError::Empty);
    }
    if name.len() > MAX_SITE_NAME {
        return Err(SiteNameError::TooLong { len: name.len() });
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(SiteNameError::BadStart {
            name: name.to_string(),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(SiteNameError::BadChar {
            name: name.escape_debug().to_string(),
            c,
        });
    }
    Ok(name)
}

/// Why a site name is refused by [`check_site_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteNameError {
    #[error("the site name is empty")]
    Empty,
    #[error("the site name is {len} bytes long; at most {MAX_SITE_NAME} are allowed")]
    TooLong { len: usize },
    #[error("site name {name:?} starts with '.' or '-'; start it with a letter or digit")]
    BadStart { name: String },
    #[error("site name {name:?} contains {c:?}; use only letters, digits, '.', '_' and '-'")]
    BadChar { name: String, c: char },
}

/// A site's own certificate and private key, loaded and checked to belong
/// together. `Debug` never prints the key.
pub struct Identity {
    /// The certificate's common name (the site name given to `keys init`).
    pub name: String,
    pub cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    pub fingerprint: Fingerprint,
    /// Where the certificate was read from (empty for in-memory identities).
    pub cert_path: PathBuf,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("fingerprint", &self.fingerprint)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
            fingerprint: self.fingerprint,
            cert_path: self.cert_path.clone(),
        }
    }
}

impl Identity {
    /// Build an identity from DER bytes, checking that the key is usable and
    /// matches the certificate.
    pub fn from_der(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TransportError> {
        Self::build(cert, key, Path::new(""), Path::new(""))
    }

    fn build(
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, TransportError> {
        let provider = super::provider();
        rustls::sign::CertifiedKey::from_der(vec![cert.clone()], key.clone_key(), &provider)
            .map_err(|e| {
                if key_path.as_os_str().is_empty() {
                    TransportError::KeyGen(format!(
                        "the private key cannot be used with the certificate: {e}"
                    ))
                } else {
                    TransportError::Identity {
                        path: key_path.to_path_buf(),
                        what: format!(
                            "the private key cannot be used with certificate {} ({e}); \
                             use the .key written together with that .crt by `vdrep keys init`",
                            cert_path.display()
                        ),
                    }
                }
            })?;
        let fingerprint = Fingerprint::of_der(&cert);
        let name = subject_cn(&cert).unwrap_or_default();
        Ok(Identity {
            name,
            cert,
            key,
            fingerprint,
            cert_path: cert_path.to_path_buf(),
        })
    }

    /// Load `CERT` and `KEY` (PEM). The key file must not be readable or
    /// writable by group or others.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TransportError> {
        let cert = load_cert(cert_path)?;
        let meta = std::fs::metadata(key_path).map_err(|e| TransportError::Identity {
            path: key_path.to_path_buf(),
            what: format!("cannot read the private key: {e}"),
        })?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TransportError::Identity {
                path: key_path.to_path_buf(),
                what: format!(
                    "the private key is accessible by other users (mode {:o}); \
                     run `chmod 600 {}`",
                    mode & 0o7777,
                    key_path.display()
                ),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TransportError::Identity {
            path: key_path.to_path_buf(),
            what: format!("not a PEM private key: {e}"),
        })?;
        Self::build(cert, key, cert_path, key_path)
    }

    /// Load the identity in `KEYDIR`: `KEYDIR/NAME.crt` + `KEYDIR/NAME.key`
    /// for the given name, or, with `name == None`, the only `*.key` in the
    /// directory that has a `.crt` beside it.
    pub fn from_dir(keydir: &Path, name: Option<&str>) -> Result<Self, TransportError> {
        let name = match name {
            Some(n) => n.to_string(),
            None => {
                let rd = std::fs::read_dir(keydir).map_err(|e| TransportError::Identity {
                    path: keydir.to_path_buf(),
                    what: format!("cannot list the key directory: {e}"),
                })?;
                let mut names: Vec<String> = Vec::new();
                for ent in rd.flatten() {
                    let p = ent.path();
                    if p.extension().is_some_and(|x| x == "key") && p.with_extension("crt").exists()
                    {
                        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                            names.push(stem.to_string());
                        }
                    }
                }
                names.sort();
                match names.len() {
                    0 => {
                        return Err(TransportError::Identity {
                            path: keydir.to_path_buf(),
                            what: "no identity here (no NAME.key with a NAME.crt); \
                                   create one with `vdrep keys init --name SITE --out DIR`"
                                .into(),
                        })
                    }
                    1 => names.remove(0),
                    _ => {
                        return Err(TransportError::Identity {
                            path: keydir.to_path_buf(),
                            what: format!(
                                "several identities here ({}); keep one per key directory",
                                names.join(", ")
                            ),
                        })
                    }
                }
            }
        };
        Self::load(
            &keydir.join(format!("{name}.crt")),
            &keydir.join(format!("{name}.key")),
        )
    }

    /// The private key (for building TLS configurations).
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// The key a receiver's QUIC endpoint signs stateless resets with,
    /// derived from the private key, so it is the same after a restart: a
    /// restarted receiver then answers packets of connections it lost with a
    /// reset the sender accepts, and the sender reconnects at once instead
    /// of waiting for a timeout.
    pub fn stateless_reset_key(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            self.derive(b"vdrep QUIC stateless reset key v1").as_ref(),
        )
    }

    /// The key of the receiver endpoint's connection-ID generator, stable
    /// across restarts like [`Identity::stateless_reset_key`]: quinn drops
    /// packets whose connection ID its generator does not validate, so a
    /// restarted receiver must recognise the IDs it issued before to answer
    /// them with a stateless reset.
    pub fn connection_id_key(&self) -> u64 {
        let tag = self.derive(b"vdrep QUIC connection id key v1");
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_le_bytes(b)
    }

    /// HMAC-SHA256 of `label` under the private key: a secret only this
    /// identity can compute, the same every time.
    fn derive(&self, label: &[u8]) -> ring::hmac::Tag {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.secret_der());
        ring::hmac::sign(&k, label)
    }

    /// Generate an identity in memory (tests, tools): same parameters as
    /// [`init`], nothing written.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let (cert_pem, key_pem) = generate_pem(name)?;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            TransportError::KeyGen(format!("generated certificate does not parse: {e}"))
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TransportError::KeyGen(format!("generated key does not parse: {e}")))?;
        Self::from_der(cert, key)
    }
}

/// Read one PEM certificate (the first one in the file).
pub fn load_cert(path: &Path) -> Result<CertificateDer<'static>, TransportError> {
    CertificateDer::from_pem_file(path).map_err(|e| TransportError::Identity {
        path: path.to_path_buf(),
        what: format!("not a PEM certificate: {e}"),
    })
}

fn generate_pem(name: &str) -> Result<(String, String), TransportError> {
    let gen_err = TransportError::KeyGen;
    check_site_name(name).map_err(|e| gen_err(e.to_string()))?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| gen_err(format!("cannot generate a P-256 key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| gen_err(format!("bad certificate name {name:?}: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    // From yesterday (tolerates a peer clock a little behind) for 10 years.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let from = today.yesterday().unwrap_or(today);
    let (y, m, d) = (from.year() as i32, from.month() as u8, from.day() as u8);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    params.not_after = rcgen::date_time_ymd(y + 10, m, d.min(28));
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| gen_err("no randomness for the serial number".into()))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params
        .self_signed(&key)
        .map_err(|e| gen_err(format!("cannot sign the certificate: {e}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Write `bytes` to a new temporary file in `dir` created with `mode`,
/// fsync it and return its path.
fn write_temp(dir: &Path, stem: &str, bytes: &[u8], mode: u32) -> std::io::Result<PathBuf> {
    let mut rnd = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd);
    let tmp = dir.join(format!(".{stem}.{}.tmp", u64::from_le_bytes(rnd)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let res = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Create a site identity: `OUTDIR/NAME.crt` and `OUTDIR/NAME.key` (see the
/// module doc). Refuses to replace an existing `NAME.key` unless `force`.
/// Creates `OUTDIR` (mode 0700) if it does not exist.
pub fn init(name: &str, outdir: &Path, force: bool) -> Result<(PathBuf, PathBuf), TransportError> {
    let io_err = |path: &Path, what: &str, e: std::io::Error| TransportError::Identity {
        path: path.to_path_buf(),
        what: format!("{what}: {e}"),
    };
    check_site_name(name).map_err(|e| TransportError::Identity {
        path: outdir.to_path_buf(),
        what: e.to_string(),
    })?;
    if !outdir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(outdir)
            .map_err(|e| io_err(outdir, "cannot create the key directory", e))?;
    }
    let crt_path = outdir.join(format!("{name}.crt"));
    let key_path = outdir.join(format!("{name}.key"));
    if !force && std::fs::symlink_metadata(&key_path).is_ok() {
        return Err(TransportError::Identity {
            path: key_path,
            what: "a private key already exists; refusing to replace it \
                   (peers that trust its certificate would be locked out). \
                   Pass --force to replace it"
                .into(),
        });
    }
    let (cert_pem, key_pem) = generate_pem(name)?;

    let key_tmp = write_temp(outdir, &format!("{name}.key"), key_pem.as_bytes(), 0o600)
        .map_err(|e| io_err(outdir, "cannot write the private key", e))?;
    let published = if force {
        std::fs::rename(&key_tmp, &key_path)
    } else {
        std::fs::hard_link(&key_tmp, &key_path).and_then(|_| std::fs::remove_file(&key_tmp))
    };
    if let Err(e) = published {
        let _ = std::fs::remove_file(&key_tmp);
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            return Err(TransportError::Identity {
                path: key_path,
                what: "a private key appeared while generating; refusing to replace it \
                       (pass --force to replace it)"
                    .into(),
            });
        }
        return Err(io_err(&key_path, "cannot publish the private key", e));
    }
    let crt_tmp = write_temp(outdir, &format!("{name}.crt"), cert_pem.as_bytes(), 0o644)
        .map_err(|e| io_err(outdir, "cannot write the certificate", e))?;
    if let Err(e) = std::fs::rename(&crt_tmp, &crt_path) {
        let _ = std::fs::remove_file(&crt_tmp);
        return Err(io_err(&crt_path, "cannot publish the certificate", e));
    }
    sync_dir(outdir);
    Ok((crt_path, key_path))
}

/// What [`rotate`] did: the new identity's files and where the old pair went.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub name: String,
    pub crt: PathBuf,
    pub key: PathBuf,
    pub fingerprint: Fingerprint,
    pub retired_crt: PathBuf,
    pub retired_key: PathBuf,
    pub retired_fingerprint: Fingerprint,
}

/// Folder of `KEYDIR` holding retired identities (never loaded as one).
pub const RETIRED_DIR: &str = "retired";

/// `vdrep keys rotate`: make a new key pair for the identity in `keydir`
/// (`name`, or the only one) and move the old pair to
/// `keydir/retired/NAME-<fingerprint>.{crt,key}`, kept so peers can trust
/// both certificates until every one has the new one. Running daemons keep
/// the identity they loaded until they restart. The new pair is written
/// before the old one moves; a failure in between puts the old pair back.
pub fn rotate(keydir: &Path, name: Option<&str>) -> Result<Rotation, TransportError> {
    let io_err = |path: &Path, what: &str, e: std::io::Error| TransportError::Identity {
        path: path.to_path_buf(),
        what: format!("{what}: {e}"),
    };
    let old = Identity::from_dir(keydir, name)?;
    let name = old.name.clone();
    let crt = keydir.join(format!("{name}.crt"));
    let key = keydir.join(format!("{name}.key"));
    let retired = keydir.join(RETIRED_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&retired)
        .map_err(|e| io_err(&retired, "cannot create the folder of retired keys", e))?;
    let stem = format!("{name}-{}", &old.fingerprint.to_hex()[..16]);
    let (retired_crt, retired_key) = (
        retired.join(format!("{stem}.crt")),
        retired.join(format!("{stem}.key")),
    );
    let (cert_pem, key_pem) = generate_pem(&name)?;
    let key_tmp = write_temp(keydir, &format!("{name}.key"), key_pem.as_bytes(), 0o600)
        .map_err(|e| io_err(keydir, "cannot write the new private key", e))?;
    let crt_tmp =
        write_temp(keydir, &format!("{name}.crt"), cert_pem.as_bytes(), 0o644).map_err(|e| {
            let _ = std::fs::remove_file(&key_tmp);
            io_err(keydir, "cannot write the new certificate", e)
        })?;
    // Old pair out, new pair in; undo what was done if a step fails.
    let steps: [(&Path, &Path); 4] = [
        (&key, &retired_key),
        (&crt, &retired_crt),
        (&key_tmp, &key),
        (&crt_tmp, &crt),
    ];
    for (i, (from, to)) in steps.iter().enumerate() {
        if let Err(e) = std::fs::rename(from, to) {
            for (f, t) in steps[..i].iter().rev() {
                let _ = std::fs::rename(t, f);
            }
            let _ = std::fs::remove_file(&key_tmp);
            let _ = std::fs::remove_file(&crt_tmp);
            return Err(io_err(
                to,
                "cannot rotate the key pair (nothing changed)",
                e,
            ));
        }
    }
    sync_dir(&retired);
    sync_dir(keydir);
    let new = Identity::load(&crt, &key)?;
    Ok(Rotation {
        name,
        crt,
        key,
        fingerprint: new.fingerprint,
        retired_crt,
        retired_key,
        retired_fingerprint: old.fingerprint,
    })
}

/// The subject common name of a DER certificate, with control characters
/// escaped (safe to print). `None` if there is none or the DER does not
/// parse.
pub fn subject_cn(cert_der: &[u8]) -> Option<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    let s = match cn.as_str() {
        Ok(s) => s.to_string(),
        // BMPString (UTF-16) and other encodings: decoded loosely.
        Err(_) => {
            let v = cn.attr_value().data;
            if cn.attr_value().tag() == x509_parser::der_parser::asn1_rs::Tag::BmpString {
                let units: Vec<u16> = v
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            } else {
                String::from_utf8_lossy(v).into_owned()
            }
        }
    };
    let s: String = s.chars().take(128).collect();
    Some(s.escape_debug().to_string())
}

/// A certificate expiring within this many days is reported (`vdrep keys
/// show`).
pub const EXPIRY_WARN_DAYS: i64 = 30;

/// The certificates (`*.crt`) directly in an identity folder, sorted.
pub fn certs_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    v.sort();
    Ok(v)
}

/// One warning per certificate of `certs` that is unreadable, expired or
/// expires within [`EXPIRY_WARN_DAYS`] of `now` (for `vdrep status`).
pub fn expiry_warnings(certs: &[PathBuf], now: jiff::Timestamp) -> Vec<String> {
    certs
        .iter()
        .filter_map(|p| {
            let v = load_cert(p).ok().and_then(|c| Validity::of_der(&c));
            let Some(v) = v else {
                return Some(format!("certificate {}: unreadable", p.display()));
            };
            let days = v.days_left(now);
            (days < EXPIRY_WARN_DAYS).then(|| {
                let when = v.not_after.strftime("%Y-%m-%d");
                if days < 0 {
                    format!("certificate {} EXPIRED on {when}", p.display())
                } else {
                    format!(
                        "certificate {} expires on {when} (in {days} day(s)): rotate it (vdrep keys rotate) and update the peers",
                        p.display()
                    )
                }
            })
        })
        .collect()
}

/// When a certificate is valid, from its DER encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: jiff::Timestamp,
    pub not_after: jiff::Timestamp,
}

impl Validity {
    /// Parse the validity of a DER certificate (`None`: not a certificate).
    pub fn of_der(cert_der: &[u8]) -> Option<Validity> {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
        let v = cert.validity();
        let ts = |t: &x509_parser::time::ASN1Time| jiff::Timestamp::from_second(t.timestamp()).ok();
        Some(Validity {
            not_before: ts(&v.not_before)?,
            not_after: ts(&v.not_after)?,
        })
    }

    /// Whole days from `now` until it expires (negative: expired).
    pub fn days_left(&self, now: jiff::Timestamp) -> i64 {
        (self.not_after.as_second() - now.as_second()).div_euclid(86_400)
    }

    /// Expired, or expires within [`EXPIRY_WARN_DAYS`] of `now`?
    pub fn expires_soon(&self, now: jiff::Timestamp) -> bool {
        self.days_left(now) < EXPIRY_WARN_DAYS
    }
}

/// Tests only: a self-signed certificate for `cn` valid from `from` to
/// `to` (Unix seconds; rcgen keeps whole UTC days), made by rcgen.
#[cfg(test)]
pub(crate) fn self_signed_valid(cn: &str, from: i64, to: i64) -> rcgen::Certificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![cn.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    let t = |s: i64| {
        let d = jiff::Timestamp::from_second(s)
            .unwrap()
            .to_zoned(jiff::tz::TimeZone::UTC)
            .date();
        rcgen::date_time_ymd(d.year() as i32, d.month() as u8, d.day() as u8)
    };
    p.not_before = t(from);
    p.not_after = t(to);
    p.self_signed(&key).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_valid(cn: &str, from: i64, to: i64) -> Vec<u8> {
        self_signed_valid(cn, from, to).der().to_vec()
    }

    #[test]
    fn validity_and_expiry() {
        let now = jiff::Timestamp::now();
        let day = 86_400;
        let id = Identity::generate("site-a").unwrap();
        let v = Validity::of_der(&id.cert).unwrap();
        assert!(v.not_before < now && v.not_before.as_second() > now.as_second() - 2 * day);
        assert!((3650..=3653).contains(&v.days_left(now)), "{v:?}");
        assert!(!v.expires_soon(now));
        let n = now.as_second();
        // Ten days left (rcgen dates are whole days: 9 or 10).
        let soon = Validity::of_der(&cert_valid("soon", n - day, n + 10 * day)).unwrap();
        assert!((9..=10).contains(&soon.days_left(now)), "{soon:?}");
        assert!(soon.expires_soon(now));
        let ok = Validity::of_der(&cert_valid("ok", n - day, n + 40 * day)).unwrap();
        assert!(!ok.expires_soon(now));
        let gone = Validity::of_der(&cert_valid("gone", n - 9 * day, n - 2 * day)).unwrap();
        assert!(gone.days_left(now) < 0 && gone.expires_soon(now));
        assert_eq!(
            subject_cn(&cert_valid("dr-site", n, n + day)).as_deref(),
            Some("dr-site")
        );
        assert_eq!(Validity::of_der(b"not a certificate"), None);
    }

    #[test]
    fn site_names() {
        for ok in ["a", "site-a", "A.b_c-1", "x".repeat(64).as_str()] {
            assert!(check_site_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a/b",
            "a b",
            "a\0",
            "é",
            "x".repeat(65).as_str(),
        ] {
            assert!(check_site_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_identity_has_cn_and_fingerprint() {
        let id = Identity::generate("site-a").unwrap();
        assert_eq!(id.name, "site-a");
        assert_eq!(id.fingerprint, Fingerprint::of_der(&id.cert));
        assert_eq!(id.fingerprint.to_string().len(), 95);
        assert_eq!(id.fingerprint.to_hex().len(), 64);
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn subject_cn_survives_garbage() {
        let id = Identity::generate("x").unwrap();
        let der = id.cert.as_ref();
        for cut in 0..der.len() {
            let _ = subject_cn(&der[..cut]);
        }
        assert_eq!(subject_cn(b""), None);
        assert_eq!(subject_cn(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn rotate_replaces_the_pair_and_retires_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path();
        init("site-a", k, false).unwrap();
        let old = Identity::from_dir(k, None).unwrap();
        let r = rotate(k, None).unwrap();
        assert_eq!(r.name, "site-a");
        assert_eq!(r.retired_fingerprint, old.fingerprint);
        assert_ne!(r.fingerprint, old.fingerprint);
        // The folder still holds exactly one identity: the new one.
        let now = Identity::from_dir(k, None).unwrap();
        assert_eq!(now.fingerprint, r.fingerprint);
        // The retired pair is intact and private.
        let retired = Identity::load(&r.retired_crt, &r.retired_key).unwrap();
        assert_eq!(retired.fingerprint, old.fingerprint);
        let mode = std::fs::metadata(&r.retired_key)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "retired key readable by others: {mode:o}");
        let mode = std::fs::metadata(&r.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "new key readable by others: {mode:o}");
        // Peers can trust both certificates at once.
        let both = super::super::trust::TrustStore::from_files(&[&r.retired_crt, &r.crt]).unwrap();
        assert_eq!(both.len(), 2);
        // Again: a second retired pair beside the first; no temp file left.
        let r2 = rotate(k, Some("site-a")).unwrap();
        assert_ne!(r2.retired_crt, r.retired_crt);
        assert_eq!(r2.retired_fingerprint, r.fingerprint);
        let leftovers: Vec<_> = std::fs::read_dir(k)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // Nothing to rotate: refused, nothing created.
        let empty = tempfile::tempdir().unwrap();
        assert!(rotate(empty.path(), None).is_err());
        assert!(!empty.path().join(RETIRED_DIR).exists());
    }
}
