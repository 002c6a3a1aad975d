//! Where an object store is and how to sign in: `s3://bucket/prefix` URLs
//! ([`StoreUrl`]) and [`Credentials`] (a TOML file with `access_key_id`,
//! `secret_access_key` and optional `region`, or the `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` environment variables).

use super::ObjectError;
use std::path::Path;

/// `s3://BUCKET[/PREFIX]`: the bucket and the key prefix (no leading or
/// trailing '/'; empty for the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub bucket: String,
    pub prefix: String,
}

impl StoreUrl {
    /// `Ok(None)` if `s` is not an `s3://` URL (a local path), an error if it
    /// is one but malformed.
    pub fn parse(s: &str) -> Result<Option<StoreUrl>, ObjectError> {
        let Some(rest) = s.strip_prefix("s3://") else {
            return Ok(None);
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let ok_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !ok_bucket {
            return Err(ObjectError::Config {
                what: format!(
                    "{s:?}: bad bucket name {bucket:?} (3..=63 characters: a-z, 0-9, '-', '.')"
                ),
            });
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == "." || c == "..")
            || prefix.contains("//")
            || prefix.chars().any(char::is_control)
        {
            return Err(ObjectError::Config {
                what: format!("{s:?}: bad prefix {prefix:?} (no empty, '.' or '..' components)"),
            });
        }
        Ok(Some(StoreUrl {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }))
    }

    /// The key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// An access key.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default)]
    pub region: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field("region", &self.region)
            .finish()
    }
}

impl Credentials {
    /// Read a credentials file (TOML).
    pub fn from_file(path: &Path) -> Result<Credentials, ObjectError> {
        let text = std::fs::read_to_string(path).map_err(|e| ObjectError::Config {
            what: format!("cannot read the credentials file {}: {e}", path.display()),
        })?;
        Self::parse(&text).map_err(|e| match e {
            ObjectError::Config { what } => ObjectError::Config {
                what: format!("{}: {what}", path.display()),
            },
            other => other,
        })
    }

    fn parse(text: &str) -> Result<Credentials, ObjectError> {
        let c: Credentials = toml::from_str(text).map_err(|e| ObjectError::Config {
            what: format!("not a credentials file (TOML with access_key_id, secret_access_key and optional region): {e}"),
        })?;
        if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
            return Err(ObjectError::Config {
                what: "access_key_id and secret_access_key must not be empty".into(),
            });
        }
        Ok(c)
    }

    /// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION`
    /// (or `AWS_DEFAULT_REGION`); `None` unless both key variables are set.
    pub fn from_env() -> Option<Credentials> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Some(Credentials {
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
        })
    }

    /// The file if one is given, else the environment.
    pub fn load(file: Option<&Path>) -> Result<Credentials, ObjectError> {
        match file {
            Some(p) => Self::from_file(p),
            None => Self::from_env().ok_or_else(|| ObjectError::Config {
                what: "no credentials: give --s3-credentials FILE or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            }),
        }
    }
}

/// How to reach and open one `s3://` store: the endpoint, the credentials
/// file (none: the `AWS_*` environment variables) and the encryption key
/// file. The flags `--s3-endpoint`, `--s3-credentials`, `--encryption-key`
/// of `receive`, `points` and `protect --to s3://…`, and their keys in the
/// configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct S3Target {
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<std::path::PathBuf>,
    pub encryption_key: std::path::PathBuf,
}

/// Why an `s3://` store could not be opened ([`S3Target::open`]).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The encryption key file is missing or not a key.
    #[error(transparent)]
    Key(#[from] super::EnvelopeError),
    /// The endpoint or credentials are unusable, or the store refused.
    #[error("{url}: {source}{}", critical(.source.retryable()))]
    Object { url: String, source: ObjectError },
    /// Opening the bucket's prefix failed (unreachable, denied, no such
    /// bucket, a prefix of another key or not vdrep's).
    #[error("{url}: {source}{}", critical(.source.retryable()))]
    Bucket {
        url: String,
        source: super::BucketError,
    },
}

fn critical(retryable: bool) -> &'static str {
    if retryable {
        ""
    } else {
        " (critical: fix the configuration)"
    }
}

/// What kind of failure an [`OpenError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenErrorKind {
    /// The key file (see [`super::EnvelopeErrorKind`]).
    Key(super::EnvelopeErrorKind),
    /// The client or the store (see [`super::ObjectErrorKind`]).
    Object(super::ObjectErrorKind),
    /// The bucket or prefix (see [`super::BucketErrorKind`]).
    Bucket(super::BucketErrorKind),
}

impl OpenError {
    pub fn kind(&self) -> OpenErrorKind {
        match self {
            OpenError::Key(e) => OpenErrorKind::Key(e.kind()),
            OpenError::Object { source, .. } => OpenErrorKind::Object(source.kind()),
            OpenError::Bucket { source, .. } => OpenErrorKind::Bucket(source.kind()),
        }
    }

    /// True if trying again later can succeed unchanged (an unreachable
    /// endpoint, 5xx); the rest needs the configuration fixed (Critical).
    pub fn retryable(&self) -> bool {
        match self {
            OpenError::Key(_) => false,
            OpenError::Object { source, .. } => source.retryable(),
            OpenError::Bucket { source, .. } => source.retryable(),
        }
    }
}

impl S3Target {
    /// Open `url` (every check of [`super::SealedBucket::open`]: nothing is
    /// written unless the store, the key and the prefix are all fine).
    pub fn open(&self, url: &StoreUrl) -> Result<super::SealedBucket, OpenError> {
        let key = super::EncryptionKey::from_file(&self.encryption_key)?;
        let object = |source| OpenError::Object {
            url: url.to_string(),
            source,
        };
        let creds = Credentials::load(self.credentials.as_deref()).map_err(object)?;
        let client = super::S3Client::new(&self.endpoint, url, &creds).map_err(object)?;
        super::SealedBucket::open(std::sync::Arc::new(client), url.clone(), key).map_err(|source| {
            OpenError::Bucket {
                url: url.to_string(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(StoreUrl::parse("/var/lib/vdrep").unwrap(), None);
        let u = StoreUrl::parse("s3://bkt-1/a/b/").unwrap().unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("bkt-1", "a/b"));
        assert_eq!(u.key("x"), "a/b/x");
        let u = StoreUrl::parse("s3://bkt").unwrap().unwrap();
        assert_eq!(u.key("x"), "x");
        for bad in [
            "s3://",
            "s3://B",
            "s3://ab",
            "s3://bkt/a/../b",
            "s3://bkt/a//b",
        ] {
            let e = StoreUrl::parse(bad).unwrap_err();
            assert_eq!(e.kind(), super::super::ObjectErrorKind::Config, "{bad}");
        }
    }

    #[test]
    fn credentials_file() {
        let c = Credentials::parse("access_key_id = \"AK\"\nsecret_access_key = \"SK\"\n").unwrap();
        assert_eq!(c.region, None);
        assert!(!format!("{c:?}").contains("SK"));
        assert!(Credentials::parse("access_key_id = \"AK\"\n").is_err());
        assert!(Credentials::parse("access_key_id = \"\"\nsecret_access_key = \"S\"\n").is_err());
        assert!(
            Credentials::parse("access_key_id = \"A\"\nsecret_access_key = \"S\"\nx = 1\n")
                .is_err()
        );
    }
}
