//! rtnetlink without a netlink crate: the socket, and the walk over what
//! the kernel sends back. The node's dumps (neighbours, bridge forwarding,
//! addresses), the endpoints' tc requests and the watch for removed hooks
//! all speak it; each keeps its own message types.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub(crate) const HEADER_LEN: usize = size_of::<libc::nlmsghdr>();

/// A `NETLINK_ROUTE` socket.
pub(crate) fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt` with a plain value.
pub(crate) fn set_option<T: Copy>(
    socket: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
) -> io::Result<()> {
    // SAFETY: setsockopt reads size_of::<T>() bytes at `value`, a live T.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes the receive buffer `bytes` long: past `rmem_max` where the agent
/// may (`CAP_NET_ADMIN`), up to it otherwise.
/// A socket bound to rtnetlink multicast `groups` (`RTMGRP_*` bits): the
/// kernel's announcements of what changed.
pub(crate) fn subscribe(groups: u32) -> io::Result<OwnedFd> {
    let socket = socket()?;
    // SAFETY: zeroed sockaddr_nl is valid; family and groups set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: addr is a sockaddr_nl of the size given.
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

pub(crate) fn set_receive_buffer(socket: &OwnedFd, bytes: libc::c_int) -> io::Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes)
        .or_else(|_| set_option(socket, libc::SOL_SOCKET, libc::SO_RCVBUF, bytes))
}

/// Sends `bytes` whole, or fails.
pub(crate) fn send(socket: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: sends the bytes of a live slice.
    let sent = unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "rtnetlink took part of the request"));
    }
    Ok(())
}

/// Receives one datagram into `buf`; a signal's interruption is read
/// through (what the kernel has to say still waits).
pub(crate) fn receive<'a>(socket: &OwnedFd, buf: &'a mut [u8]) -> io::Result<&'a [u8]> {
    loop {
        // SAFETY: receives into a buffer of the length given.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(&buf[..n as usize]);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub(crate) fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One message of a datagram: its header, and what follows the header.
pub(crate) struct Message<'a> {
    pub kind: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

impl Message<'_> {
    /// For `NLMSG_ERROR`: the errno it reports (0 for an acknowledgement).
    pub fn error(&self) -> Option<i32> {
        if i32::from(self.kind) != libc::NLMSG_ERROR {
            return None;
        }
        let code = i32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?);
        Some(-code)
    }

    /// The fixed-size body that starts the payload (`ndmsg`, `tcmsg`, ...),
    /// and the attributes after it.
    pub fn body<B: Copy>(&self) -> Option<(B, Attributes<'_>)> {
        if self.payload.len() < size_of::<B>() {
            return None;
        }
        // SAFETY: in bounds (checked); `B` is plain data, read unaligned.
        let body = unsafe { std::ptr::read_unaligned(self.payload.as_ptr().cast::<B>()) };
        let rest = self.payload.get(align(size_of::<B>())..).unwrap_or_default();
        Some((body, Attributes { rest }))
    }
}

/// The messages of a datagram, in order; a truncated one ends the walk
/// with an error.
pub(crate) fn messages(data: &[u8]) -> impl Iterator<Item = io::Result<Message<'_>>> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < HEADER_LEN {
            return None;
        }
        let word = |at: usize| u32::from_ne_bytes([rest[at], rest[at + 1], rest[at + 2], rest[at + 3]]);
        let len = word(0) as usize;
        if len < HEADER_LEN || len > rest.len() {
            rest = &[];
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message")));
        }
        let message = Message {
            kind: u16::from_ne_bytes([rest[4], rest[5]]),
            seq: word(8),
            payload: &rest[HEADER_LEN..len],
        };
        rest = rest.get(align(len)..).unwrap_or_default();
        Some(Ok(message))
    })
}

/// A message's attributes: `(type, value)`, the nested and byte-order
/// flags taken off the type. A malformed one ends them.
pub(crate) struct Attributes<'a> {
    rest: &'a [u8],
}

/// The attributes nested in an attribute's value.
pub(crate) fn nested(value: &[u8]) -> Attributes<'_> {
    Attributes { rest: value }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            self.rest = &[];
            return None;
        }
        self.rest = rest.get(align(len)..).unwrap_or_default();
        Some((kind, &rest[4..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((HEADER_LEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 2]);
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(payload);
        m.resize(align(m.len()), 0);
        m
    }

    #[test]
    fn messages_attributes_and_errors_are_walked_in_order() {
        let mut body = 7u32.to_ne_bytes().to_vec();
        for (kind, value) in [(1u16, &b"abc"[..]), (2 | 0x8000, &[9u8; 4][..])] {
            body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(value);
            body.resize(align(body.len()), 0);
        }
        let mut data = message(20, 1, &body);
        data.extend(message(libc::NLMSG_ERROR as u16, 2, &(-libc::EEXIST).to_ne_bytes()));
        data.extend(message(libc::NLMSG_ERROR as u16, 3, &0i32.to_ne_bytes()));
        let all: Vec<Message<'_>> = messages(&data).collect::<io::Result<_>>().unwrap();
        assert_eq!(all.iter().map(|m| (m.kind, m.seq)).collect::<Vec<_>>(), [(20, 1), (2, 2), (2, 3)]);
        let (head, attrs) = all[0].body::<u32>().unwrap();
        assert_eq!(head, 7);
        assert_eq!(
            attrs.collect::<Vec<_>>(),
            [(1, &b"abc"[..]), (2, &[9u8; 4][..])],
            "nested flag taken off"
        );
        assert_eq!((all[0].error(), all[1].error(), all[2].error()), (None, Some(libc::EEXIST), Some(0)));

        let cut = &data[..data.len() - 2];
        let walked: Vec<io::Result<Message<'_>>> = messages(cut).collect();
        assert_eq!(walked.len(), 3);
        assert!(walked[2].is_err(), "a truncated message ends the walk with an error");
    }
}
