//! Raw sockets in a network namespace: what a pod with CAP_NET_RAW can send
//! (any IP protocol number, any hop limit, any payload), and a receiver
//! that says whether such a packet arrived.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::Netns;

fn raw_socket(v6: bool, protocol: i32) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: an int option of the size given.
    let rc = unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (&value as *const i32).cast(), size_of::<i32>() as u32)
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Sends `payload` from `from` to `to` as IP protocol `protocol`, with
/// `hop_limit` (IPv4 TTL or IPv6 hop limit); the kernel writes the IP
/// header (and, for ICMPv6, the checksum).
pub fn send(from: &Netns, to: IpAddr, protocol: i32, hop_limit: i32, payload: Vec<u8>) -> Result<()> {
    from.run(move || -> io::Result<()> {
        let fd = raw_socket(to.is_ipv6(), protocol)?;
        let sent = match to {
            IpAddr::V4(a) => {
                set_int(&fd, libc::IPPROTO_IP, libc::IP_TTL, hop_limit)?;
                // SAFETY: zeroed sockaddr_in is valid; fields set below.
                let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                // SAFETY: sends the buffer to a valid sockaddr of the size given.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        payload.as_ptr().cast(),
                        payload.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        size_of::<libc::sockaddr_in>() as u32,
                    )
                }
            }
            IpAddr::V6(a) => {
                set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, hop_limit)?;
                // SAFETY: zeroed sockaddr_in6 is valid; fields set below.
                let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as u16;
                sa.sin6_addr.s6_addr = a.octets();
                // SAFETY: as above.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        payload.as_ptr().cast(),
                        payload.len(),
                        0,
                        (&sa as *const libc::sockaddr_in6).cast(),
                        size_of::<libc::sockaddr_in6>() as u32,
                    )
                }
            }
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    })?
    .context("sending a raw packet")
}

/// A raw socket for one IP protocol, opened in a namespace before anything
/// is sent, so nothing that arrives is missed.
pub struct Receiver {
    fd: OwnedFd,
}

impl Receiver {
    pub fn open(at: &Netns, v6: bool, protocol: i32) -> Result<Receiver> {
        let fd = at.run(move || raw_socket(v6, protocol))?.context("raw receiver")?;
        Ok(Receiver { fd })
    }

    /// Whether a packet whose bytes contain `marker` arrives within `timeout`.
    pub fn saw(&self, marker: &[u8], timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if n <= 0 {
                continue;
            }
            // SAFETY: receives into a buffer of the length given.
            let got = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got > 0 && buf[..got as usize].windows(marker.len()).any(|w| w == marker) {
                return Ok(true);
            }
        }
    }
}
