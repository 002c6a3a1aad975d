//! Unit tests of the configuration's parsing and checks.

use super::*;

fn check(text: &str) -> Result<Config, ConfigError> {
    parse(
        Path::new("/etc/vdrep/vdrep.toml"),
        text,
        Checks::ContentOnly,
    )
}

fn problems(text: &str) -> Vec<Problem> {
    match check(text) {
        Ok(c) => panic!("accepted: {c:?}"),
        Err(e) => {
            assert_eq!(e.kind(), ConfigErrorKind::Invalid);
            e.problems().to_vec()
        }
    }
}

const GOOD: &str = r#"
[site]
name = "prod"
keys = "/etc/vdrep/keys"
trust = ["/etc/vdrep/peers/dr.crt"]

[[mount]]
path = "/srv/vdrep-test-vms"

[receiver]
listen = "0.0.0.0:7700"
store = "/srv/replicas"
keep_for = "forever"
prune_every = "1min"
verify_boot = "daily"
verify_boot_wait_for = "true"

[[vm]]
name = "web"
disks = ["/srv/vdrep-test-vms/web/a.raw", "/srv/vdrep-test-vms/web/../web/b.raw"]
to = "dr.example.com:7700"
every = "2h 30m"
max_rate = "100Mbit/s"
link_max_rate = "1Gbit/s"
rpo_alert = "15min"

[[vm]]
name = "db"
disks = ["/srv/vdrep-test-vms/db.raw"]
to = "10.0.0.2:7700"
every = "continuous"
max_rate = "10MB/s"
app_hook = "/usr/bin/hook"
app_every = "1h"
"#;

#[test]
fn a_good_file_is_typed() {
    let c = check(GOOD).unwrap();
    assert_eq!(c.site.name.as_deref(), Some("prod"));
    assert_eq!(c.vms.len(), 2);
    let web = &c.vms[0];
    assert_eq!(web.every, Some(Every::Interval(Duration::from_secs(9000))));
    assert_eq!(web.max_rate, Some(12_500_000));
    assert_eq!(web.link_max_rate, Some(125_000_000));
    assert_eq!(web.disks_rel, vec!["web/a.raw", "web/b.raw"]);
    assert_eq!(web.trust, vec![PathBuf::from("/etc/vdrep/peers/dr.crt")]);
    assert_eq!(web.rpo_alert, Some(Duration::from_secs(900)));
    let db = &c.vms[1];
    assert_eq!(db.every.map(Every::secs), Some(0));
    assert_eq!(db.max_rate, Some(10_000_000));
    let r = c.receiver.clone().unwrap();
    assert_eq!(r.keep_for, Some(None));
    assert_eq!(r.prune_every, Some(Some(Duration::from_secs(60))));
    assert_eq!(r.verify_boot.map(|b| b.every.as_secs()), Some(86_400));
    assert_eq!(r.verify_boot_wait_for.as_deref(), Some("true"));
    assert_eq!(r.verify_boot_timeout, None);
    assert_eq!(c.vms_under(Path::new("/srv/vdrep-test-vms")).len(), 2);
}

#[test]
fn unknown_key_names_line_and_key() {
    let text = GOOD.replace("rpo_alert = \"15min\"", "rpo_alrt = \"15min\"");
    let p = problems(&text);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].kind, ProblemKind::Schema);
    assert_eq!(p[0].key, "rpo_alrt");
    let line = text
        .lines()
        .position(|l| l.starts_with("rpo_alrt"))
        .unwrap()
        + 1;
    assert_eq!(p[0].line, line);
    let s = p[0].to_string();
    assert!(
        s.starts_with(&format!("/etc/vdrep/vdrep.toml:{line}: rpo_alrt: ")),
        "{s}"
    );
    assert!(s.contains("rpo_alert"), "says what is allowed: {s}");
}

#[test]
fn bad_values_are_each_reported_with_their_key() {
    let text = GOOD
        .replace("every = \"2h 30m\"", "every = \"2 fortnights\"")
        .replace("max_rate = \"10MB/s\"", "max_rate = \"fast\"")
        .replace("to = \"10.0.0.2:7700\"", "to = \"10.0.0.2\"")
        .replace("/srv/vdrep-test-vms/db.raw", "/elsewhere/db.raw")
        .replace("verify_boot = \"daily\"", "verify_boot = \"nightly\"");
    let p = problems(&text);
    assert!(p.iter().any(|p| p.key == "receiver.verify_boot"), "{p:?}");
    let kinds: Vec<(ProblemKind, &str)> = p.iter().map(|p| (p.kind, p.key.as_str())).collect();
    assert!(
        kinds.contains(&(ProblemKind::BadDuration, "vm[web].every")),
        "{p:?}"
    );
    assert!(
        kinds.contains(&(ProblemKind::BadRate, "vm[db].max_rate")),
        "{p:?}"
    );
    assert!(
        kinds.contains(&(ProblemKind::BadAddress, "vm[db].to")),
        "{p:?}"
    );
    assert!(
        kinds.contains(&(ProblemKind::DiskOutsideMount, "vm[db].disks")),
        "{p:?}"
    );
    for x in &p {
        let l = text.lines().nth(x.line - 1).unwrap();
        let field = x.key.rsplit('.').next().unwrap();
        assert!(l.starts_with(field), "line {} of {x} is {l:?}", x.line);
    }
}

#[test]
fn duplicate_vm_names_are_refused() {
    let text = GOOD.replace("name = \"db\"", "name = \"web\"");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].kind, ProblemKind::Duplicate);
    assert_eq!(p[0].key, "vm[web].name");
    assert_eq!(text.lines().nth(p[0].line - 1).unwrap(), "name = \"web\"",);
    let second = text.rfind("name = \"web\"").unwrap();
    assert_eq!(p[0].line, text[..second].lines().count() + 1);
}

#[test]
fn unreadable_key_files_are_refused_when_files_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[site]\nkeys = \"{0}/nokeys\"\ntrust = [\"{0}/missing.crt\"]\n",
        dir.path().display()
    );
    let path = dir.path().join("v.toml");
    assert!(parse(&path, &text, Checks::ContentOnly).is_ok());
    let e = parse(&path, &text, Checks::Files).unwrap_err();
    let p = e.problems();
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p.iter().all(|p| p.kind == ProblemKind::Unreadable));
    assert_eq!((p[0].line, p[0].key.as_str()), (2, "site.keys"));
    assert_eq!((p[1].line, p[1].key.as_str()), (3, "site.trust"));
}

#[test]
fn durations_and_rates() {
    assert_eq!(parse_duration("15min"), Ok(Duration::from_secs(900)));
    assert_eq!(
        parse_duration("soon").unwrap_err().kind(),
        ProblemKind::BadDuration
    );
    assert_eq!(parse_rate("fast").unwrap_err().kind(), ProblemKind::BadRate);
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("soon").is_err());
    assert_eq!(parse_every("continuous"), Ok(Every::Continuous));
    assert_eq!(parse_rate("50MiB/s"), Ok(50 << 20));
    assert_eq!(parse_rate("800KB"), Ok(800_000));
    assert_eq!(parse_rate("8bit/s"), Ok(1));
    assert_eq!(parse_rate("12345"), Ok(12345));
    assert!(parse_rate("0").is_err());
    assert!(parse_rate("-5MB/s").is_err());
}

#[test]
fn syntax_errors_have_a_line() {
    let p = problems("[site]\nname = \"a\"\nkeys = \n");
    assert_eq!(p[0].kind, ProblemKind::Schema);
    assert_eq!(p[0].line, 3);
}

#[test]
fn the_example_file_is_accepted() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("doc/vdrep.example.toml");
    let c = load(&path, Checks::ContentOnly).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.vms.len(), 2);
    assert!(c.receiver.is_some());
}

#[test]
fn a_vm_needs_a_certificate_to_trust() {
    let text = GOOD.replace("trust = [\"/etc/vdrep/peers/dr.crt\"]\n", "");
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p
        .iter()
        .all(|p| p.key.ends_with(".trust") && p.kind == ProblemKind::BadValue));
}

#[test]
fn log_format_is_text_or_json() {
    let with = |v: &str| {
        GOOD.replace(
            "name = \"prod\"",
            &format!("name = \"prod\"\nlog_format = {v}"),
        )
    };
    let c = check(&with("\"json\"")).unwrap();
    assert_eq!(c.site.log_format, Some(crate::service::LogFormat::Json));
    assert_eq!(check(GOOD).unwrap().site.log_format, None);
    let p = problems(&with("\"xml\""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].kind, p[0].key.as_str()),
        (ProblemKind::BadValue, "site.log_format")
    );
    assert_eq!(p[0].line, 4, "{p:?}");
    assert!(p[0].msg.contains("`text` or `json`"), "{}", p[0].msg);
}

#[test]
fn metrics_and_notify_keys() {
    let text = GOOD
        .replace(
            "trust = [\"/etc/vdrep/peers/dr.crt\"]\n",
            "trust = [\"/etc/vdrep/peers/dr.crt\"]\nnotify_command = \"/usr/share/vdrep/notify-webhook.sh https://hooks.example/x\"\nnotify_timeout = \"5s\"\n",
        )
        .replace(
            "path = \"/srv/vdrep-test-vms\"\n",
            "path = \"/srv/vdrep-test-vms\"\nmetrics_listen = \"127.0.0.1:9477\"\n",
        )
        .replace(
            "prune_every = \"1min\"\n",
            "prune_every = \"1min\"\nmetrics_listen = \"[::1]:9478\"\n",
        );
    let c = check(&text).unwrap();
    assert_eq!(
        c.site.notify_command.as_deref(),
        Some("/usr/share/vdrep/notify-webhook.sh https://hooks.example/x")
    );
    assert_eq!(c.site.notify_timeout, Some(Duration::from_secs(5)));
    assert_eq!(
        c.mounts[0].metrics_listen,
        Some("127.0.0.1:9477".parse().unwrap())
    );
    assert_eq!(
        c.receiver.unwrap().metrics_listen,
        Some("[::1]:9478".parse().unwrap())
    );
    let bad = text.replace("127.0.0.1:9477", "localhost");
    let p = problems(&bad);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].kind, ProblemKind::BadAddress);
    assert_eq!(p[0].key, "mount.metrics_listen");
    let bad = text.replace("notify_timeout = \"5s\"", "notify_timeout = \"soon\"");
    let p = problems(&bad);
    assert_eq!(
        (p[0].kind, p[0].key.as_str()),
        (ProblemKind::BadDuration, "site.notify_timeout")
    );
}

#[test]
fn a_vm_names_its_disks_or_its_libvirt_domain_not_both() {
    // A domain alone: its disks come from libvirt (not read in a
    // content-only check), so no "name at least one disk".
    let only_domain = GOOD.replace(
        r#"disks = ["/srv/vdrep-test-vms/db.raw"]"#,
        r#"domain = "db""#,
    );
    if let Err(e) = check(&only_domain) {
        panic!("a VM with only a domain: {:?}", e.problems());
    }
    let both = GOOD.replace(
        r#"disks = ["/srv/vdrep-test-vms/db.raw"]"#,
        "disks = [\"/srv/vdrep-test-vms/db.raw\"]\ndomain = \"db\"",
    );
    let p = problems(&both);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "vm[db].domain");
    assert_eq!(p[0].kind, ProblemKind::BadValue);
    assert!(p[0].msg.contains("not both"), "{p:?}");
}

#[test]
fn max_rate_may_be_a_schedule() {
    let text = GOOD.replace(
        "max_rate = \"10MB/s\"",
        "max_rate = [\n  { when = \"mon..fri 08:00-18:00\", rate = \"10MB/s\" },\n  { rate = \"100MB/s\" },\n]",
    );
    let c = check(&text).unwrap();
    let db = &c.vms[1];
    assert_eq!(db.max_rate, None);
    let s = db.rate_schedule();
    assert!(s.is_timed());
    // 2026-03-02 is a Monday.
    let mon = |h| jiff::civil::date(2026, 3, 2).at(h, 0, 0, 0);
    assert_eq!(s.rate_at(mon(9)), 10_000_000);
    assert_eq!(s.rate_at(mon(19)), 100_000_000);
    // A constant rate is a one-rule schedule.
    assert_eq!(c.vms[0].rate_schedule().rate_at(mon(9)), 12_500_000);
    assert!(!c.vms[0].rate_schedule().is_timed());
}

#[test]
fn bad_rate_schedules_name_the_rule_and_key() {
    let bad = |sched: &str| -> Vec<(ProblemKind, String, usize)> {
        let text = GOOD.replace("max_rate = \"10MB/s\"", &format!("max_rate = {sched}"));
        let line = text
            .lines()
            .position(|l| l.starts_with("max_rate = ["))
            .map(|l| l + 1);
        problems(&text)
            .into_iter()
            .map(|p| {
                assert_eq!(Some(p.line), line, "{p}");
                (p.kind, p.key, p.line)
            })
            .collect()
    };
    let keys = |v: Vec<(ProblemKind, String, usize)>| -> Vec<(ProblemKind, String)> {
        v.into_iter().map(|(k, key, _)| (k, key)).collect()
    };
    assert_eq!(
        keys(bad(
            "[{ when = \"mon..fry 08:00-18:00\", rate = \"10MB/s\" }]"
        )),
        vec![(ProblemKind::BadValue, "vm[db].max_rate[0].when".to_string())]
    );
    assert_eq!(
        keys(bad(
            "[{ when = \"08:00-18:00\", rate = \"fast\" }, { rate = \"1MB/s\" }]"
        )),
        vec![(ProblemKind::BadRate, "vm[db].max_rate[0].rate".to_string())]
    );
    assert_eq!(
        keys(bad(
            "[{ rate = \"1MB/s\" }, { when = \"sat\", rate = \"2MB/s\" }]"
        )),
        vec![(ProblemKind::BadValue, "vm[db].max_rate[1]".to_string())]
    );
    assert_eq!(
        keys(bad("[{ at = \"sat\", rate = \"2MB/s\" }]")),
        vec![(ProblemKind::Schema, "vm[db].max_rate[0].at".to_string())]
    );
    assert_eq!(
        keys(bad("[{ when = \"sat\" }]")),
        vec![(ProblemKind::Schema, "vm[db].max_rate[0].rate".to_string())]
    );
    assert_eq!(
        keys(bad("[]")),
        vec![(ProblemKind::Schema, "vm[db].max_rate".to_string())]
    );
}

#[test]
fn retry_schedule_keys_are_typed_and_checked() {
    let text = GOOD.replace(
        "app_every = \"1h\"",
        "app_every = \"1h\"\nretry_fast = \"500ms, 3s\"\nretry_fast_max_every = \"15min\"\nretry_schedule = \"30s,2m\"",
    );
    let c = check(&text).unwrap();
    let db = &c.vms[1];
    assert_eq!(
        db.retry_fast,
        Some(vec![Duration::from_millis(500), Duration::from_secs(3)])
    );
    assert_eq!(
        db.retry_fast_max_every,
        Some(Every::Interval(Duration::from_secs(900)))
    );
    assert_eq!(
        db.retry_schedule,
        Some(vec![Duration::from_secs(30), Duration::from_secs(120)])
    );
    // Not set: the defaults apply later (the sender's RetrySchedule).
    assert_eq!(c.vms[0].retry_fast, None);
    let none = GOOD.replace(
        "app_every = \"1h\"",
        "app_every = \"1h\"\nretry_fast = \"none\"",
    );
    assert_eq!(check(&none).unwrap().vms[1].retry_fast, Some(vec![]));

    let bad = GOOD.replace(
        "app_every = \"1h\"",
        "app_every = \"1h\"\nretry_fast = \"1s, soon\"\nretry_schedule = \"none\"",
    );
    let p = problems(&bad);
    let kinds: Vec<(ProblemKind, &str)> = p.iter().map(|p| (p.kind, p.key.as_str())).collect();
    assert!(
        kinds.contains(&(ProblemKind::BadDuration, "vm[db].retry_fast")),
        "{p:?}"
    );
    assert!(
        kinds.contains(&(ProblemKind::BadDuration, "vm[db].retry_schedule")),
        "{p:?}"
    );
}

#[test]
fn receiver_on_an_object_store() {
    let store_line = GOOD
        .lines()
        .find(|l| l.starts_with("store = "))
        .unwrap()
        .to_string();
    let text = GOOD.replace(
        &format!("{store_line}\n"),
        "store = \"s3://dr-bucket/vdrep\"\ns3_endpoint = \"http://127.0.0.1:3900\"\ns3_credentials = \"/etc/vdrep/s3.toml\"\nencryption_key = \"/etc/vdrep/enc.key\"\ncache = \"/var/cache/vdrep/dr\"\n",
    );
    let r = check(&text).unwrap().receiver.unwrap();
    assert_eq!(r.store, std::path::PathBuf::from("s3://dr-bucket/vdrep"));
    assert_eq!(r.s3_endpoint.as_deref(), Some("http://127.0.0.1:3900"));
    assert_eq!(
        r.encryption_key.as_deref(),
        Some(std::path::Path::new("/etc/vdrep/enc.key"))
    );
    // Without the endpoint: one problem on receiver.store.
    let bad = text.replace("s3_endpoint = \"http://127.0.0.1:3900\"\n", "");
    let p = problems(&bad);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "receiver.store");
    assert!(p[0].msg.contains("s3_endpoint"), "{}", p[0].msg);
}

#[test]
fn mount_watchdog_is_a_duration_or_off() {
    let with = |v: &str| {
        GOOD.replace(
            "path = \"/srv/vdrep-test-vms\"\n",
            &format!("path = \"/srv/vdrep-test-vms\"\nwatchdog = \"{v}\"\n"),
        )
    };
    assert_eq!(check(GOOD).unwrap().mounts[0].watchdog, None);
    assert_eq!(
        check(&with("45s")).unwrap().mounts[0].watchdog,
        Some(Some(Duration::from_secs(45)))
    );
    assert_eq!(check(&with("off")).unwrap().mounts[0].watchdog, Some(None));
    for bad in ["soon", "0s"] {
        let p = problems(&with(bad));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].kind, p[0].key.as_str()),
            (ProblemKind::BadDuration, "mount.watchdog"),
            "{bad}"
        );
        assert!(p[0].msg.contains("`off`"), "{:?}", p[0].msg);
    }
}

/// `activity_hot`: a size per disk, in 4 MiB extents rounded up; `0`
/// allowed; not a size or above 1 TiB is a problem naming the key.
#[test]
fn mount_activity_hot_is_a_size() {
    let with = |v: &str| {
        GOOD.replace(
            "path = \"/srv/vdrep-test-vms\"\n",
            &format!("path = \"/srv/vdrep-test-vms\"\nactivity_hot = \"{v}\"\n"),
        )
    };
    assert_eq!(check(GOOD).unwrap().mounts[0].activity_hot, None);
    for (v, extents) in [("1GiB", 256), ("0", 0), ("5MiB", 2), ("1TiB", 262_144)] {
        assert_eq!(
            check(&with(v)).unwrap().mounts[0].activity_hot,
            Some(extents),
            "{v}"
        );
    }
    for bad in ["lots", "2TiB"] {
        let p = problems(&with(bad));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].kind, p[0].key.as_str()),
            (ProblemKind::BadValue, "mount.activity_hot"),
            "{bad}"
        );
        assert!(p[0].msg.contains("1GiB"), "{:?}", p[0].msg);
    }
}

/// `keep_writes`: a size for the whole mount; `0` (off) allowed; not a
/// size or above 64 GiB is a problem naming the key.
#[test]
fn mount_keep_writes_is_a_size() {
    let with = |v: &str| {
        GOOD.replace(
            "path = \"/srv/vdrep-test-vms\"\n",
            &format!("path = \"/srv/vdrep-test-vms\"\nkeep_writes = \"{v}\"\n"),
        )
    };
    assert_eq!(check(GOOD).unwrap().mounts[0].keep_writes, None);
    for (v, bytes) in [("256MiB", 256u64 << 20), ("0", 0), ("1GiB", 1 << 30)] {
        assert_eq!(
            check(&with(v)).unwrap().mounts[0].keep_writes,
            Some(bytes),
            "{v}"
        );
    }
    for bad in ["plenty", "65GiB"] {
        let p = problems(&with(bad));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].kind, p[0].key.as_str()),
            (ProblemKind::BadValue, "mount.keep_writes"),
            "{bad}"
        );
        assert!(p[0].msg.contains("256MiB"), "{:?}", p[0].msg);
    }
}

#[test]
fn mount_fuse_transport_is_dev_or_uring() {
    use crate::fuse::FuseTransport;
    let with = |v: &str| {
        GOOD.replace(
            "path = \"/srv/vdrep-test-vms\"\n",
            &format!("path = \"/srv/vdrep-test-vms\"\nfuse_transport = \"{v}\"\n"),
        )
    };
    assert_eq!(check(GOOD).unwrap().mounts[0].fuse_transport, None);
    assert_eq!(
        check(&with("uring")).unwrap().mounts[0].fuse_transport,
        Some(FuseTransport::Uring)
    );
    assert_eq!(
        check(&with("dev")).unwrap().mounts[0].fuse_transport,
        Some(FuseTransport::Dev)
    );
    let p = problems(&with("io_uring"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].kind, p[0].key.as_str()),
        (ProblemKind::BadValue, "mount.fuse_transport")
    );
    assert!(p[0].msg.contains("\"uring\""), "{:?}", p[0].msg);
}

#[test]
fn receiver_store_sync_is_auto_fs_or_file() {
    use crate::util::durable::SyncMode;
    let with = |v: &str| {
        GOOD.replace(
            "store = \"/srv/replicas\"\n",
            &format!("store = \"/srv/replicas\"\nstore_sync = \"{v}\"\n"),
        )
    };
    let sync = |t: &str| check(t).unwrap().receiver.unwrap().store_sync;
    assert_eq!(sync(GOOD), None);
    assert_eq!(sync(&with("auto")), Some(SyncMode::Auto));
    assert_eq!(sync(&with("fs")), Some(SyncMode::Fs));
    assert_eq!(sync(&with("file")), Some(SyncMode::File));
    let p = problems(&with("syncfs"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].kind, p[0].key.as_str()),
        (ProblemKind::BadValue, "receiver.store_sync")
    );
    assert!(p[0].msg.contains("\"file\""), "{:?}", p[0].msg);
}

/// `[[vm]] to = "s3://…"`: direct protection to an object store, with its
/// endpoint, credentials and key; no trust needed. Missing keys, a bad
/// URL and object-store keys on a receiver address are problems.
#[test]
fn vm_protected_directly_to_an_object_store() {
    let s3 = "to = \"s3://dr-bucket/web\"\ns3_endpoint = \"http://127.0.0.1:3900\"\ns3_credentials = \"/etc/vdrep/s3.toml\"\nencryption_key = \"/etc/vdrep/enc.key\"\n";
    let text = GOOD
        .replace("trust = [\"/etc/vdrep/peers/dr.crt\"]\n", "")
        .replace("to = \"dr.example.com:7700\"\n", s3)
        .replace(
            "to = \"10.0.0.2:7700\"\n",
            "to = \"10.0.0.2:7700\"\ntrust = [\"/etc/vdrep/peers/dr.crt\"]\n",
        );
    let c = check(&text).unwrap();
    let web = &c.vms[0];
    assert_eq!(web.to, "s3://dr-bucket/web");
    assert!(web.trust.is_empty());
    let t = web.s3.as_ref().unwrap();
    assert_eq!(t.endpoint, "http://127.0.0.1:3900");
    assert_eq!(t.credentials, Some(PathBuf::from("/etc/vdrep/s3.toml")));
    assert_eq!(t.encryption_key, PathBuf::from("/etc/vdrep/enc.key"));
    assert!(c.vms[1].s3.is_none());
    // No key: one problem on vm[web].to.
    let p = problems(&text.replace("encryption_key = \"/etc/vdrep/enc.key\"\n", ""));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "vm[web].to");
    assert_eq!(p[0].kind, ProblemKind::BadValue);
    // A bad bucket name.
    let p = problems(&text.replace("s3://dr-bucket/web", "s3://X/web"));
    assert!(
        p.iter()
            .any(|p| p.key == "vm[web].to" && p.kind == ProblemKind::BadValue),
        "{p:?}"
    );
    // Object-store keys with a receiver address.
    let p = problems(&text.replace(
        "to = \"10.0.0.2:7700\"\n",
        "to = \"10.0.0.2:7700\"\ns3_endpoint = \"http://x:1\"\n",
    ));
    assert!(
        p.iter()
            .any(|p| p.key == "vm[db].to" && p.kind == ProblemKind::BadValue),
        "{p:?}"
    );
}

#[test]
fn a_group_is_one_name_under_one_mount() {
    let grouped = GOOD
        .replace("name = \"web\"\n", "name = \"web\"\ngroup = \"shop\"\n")
        .replace("name = \"db\"\n", "name = \"db\"\ngroup = \"shop\"\n")
        .replace("to = \"10.0.0.2:7700\"", "to = \"dr.example.com:7700\"");
    let c = check(&grouped).unwrap();
    assert!(c.vms.iter().all(|v| v.group.as_deref() == Some("shop")));
    // Not a plain name.
    let p = problems(&grouped.replacen("group = \"shop\"", "group = \"a/b\"", 1));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "vm[web].group");
    // The second VM under another mount.
    let text = grouped
        .replace(
            "[[mount]]\npath = \"/srv/vdrep-test-vms\"\n",
            "[[mount]]\npath = \"/srv/vdrep-test-vms\"\n\n[[mount]]\npath = \"/srv/other\"\n",
        )
        .replace("\"/srv/vdrep-test-vms/db.raw\"", "\"/srv/other/db.raw\"");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "vm[db].group");
    assert!(p[0].msg.contains("one [[mount]]"), "{}", p[0].msg);
    // To another receiver.
    let p =
        problems(&grouped.replacen("to = \"dr.example.com:7700\"", "to = \"10.0.0.3:7700\"", 1));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].msg.contains("one receiver"), "{}", p[0].msg);
}
