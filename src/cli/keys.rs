//! `vdrep keys init` and `vdrep keys rotate`: create a site identity, or
//! replace its key pair keeping the old one (see [`crate::transport::keys`]).

use std::path::PathBuf;

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
