//! The few kernel interfaces aya does not wrap: map freezing, a map's frozen flag, interface
//! facts by ioctl (they follow the calling thread's network namespace, unlike /sys).
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

use anyhow::{bail, Context as _};

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

/// The interface index an XDP link pinned at `pin` is attached to: 0 once the kernel has
/// detached it (its interface, or the interface's network namespace, was deleted). None if the
/// pin is not an XDP link.
pub fn pinned_xdp_link_ifindex(pin: &Path) -> anyhow::Result<Option<u32>> {
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
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // struct bpf_link_info: type, id, prog_id (u32 each), then a union aligned to 8 whose xdp
    // member starts with ifindex (u32).
    let mut info = [0u8; 128];
    let mut attr = [0u8; 128];
    attr[..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: attr and info outlive the call; the kernel writes at most info_len bytes.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("link info of {}", pin.display()));
    }
    let word = |at: usize| u32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    Ok((word(0) == BPF_LINK_TYPE_XDP).then(|| word(16)))
}

/// The kernel's `frozen` flag of a map, read from its fdinfo.
pub fn map_is_frozen(fd: BorrowedFd<'_>) -> anyhow::Result<bool> {
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

fn ifreq(name: &str) -> anyhow::Result<libc::ifreq> {
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
pub fn interface_info(name: &str) -> anyhow::Result<InterfaceInfo> {
    let sock = ioctl_socket().context("socket for interface ioctls")?;
    let get = |request: libc::c_ulong| -> anyhow::Result<libc::ifreq> {
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

/// Whether `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> anyhow::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    // SAFETY: statfs fills the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(false);
    }
    Ok(st.f_type as libc::c_long == BPF_FS_MAGIC)
}

/// Mounts bpffs at `path` (the usual /sys/fs/bpf).
pub fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    let target = CString::new(path.as_os_str().as_encoded_bytes()).context("path with a NUL byte")?;
    let fstype = c"bpf";
    // SAFETY: all strings are NUL-terminated and outlive the call.
    if unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("mounting bpffs at {}", path.display()));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("'{text}' is not a MAC address (expected six hex bytes like 02:00:00:00:00:01)");
    }
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            bail!("'{text}' is not a MAC address (byte '{part}' is not two hex digits)");
        }
        *byte =
            u8::from_str_radix(part, 16).with_context(|| format!("'{text}' is not a MAC address (byte '{part}')"))?;
    }
    Ok(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_UPDATE_BATCH`: all of `keys[i] -> values[i]` in one call.
pub fn update_batch<K: aya::Pod, V: aya::Pod>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> anyhow::Result<()> {
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
pub fn lookup_raw(fd: BorrowedFd<'_>, key: &[u8], value_size: usize) -> anyhow::Result<Vec<u8>> {
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_errors() {
        let mac = parse_mac("02:0a:FF:00:10:01").unwrap();
        assert_eq!(format_mac(&mac), "02:0a:ff:00:10:01");
        for bad in ["", "02:0a:ff:00:10", "02:0a:ff:00:10:01:02", "02:0a:ff:00:10:zz", "2:0a:ff:00:10:01"] {
            let err = parse_mac(bad).unwrap_err().to_string();
            assert!(err.contains("is not a MAC address"), "{bad}: {err}");
        }
    }
}
