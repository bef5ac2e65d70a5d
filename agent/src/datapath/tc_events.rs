//! Noticing when someone else takes an endpoint's hooks away.
//!
//! A tc filter, unlike a pinned TCX link, can be deleted by anyone with
//! `CAP_NET_ADMIN` (`tc qdisc del dev lxc… clsact`, or a tool that resets
//! qdiscs), and the pod would then pass everything. The kernel announces
//! such deletions on the rtnetlink TC group; the agent listens, and the
//! endpoint on that interface is attached again in the next pass (the
//! loop wakes for it). Not noticed: another program put into our filter
//! (a replace is not a deletion).

use std::io;

use super::attach::{FILTER_HANDLE_RAW, FILTER_PRIORITY};
use crate::rtnetlink;

const RTM_DELQDISC: u16 = 37;
const RTM_DELTFILTER: u16 = 45;
const RTM_DELCHAIN: u16 = 101;
/// clsact's two hooks, as filter parents.
const CLSACT_INGRESS: u32 = 0xFFFF_FFF2;
const CLSACT_EGRESS: u32 = 0xFFFF_FFF3;
/// `RTNLGRP_TC` as a group bit (`RTMGRP_TC`).
const RTMGRP_TC: u32 = 0x8;
/// The clsact qdisc's parent handle.
const TC_H_CLSACT: u32 = 0xFFFF_FFF1;

/// Interfaces whose endpoint hooks a notification says are gone.
pub fn hooks_removed(messages: &[u8]) -> Vec<u32> {
    let mut out = Vec::new();
    // A truncated message ends the walk: what came before it counts.
    for message in rtnetlink::messages(messages).map_while(Result::ok) {
        // struct tcmsg: family, 3 bytes of padding, ifindex, handle,
        // parent, info (priority in its upper half).
        let Some(([_, ifindex, handle, parent, info], _)) = message.body::<[u32; 5]>() else { continue };
        let ours = match message.kind {
            // Our filter by its handle, or every filter at our priority
            // (a delete by priority, or a flush of the hook, is
            // announced without a handle).
            RTM_DELTFILTER => {
                info >> 16 == u32::from(FILTER_PRIORITY) && (handle == FILTER_HANDLE_RAW || handle == 0)
            }
            RTM_DELCHAIN => parent == CLSACT_INGRESS || parent == CLSACT_EGRESS,
            RTM_DELQDISC => parent == TC_H_CLSACT,
            _ => false,
        };
        if ours && ifindex != 0 {
            out.push(ifindex);
        }
    }
    out
}

/// Listens, on a thread of its own, for deletions of endpoint hooks in the
/// caller's network namespace; `removed` gets each interface index.
pub fn watch_hook_removals(removed: impl Fn(u32) + Send + 'static) -> io::Result<()> {
    let socket = rtnetlink::subscribe(RTMGRP_TC)?;
    // Room for a burst (every re-attach is announced too). Best effort:
    // a smaller buffer only makes an overflow (all taken as gone) likelier.
    let _ = rtnetlink::set_receive_buffer(&socket, 1 << 20);
    std::thread::Builder::new().name("tc-events".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rtnetlink::receive(&socket, &mut buf) {
                Ok(data) => {
                    for ifindex in hooks_removed(data) {
                        removed(ifindex);
                    }
                }
                // Notifications were lost: take every hook as gone, the
                // next pass attaches (replaces) them all again.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => removed(0),
                Err(e) => {
                    tracing::error!(error = %e, "tc notifications: no longer listening");
                    return;
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, ifindex: u32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 4]);
        for w in [ifindex, handle, parent, info] {
            m.extend_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn only_deletions_of_our_filters_and_of_clsact_count() {
        let ours = u32::from(FILTER_PRIORITY) << 16;
        let mut all = message(RTM_DELTFILTER, 7, FILTER_HANDLE_RAW, 0xFFFF_FFF2, ours);
        all.extend(message(RTM_DELTFILTER, 8, 1, 0xFFFF_FFF2, ours)); // another handle
        all.extend(message(RTM_DELTFILTER, 9, FILTER_HANDLE_RAW, 0xFFFF_FFF2, 2 << 16)); // another priority
        all.extend(message(RTM_DELQDISC, 10, 0xFFFF_0000, TC_H_CLSACT, 0));
        all.extend(message(RTM_DELQDISC, 11, 0x8001_0000, 0xFFFF_FFFF, 0)); // a root qdisc
        all.extend(message(44, 12, FILTER_HANDLE_RAW, 0xFFFF_FFF2, ours)); // a new filter
        all.extend(message(RTM_DELTFILTER, 13, 0, CLSACT_INGRESS, ours)); // `tc filter del dev … ingress`
        all.extend(message(RTM_DELCHAIN, 14, 0, CLSACT_EGRESS, 0)); // `tc chain del … egress chain 0`
        all.extend(message(RTM_DELCHAIN, 15, 0, 0xFFFF_FFFF, 0)); // another qdisc's chain
        assert_eq!(hooks_removed(&all), vec![7, 10, 13, 14]);
        assert_eq!(hooks_removed(&all[..20]), Vec::<u32>::new(), "a truncated message is ignored");
    }
}
