//! [`S3Client`]: the S3 API over `rusty-s3` (SigV4 presigned requests) and
//! `ureq` (blocking HTTP/1.1 with rustls), path-style URLs so any endpoint
//! (Garage, Ceph RGW, MinIO, AWS S3) works without DNS per bucket.
//!
//! Chosen over `object_store` (aws feature) by measurement: 58 new crates
//! against 109 (it brings reqwest/hyper and is async only, where the replica
//! store is synchronous), see `kernel-notes/s3.md`.
//!
//! Every call is retried with exponential back-off (100 ms doubling, 6
//! attempts) on transport errors, 5xx and 429; each attempt signs afresh.
//! Connect timeout 5 s, whole-request timeout 120 s. Bodies are read with a
//! bound ([`MAX_OBJECT`]), so a hostile endpoint cannot exhaust memory.

use super::{
    Credentials, GetIf, GetResult, ObjectClient, ObjectError, ObjectMeta, PutMode, StoreUrl,
};
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, S3Action, UrlStyle};
use std::ops::Range;
use std::time::Duration;

/// The largest object body read into memory (objects the store writes are
/// far smaller: chunks and logs are bounded).
pub const MAX_OBJECT: u64 = 1 << 30;
const SIGN_FOR: Duration = Duration::from_secs(600);
const ATTEMPTS: u32 = 6;

/// An S3 bucket at an endpoint, with one access key.
pub struct S3Client {
    bucket: Bucket,
    creds: rusty_s3::Credentials,
    agent: ureq::Agent,
    endpoint: String,
    attempts: u32,
}

type Resp = ureq::http::Response<ureq::Body>;

enum Method<'a> {
    Get,
    Head,
    Delete,
    Put(&'a [u8]),
}

impl S3Client {
    /// A client of `url`'s bucket at `endpoint` (`http(s)://host[:port]`).
    /// The region is the credentials' (default `us-east-1`). Nothing is
    /// contacted yet.
    pub fn new(
        endpoint: &str,
        url: &StoreUrl,
        creds: &Credentials,
    ) -> Result<S3Client, ObjectError> {
        let parsed = url::Url::parse(endpoint).map_err(|e| ObjectError::Config {
            what: format!("bad --s3-endpoint {endpoint:?}: {e}"),
        })?;
        let region = creds.region.clone().unwrap_or_else(|| "us-east-1".into());
        let bucket =
            Bucket::new(parsed, UrlStyle::Path, url.bucket.clone(), region).map_err(|e| {
                ObjectError::Config {
                    what: format!("bad --s3-endpoint {endpoint:?} (http:// or https:// URL): {e}"),
                }
            })?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Ok(S3Client {
            bucket,
            creds: rusty_s3::Credentials::new(&creds.access_key_id, &creds.secret_access_key),
            agent,
            endpoint: endpoint.to_string(),
            attempts: ATTEMPTS,
        })
    }

    /// Limit the attempts per call (1 = no retry), e.g. for a quick check.
    pub fn with_attempts(mut self, attempts: u32) -> S3Client {
        self.attempts = attempts.max(1);
        self
    }

    /// Check the bucket exists and the key may read it (one listing).
    pub fn check(&self) -> Result<(), ObjectError> {
        let sign = || {
            let mut l = self.bucket.list_objects_v2(Some(&self.creds));
            l.with_max_keys(1);
            l.sign(SIGN_FOR)
        };
        let resp = self.send("list", "", &sign, Method::Get, &[])?;
        self.ok_or_error("list", "", resp).map(|_| ())
    }

    /// Send one request, retried on transport errors, 5xx and 429.
    /// `sign` makes the presigned URL of each attempt (signatures expire).
    fn send(
        &self,
        op: &'static str,
        key: &str,
        sign: &dyn Fn() -> url::Url,
        method: Method<'_>,
        headers: &[(&str, String)],
    ) -> Result<Resp, ObjectError> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let url = sign();
            let result = match &method {
                Method::Get => with_headers(self.agent.get(url.as_str()), headers).call(),
                Method::Head => with_headers(self.agent.head(url.as_str()), headers).call(),
                Method::Delete => with_headers(self.agent.delete(url.as_str()), headers).call(),
                Method::Put(body) => {
                    with_headers(self.agent.put(url.as_str()), headers).send(*body)
                }
            };
            let retry = match &result {
                Ok(r) => r.status().as_u16() >= 500 || r.status().as_u16() == 429,
                Err(_) => true,
            };
            if !retry || attempt >= self.attempts {
                return result.map_err(|e| ObjectError::Unreachable {
                    op,
                    key: key.to_string(),
                    endpoint: self.endpoint.clone(),
                    why: e.to_string(),
                });
            }
            tracing::debug!(op, key, attempt, "object store call failed; retrying");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
            attempt += 1;
        }
    }

    /// `resp` if it is a success, else the typed error of its status.
    fn ok_or_error(
        &self,
        op: &'static str,
        key: &str,
        mut resp: Resp,
    ) -> Result<Resp, ObjectError> {
        let status = resp.status().as_u16();
        if (200..300).contains(&status) || status == 304 {
            return Ok(resp);
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 << 10)
            .read_to_string()
            .unwrap_or_default();
        let code = xml_field(&body, "Code").unwrap_or_default();
        let message = xml_field(&body, "Message").unwrap_or_default();
        let key = key.to_string();
        Err(match (status, code.as_str()) {
            (_, "NoSuchBucket") => ObjectError::NoSuchBucket {
                bucket: self.bucket.name().to_string(),
                endpoint: self.endpoint.clone(),
            },
            (404, _) => ObjectError::NotFound { op, key },
            (412, _) => ObjectError::PreconditionFailed { op, key },
            (401 | 403, _) => ObjectError::Denied {
                op,
                key,
                code,
                message,
            },
            _ => ObjectError::Http {
                op,
                key,
                status,
                code,
                message,
            },
        })
    }

    fn read_body(
        &self,
        op: &'static str,
        key: &str,
        mut resp: Resp,
    ) -> Result<Vec<u8>, ObjectError> {
        resp.body_mut()
            .with_config()
            .limit(MAX_OBJECT)
            .read_to_vec()
            .map_err(|e| ObjectError::Unreachable {
                op,
                key: key.to_string(),
                endpoint: self.endpoint.clone(),
                why: format!("reading the body: {e}"),
            })
    }
}

fn with_headers<B>(
    mut r: ureq::RequestBuilder<B>,
    headers: &[(&str, String)],
) -> ureq::RequestBuilder<B> {
    for (k, v) in headers {
        r = r.header(*k, v.as_str());
    }
    r
}

/// The text of the first `<tag>…</tag>` of an S3 XML error body.
fn xml_field(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..start + len].to_string())
}

fn etag_of(resp: &Resp) -> String {
    resp.headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

impl ObjectClient for S3Client {
    fn put(&self, key: &str, body: &[u8], mode: PutMode) -> Result<String, ObjectError> {
        let sign = || {
            self.bucket
                .put_object(Some(&self.creds), key)
                .sign(SIGN_FOR)
        };
        let headers = match mode {
            PutMode::Overwrite => vec![],
            PutMode::Create => vec![("If-None-Match", "*".to_string())],
        };
        let resp = self.send("put", key, &sign, Method::Put(body), &headers)?;
        let resp = self.ok_or_error("put", key, resp)?;
        Ok(etag_of(&resp))
    }

    fn get(&self, key: &str, range: Option<Range<u64>>, cond: GetIf<'_>) -> GetResult {
        if range.as_ref().is_some_and(|r| r.start >= r.end) {
            return Ok(Some(Vec::new()));
        }
        let sign = || {
            self.bucket
                .get_object(Some(&self.creds), key)
                .sign(SIGN_FOR)
        };
        let mut headers = Vec::new();
        if let Some(r) = &range {
            headers.push(("Range", format!("bytes={}-{}", r.start, r.end - 1)));
        }
        match cond {
            GetIf::Always => {}
            GetIf::Match(e) => headers.push(("If-Match", e.to_string())),
            GetIf::NoneMatch(e) => headers.push(("If-None-Match", e.to_string())),
        }
        let resp = self.send("get", key, &sign, Method::Get, &headers)?;
        if resp.status().as_u16() == 416 {
            return Ok(Some(Vec::new())); // the range starts past the end
        }
        let resp = self.ok_or_error("get", key, resp)?;
        if resp.status().as_u16() == 304 {
            return Ok(None);
        }
        self.read_body("get", key, resp).map(Some)
    }

    fn head(&self, key: &str) -> Result<ObjectMeta, ObjectError> {
        let sign = || {
            self.bucket
                .head_object(Some(&self.creds), key)
                .sign(SIGN_FOR)
        };
        let resp = self.send("head", key, &sign, Method::Head, &[])?;
        let resp = self.ok_or_error("head", key, resp)?;
        let size = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ObjectError::BadResponse {
                op: "head",
                key: key.to_string(),
                why: "no Content-Length".into(),
            })?;
        Ok(ObjectMeta {
            key: key.to_string(),
            size,
            etag: etag_of(&resp),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ObjectError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let sign = || {
                let mut l = self.bucket.list_objects_v2(Some(&self.creds));
                l.with_prefix(prefix);
                if let Some(t) = &token {
                    l.with_continuation_token(t.clone());
                }
                l.sign(SIGN_FOR)
            };
            let resp = self.send("list", prefix, &sign, Method::Get, &[])?;
            let resp = self.ok_or_error("list", prefix, resp)?;
            let body = self.read_body("list", prefix, resp)?;
            let text = String::from_utf8_lossy(&body);
            let parsed =
                ListObjectsV2::parse_response(&text).map_err(|e| ObjectError::BadResponse {
                    op: "list",
                    key: prefix.to_string(),
                    why: format!("unreadable listing: {e}"),
                })?;
            out.extend(parsed.contents.into_iter().map(|c| ObjectMeta {
                key: c.key,
                size: c.size,
                etag: c.etag,
            }));
            match parsed.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let sign = || {
            self.bucket
                .delete_object(Some(&self.creds), key)
                .sign(SIGN_FOR)
        };
        let resp = self.send("delete", key, &sign, Method::Delete, &[])?;
        match self.ok_or_error("delete", key, resp) {
            Ok(_) => Ok(()),
            Err(ObjectError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::xml_field;

    #[test]
    fn error_fields() {
        let b = "<?xml version=\"1.0\"?><Error><Code>NoSuchKey</Code><Message>Key not found</Message></Error>";
        assert_eq!(xml_field(b, "Code").as_deref(), Some("NoSuchKey"));
        assert_eq!(xml_field(b, "Message").as_deref(), Some("Key not found"));
        assert_eq!(xml_field(b, "Resource"), None);
        assert_eq!(xml_field("<Code>x", "Code"), None);
    }
}
