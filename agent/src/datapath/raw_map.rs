//! The few bpf(2) map commands needed on maps of any layout: the
//! carry-over of an earlier agent's maps (`pins`), whose key and value
//! sizes are known only at run time, so aya's typed maps cannot open them.

use std::{
    os::fd::{AsFd, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;

/// `union bpf_attr`, zeroed past what a command uses (the kernel
/// requires that).
#[repr(C, align(8))]
struct Attr([u64; 16]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed, sufficiently sized `union bpf_attr`
    // whose pointers (set by the callers) outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Attr([0; 16]);
    attr.0[0] = c.as_ptr() as u64; // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// map_fd, then key and value (or next_key) pointers, then flags.
fn map_attr(fd: impl AsFd, key: u64, value: u64, flags: u64) -> Attr {
    let mut attr = Attr([0; 16]);
    attr.0[0] = fd.as_fd().as_raw_fd() as u32 as u64;
    attr.0[1] = key;
    attr.0[2] = value;
    attr.0[3] = flags;
    attr
}

/// The key after `key` (the first with None); false at the end.
pub fn next_key(fd: impl AsFd, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<bool> {
    let key = key.map_or(0, |k| k.as_ptr() as u64);
    match bpf(BPF_MAP_GET_NEXT_KEY, &mut map_attr(fd, key, next.as_mut_ptr() as u64, 0)) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// False if the key is gone.
pub fn lookup(fd: impl AsFd, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut map_attr(fd, key.as_ptr() as u64, value.as_mut_ptr() as u64, 0)) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn update(fd: impl AsFd, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    bpf(BPF_MAP_UPDATE_ELEM, &mut map_attr(fd, key.as_ptr() as u64, value.as_ptr() as u64, 0)).map(|_| ())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;

/// A new map (`map_type` as `enum bpf_map_type`); tests use it to stand in
/// for an earlier release's maps.
pub fn create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> std::io::Result<OwnedFd> {
    let mut attr = Attr([0; 16]);
    attr.0[0] = u64::from(map_type) | (u64::from(key_size) << 32);
    attr.0[1] = u64::from(value_size) | (u64::from(max_entries) << 32);
    attr.0[2] = u64::from(flags);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins `fd` at `path` (on a bpffs).
pub fn pin(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut attr = Attr([0; 16]);
    attr.0[0] = c.as_ptr() as u64;
    attr.0[1] = fd.as_raw_fd() as u32 as u64;
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Calls `each` with every entry of a hash map, a chunk at a time (walking
/// it key by key takes two calls per entry, and a full conntrack table is
/// 250,000 flows; holding them all would double the agent's memory).
/// `K` and `V` must be the map's key and value layouts. Like any walk of a
/// map that programs write, a snapshot only entry by entry; `each` may
/// delete what it was given.
pub fn for_each_batch<K: aya::Pod, V: aya::Pod>(
    fd: std::os::fd::BorrowedFd<'_>,
    mut chunk: usize,
    mut each: impl FnMut(&[K], &[V]),
) -> std::io::Result<()> {
    let mut keys: Vec<K> = Vec::new();
    let mut values: Vec<V> = Vec::new();
    // The hash map's batch token: the bucket to go on from.
    let (mut token, mut next, mut first) = (0u32, 0u32, true);
    loop {
        keys.clear();
        values.clear();
        keys.reserve(chunk);
        values.reserve(chunk);
        let mut attr = Attr([0; 16]);
        attr.0[0] = if first { 0 } else { &token as *const u32 as u64 }; // in_batch
        attr.0[1] = &mut next as *mut u32 as u64; // out_batch
        attr.0[2] = keys.as_mut_ptr() as u64;
        attr.0[3] = values.as_mut_ptr() as u64;
        attr.0[4] = chunk as u64 | (u64::from(fd.as_raw_fd() as u32) << 32); // count, map_fd
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // The kernel writes back how many entries it filled, also at the end.
        let count = (attr.0[4] & 0xffff_ffff) as usize;
        let done = match result {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            // A bucket holds more entries than a chunk: a bigger one.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && count == 0 => {
                chunk *= 2;
                continue;
            }
            Err(e) => return Err(e),
        };
        let count = count.min(chunk);
        // SAFETY: the kernel filled `count` (at most `chunk`, the capacity)
        // keys and values, plain data of the map's layouts.
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        each(&keys, &values);
        if done {
            return Ok(());
        }
        token = next;
        first = false;
    }
}

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// Deletes `key`; false if it was not there.
pub fn delete(fd: std::os::fd::BorrowedFd<'_>, key: &[u8]) -> std::io::Result<bool> {
    let mut attr = Attr([0; 16]);
    attr.0[0] = fd.as_raw_fd() as u32 as u64;
    attr.0[1] = key.as_ptr() as u64;
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Deletes `keys` (a map's key layout), a few thousand per call; returns
/// how many were there. The kernel stops at a key that is gone (evicted,
/// expired meanwhile): it is skipped and the rest go on.
pub fn delete_batch<K: aya::Pod>(fd: std::os::fd::BorrowedFd<'_>, keys: &[K]) -> std::io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = Attr([0; 16]);
        attr.0[2] = rest.as_ptr() as u64; // keys
        attr.0[4] = rest.len() as u64 | (u64::from(fd.as_raw_fd() as u32) << 32); // count, map_fd
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = ((attr.0[4] & 0xffff_ffff) as usize).min(rest.len());
        deleted += done;
        match result {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => rest = &rest[done + 1..],
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
