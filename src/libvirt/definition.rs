//! A libvirt domain definition (the XML of `virsh dumpxml`): what vdrep
//! reads from it (name, UUID, disks with their format, NICs, the guest
//! agent channel) and the rewrite that turns it into the definition of a
//! failed-over copy (new name, UUID and MACs, NICs remapped, disks pointed
//! at the exposed or live files).
//!
//! The rewrite streams the document's events through unchanged except for
//! the elements and attributes it names, so everything vdrep does not know
//! about (CPU model, controllers, the kernel command line, ...) is kept as
//! it was.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use super::LibvirtError;

/// The virtio-serial port name of the QEMU guest agent.
pub const AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";
/// The namespace of the metadata vdrep puts in the domains it defines.
pub const METADATA_NS: &str = "urn:vdrep:failover:1";

/// A disk image format, as libvirt's `<driver type=...>` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow2,
    /// VHD (QEMU's `vpc` driver).
    Vpc,
    Vhdx,
}

impl DiskFormat {
    /// The format a `<driver type=...>` value names (`None`: one vdrep does
    /// not replicate).
    pub fn parse(s: &str) -> Option<DiskFormat> {
        match s {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            "vpc" => Some(DiskFormat::Vpc),
            "vhdx" => Some(DiskFormat::Vhdx),
            _ => None,
        }
    }
    /// libvirt's name of it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vpc => "vpc",
            DiskFormat::Vhdx => "vhdx",
        }
    }
}

/// One `<disk>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Disk {
    /// `file`, `block`, `network`, `volume`, `dir`, ...
    pub kind: String,
    /// `disk`, `cdrom`, `floppy`, `lun`.
    pub device: String,
    /// The guest's device name (`vda`).
    pub target: String,
    /// The file of a `type='file'` disk.
    pub file: Option<PathBuf>,
    /// What else names its source (a device, a pool/volume, a protocol and
    /// name), for messages.
    pub source: String,
    /// `<driver type=...>` as written (`None` if absent).
    pub format: Option<String>,
    pub readonly: bool,
}

impl Disk {
    /// A disk whose data vdrep replicates: a writable file-backed disk.
    pub fn is_replicated(&self) -> bool {
        self.kind == "file" && matches!(self.device.as_str(), "disk" | "lun") && !self.readonly
    }
}

/// One `<interface>` of a domain.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Nic {
    /// `network`, `bridge`, `user`, `direct`, ...
    pub kind: String,
    /// The network or bridge (or device) it is attached to.
    pub source: Option<String>,
    pub mac: Option<String>,
}

/// What vdrep reads from a domain definition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Definition {
    pub name: String,
    pub uuid: Option<String>,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// It has a virtio-serial channel for the QEMU guest agent.
    pub agent_channel: bool,
    /// The attributes of vdrep's `<vdrep:failover>` metadata (a copy vdrep
    /// defined), empty if none.
    pub vdrep_metadata: Vec<(String, String)>,
    /// The XML it was read from.
    #[serde(skip)]
    pub xml: String,
}

fn xml_err(e: impl std::fmt::Display) -> LibvirtError {
    LibvirtError::Xml(format!("the domain definition is not valid XML: {e}"))
}

/// The value of attribute `key` of `e`, unescaped.
fn attr(e: &BytesStart<'_>, key: &str) -> Result<Option<String>, LibvirtError> {
    match e.try_get_attribute(key).map_err(xml_err)? {
        Some(a) => Ok(Some(
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(xml_err)?
                .into_owned(),
        )),
        None => Ok(None),
    }
}

fn local(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Text of a `&...;` reference inside element text.
fn resolve_ref(r: &quick_xml::events::BytesRef<'_>) -> Result<String, LibvirtError> {
    if let Some(c) = r.resolve_char_ref().map_err(xml_err)? {
        return Ok(c.to_string());
    }
    let name = r.decode().map_err(xml_err)?;
    quick_xml::escape::resolve_predefined_entity(&name)
        .map(str::to_string)
        .ok_or_else(|| xml_err(format!("unknown entity &{name};")))
}

impl Definition {
    /// Parse a domain definition.
    pub fn parse(xml: &str) -> Result<Definition, LibvirtError> {
        let mut r = Reader::from_str(xml);
        let mut path: Vec<String> = Vec::new();
        let mut name = None;
        let mut uuid = None;
        let mut text = String::new();
        let mut disks = Vec::new();
        let mut nics = Vec::new();
        let mut agent_channel = false;
        let mut disk: Option<Disk> = None;
        let mut nic: Option<Nic> = None;
        let mut channel_virtio_agent = false;
        let mut vdrep_metadata = Vec::new();
        loop {
            let ev = r.read_event().map_err(xml_err)?;
            let (start, empty) = match &ev {
                Event::Start(e) => (Some(e.clone()), false),
                Event::Empty(e) => (Some(e.clone()), true),
                _ => (None, false),
            };
            if let Some(e) = start {
                let n = local(e.local_name().as_ref());
                let parent = path.last().map(String::as_str).unwrap_or("");
                let depth = path.len();
                match (depth, parent, n.as_str()) {
                    (2, "devices", "disk") => {
                        disk = Some(Disk {
                            kind: attr(&e, "type")?.unwrap_or_else(|| "file".into()),
                            device: attr(&e, "device")?.unwrap_or_else(|| "disk".into()),
                            target: String::new(),
                            file: None,
                            source: String::new(),
                            format: None,
                            readonly: false,
                        })
                    }
                    (3, "disk", "source") => {
                        if let Some(d) = disk.as_mut() {
                            d.file = attr(&e, "file")?.map(PathBuf::from);
                            let mut what = Vec::new();
                            for k in ["file", "dev", "pool", "volume", "protocol", "name", "dir"] {
                                if let Some(v) = attr(&e, k)? {
                                    what.push(v);
                                }
                            }
                            d.source = what.join(" ");
                        }
                    }
                    (3, "disk", "driver") => {
                        if let Some(d) = disk.as_mut() {
                            d.format = attr(&e, "type")?;
                        }
                    }
                    (3, "disk", "target") => {
                        if let Some(d) = disk.as_mut() {
                            d.target = attr(&e, "dev")?.unwrap_or_default();
                        }
                    }
                    (3, "disk", "readonly") => {
                        if let Some(d) = disk.as_mut() {
                            d.readonly = true;
                        }
                    }
                    (2, "devices", "interface") => {
                        nic = Some(Nic {
                            kind: attr(&e, "type")?.unwrap_or_default(),
                            source: None,
                            mac: None,
                        })
                    }
                    (3, "interface", "source") => {
                        if let Some(i) = nic.as_mut() {
                            let mut s = None;
                            for k in ["network", "bridge", "dev"] {
                                if let Some(v) = attr(&e, k)? {
                                    s = Some(v);
                                    break;
                                }
                            }
                            i.source = s;
                        }
                    }
                    (3, "interface", "mac") => {
                        if let Some(i) = nic.as_mut() {
                            i.mac = attr(&e, "address")?;
                        }
                    }
                    (2, "devices", "channel") => channel_virtio_agent = false,
                    (2, "metadata", "failover") => {
                        let mut attrs = Vec::new();
                        let mut ours = false;
                        for a in e.attributes() {
                            let a = a.map_err(xml_err)?;
                            let k = local(a.key.as_ref());
                            let v = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .map_err(xml_err)?
                                .into_owned();
                            if k.starts_with("xmlns") {
                                ours |= v == METADATA_NS;
                            } else {
                                attrs.push((k, v));
                            }
                        }
                        if ours {
                            vdrep_metadata = attrs;
                        }
                    }
                    (3, "channel", "target") => {
                        channel_virtio_agent = attr(&e, "type")?.as_deref() == Some("virtio")
                            && attr(&e, "name")?.as_deref() == Some(AGENT_CHANNEL);
                    }
                    _ => {}
                }
                text.clear();
                if empty {
                    close(&n, depth, &mut disk, &mut nic, &mut disks, &mut nics);
                    if depth == 2 && n == "channel" && channel_virtio_agent {
                        agent_channel = true;
                    }
                } else {
                    path.push(n);
                }
                continue;
            }
            match ev {
                Event::Text(t) => text.push_str(&t.xml10_content().map_err(xml_err)?),
                Event::GeneralRef(r) => text.push_str(&resolve_ref(&r)?),
                Event::End(e) => {
                    let n = local(e.local_name().as_ref());
                    path.pop();
                    let depth = path.len();
                    if depth == 1 && n == "name" {
                        name = Some(text.trim().to_string());
                    } else if depth == 1 && n == "uuid" {
                        uuid = Some(text.trim().to_string());
                    } else if depth == 2 && n == "channel" && channel_virtio_agent {
                        agent_channel = true;
                    }
                    close(&n, depth, &mut disk, &mut nic, &mut disks, &mut nics);
                    text.clear();
                }
                Event::Eof => break,
                _ => {}
            }
        }
        let name = name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| LibvirtError::Xml("the domain definition has no <name>".into()))?;
        Ok(Definition {
            name,
            uuid,
            disks,
            nics,
            agent_channel,
            vdrep_metadata,
            xml: xml.to_string(),
        })
    }

    /// Attribute `key` of vdrep's metadata in this definition.
    pub fn vdrep_metadata(&self, key: &str) -> Option<String> {
        self.vdrep_metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// The disks vdrep replicates (writable file-backed disks).
    pub fn replicated_disks(&self) -> impl Iterator<Item = &Disk> {
        self.disks.iter().filter(|d| d.is_replicated())
    }
}

/// An element at `depth` named `n` ended: finish the disk or NIC it closes.
fn close(
    n: &str,
    depth: usize,
    disk: &mut Option<Disk>,
    nic: &mut Option<Nic>,
    disks: &mut Vec<Disk>,
    nics: &mut Vec<Nic>,
) {
    if depth != 2 {
        return;
    }
    match n {
        "disk" => disks.extend(disk.take()),
        "interface" => nics.extend(nic.take()),
        _ => {}
    }
}

/// Whether `xml` has an element named `name` (anywhere).
pub fn has_element(xml: &str, name: &str) -> Result<bool, LibvirtError> {
    let mut r = Reader::from_str(xml);
    loop {
        match r.read_event().map_err(xml_err)? {
            Event::Start(e) | Event::Empty(e) if e.local_name().as_ref() == name.as_bytes() => {
                return Ok(true)
            }
            Event::Eof => return Ok(false),
            _ => {}
        }
    }
}

/// Where a failed-over copy's NICs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetTarget {
    /// A libvirt network (`<interface type='network'>`).
    Network(String),
    /// A host bridge (`<interface type='bridge'>`).
    Bridge(String),
}

/// How the NICs of a copy are attached.
#[derive(Debug, Clone)]
pub enum NicPlan {
    /// Every NIC on this target (a test failover's isolated network).
    All(NetTarget),
    /// A NIC whose network or bridge is a key moves to its value; the
    /// others stay as they are.
    Map(HashMap<String, NetTarget>),
}

/// A disk of the copy: its new file and format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMove {
    pub file: PathBuf,
    pub format: DiskFormat,
}

/// How to turn a definition into a failed-over copy's.
#[derive(Debug, Clone)]
pub struct Rewrite {
    /// The copy's name (`None`: the same).
    pub name: Option<String>,
    /// A new UUID and new MAC addresses (a copy that may run beside the
    /// original); else both are kept (the same VM, elsewhere).
    pub new_identity: bool,
    /// Source file of each replicated disk -> the copy's file and format.
    pub disks: HashMap<PathBuf, DiskMove>,
    pub nics: NicPlan,
    /// Serial and console logs (`type='file'`) go to this file instead.
    pub console_log: Option<PathBuf>,
    /// Attributes of a `<vdrep:failover>` element put in `<metadata>`.
    pub metadata: Vec<(String, String)>,
}

/// A random UUID (version 4).
pub fn random_uuid() -> String {
    let mut b = crate::util::random_id();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = crate::util::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A random MAC address in QEMU's locally administered 52:54:00 range.
pub fn random_mac() -> String {
    let b = crate::util::random_id();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn start_with(name: &str, attrs: &[(&str, &str)]) -> BytesStart<'static> {
    let mut e = BytesStart::new(name.to_string());
    for (k, v) in attrs {
        e.push_attribute((*k, *v));
    }
    e
}

/// `e` with attribute `key` set to `value` (others kept, in order).
fn set_attr(
    e: &BytesStart<'_>,
    key: &str,
    value: &str,
) -> Result<BytesStart<'static>, LibvirtError> {
    let mut out = BytesStart::new(local(e.name().as_ref()));
    let mut done = false;
    for a in e.attributes() {
        let a = a.map_err(xml_err)?;
        if a.key.as_ref() == key.as_bytes() {
            out.push_attribute((key, value));
            done = true;
        } else {
            out.push_attribute(a);
        }
    }
    if !done {
        out.push_attribute((key, value));
    }
    Ok(out)
}

/// Depth (within `block`, 0 = the element itself) of every event.
fn depths(block: &[Event<'static>]) -> Vec<usize> {
    let mut d = 0usize;
    block
        .iter()
        .map(|e| match e {
            Event::Start(_) => {
                d += 1;
                d - 1
            }
            Event::End(_) => {
                d = d.saturating_sub(1);
                d
            }
            _ => d,
        })
        .collect()
}

/// The direct child element `name` of the block (its index).
fn child(block: &[Event<'static>], name: &str) -> Option<usize> {
    let ds = depths(block);
    block.iter().zip(ds).position(|(e, d)| {
        d == 1
            && matches!(e, Event::Start(x) | Event::Empty(x) if x.local_name().as_ref() == name.as_bytes())
    })
}

fn start_of<'e>(e: &'e Event<'static>) -> Option<&'e BytesStart<'static>> {
    match e {
        Event::Start(x) | Event::Empty(x) => Some(x),
        _ => None,
    }
}

/// `e` (a start or empty element) with its start tag replaced by `s`.
fn with_start(e: &Event<'static>, s: BytesStart<'static>) -> Event<'static> {
    match e {
        Event::Start(_) => Event::Start(s),
        _ => Event::Empty(s),
    }
}

impl Rewrite {
    /// The rewritten definition. Every replicated disk of `def` must have
    /// an entry in `self.disks`.
    pub fn apply(&self, def: &Definition) -> Result<String, LibvirtError> {
        for d in def.replicated_disks() {
            let f = d.file.as_deref().unwrap_or(Path::new(""));
            if !self.disks.contains_key(f) {
                return Err(LibvirtError::Refused(format!(
                    "disk {} ({}) of domain {} has no replica here",
                    d.target,
                    f.display(),
                    def.name
                )));
            }
        }
        let mut r = Reader::from_str(&def.xml);
        let mut w = Writer::new(Cursor::new(Vec::new()));
        let mut path: Vec<String> = Vec::new();
        // A <disk> or <interface> held until its end (its parts depend on
        // each other: the driver comes before the source).
        let mut block: Option<Vec<Event<'static>>> = None;
        let mut name_done = false;
        let mut saw_metadata = false;
        loop {
            let ev = r.read_event().map_err(xml_err)?.into_owned();
            if matches!(ev, Event::Eof) {
                break;
            }
            let mut out = vec![];
            match &ev {
                Event::Start(e) | Event::Empty(e) => {
                    let n = local(e.local_name().as_ref());
                    let opens = matches!(ev, Event::Start(_));
                    let depth = path.len();
                    let parent = path.last().map(String::as_str).unwrap_or("");
                    if depth == 2 && parent == "devices" && (n == "disk" || n == "interface") {
                        if opens {
                            block = Some(Vec::new());
                        }
                        out.push(ev.clone());
                    } else if depth == 3
                        && (parent == "serial" || parent == "console")
                        && n == "source"
                    {
                        out.push(self.console_source(&ev, e)?);
                    } else if depth == 1 && n == "metadata" {
                        saw_metadata = true;
                        if opens {
                            out.push(ev.clone());
                            out.extend(self.metadata_events());
                        } else {
                            out.extend(self.metadata_block());
                        }
                    } else {
                        out.push(ev.clone());
                    }
                    if opens {
                        path.push(n);
                    }
                }
                Event::Text(_) | Event::GeneralRef(_) | Event::CData(_) => {
                    let at = |n: &str| path.len() == 2 && path[1] == n;
                    if at("name") && self.name.is_some() {
                        if let (false, Some(new)) = (name_done, &self.name) {
                            out.push(Event::Text(BytesText::new(new).into_owned()));
                            name_done = true;
                        }
                    } else if !(at("uuid") && self.new_identity) {
                        out.push(ev.clone());
                    }
                }
                Event::End(e) => {
                    let n = local(e.local_name().as_ref());
                    path.pop();
                    let depth = path.len();
                    if depth == 1 && n == "uuid" && self.new_identity {
                        out.push(Event::Text(BytesText::new(&random_uuid()).into_owned()));
                    }
                    if depth == 0 && n == "domain" && !saw_metadata {
                        out.extend(self.metadata_block());
                    }
                    out.push(ev.clone());
                    if depth == 2 && (n == "disk" || n == "interface") {
                        if let Some(mut b) = block.take() {
                            b.append(&mut out);
                            out = if n == "disk" {
                                self.disk_block(b)?
                            } else {
                                self.nic_block(b)?
                            };
                        }
                    }
                }
                _ => out.push(ev.clone()),
            }
            for e in out {
                match block.as_mut() {
                    Some(b) => b.push(e),
                    None => w.write_event(e).map_err(xml_err)?,
                }
            }
        }
        String::from_utf8(w.into_inner().into_inner()).map_err(xml_err)
    }

    /// A serial or console `<source path=...>`, moved to the copy's log.
    fn console_source(
        &self,
        ev: &Event<'static>,
        e: &BytesStart<'static>,
    ) -> Result<Event<'static>, LibvirtError> {
        match (&self.console_log, attr(e, "path")?) {
            (Some(log), Some(_)) => {
                Ok(with_start(ev, set_attr(e, "path", &log.to_string_lossy())?))
            }
            _ => Ok(ev.clone()),
        }
    }

    /// One `<disk>` element: its source and driver moved to the copy's.
    fn disk_block(&self, mut b: Vec<Event<'static>>) -> Result<Vec<Event<'static>>, LibvirtError> {
        let Some(si) = child(&b, "source") else {
            return Ok(b);
        };
        let Some(file) = start_of(&b[si])
            .map(|s| attr(s, "file"))
            .transpose()?
            .flatten()
        else {
            return Ok(b);
        };
        let Some(m) = self.disks.get(Path::new(&file)) else {
            return Ok(b);
        };
        if let Some(s) = start_of(&b[si]) {
            b[si] = with_start(&b[si], set_attr(s, "file", &m.file.to_string_lossy())?);
        }
        match child(&b, "driver") {
            Some(di) => {
                if let Some(s) = start_of(&b[di]) {
                    b[di] = with_start(&b[di], set_attr(s, "type", m.format.as_str())?);
                }
            }
            None => b.insert(
                1,
                Event::Empty(start_with(
                    "driver",
                    &[("name", "qemu"), ("type", m.format.as_str())],
                )),
            ),
        }
        Ok(b)
    }

    /// One `<interface>` element: attached where the plan says, with a new
    /// MAC address for a new identity.
    fn nic_block(&self, mut b: Vec<Event<'static>>) -> Result<Vec<Event<'static>>, LibvirtError> {
        if self.new_identity {
            if let Some(mi) = child(&b, "mac") {
                if let Some(s) = start_of(&b[mi]) {
                    b[mi] = with_start(&b[mi], set_attr(s, "address", &random_mac())?);
                }
            }
        }
        let si = child(&b, "source");
        let src = match si.and_then(|i| start_of(&b[i])) {
            Some(s) => match attr(s, "network")? {
                Some(v) => Some(v),
                None => attr(s, "bridge")?,
            },
            None => None,
        };
        let target = match &self.nics {
            NicPlan::All(t) => Some(t.clone()),
            NicPlan::Map(m) => src.as_ref().and_then(|s| m.get(s)).cloned(),
        };
        let Some(t) = target else {
            return Ok(b);
        };
        let (kind, k, v) = match &t {
            NetTarget::Network(v) => ("network", "network", v.as_str()),
            NetTarget::Bridge(v) => ("bridge", "bridge", v.as_str()),
        };
        if let Some(s) = start_of(&b[0]) {
            b[0] = with_start(&b[0], set_attr(s, "type", kind)?);
        }
        let src_el = Event::Empty(start_with("source", &[(k, v)]));
        match si {
            Some(i) => {
                // Replace the whole <source> element (it may have children).
                let ds = depths(&b);
                let end = if matches!(b[i], Event::Start(_)) {
                    (i + 1..b.len())
                        .find(|&j| ds[j] == 1 && matches!(b[j], Event::End(_)))
                        .unwrap_or(i)
                } else {
                    i
                };
                b.splice(i..=end, [src_el]);
            }
            None => b.insert(1, src_el),
        }
        Ok(b)
    }

    /// The `<vdrep:failover .../>` element (none without metadata).
    fn metadata_events(&self) -> Vec<Event<'static>> {
        if self.metadata.is_empty() {
            return vec![];
        }
        let mut e = BytesStart::new("vdrep:failover");
        e.push_attribute(("xmlns:vdrep", METADATA_NS));
        for (k, v) in &self.metadata {
            e.push_attribute((k.as_str(), v.as_str()));
        }
        vec![Event::Empty(e)]
    }

    /// A whole `<metadata>` element holding ours (none without metadata).
    fn metadata_block(&self) -> Vec<Event<'static>> {
        let inner = self.metadata_events();
        if inner.is_empty() {
            return inner;
        }
        let mut v = vec![Event::Start(BytesStart::new("metadata"))];
        v.extend(inner);
        v.push(Event::End(BytesEnd::new("metadata")));
        v
    }
}
