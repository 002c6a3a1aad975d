//! Garage (the S3-compatible distributed object store the object-store
//! backend is tested against) as a test fixture: a single node, or a
//! cluster of several nodes with `replication_factor` = node count, on free
//! loopback ports in a temporary folder, with one access key and one bucket;
//! everything is stopped and deleted on drop.
//!
//! Garage is AGPL: it runs as a separate process, never linked. The binary
//! is `$VDREP_GARAGE`, else `../shared/bin/garage` beside the checkout, else
//! `~/.cargo/bin/garage` (where `scripts/lib.sh`'s `vdrep_install_garage`
//! builds it), else `garage` on `PATH`. [`Garage::start`] returns `None`
//! (after `skip::skip`) when there is none.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The region the fixture's nodes answer for.
pub const REGION: &str = "garage";

/// The Garage executable, if one is installed.
pub fn garage_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VDREP_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut candidates = vec![manifest.join("../shared/bin/garage")];
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/garage"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("garage")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut &f, &mut v).expect("read /dev/urandom");
    v
}

struct Node {
    config: PathBuf,
    child: Option<Child>,
    s3_port: u16,
    rpc_port: u16,
}

/// A running Garage cluster with one key and one bucket.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// The temporary folder holding every node's config, metadata and data.
    pub dir: tempfile::TempDir,
    /// The access key id and secret of the key the fixture made.
    pub key_id: String,
    pub secret: String,
    /// The bucket the fixture made (read, write and owner for the key).
    pub bucket: String,
}

impl Garage {
    /// Start `nodes` nodes (replication factor = `nodes`: 1 or 3), lay them
    /// out in three zones at most, make a key and a bucket. `None` (after
    /// a skip) if Garage is not installed.
    pub fn start(nodes: usize) -> Option<Garage> {
        let Some(bin) = garage_bin() else {
            crate::skip::skip(
                "SKIP: garage not found (../shared/bin/garage, ~/.cargo/bin/garage or PATH; \
                 scripts/lib.sh vdrep_install_garage builds it)",
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = hex(&random_bytes(32));
        let mut g = Garage {
            bin,
            nodes: Vec::new(),
            dir,
            key_id: format!("GK{}", hex(&random_bytes(12))),
            secret: hex(&random_bytes(32)),
            bucket: "vdrep-test".into(),
        };
        for i in 0..nodes {
            let node_dir = g.dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
            let config = node_dir.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\n\
                     db_engine = \"sqlite\"\nreplication_factor = {nodes}\n\
                     compression_level = \"none\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc_port}\"\nrpc_secret = \"{secret}\"\n\
                     [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                     root_domain = \".s3.garage.localhost\"\n\
                     [admin]\napi_bind_addr = \"127.0.0.1:{admin_port}\"\n",
                    d = node_dir.display()
                ),
            )
            .expect("write garage.toml");
            g.nodes.push(Node {
                config,
                child: None,
                s3_port,
                rpc_port,
            });
            g.spawn(i);
        }
        let ids: Vec<String> = (0..nodes).map(|i| g.node_id(i)).collect();
        for (i, id) in ids.iter().enumerate().skip(1) {
            let port = g.nodes[i].rpc_port;
            g.cli(0, &["node", "connect", &format!("{id}@127.0.0.1:{port}")]);
        }
        for (i, id) in ids.iter().enumerate() {
            let short = &id[..16];
            g.cli(
                0,
                &[
                    "layout",
                    "assign",
                    "-z",
                    &format!("dc{}", i % 3),
                    "-c",
                    "1G",
                    short,
                ],
            );
        }
        g.cli(0, &["layout", "apply", "--version", "1"]);
        let (key_id, key_secret) = (g.key_id.clone(), g.secret.clone());
        g.cli(
            0,
            &[
                "key",
                "import",
                "-n",
                "vdrep",
                "--yes",
                &key_id,
                &key_secret,
            ],
        );
        let bucket = g.bucket.clone();
        g.create_bucket(&bucket);
        Some(g)
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(node.config.with_file_name("server.log")).expect("log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        node.child = Some(child);
    }

    /// The full node id of node `i`, once its RPC answers.
    fn node_id(&self, i: usize) -> String {
        let out = self.cli(i, &["node", "id", "-q"]);
        out.trim()
            .split('@')
            .next()
            .map(str::to_string)
            .expect("node id")
    }

    /// Run `garage -c <node i's config> ARGS`, retried for up to 20 s while
    /// the node starts; its stdout. Panics if it keeps failing.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[i].config)
                .args(args)
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .output()
                .expect("run garage");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.nodes[i].config.with_file_name("server.log"))
                        .unwrap_or_default();
                panic!(
                    "garage {args:?} failed: {}\n{}\nserver log:\n{log}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Make bucket `name`, readable and writable by the fixture's key.
    pub fn create_bucket(&self, name: &str) {
        self.cli(0, &["bucket", "create", name]);
        self.cli(
            0,
            &[
                "bucket", "allow", "--read", "--write", "--owner", name, "--key", "vdrep",
            ],
        );
    }

    /// The S3 endpoint of node `i` (`http://127.0.0.1:PORT`).
    pub fn endpoint_of(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3_port)
    }

    /// The S3 endpoint of node 0.
    pub fn endpoint(&self) -> String {
        self.endpoint_of(0)
    }

    /// Write a credentials file (TOML: `access_key_id`, `secret_access_key`,
    /// `region`) for the fixture's key into `dir`; its path.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        let p = dir.join("s3-credentials.toml");
        std::fs::write(
            &p,
            format!(
                "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\nregion = \"{REGION}\"\n",
                self.key_id, self.secret
            ),
        )
        .expect("write credentials");
        p
    }

    /// The fixture's key as [`vdrep::objstore::Credentials`].
    pub fn credentials(&self) -> vdrep::objstore::Credentials {
        vdrep::objstore::Credentials {
            access_key_id: self.key_id.clone(),
            secret_access_key: self.secret.clone(),
            region: Some(REGION.into()),
        }
    }

    /// `url` (`s3://…` of this cluster) opened with the key file `key`,
    /// as a reader with no local state would.
    pub fn sealed(
        &self,
        url: &vdrep::objstore::StoreUrl,
        key: &Path,
    ) -> std::sync::Arc<vdrep::objstore::SealedBucket> {
        let client =
            vdrep::objstore::S3Client::new(&self.endpoint(), url, &self.credentials()).unwrap();
        std::sync::Arc::new(
            vdrep::objstore::SealedBucket::open(
                std::sync::Arc::new(client),
                url.clone(),
                vdrep::objstore::EncryptionKey::from_file(key).unwrap(),
            )
            .unwrap(),
        )
    }

    /// The data folder of node `i` (blocks as written: compression is off).
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].config.with_file_name("data")
    }

    /// Kill node `i` (SIGKILL) and reap it.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start node `i` again (after [`kill_node`](Self::kill_node)) and
    /// reconnect it to every other live node.
    pub fn restart_node(&mut self, i: usize) {
        self.kill_node(i);
        self.spawn(i);
        let id = self.node_id(i);
        let port = self.nodes[i].rpc_port;
        for j in (0..self.nodes.len()).filter(|&j| j != i && self.nodes[j].child.is_some()) {
            self.cli(j, &["node", "connect", &format!("{id}@127.0.0.1:{port}")]);
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
    }
}
