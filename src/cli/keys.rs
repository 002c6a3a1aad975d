//! `vdrep keys init`: create a site identity (see [`crate::transport::keys`]);
//! `vdrep keys encryption-key`: a key for encryption at rest
//! ([`crate::objstore::EncryptionKey`]).

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
