//! Real TCP from test code, for what a backend's decapsulator decides by (its socket lookup
//! and SYN-cookie check): a connection from a chosen local address, TCP segments built whole
//! (checksums included), raw sockets that send them and read the TCP segments the host
//! receives, and the SYN cookie a listener answers a SYN with. Everything works in the calling
//! thread's network namespace.
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use etherparse::{PacketBuilder, SlicedPacket, TcpSlice, TransportSlice};
use socket2::{Domain, Protocol, Socket, Type};

/// TCP flag bits, as in the header's flags byte.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// How long [`RawTcp::next`] waits for a segment.
pub const SNIFF_LIMIT: Duration = Duration::from_secs(5);

/// An IPv4 or IPv6 packet (the family of `from` and `to`) holding a TCP segment with these
/// numbers, `flags` (the bits above) and `payload`; the acknowledgment number is written
/// only with ACK.
pub fn segment(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let ip = match (from.ip(), to.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ipv4(a.octets(), b.octets(), 64),
        (IpAddr::V6(a), IpAddr::V6(b)) => PacketBuilder::ipv6(a.octets(), b.octets(), 64),
        (a, b) => panic!("{a} and {b} are of different families"),
    };
    let mut tcp = ip.tcp(from.port(), to.port(), seq, 64_240);
    if flags & SYN != 0 {
        tcp = tcp.syn();
    }
    if flags & PSH != 0 {
        tcp = tcp.psh();
    }
    if flags & FIN != 0 {
        tcp = tcp.fin();
    }
    if flags & RST != 0 {
        tcp = tcp.rst();
    }
    if flags & ACK != 0 {
        tcp = tcp.ack(ack);
    }
    let mut bytes = Vec::new();
    tcp.write(&mut bytes, payload).unwrap_or_else(|e| panic!("building a TCP segment: {e}"));
    bytes
}

/// A TCP connection to `to` from the local address `local` (any port).
pub fn connect_from(local: IpAddr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).context("socket")?;
    socket.bind(&SocketAddr::new(local, 0).into()).with_context(|| format!("binding to {local}"))?;
    socket.connect(&to.into()).with_context(|| format!("connecting from {local} to {to}"))?;
    Ok(socket.into())
}

fn raw_socket(ipv4: bool, protocol: libc::c_int) -> anyhow::Result<Socket> {
    let domain = if ipv4 { Domain::IPV4 } else { Domain::IPV6 };
    Socket::new(domain, Type::RAW, Some(Protocol::from(protocol))).context("raw socket")
}

/// Sends the whole IP packet `packet` (built by [`segment`]) through a raw socket.
pub fn send_raw(packet: &[u8], to: IpAddr) -> anyhow::Result<()> {
    let socket = raw_socket(to.is_ipv4(), libc::IPPROTO_RAW)?;
    let sent = socket.send_to(packet, &SocketAddr::new(to, 0).into()).with_context(|| format!("sending to {to}"))?;
    anyhow::ensure!(sent == packet.len(), "sent {sent} of {} bytes to {to}", packet.len());
    Ok(())
}

/// A TCP segment the host received, as [`RawTcp`] read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub source_port: u16,
    pub destination_port: u16,
    pub seq: u32,
    pub ack: u32,
    /// The flag bits above.
    pub flags: u8,
    pub payload_len: usize,
}

/// A raw TCP socket: a copy of every TCP segment of its family the host receives, from the
/// moment it is opened.
pub struct RawTcp {
    socket: Socket,
    ipv4: bool,
}

impl RawTcp {
    pub fn open(ipv4: bool) -> anyhow::Result<RawTcp> {
        let socket = raw_socket(ipv4, libc::IPPROTO_TCP)?;
        socket.set_read_timeout(Some(Duration::from_millis(100))).context("SO_RCVTIMEO")?;
        Ok(RawTcp { socket, ipv4 })
    }

    /// The first segment received (since it was opened or last read) that `wanted` takes,
    /// within [`SNIFF_LIMIT`].
    pub fn next(&self, mut wanted: impl FnMut(&Segment) -> bool) -> anyhow::Result<Segment> {
        let deadline = Instant::now() + SNIFF_LIMIT;
        let mut buffer = [0u8; 2048];
        while Instant::now() < deadline {
            let Ok(n) = (&self.socket).read(&mut buffer) else { continue };
            // IPv4 raw sockets deliver the IP header too, IPv6 ones the segment alone.
            let tcp = if self.ipv4 {
                match SlicedPacket::from_ip(&buffer[..n]).map(|p| p.transport) {
                    Ok(Some(TransportSlice::Tcp(tcp))) => tcp,
                    _ => continue,
                }
            } else {
                match TcpSlice::from_slice(&buffer[..n]) {
                    Ok(tcp) => tcp,
                    Err(_) => continue,
                }
            };
            let flags = [(tcp.fin(), FIN), (tcp.syn(), SYN), (tcp.rst(), RST), (tcp.psh(), PSH), (tcp.ack(), ACK)]
                .iter()
                .filter(|(set, _)| *set)
                .fold(0, |all, (_, bit)| all | bit);
            let segment = Segment {
                source_port: tcp.source_port(),
                destination_port: tcp.destination_port(),
                seq: tcp.sequence_number(),
                ack: tcp.acknowledgment_number(),
                flags,
                payload_len: tcp.payload().len(),
            };
            if wanted(&segment) {
                return Ok(segment);
            }
        }
        bail!("no such TCP segment within {SNIFF_LIMIT:?}")
    }
}

/// Sends a SYN `client` -> `server` (sequence `isn`) through a raw socket and returns the
/// SYN-ACK's sequence number: with `net.ipv4.tcp_syncookies=2` in the namespace, a SYN cookie
/// (valid for one to two minutes). `client` must be a local address without a socket on that
/// port: its stack answers the SYN-ACK with a reset, which a listener ignores, so the handshake
/// is never completed and only the cookie vouches for the flow.
pub fn syn_cookie(client: SocketAddr, server: SocketAddr, isn: u32) -> anyhow::Result<u32> {
    let replies = RawTcp::open(client.is_ipv4())?;
    send_raw(&segment(client, server, isn, 0, SYN, &[]), server.ip())?;
    let reply = replies
        .next(|s| {
            s.flags & (SYN | ACK) == SYN | ACK
                && (s.source_port, s.destination_port) == (server.port(), client.port())
                && s.ack == isn.wrapping_add(1)
        })
        .with_context(|| format!("waiting for the SYN-ACK from {server} to {client}"))?;
    Ok(reply.seq)
}
