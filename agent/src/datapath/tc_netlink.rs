//! Endpoint filters attached many at a time: one rtnetlink message buffer,
//! on a socket of its own, per 32 interfaces of a pass (each interface's
//! clsact qdisc, then its two filters), where a request each would open a
//! socket each and wait for its answer. Pods started together reach a pass
//! together.

use std::{
    ffi::CStr,
    io,
    mem::size_of,
    os::fd::{OwnedFd, RawFd},
};

use crate::rtnetlink::{self, align};

const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
const ETH_P_ALL: u16 = 0x0003;
/// At most this many interfaces' requests go in one message buffer (their
/// acknowledgements must fit the socket's receive buffer).
const INTERFACES_PER_SEND: usize = 32;

/// `struct tcmsg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct TcMsg {
    family: u8,
    _pad1: u8,
    _pad2: u16,
    ifindex: i32,
    handle: u32,
    parent: u32,
    info: u32,
}

/// Which side of the interface a filter sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Side {
    Ingress,
    Egress,
}

/// One filter to make hold a program: created, or its program replaced in
/// place (`tc filter replace`), at a fixed priority and handle.
pub(super) struct Filter<'a> {
    pub side: Side,
    pub priority: u16,
    pub handle: u32,
    pub program: RawFd,
    pub name: &'a CStr,
}

/// A request the kernel refused, or an exchange that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct RequestError {
    pub what: &'static str,
    #[source]
    pub source: io::Error,
}

impl RequestError {
    fn copy(&self) -> RequestError {
        let source = match self.source.raw_os_error() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::new(self.source.kind(), self.source.to_string()),
        };
        RequestError { what: self.what, source }
    }
}

/// Attaches `filters` on every interface of `ifindexes` (in the caller's
/// network namespace), adding each interface's clsact qdisc first when it
/// has none. Returns, per interface, the first error of its requests.
pub(super) fn attach(ifindexes: &[u32], filters: &[Filter<'_>]) -> Vec<Result<(), RequestError>> {
    let mut results = Vec::with_capacity(ifindexes.len());
    let per = 1 + filters.len() as u32;
    for chunk in ifindexes.chunks(INTERFACES_PER_SEND) {
        // Request k of interface i has sequence number i × per + k + 1.
        let mut buf = Vec::with_capacity(chunk.len() * per as usize * 96);
        for (i, &ifindex) in chunk.iter().enumerate() {
            let seq = i as u32 * per + 1;
            push_qdisc(&mut buf, seq, ifindex);
            for (f, filter) in filters.iter().enumerate() {
                push_filter(&mut buf, seq + 1 + f as u32, ifindex, filter);
            }
        }
        // A socket per buffer: acknowledgements a failed exchange left
        // unread can never be taken for the next buffer's.
        let acks = open()
            .map_err(|source| RequestError { what: "opening an rtnetlink socket", source })
            .and_then(|socket| {
                exchange(&socket, &buf, chunk.len() * per as usize)
                    .map_err(|source| RequestError { what: "rtnetlink exchange", source })
            });
        let mut chunk_results: Vec<Result<(), RequestError>> = chunk.iter().map(|_| Ok(())).collect();
        match acks {
            Ok(acks) => {
                for (seq, code) in acks.into_iter().enumerate().map(|(k, code)| (k as u32 + 1, code)) {
                    let is_qdisc = (seq - 1) % per == 0;
                    // A qdisc that exists already is the one wanted.
                    if code == 0 || (is_qdisc && code == libc::EEXIST) {
                        continue;
                    }
                    if let Some(r @ Ok(())) = chunk_results.get_mut(((seq - 1) / per) as usize) {
                        let what = if is_qdisc { "adding the clsact qdisc" } else { "adding a filter" };
                        *r = Err(RequestError { what, source: io::Error::from_raw_os_error(code) });
                    }
                }
            }
            Err(e) => {
                for r in &mut chunk_results {
                    *r = Err(e.copy());
                }
            }
        }
        results.extend(chunk_results);
    }
    results
}

/// Adds the clsact qdisc to an interface that has none (one there is
/// kept): no filter yet, so nothing it carries changes. Done ahead of a
/// pass, it takes from the pass the qdisc's cost: adding one to an
/// interface that is up waits for an RCU grace period under RTNL.
pub(super) fn add_clsact(ifindex: u32) -> Result<(), RequestError> {
    let mut buf = Vec::with_capacity(64);
    push_qdisc(&mut buf, 1, ifindex);
    let socket = open().map_err(|source| RequestError { what: "opening an rtnetlink socket", source })?;
    let codes =
        exchange(&socket, &buf, 1).map_err(|source| RequestError { what: "rtnetlink exchange", source })?;
    match codes.as_slice() {
        [0] | [libc::EEXIST] => Ok(()),
        [code, ..] => {
            Err(RequestError { what: "adding the clsact qdisc", source: io::Error::from_raw_os_error(*code) })
        }
        [] => Err(RequestError {
            what: "adding the clsact qdisc",
            source: io::Error::new(io::ErrorKind::InvalidData, "no answer"),
        }),
    }
}

fn open() -> io::Result<OwnedFd> {
    let socket = rtnetlink::socket()?;
    // Acknowledgements without a copy of each request: short, so a
    // buffer's worth fits the receive buffer...
    rtnetlink::set_option(&socket, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1 as libc::c_int)?;
    // ...which is made room for all the same.
    rtnetlink::set_receive_buffer(&socket, 1 << 20)?;
    // The kernel answers at once; a bound on the wait all the same (the
    // agent's loop waits on it).
    let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
    rtnetlink::set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout)?;
    Ok(socket)
}

/// Sends `buf` (`expected` requests numbered 1 to `expected`, each asking
/// for an acknowledgement) and returns each request's errno (0: done), in
/// order. Acknowledgements of other numbers, or of one twice, are ignored.
fn exchange(socket: &OwnedFd, buf: &[u8], expected: usize) -> io::Result<Vec<i32>> {
    rtnetlink::send(socket, buf)?;
    let mut codes: Vec<Option<i32>> = vec![None; expected];
    let mut missing = expected;
    let mut rx = vec![0u8; 64 * 1024];
    while missing > 0 {
        for message in rtnetlink::messages(rtnetlink::receive(socket, &mut rx)?) {
            let message = message?;
            let slot = (message.seq as usize).checked_sub(1).and_then(|i| codes.get_mut(i));
            if let (Some(code), Some(slot @ None)) = (message.error(), slot) {
                *slot = Some(code);
                missing -= 1;
            }
        }
    }
    // Every request has its answer here (`missing` is 0); none is taken
    // for a success it did not report.
    codes
        .into_iter()
        .map(|c| c.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a request went unanswered")))
        .collect()
}

/// Starts a message: its header (length filled in by `finish`) and body.
fn begin(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, body: TcMsg) -> usize {
    let start = buf.len();
    let header =
        libc::nlmsghdr { nlmsg_len: 0, nlmsg_type: kind, nlmsg_flags: flags, nlmsg_seq: seq, nlmsg_pid: 0 };
    // SAFETY: both are plain repr(C) structs without padding bytes.
    buf.extend_from_slice(unsafe {
        std::slice::from_raw_parts((&header as *const libc::nlmsghdr).cast(), size_of::<libc::nlmsghdr>())
    });
    buf.extend_from_slice(unsafe {
        std::slice::from_raw_parts((&body as *const TcMsg).cast(), size_of::<TcMsg>())
    });
    start
}

fn finish(buf: &mut [u8], start: usize) {
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends an attribute; returns where it starts (for a nested one's length).
fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(start + align(4 + value.len()), 0);
    start
}

fn push_qdisc(buf: &mut Vec<u8>, seq: u32, ifindex: u32) {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let body = TcMsg {
        family: libc::AF_UNSPEC as u8,
        ifindex: ifindex as i32,
        handle: TC_H_CLSACT & 0xffff_0000,
        parent: TC_H_CLSACT,
        ..TcMsg::default()
    };
    let start = begin(buf, RTM_NEWQDISC, flags, seq, body);
    attr(buf, TCA_KIND, b"clsact\0");
    finish(buf, start);
}

fn push_filter(buf: &mut Vec<u8>, seq: u32, ifindex: u32, filter: &Filter<'_>) {
    // Create, or replace the program of the filter at this handle (no
    // NLM_F_EXCL): the kernel swaps it atomically.
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE) as u16;
    let minor = match filter.side {
        Side::Ingress => TC_H_MIN_INGRESS,
        Side::Egress => TC_H_MIN_EGRESS,
    };
    let body = TcMsg {
        family: libc::AF_UNSPEC as u8,
        ifindex: ifindex as i32,
        handle: filter.handle,
        parent: (TC_H_CLSACT & 0xffff_0000) | minor,
        info: (u32::from(filter.priority) << 16) | u32::from(ETH_P_ALL.to_be()),
        ..TcMsg::default()
    };
    let start = begin(buf, RTM_NEWTFILTER, flags, seq, body);
    attr(buf, TCA_KIND, b"bpf\0");
    let options = attr(buf, TCA_OPTIONS | NLA_F_NESTED, &[]);
    attr(buf, TCA_BPF_FD, &filter.program.to_ne_bytes());
    attr(buf, TCA_BPF_NAME, filter.name.to_bytes_with_nul());
    attr(buf, TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    let nested = (buf.len() - options) as u16;
    buf[options..options + 2].copy_from_slice(&nested.to_ne_bytes());
    finish(buf, start);
}
