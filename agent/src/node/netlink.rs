//! Neighbour and bridge forwarding entries (`RTM_GETNEIGH`) and interface
//! addresses (`RTM_GETADDR`), read with one rtnetlink dump each: enough to
//! find the bridge port behind which a pod's address lives, and the node's
//! own addresses, without a netlink crate.

use std::{io, mem::size_of, net::IpAddr};

use crate::rtnetlink;

const RTM_GETNEIGH: u16 = 30;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
/// Neighbour states without a usable link-layer address.
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NdMsg {
    family: u8,
    _pad1: u8,
    _pad2: u16,
    ifindex: i32,
    state: u16,
    flags: u8,
    kind: u8,
}

/// `struct ifaddrmsg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IfAddrMsg {
    family: u8,
    prefix_len: u8,
    flags: u8,
    scope: u8,
    ifindex: u32,
}

/// `struct ifinfomsg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IfInfoMsg {
    family: u8,
    _pad: u8,
    kind: u16,
    index: i32,
    flags: u32,
    change: u32,
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// A network interface of this namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// Its link-layer type (`ARPHRD_*`).
    pub link_type: u16,
    /// Its driver kind (`veth`, `bridge`, `wireguard`, ...), when it has one.
    pub kind: Option<String>,
}

/// Every interface of this network namespace (one `RTM_GETLINK` dump).
pub fn links() -> io::Result<Vec<Link>> {
    let found = dump::<IfInfoMsg>(RTM_GETLINK, RTM_NEWLINK, libc::AF_UNSPEC as u8)?;
    Ok(found.iter().filter_map(|(msg, attrs)| link(msg, attrs.iter().map(|(t, v)| (*t, &v[..])))).collect())
}

/// The interfaces announced as new (or changed) in a datagram of the
/// rtnetlink link group.
pub fn announced_links(data: &[u8]) -> Vec<Link> {
    rtnetlink::messages(data)
        .map_while(Result::ok)
        .filter(|m| m.kind == RTM_NEWLINK)
        .filter_map(|m| m.body::<IfInfoMsg>().and_then(|(msg, attrs)| link(&msg, attrs)))
        .collect()
}

fn link<'a>(msg: &IfInfoMsg, attrs: impl Iterator<Item = (u16, &'a [u8])>) -> Option<Link> {
    let mut name = None;
    let mut kind = None;
    for (t, v) in attrs {
        let text =
            |v: &[u8]| String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        match t {
            IFLA_IFNAME => name = Some(text(v)),
            IFLA_LINKINFO => {
                kind = rtnetlink::nested(v).find(|(t, _)| *t == IFLA_INFO_KIND).map(|(_, v)| text(v));
            }
            _ => {}
        }
    }
    Some(Link { ifindex: u32::try_from(msg.index).ok()?, name: name?, link_type: msg.kind, kind })
}

const RTM_GETADDR: u16 = 22;
const RTM_NEWADDR: u16 = 20;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

#[repr(C)]
struct Request<B> {
    header: libc::nlmsghdr,
    body: B,
}

/// An IP neighbour: which link-layer address answers for `ip` on `ifindex`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A bridge forwarding entry: frames for `mac` leave through port `port`
/// of bridge `master`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarding {
    pub port: u32,
    pub master: u32,
    pub mac: [u8; 6],
}

/// The IPv4 and IPv6 neighbour tables of this network namespace.
pub fn neighbours() -> io::Result<Vec<Neighbour>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for (msg, attrs) in dump::<NdMsg>(RTM_GETNEIGH, libc::RTM_NEWNEIGH, family as u8)? {
            if msg.state & (NUD_INCOMPLETE | NUD_FAILED) != 0 {
                continue;
            }
            let ip = attrs.iter().find(|(t, _)| *t == NDA_DST).and_then(|(_, v)| match v.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(&v[..]).ok()?)),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(&v[..]).ok()?)),
                _ => None,
            });
            let mac = attrs
                .iter()
                .find(|(t, _)| *t == NDA_LLADDR)
                .and_then(|(_, v)| <[u8; 6]>::try_from(&v[..]).ok());
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push(Neighbour { ifindex: msg.ifindex as u32, ip, mac });
            }
        }
    }
    Ok(out)
}

/// Every address on this network namespace's interfaces (one `RTM_GETADDR`
/// dump: unlike `getifaddrs`, no dump of every link with its statistics,
/// which hundreds of veths make long).
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for (_, attrs) in dump::<IfAddrMsg>(RTM_GETADDR, RTM_NEWADDR, libc::AF_UNSPEC as u8)? {
        // IFA_LOCAL is the interface's own address on point-to-point links,
        // where IFA_ADDRESS is the peer's.
        let value = |kind: u16| attrs.iter().find(|(t, _)| *t == kind).map(|(_, v)| v);
        let ip = value(IFA_LOCAL).or_else(|| value(IFA_ADDRESS)).and_then(|v| match v.len() {
            4 => Some(IpAddr::from(<[u8; 4]>::try_from(&v[..]).ok()?)),
            16 => Some(IpAddr::from(<[u8; 16]>::try_from(&v[..]).ok()?)),
            _ => None,
        });
        out.extend(ip);
    }
    Ok(out)
}

/// Every bridge forwarding entry of this network namespace.
pub fn forwarding() -> io::Result<Vec<Forwarding>> {
    let mut out = Vec::new();
    for (msg, attrs) in dump::<NdMsg>(RTM_GETNEIGH, libc::RTM_NEWNEIGH, libc::AF_BRIDGE as u8)? {
        let mac =
            attrs.iter().find(|(t, _)| *t == NDA_LLADDR).and_then(|(_, v)| <[u8; 6]>::try_from(&v[..]).ok());
        let master = attrs
            .iter()
            .find(|(t, _)| *t == NDA_MASTER)
            .and_then(|(_, v)| <[u8; 4]>::try_from(&v[..]).ok())
            .map(u32::from_ne_bytes);
        if let (Some(mac), Some(master)) = (mac, master) {
            out.push(Forwarding { port: msg.ifindex as u32, master, mac });
        }
    }
    Ok(out)
}

/// Attributes of one message: `(type, value)`.
type Attributes = Vec<(u16, Vec<u8>)>;

/// A message body that starts with its address family (`ndmsg`, `ifaddrmsg`).
trait Body: Copy + Default {
    fn with_family(family: u8) -> Self;
}

impl Body for NdMsg {
    fn with_family(family: u8) -> Self {
        NdMsg { family, ..NdMsg::default() }
    }
}

impl Body for IfInfoMsg {
    fn with_family(family: u8) -> Self {
        IfInfoMsg { family, ..IfInfoMsg::default() }
    }
}

impl Body for IfAddrMsg {
    fn with_family(family: u8) -> Self {
        IfAddrMsg { family, ..IfAddrMsg::default() }
    }
}

/// One dump (`request`, answered by `reply` messages) for `family`.
fn dump<B: Body>(request: u16, reply: u16, family: u8) -> io::Result<Vec<(B, Attributes)>> {
    let socket = rtnetlink::socket()?;
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<Request<B>>() as u32,
            nlmsg_type: request,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body: B::with_family(family),
    };
    // SAFETY: the bytes of a plain repr(C) struct, read as bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts((&request as *const Request<B>).cast::<u8>(), size_of::<Request<B>>())
    };
    rtnetlink::send(&socket, bytes)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        for message in rtnetlink::messages(rtnetlink::receive(&socket, &mut buf)?) {
            let message = message?;
            if i32::from(message.kind) == libc::NLMSG_DONE {
                return Ok(out);
            }
            match message.error() {
                Some(0) => {}
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None if message.kind == reply => {
                    if let Some((body, attrs)) = message.body::<B>() {
                        out.push((body, attrs.map(|(kind, value)| (kind, value.to_vec())).collect()));
                    }
                }
                None => {}
            }
        }
    }
}
