//! `ballast lab serve` (hidden): a backend's real server. Bound to the VIPs on the backend's
//! loopback, it answers every TCP request line with the backend's name (closing the
//! connection after it unless the request asks to keep it open, [`KEEP_OPEN`]), and every
//! UDP datagram with the name, and bulk transfers either way ([`UPLOAD`], [`DOWNLOAD`]).
//! The replies leave from the VIP straight to the client (direct server return): the load
//! balancer never sees them. On the backend's own addresses
//! it answers health checks (`ballast run`): an HTTP GET of [`HEALTH_PATH`] with 200.
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::Context as _;

use ballast::kernel::netns;

/// Printed on stdout once every socket is bound: `up` waits for it.
pub const READY: &str = "ready";
/// The path the health responder answers with 200 (any other: 404).
pub const HEALTH_PATH: &str = "/health";
/// A health check must send its request within this.
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The request of a one-shot TCP connection: answered, then the server closes.
pub const REQUEST: &[u8] = b"who?\n";
/// A TCP request line that starts with this is answered and the connection kept open for
/// the next request: long-lived connections ([`crate::Connections`]).
pub const KEEP_OPEN: &str = "who? keep open";
/// Longest TCP request line (newline included) the server reads; a longer one ends the connection.
pub(crate) const MAX_REQUEST_LEN: usize = 4096;
/// A TCP request line `upload N` is followed by N bytes; the server answers with one line,
/// `NAME N' CHECKSUM`: the N' bytes it got and their [`Checksum`], and closes.
pub const UPLOAD: &str = "upload";
/// A TCP request line `download N SEED` is answered with a line `NAME`, then N bytes of
/// [`transfer_bytes`]`(SEED, N)`; then the server closes.
pub const DOWNLOAD: &str = "download";
/// Largest transfer either way.
pub const MAX_TRANSFER_LEN: usize = 16 << 20;
/// During a transfer every read or write must make progress within this.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// A new connection must send its first request within this.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A kept connection may stay idle this long between requests (longer than any test holds one).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The backend's network namespace.
    #[arg(long)]
    pub netns: String,
    /// The name to answer with.
    #[arg(long)]
    pub name: String,
    /// A TCP address to listen on (repeatable).
    #[arg(long = "tcp")]
    pub tcp: Vec<SocketAddr>,
    /// A UDP address to answer on (repeatable).
    #[arg(long = "udp")]
    pub udp: Vec<SocketAddr>,
    /// An address to answer HTTP health checks on (repeatable): GET /health is 200.
    #[arg(long = "http")]
    pub http: Vec<SocketAddr>,
}

fn listen(addresses: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    addresses.iter().map(|addr| TcpListener::bind(addr).with_context(|| format!("listening on TCP {addr}"))).collect()
}

pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    // Threads spawned after this inherit the namespace.
    netns::enter(&args.netns)?;
    let listeners = listen(&args.tcp)?;
    let health = listen(&args.http)?;
    let sockets = args
        .udp
        .iter()
        .map(|addr| UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{READY}").and_then(|()| stdout.flush()).context("signalling readiness")?;
    drop(stdout);
    let reply = format!("{}\n", args.name);
    std::thread::scope(|s| {
        for listener in &listeners {
            s.spawn(|| answer_tcp(listener, reply.as_bytes()));
        }
        for socket in &sockets {
            s.spawn(|| answer_udp(socket, reply.as_bytes()));
        }
        for listener in &health {
            s.spawn(|| answer_health(listener, &reply));
        }
    });
    Ok(())
}

/// Each connection on a thread of its own: long-lived connections wait there for their next
/// request while others come and go.
fn answer_tcp(listener: &TcpListener, reply: &[u8]) {
    for stream in listener.incoming() {
        let spawned = stream.and_then(|stream| {
            let reply = reply.to_vec();
            std::thread::Builder::new().spawn(move || {
                if let Err(err) = answer_connection(&stream, &reply) {
                    eprintln!("tcp: {err}");
                }
            })
        });
        if let Err(err) = spawned {
            eprintln!("tcp: {err}");
        }
    }
}

/// Answers each request line with the name; after the last (one that does not start with
/// [`KEEP_OPEN`]) the server closes first, so the client's end of the flow is free again at
/// once and the same source port can be used for the next connection.
fn answer_connection(mut stream: &TcpStream, reply: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(FIRST_REQUEST_TIMEOUT))?;
    let mut requests = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        (&mut requests).take(MAX_REQUEST_LEN as u64).read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            // The client closed, or sent no line of a length we read.
            return Ok(());
        }
        if let Some(transfer) = Transfer::parse(&line) {
            stream.set_read_timeout(Some(TRANSFER_TIMEOUT))?;
            stream.set_write_timeout(Some(TRANSFER_TIMEOUT))?;
            return transfer.serve(&mut requests, stream, reply);
        }
        stream.write_all(reply)?;
        if !line.starts_with(KEEP_OPEN.as_bytes()) {
            return Ok(());
        }
        stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    }
}

/// A bulk transfer a request line asks for.
enum Transfer {
    Upload { len: usize },
    Download { len: usize, seed: u64 },
}

impl Transfer {
    fn parse(line: &[u8]) -> Option<Transfer> {
        let line = std::str::from_utf8(line).ok()?;
        let mut words = line.split_whitespace();
        let (kind, len) = (words.next()?, words.next()?.parse().ok().filter(|n| *n <= MAX_TRANSFER_LEN)?);
        let transfer = match kind {
            UPLOAD => Transfer::Upload { len },
            DOWNLOAD => Transfer::Download { len, seed: words.next()?.parse().ok()? },
            _ => return None,
        };
        words.next().is_none().then_some(transfer)
    }

    /// Reads the upload from `requests` (what follows the request line) or writes the
    /// download to `stream`; `reply` is the name and a newline.
    fn serve(self, requests: &mut impl std::io::BufRead, mut stream: &TcpStream, reply: &[u8]) -> std::io::Result<()> {
        let name = String::from_utf8_lossy(reply.strip_suffix(b"\n").unwrap_or(reply)).into_owned();
        match self {
            Transfer::Upload { len } => {
                let (mut got, mut checksum) = (0, Checksum::new());
                let mut body = requests.take(len as u64);
                loop {
                    let chunk = body.fill_buf()?;
                    if chunk.is_empty() {
                        break;
                    }
                    checksum.update(chunk);
                    let n = chunk.len();
                    got += n;
                    body.consume(n);
                }
                stream.write_all(format!("{name} {got} {:016x}\n", checksum.value()).as_bytes())
            }
            Transfer::Download { len, seed } => {
                stream.write_all(reply)?;
                stream.write_all(&transfer_bytes(seed, len))
            }
        }
    }
}

/// FNV-1a (64 bits) over a transfer's bytes, in order: what both ends compare.
#[derive(Clone, Copy, Debug)]
pub struct Checksum(u64);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn value(&self) -> u64 {
        self.0
    }

    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut checksum = Checksum::new();
        checksum.update(bytes);
        checksum.value()
    }
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum::new()
    }
}

/// `len` bytes that differ with `seed` and along the way (xorshift64), so that a lost,
/// repeated or misplaced segment changes what arrives.
pub fn transfer_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

fn answer_udp(socket: &UdpSocket, reply: &[u8]) {
    let mut buf = [0u8; 2048];
    loop {
        let answered = socket.recv_from(&mut buf).and_then(|(_, client)| socket.send_to(reply, client));
        if let Err(err) = answered {
            eprintln!("udp: {err}");
        }
    }
}

/// HTTP/1.0 health checks, one at a time: 200 with the name for GET [`HEALTH_PATH`], else 404.
fn answer_health(listener: &TcpListener, name: &str) {
    for stream in listener.incoming() {
        if let Err(err) = stream.and_then(|stream| answer_health_check(stream, name)) {
            eprintln!("http: {err}");
        }
    }
}

fn answer_health_check(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HEALTH_READ_TIMEOUT))?;
    // The request line is all that matters; it comes in the first segment.
    let mut request = [0u8; 1024];
    let n = stream.read(&mut request)?;
    let line = String::from_utf8_lossy(&request[..n]);
    let wanted = line.strip_prefix("GET ").and_then(|rest| rest.split_whitespace().next()) == Some(HEALTH_PATH);
    let response = if wanted {
        format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{name}", name.len())
    } else {
        "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
    };
    stream.write_all(response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_requests_parse_and_others_do_not() {
        assert!(matches!(Transfer::parse(b"upload 200000\n"), Some(Transfer::Upload { len: 200_000 })));
        assert!(matches!(Transfer::parse(b"download 5 7\n"), Some(Transfer::Download { len: 5, seed: 7 })));
        let too_long = format!("upload {}\n", MAX_TRANSFER_LEN + 1);
        for other in ["who?\n", KEEP_OPEN, "upload\n", "upload x\n", "download 5\n", "upload 5 6\n", &too_long] {
            assert!(Transfer::parse(other.as_bytes()).is_none(), "{other:?}");
        }
    }

    #[test]
    fn checksum_is_fnv1a_and_sees_order() {
        // FNV-1a 64 of "a" (the published test vector).
        assert_eq!(Checksum::of(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(Checksum::of(b"ab"), Checksum::of(b"ba"));
        let bytes = transfer_bytes(30_000, 1000);
        let mut pieces = Checksum::new();
        bytes.chunks(7).for_each(|piece| pieces.update(piece));
        assert_eq!(pieces.value(), Checksum::of(&bytes));
    }

    #[test]
    fn transfer_bytes_follow_their_seed() {
        assert_eq!(transfer_bytes(1, 1001).len(), 1001);
        assert_eq!(transfer_bytes(1, 64)[..], transfer_bytes(1, 1001)[..64]);
        assert_ne!(transfer_bytes(1, 64), transfer_bytes(2, 64));
    }
}
