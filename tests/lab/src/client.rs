//! The lab's client: real TCP connections and UDP requests to the VIPs from fixed source
//! ports, so that a flow (source address and port, VIP, protocol) can be sent again and
//! compared, and predicted with the reference model.
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};

use super::serve::{transfer_bytes, Checksum, DOWNLOAD, MAX_TRANSFER_LEN, REQUEST, UPLOAD};
use super::{backend_name, client_address, Lab, Role};
use ballast::generation::{config::Protocol, Generation};
use ballast::kernel::netns;

/// A TCP connection must be set up and answered within this.
pub(crate) const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// A UDP request must be answered within this: a reply must come for every request.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(1);
/// A transfer reads and writes in pieces of this, so that its deadline bounds the whole.
const TRANSFER_PIECE: usize = 64 << 10;
/// How long a source port may still be held after its socket was closed (see [`when_port_free`]).
const PORT_BUSY_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub protocol: Protocol,
    pub vip: SocketAddr,
    pub sport: u16,
}

impl Flow {
    /// The client's address and port this flow leaves from.
    pub fn source(&self) -> SocketAddr {
        SocketAddr::new(client_address(self.vip.ip()), self.sport)
    }

    /// The backend the reference model sends this flow to under `generation`.
    pub fn predicted_backend(&self, generation: &Generation) -> Option<IpAddr> {
        let source = self.source().ip();
        generation.predict_backend(source, self.vip.ip(), self.sport, self.vip.port(), self.protocol.number())
    }

    /// The name of that backend's server.
    pub fn predicted_name(&self, generation: &Generation) -> Option<String> {
        self.predicted_backend(generation).and_then(backend_name)
    }
}

/// One flow for each source port in `ports`.
pub fn flows(protocol: Protocol, vip: SocketAddr, ports: Range<u16>) -> Vec<Flow> {
    ports.map(|sport| Flow { protocol, vip, sport }).collect()
}

/// A request and what came back: the answering backend's name, or why none did.
#[derive(Clone, Debug)]
pub struct Reply {
    pub flow: Flow,
    pub answer: Result<String, String>,
}

impl Reply {
    pub fn backend(&self) -> Option<&str> {
        self.answer.as_deref().ok()
    }
}

/// Answers per backend name.
pub fn by_backend(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in replies.iter().filter_map(Reply::backend) {
        *counts.entry(name.to_owned()).or_default() += 1;
    }
    counts
}

pub fn failures(replies: &[Reply]) -> Vec<&Reply> {
    replies.iter().filter(|r| r.answer.is_err()).collect()
}

/// Sends one request of `flow` (the calling thread is in the client's namespace).
pub fn request(flow: &Flow) -> anyhow::Result<String> {
    let name = match flow.protocol {
        Protocol::Tcp => tcp_request(flow.source(), flow.vip),
        Protocol::Udp => udp_request(flow.source(), flow.vip),
    }?;
    Ok(name.trim().to_owned())
}

fn reply(flow: &Flow) -> Reply {
    Reply { flow: *flow, answer: request(flow).map_err(|e| format!("{e:#}")) }
}

/// Sends one request per flow from the client namespace `ns`, over `threads` threads;
/// the replies in the order of `flows`.
pub fn run(ns: &str, flows: &[Flow], threads: usize) -> anyhow::Result<Vec<Reply>> {
    on_threads_in(ns, flows, threads, reply)
}

/// `work` on each of `items`, over `threads` threads that entered the network namespace `ns`;
/// the results in the order of `items`.
pub(crate) fn on_threads_in<I: Sync, T: Send>(
    ns: &str,
    items: &[I],
    threads: usize,
    work: impl Fn(&I) -> T + Sync,
) -> anyhow::Result<Vec<T>> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let work = &work;
    std::thread::scope(|s| {
        let workers: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> anyhow::Result<Vec<T>> {
                    netns::enter(ns)?;
                    Ok(part.iter().map(work).collect())
                })
            })
            .collect();
        let mut results = Vec::with_capacity(items.len());
        for worker in workers {
            results.extend(worker.join().map_err(|_| anyhow!("a client thread panicked"))??);
        }
        Ok(results)
    })
}

/// Continuous traffic: each thread sends its share of the flows, over and over, until
/// stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<anyhow::Result<Vec<Reply>>>>,
}

impl Load {
    pub fn start(ns: &str, flows: &[Flow], threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let chunk = flows.len().div_ceil(threads.max(1)).max(1);
        let workers = flows
            .chunks(chunk)
            .map(|part| {
                let (ns, part, stop) = (ns.to_owned(), part.to_vec(), Arc::clone(&stop));
                std::thread::spawn(move || -> anyhow::Result<Vec<Reply>> {
                    netns::enter(&ns)?;
                    let mut replies = Vec::new();
                    for flow in part.iter().cycle() {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        replies.push(reply(flow));
                    }
                    Ok(replies)
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the traffic; every reply received since the start.
    pub fn stop(self) -> anyhow::Result<Vec<Reply>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut replies = Vec::new();
        for worker in self.workers {
            replies.extend(worker.join().map_err(|_| anyhow!("a client thread panicked"))??);
        }
        Ok(replies)
    }
}

/// Which way a bulk transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client to the backend, through the load balancer (its every segment).
    Upload,
    /// From the backend to the client, by direct server return.
    Download,
}

impl Lab {
    /// One bulk transfer of `len` bytes per flow (TCP), all at once from the client, each
    /// within `limit`: the answering backend's name, or why the transfer failed (not all
    /// bytes, or other bytes, arrived), in the order of `flows`.
    pub fn transfer(
        &self,
        flows: &[Flow],
        direction: Direction,
        len: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<Reply>> {
        anyhow::ensure!(len <= MAX_TRANSFER_LEN, "{len} bytes: transfers go up to {MAX_TRANSFER_LEN}");
        on_threads_in(&self.namespace(Role::Client), flows, flows.len(), |flow| {
            let answer = match direction {
                Direction::Upload => upload(flow, len, limit),
                Direction::Download => download(flow, len, limit),
            };
            Reply { flow: *flow, answer: answer.map_err(|e| format!("{e:#}")) }
        })
    }
}

/// A connection of `flow` for a transfer: every read and write bounded by what is left until
/// `deadline` ([`Deadline::bound`]).
struct Deadline {
    at: Instant,
    limit: Duration,
}

impl Deadline {
    fn bound(&self, stream: &TcpStream) -> anyhow::Result<()> {
        let left = self.at.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "not done within {:?}", self.limit);
        stream.set_read_timeout(Some(left)).and_then(|()| stream.set_write_timeout(Some(left))).context("timeouts")
    }

    /// `err` of a read or write bounded by [`Deadline::bound`], saying so when time ran out.
    fn error(&self, err: std::io::Error) -> anyhow::Error {
        if matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            anyhow!("not done within {:?}", self.limit)
        } else {
            err.into()
        }
    }
}

/// Sends `len` bytes (of [`transfer_bytes`], seeded with the source port) to the VIP:
/// the backend's name once it answered that it got them all, with their checksum.
fn upload(flow: &Flow, len: usize, limit: Duration) -> anyhow::Result<String> {
    let (source, vip) = (flow.source(), flow.vip);
    let deadline = Deadline { at: Instant::now() + limit, limit };
    let mut stream = connect_from(source, vip)?;
    let body = transfer_bytes(u64::from(flow.sport), len);
    let mut request = format!("{UPLOAD} {len}\n").into_bytes();
    request.extend_from_slice(&body);
    for (sent, piece) in request.chunks(TRANSFER_PIECE).enumerate() {
        deadline.bound(&stream)?;
        stream
            .write_all(piece)
            .map_err(|e| deadline.error(e))
            .with_context(|| format!("TCP {source} -> {vip}: uploading (after {} bytes)", sent * TRANSFER_PIECE))?;
    }
    deadline.bound(&stream)?;
    let mut answer = String::new();
    (&stream)
        .take(256)
        .read_to_string(&mut answer)
        .map_err(|e| deadline.error(e))
        .with_context(|| format!("TCP {source} -> {vip}: reading the answer"))?;
    let words: Vec<&str> = answer.split_whitespace().collect();
    let expected = [len.to_string(), format!("{:016x}", Checksum::of(&body))];
    match words.as_slice() {
        [name, got, checksum] if [*got, *checksum] == expected => Ok((*name).to_owned()),
        _ => anyhow::bail!(
            "TCP {source} -> {vip}: uploaded {len} bytes, checksum {}; the answer: {answer:?}",
            expected[1]
        ),
    }
}

/// Asks the VIP for `len` bytes (of [`transfer_bytes`], seeded with the source port): the
/// backend's name once they all arrived, as sent.
fn download(flow: &Flow, len: usize, limit: Duration) -> anyhow::Result<String> {
    let (source, vip) = (flow.source(), flow.vip);
    let deadline = Deadline { at: Instant::now() + limit, limit };
    let mut stream = connect_from(source, vip)?;
    let seed = u64::from(flow.sport);
    deadline.bound(&stream)?;
    stream
        .write_all(format!("{DOWNLOAD} {len} {seed}\n").as_bytes())
        .with_context(|| format!("TCP {source} -> {vip}: asking"))?;
    // The name's line, the bytes, and one more to see whether more came.
    let most = (len + 65) as u64;
    let mut received = Vec::with_capacity(len + 65);
    let mut piece = vec![0u8; TRANSFER_PIECE];
    loop {
        deadline.bound(&stream).with_context(|| format!("TCP {source} -> {vip}: {} bytes received", received.len()))?;
        let n = (&stream)
            .take(most - received.len() as u64)
            .read(&mut piece)
            .map_err(|e| deadline.error(e))
            .with_context(|| format!("TCP {source} -> {vip}: downloading ({} bytes received)", received.len()))?;
        if n == 0 {
            break;
        }
        received.extend_from_slice(&piece[..n]);
    }
    let end =
        received.iter().position(|&b| b == b'\n').with_context(|| format!("TCP {source} -> {vip}: no name line"))?;
    let (body, expected) = (&received[end + 1..], transfer_bytes(seed, len));
    anyhow::ensure!(
        body == expected.as_slice(),
        "TCP {source} -> {vip}: {} bytes arrived ({len} expected), checksum {:016x} ({:016x} expected)",
        body.len(),
        Checksum::of(body),
        Checksum::of(&expected)
    );
    Ok(String::from_utf8_lossy(&received[..end]).trim().to_owned())
}

/// Connects from `source` (a fixed port) to `vip`, sends one request and reads the answer
/// to its end (the server closes after it).
fn tcp_request(source: SocketAddr, vip: SocketAddr) -> anyhow::Result<String> {
    let mut stream = connect_from(source, vip)?;
    stream.set_read_timeout(Some(TCP_TIMEOUT)).context("setting the read timeout")?;
    stream.write_all(REQUEST).with_context(|| format!("TCP {source} -> {vip}: sending the request"))?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).with_context(|| format!("TCP {source} -> {vip}: reading the answer"))?;
    Ok(answer)
}

fn udp_request(source: SocketAddr, vip: SocketAddr) -> anyhow::Result<String> {
    let socket = when_port_free(|| UdpSocket::bind(source)).with_context(|| format!("binding UDP {source}"))?;
    // Connected: only datagrams from the VIP itself count as the answer (direct server return).
    socket.connect(vip).with_context(|| format!("UDP {source} -> {vip}"))?;
    socket.set_read_timeout(Some(UDP_TIMEOUT)).context("setting the read timeout")?;
    socket.send(b"who are you?").with_context(|| format!("UDP {source} -> {vip}: sending"))?;
    let mut buf = [0u8; 512];
    let n =
        socket.recv(&mut buf).with_context(|| format!("UDP {source} -> {vip}: no answer within {UDP_TIMEOUT:?}"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A TCP connection from a fixed source port.
pub(crate) fn connect_from(source: SocketAddr, vip: SocketAddr) -> anyhow::Result<TcpStream> {
    when_port_free(|| try_connect_from(source, vip)).with_context(|| format!("TCP {source} -> {vip}: connecting"))
}

/// Runs `attempt` until the source port it binds is free. A port may still be held for a
/// moment after its socket was closed: by the previous connection of the same flow (its
/// last ACK in flight), or by a child process forked (to run a command) before it execs
/// and lets go of the parent's descriptors.
fn when_port_free<T>(mut attempt: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + PORT_BUSY_TIMEOUT;
    loop {
        match attempt() {
            Err(err) if port_busy(&err) && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            result => return result,
        }
    }
}

fn port_busy(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL))
}

fn try_connect_from(source: SocketAddr, vip: SocketAddr) -> std::io::Result<TcpStream> {
    let domain = if source.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); owned at once.
    let raw = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_option(&fd, libc::SO_REUSEADDR, &1i32)?;
    // Bounds connect(2) too (Linux).
    let timeout = libc::timeval { tv_sec: TCP_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    set_option(&fd, libc::SO_SNDTIMEO, &timeout)?;
    let (addr, len) = sockaddr(source);
    // SAFETY: addr is a valid socket address of length len.
    if unsafe { libc::bind(fd.as_raw_fd(), (&addr as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (addr, len) = sockaddr(vip);
    // SAFETY: as above.
    if unsafe { libc::connect(fd.as_raw_fd(), (&addr as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(fd))
}

fn set_option<T>(fd: &OwnedFd, name: i32, value: &T) -> std::io::Result<()> {
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: value points at a T of the length given.
    if unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, name, (value as *const T).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and aligned for any socket address.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
