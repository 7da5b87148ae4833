//! The few kernel interfaces aya does not wrap: map freezing, a map's frozen flag, interface
//! facts by ioctl (they follow the calling thread's network namespace, unlike /sys).
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

use crate::{bail, error::Context as _};

const BPF_MAP_FREEZE: libc::c_long = 22;
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// `BPF_MAP_FREEZE`: from now on no syscall can write the map.
pub fn freeze_map(fd: BorrowedFd<'_>) -> io::Result<()> {
    // bpf_attr for BPF_MAP_FREEZE is just the map fd; the kernel wants the rest zeroed.
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: attr outlives the call and its size is passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// What the kernel says about an XDP link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpLinkInfo {
    pub id: u32,
    pub program_id: u32,
    /// The interface index it is attached to (in the network namespace the interface is in
    /// now): 0 once the kernel has detached it (`bpftool link detach`, its interface or the
    /// interface's network namespace deleted).
    pub ifindex: u32,
}

/// Opens the bpf object pinned at `pin` (BPF_OBJ_GET).
pub(crate) fn open_pinned(pin: &Path) -> crate::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes()).context("a path with a NUL byte")?;
    // bpf_attr for BPF_OBJ_GET: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr and the path it points to outlive the call; its size is passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`; the length the kernel filled.
fn object_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<u32> {
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]))
}

/// The link behind `fd`, if it is an XDP link.
pub fn xdp_link_info(fd: BorrowedFd<'_>) -> crate::Result<Option<XdpLinkInfo>> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose xdp
    // member starts with ifindex (u32).
    let mut info = [0u8; 128];
    object_info(fd, &mut info).context("BPF_OBJ_GET_INFO_BY_FD on a link")?;
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    Ok((word(0) == BPF_LINK_TYPE_XDP).then(|| XdpLinkInfo { id: word(4), program_id: word(8), ifindex: word(16) }))
}

/// The XDP link pinned at `pin`; None if the pin is not an XDP link.
pub fn pinned_xdp_link(pin: &Path) -> crate::Result<Option<XdpLinkInfo>> {
    let link = open_pinned(pin)?;
    xdp_link_info(link.as_fd()).with_context(|| format!("link info of {}", pin.display()))
}

/// The interface index an XDP link pinned at `pin` is attached to: 0 once the kernel has
/// detached it (its interface, or the interface's network namespace, was deleted). None if the
/// pin is not an XDP link.
pub(crate) fn pinned_xdp_link_ifindex(pin: &Path) -> crate::Result<Option<u32>> {
    Ok(pinned_xdp_link(pin)?.map(|link| link.ifindex))
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// BPF_PROG_TEST_RUN of the XDP program `fd` on one frame: (XDP action, output frame).
pub fn xdp_test_run(fd: BorrowedFd<'_>, frame: &[u8]) -> crate::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    // struct { u32 prog_fd, retval, data_size_in, data_size_out; u64 data_in, data_out; ... }
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&u32::try_from(frame.len()).context("frame too large")?.to_ne_bytes());
    attr[12..16].copy_from_slice(&(out.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
    attr[24..32].copy_from_slice(&(out.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr, frame and out outlive the call; the kernel writes at most data_size_out.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("BPF_PROG_TEST_RUN");
    }
    let word = |at: usize| u32::from_ne_bytes([attr[at], attr[at + 1], attr[at + 2], attr[at + 3]]);
    out.truncate(word(12) as usize);
    Ok((word(4), out))
}

const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// The raw BTF (types and strings) the kernel holds under `id`, as a program's `btf_id` names
/// it: the loader's description of the program's globals, with their offsets in `.rodata`.
pub fn btf_by_id(id: u32) -> crate::Result<Vec<u8>> {
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: attr outlives the call; its size is passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_BTF_GET_FD_BY_ID, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("BPF_BTF_GET_FD_BY_ID {id}"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let btf = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_btf_info: btf (u64 pointer), btf_size (u32), id (u32), name (u64), name_len,
    // kernel_btf (u32 each). A first call with no buffer says how large it is.
    let mut info = [0u8; 32];
    object_info(btf.as_fd(), &mut info).with_context(|| format!("the size of BTF {id}"))?;
    let size = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let mut data = vec![0u8; size];
    let mut info = [0u8; 32];
    info[..8].copy_from_slice(&(data.as_mut_ptr() as u64).to_ne_bytes());
    info[8..12].copy_from_slice(&(size as u32).to_ne_bytes());
    object_info(btf.as_fd(), &mut info).with_context(|| format!("reading BTF {id}"))?;
    Ok(data)
}

/// The kernel's `frozen` flag of a map, read from its fdinfo.
pub fn map_is_frozen(fd: BorrowedFd<'_>) -> crate::Result<bool> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(info.lines().any(|l| l.split_once(':').is_some_and(|(k, v)| k.trim() == "frozen" && v.trim() == "1")))
}

pub struct InterfaceInfo {
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
}

fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> crate::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        bail!("'{name}' is not a valid interface name");
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// Index, MAC and MTU of an interface in the calling thread's network namespace.
pub fn interface_info(name: &str) -> crate::Result<InterfaceInfo> {
    let sock = ioctl_socket().context("socket for interface ioctls")?;
    let get = |request: libc::c_ulong| -> crate::Result<libc::ifreq> {
        let mut req = ifreq(name)?;
        // SAFETY: req is a valid ifreq for these requests.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) } < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENODEV) {
                bail!("no interface '{name}' in this network namespace");
            }
            return Err(err).with_context(|| format!("ioctl on interface '{name}'"));
        }
        Ok(req)
    };
    // SAFETY: each union field read is the one the ioctl filled.
    let index = unsafe { get(libc::SIOCGIFINDEX)?.ifr_ifru.ifru_ifindex } as u32;
    let hw = unsafe { get(libc::SIOCGIFHWADDR)?.ifr_ifru.ifru_hwaddr };
    let mtu = unsafe { get(libc::SIOCGIFMTU)?.ifr_ifru.ifru_mtu } as u32;
    if hw.sa_family != libc::ARPHRD_ETHER {
        bail!("interface '{name}' is not Ethernet (hardware type {})", hw.sa_family);
    }
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok(InterfaceInfo { index, mac, mtu })
}

/// The index of interface `name` in the calling thread's network namespace; None if there is
/// no interface of that name there.
pub fn interface_index(name: &str) -> crate::Result<Option<u32>> {
    let sock = ioctl_socket().context("socket for interface ioctls")?;
    let mut req = ifreq(name)?;
    // SAFETY: req is a valid ifreq for SIOCGIFINDEX.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Ok(None);
        }
        return Err(err).with_context(|| format!("ioctl on interface '{name}'"));
    }
    // SAFETY: the union field SIOCGIFINDEX fills.
    Ok(Some(unsafe { req.ifr_ifru.ifru_ifindex } as u32))
}

/// The name of the interface with index `index` in the calling thread's network namespace;
/// None if no interface there has it.
pub fn interface_name(index: u32) -> crate::Result<Option<String>> {
    let sock = ioctl_socket().context("socket for interface ioctls")?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_ifru.ifru_ifindex = index as libc::c_int;
    // SAFETY: req is a valid ifreq for SIOCGIFNAME (index in, name out).
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFNAME, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Ok(None);
        }
        return Err(err).with_context(|| format!("the name of interface index {index}"));
    }
    let name: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const IFLA_EXT_MASK: u16 = 29;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The ids of the XDP programs the kernel runs on the interface with index `ifindex` in the
/// calling thread's network namespace (in any mode), as rtnetlink reports them (RTM_GETLINK,
/// IFLA_XDP: what `ip link show` prints as `prog/xdp id N`); None if there is no interface
/// with that index there. Independent of bpf links: it says what the interface runs.
pub fn interface_xdp_programs(ifindex: u32) -> crate::Result<Option<Vec<u32>>> {
    // SAFETY: plain socket(2); owned at once.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("rtnetlink socket");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + ifinfomsg (16) + IFLA_EXT_MASK (8): RTEXT_FILTER_SKIP_STATS keeps the
    // answer small.
    let mut request = Vec::with_capacity(40);
    request.extend_from_slice(&40u32.to_ne_bytes());
    request.extend_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
    request.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    request.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]); // family, pad, type (u16)
    request.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // flags
    request.extend_from_slice(&0u32.to_ne_bytes()); // change
    request.extend_from_slice(&8u16.to_ne_bytes());
    request.extend_from_slice(&IFLA_EXT_MASK.to_ne_bytes());
    request.extend_from_slice(&(libc::RTEXT_FILTER_SKIP_STATS as u32).to_ne_bytes());
    // SAFETY: request outlives the call.
    if unsafe { libc::send(sock.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) } < 0 {
        return Err(io::Error::last_os_error()).context("sending RTM_GETLINK");
    }
    let mut answer = vec![0u8; 64 * 1024];
    // SAFETY: answer outlives the call; its length is passed.
    let len = unsafe { libc::recv(sock.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error()).context("receiving the RTM_GETLINK answer");
    }
    parse_getlink_answer(&answer[..len as usize])
}

/// The XDP program ids in an RTM_GETLINK answer; None for "no such device".
fn parse_getlink_answer(answer: &[u8]) -> crate::Result<Option<Vec<u32>>> {
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
    let u32_at = |b: &[u8], at: usize| b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]));
    let message_len = u32_at(answer, 0).context("an empty rtnetlink answer")? as usize;
    let message = answer.get(..message_len).context("a truncated rtnetlink answer")?;
    match u16_at(message, 4).context("a truncated rtnetlink answer")? {
        t if t == libc::NLMSG_ERROR as u16 => {
            let errno = -(u32_at(message, 16).context("a truncated rtnetlink error")? as i32);
            if errno == libc::ENODEV {
                return Ok(None);
            }
            Err(io::Error::from_raw_os_error(errno)).context("RTM_GETLINK")
        }
        t if t == libc::RTM_NEWLINK => {
            let mut programs = Vec::new();
            for (kind, payload) in attributes(message.get(32..).unwrap_or_default()) {
                if kind == libc::IFLA_XDP {
                    for (xdp_kind, value) in attributes(payload) {
                        if (IFLA_XDP_PROG_ID..=IFLA_XDP_HW_PROG_ID).contains(&xdp_kind) {
                            programs.extend(u32_at(value, 0).filter(|id| *id != 0));
                        }
                    }
                }
            }
            programs.sort_unstable();
            programs.dedup();
            Ok(Some(programs))
        }
        other => bail!("unexpected rtnetlink message type {other} in the RTM_GETLINK answer"),
    }
}

/// The netlink attributes (type without flags, payload) in `bytes`.
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while bytes.len() >= 4 {
        let len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            break;
        }
        found.push((kind, &bytes[4..len]));
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    found
}

/// Every address configured in the calling thread's network namespace, with its interface
/// (getifaddrs follows the calling thread's network namespace).
pub fn host_addresses() -> crate::Result<Vec<(String, std::net::IpAddr)>> {
    use std::net::IpAddr;
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list; freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error()).context("getifaddrs");
    }
    let mut found = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: the family tells which sockaddr it is.
        let addr = unsafe {
            match (*entry.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        found.extend(addr.map(|a| (name, a)));
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(found)
}

/// Whether `path` is on a bpf filesystem.
pub(crate) fn is_bpffs(path: &Path) -> crate::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    // SAFETY: statfs fills the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(false);
    }
    Ok(st.f_type as libc::c_long == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` (the usual /sys/fs/bpf).
pub(crate) fn mount_bpffs(path: &Path) -> crate::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    let fstype = c"bpf";
    // SAFETY: all strings are NUL-terminated and outlive the call.
    if unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("mounting bpffs at {}", path.display()));
    }
    Ok(())
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_UPDATE_BATCH`: all of `keys[i] -> values[i]` in one call.
pub(crate) fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> crate::Result<()> {
    if keys.len() != values.len() {
        bail!("{} keys for {} values", keys.len(), values.len());
    }
    // struct { u64 in_batch, out_batch, keys, values; u32 count, map_fd; u64 elem_flags, flags; }
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).context("batch too large")?,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    let requested = attr.count;
    // SAFETY: keys and values outlive the call; the kernel reads `count` of each.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("BPF_MAP_UPDATE_BATCH ({} of {requested} written)", attr.count));
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// `BPF_MAP_LOOKUP_ELEM` with raw bytes, for maps whose value has no Rust type (.rodata).
pub(crate) fn lookup_raw(fd: BorrowedFd<'_>, key: &[u8], value_size: usize) -> crate::Result<Vec<u8>> {
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let mut value = vec![0u8; value_size];
    let mut attr = LookupAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: key and value outlive the call; value has the map's value size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &mut attr as *mut LookupAttr,
            std::mem::size_of::<LookupAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error()).context("BPF_MAP_LOOKUP_ELEM");
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attribute(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn xdp_program_ids_are_read_from_an_rtm_newlink_answer() {
        let mut xdp = attribute(2, &[1]); // IFLA_XDP_ATTACHED: a u8
        xdp.extend(attribute(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes()));
        xdp.extend(attribute(6, &42u32.to_ne_bytes())); // IFLA_XDP_SKB_PROG_ID
        let mut body = vec![0u8; 16]; // ifinfomsg
        body.extend(attribute(3, b"eth0\0")); // IFLA_IFNAME
        body.extend(attribute(libc::IFLA_XDP | 0x8000, &xdp)); // nested
        assert_eq!(parse_getlink_answer(&message(libc::RTM_NEWLINK, &body)).unwrap(), Some(vec![42]));
        let no_xdp = message(libc::RTM_NEWLINK, &[0u8; 16]);
        assert_eq!(parse_getlink_answer(&no_xdp).unwrap(), Some(vec![]));
        let no_device = message(libc::NLMSG_ERROR as u16, &(-libc::ENODEV).to_ne_bytes());
        assert_eq!(parse_getlink_answer(&no_device).unwrap(), None);
        let refused = message(libc::NLMSG_ERROR as u16, &(-libc::EPERM).to_ne_bytes());
        assert!(parse_getlink_answer(&refused).is_err());
        assert!(parse_getlink_answer(&[]).is_err());
    }
}
