//! Unit tests of [`super::definition`] on a real definition: `testdata/
//! web1-inactive.xml` is `virsh dumpxml --inactive` (libvirt 11.3) of the
//! two-disk TCG domain tests/libvirt_e2e.rs defines (a qcow2 and a raw disk,
//! a NIC on a network, a serial log, the guest agent channel).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::definition::*;
use super::LibvirtErrorKind;

const WEB1: &str = include_str!("testdata/web1-inactive.xml");

fn moves() -> HashMap<PathBuf, DiskMove> {
    HashMap::from([
        (
            PathBuf::from("/tmp/lvx/os.qcow2"),
            DiskMove {
                file: "/srv/view/os.qcow2".into(),
                format: DiskFormat::Qcow2,
            },
        ),
        (
            PathBuf::from("/tmp/lvx/data.img"),
            DiskMove {
                file: "/srv/view/data.vhd".into(),
                format: DiskFormat::Vpc,
            },
        ),
    ])
}

#[test]
fn reads_disks_nics_and_the_agent_channel() {
    let d = Definition::parse(WEB1).unwrap();
    assert_eq!(d.name, "lvx-web1");
    assert_eq!(
        d.uuid.as_deref(),
        Some("15575d0a-787d-4572-910c-51c5ac3d8198")
    );
    let disks: Vec<_> = d
        .replicated_disks()
        .map(|x| (x.target.as_str(), x.file.clone(), x.format.as_deref()))
        .collect();
    assert_eq!(
        disks,
        vec![
            (
                "vda",
                Some(PathBuf::from("/tmp/lvx/os.qcow2")),
                Some("qcow2")
            ),
            ("vdb", Some(PathBuf::from("/tmp/lvx/data.img")), Some("raw")),
        ]
    );
    assert_eq!(d.nics.len(), 1);
    assert_eq!(d.nics[0].kind, "network");
    assert_eq!(d.nics[0].source.as_deref(), Some("lvx-prod"));
    assert_eq!(d.nics[0].mac.as_deref(), Some("52:54:00:d6:b8:9f"));
    assert!(d.agent_channel);
    assert!(d.vdrep_metadata.is_empty());
}

#[test]
fn no_agent_channel_and_disks_not_replicated() {
    let xml = r#"<domain type='qemu'><name>x</name><devices>
        <disk type='block' device='disk'><driver name='qemu' type='raw'/>
          <source dev='/dev/vg0/x'/><target dev='vda' bus='virtio'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/d.iso'/><target dev='sda'/><readonly/></disk>
        <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/><target dev='vdb'/></disk>
        <channel type='unix'><target type='virtio' name='org.qemu.spice.0'/></channel>
        </devices></domain>"#;
    let d = Definition::parse(xml).unwrap();
    assert!(!d.agent_channel);
    assert_eq!(d.disks.len(), 3);
    assert_eq!(d.replicated_disks().count(), 0);
    assert_eq!(d.disks[0].source, "/dev/vg0/x");
    assert_eq!(d.disks[2].source, "rbd pool/img");
    assert!(d.disks[1].readonly);
}

#[test]
fn a_test_copy_gets_a_new_identity_the_isolated_network_and_the_view() {
    let orig = Definition::parse(WEB1).unwrap();
    let rw = Rewrite {
        name: Some("lvx-web1-test".into()),
        new_identity: true,
        disks: moves(),
        nics: NicPlan::All(NetTarget::Network("vdrep-isolated".into())),
        console_log: Some("/srv/scratch/console.log".into()),
        metadata: vec![("vm".into(), "web1".into()), ("cycle".into(), "7".into())],
    };
    let xml = rw.apply(&orig).unwrap();
    let d = Definition::parse(&xml).unwrap();
    assert_eq!(d.name, "lvx-web1-test");
    let uuid = d.uuid.clone().unwrap();
    assert_ne!(Some(uuid.clone()), orig.uuid);
    assert_eq!(uuid.len(), 36);
    assert_eq!(uuid.as_bytes()[14], b'4', "a version-4 UUID: {uuid}");
    let mac = d.nics[0].mac.clone().unwrap();
    assert!(
        mac.starts_with("52:54:00:") && mac != "52:54:00:d6:b8:9f",
        "{mac}"
    );
    assert_eq!(d.nics[0].kind, "network");
    assert_eq!(d.nics[0].source.as_deref(), Some("vdrep-isolated"));
    let disks: Vec<_> = d
        .replicated_disks()
        .map(|x| (x.file.clone().unwrap(), x.format.clone().unwrap()))
        .collect();
    assert_eq!(
        disks,
        vec![
            (PathBuf::from("/srv/view/os.qcow2"), "qcow2".to_string()),
            (PathBuf::from("/srv/view/data.vhd"), "vpc".to_string()),
        ]
    );
    assert!(d.agent_channel);
    assert_eq!(d.vdrep_metadata("vm").as_deref(), Some("web1"));
    assert_eq!(d.vdrep_metadata("cycle").as_deref(), Some("7"));
    // Serial and console both log to the copy's file; the rest is kept.
    assert_eq!(xml.matches("/srv/scratch/console.log").count(), 2);
    assert!(!xml.contains("/tmp/lvx/console.log"));
    assert!(xml.contains("<cmdline>console=ttyS0 panic=-1 vdrep.mode=write vdrep.tag=p1</cmdline>"));
    assert!(xml.contains("<model fallback='forbid'>qemu64</model>"));
    // Applying twice gives two different identities.
    let again = Definition::parse(&rw.apply(&orig).unwrap()).unwrap();
    assert_ne!(again.uuid, d.uuid);
}

#[test]
fn an_unplanned_copy_keeps_its_identity_and_maps_networks() {
    let orig = Definition::parse(WEB1).unwrap();
    let live = |p: &str| DiskMove {
        file: Path::new("/srv/live").join(p),
        format: if p.ends_with("qcow2") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        },
    };
    let rw = Rewrite {
        name: None,
        new_identity: false,
        disks: HashMap::from([
            ("/tmp/lvx/os.qcow2".into(), live("os.qcow2")),
            ("/tmp/lvx/data.img".into(), live("data.img")),
        ]),
        nics: NicPlan::Map(HashMap::from([(
            "lvx-prod".to_string(),
            NetTarget::Bridge("br-dr".into()),
        )])),
        console_log: None,
        metadata: vec![],
    };
    let xml = rw.apply(&orig).unwrap();
    let d = Definition::parse(&xml).unwrap();
    assert_eq!(d.name, orig.name);
    assert_eq!(d.uuid, orig.uuid);
    assert_eq!(d.nics[0].mac, orig.nics[0].mac);
    assert_eq!(d.nics[0].kind, "bridge");
    assert_eq!(d.nics[0].source.as_deref(), Some("br-dr"));
    let formats: Vec<_> = d
        .replicated_disks()
        .map(|x| x.format.clone().unwrap())
        .collect();
    assert_eq!(formats, ["qcow2", "raw"]);
    assert!(xml.contains("/tmp/lvx/console.log"));
    assert!(!xml.contains("<metadata>"));
    // A NIC not in the map stays where it was.
    let rw2 = Rewrite {
        nics: NicPlan::Map(HashMap::new()),
        ..rw
    };
    let d2 = Definition::parse(&rw2.apply(&orig).unwrap()).unwrap();
    assert_eq!(d2.nics, orig.nics);
}

#[test]
fn a_disk_without_driver_gets_one_and_a_missing_replica_is_refused() {
    let xml = "<domain><name>x</name><devices><disk type='file' device='disk'>\
               <source file='/a/d.img'/><target dev='vda'/></disk></devices></domain>";
    let orig = Definition::parse(xml).unwrap();
    assert_eq!(orig.disks[0].format, None);
    let mut rw = Rewrite {
        name: None,
        new_identity: false,
        disks: HashMap::new(),
        nics: NicPlan::Map(HashMap::new()),
        console_log: None,
        metadata: vec![],
    };
    let e = rw.apply(&orig).unwrap_err();
    assert_eq!(e.kind(), LibvirtErrorKind::Refused);
    assert!(e.to_string().contains("/a/d.img"), "{e}");
    rw.disks.insert(
        "/a/d.img".into(),
        DiskMove {
            file: "/v/d.vhd".into(),
            format: DiskFormat::Vpc,
        },
    );
    let d = Definition::parse(&rw.apply(&orig).unwrap()).unwrap();
    assert_eq!(d.disks[0].format.as_deref(), Some("vpc"));
    assert_eq!(d.disks[0].file.as_deref(), Some(Path::new("/v/d.vhd")));
}

#[test]
fn not_xml_is_an_invalid_definition() {
    for bad in ["<domain><name>x</domain>", "<domain></domain>", ""] {
        let e = Definition::parse(bad).unwrap_err();
        assert_eq!(e.kind(), LibvirtErrorKind::Invalid, "{bad:?}: {e}");
    }
    assert!(has_element("<network><forward mode='nat'/></network>", "forward").unwrap());
    assert!(!has_element("<network><bridge/></network>", "forward").unwrap());
}
