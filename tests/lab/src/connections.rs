//! Long-lived TCP connections from the client to the VIPs, as an operator's clients keep
//! them: each opened from a fixed source port (so its flow is known in advance and the
//! reference model says where it goes, [`Flow::predicted_backend`]), one exchange when it
//! opens, and one more on the same connection after each step a test takes (a swap). Each
//! exchange says whether the backend that answered first answered again
//! ([`Outcome::Same`]), another one did ([`Outcome::Moved`]) or the connection is gone
//! ([`Outcome::Reset`]: reset, closed, or no answer in time).
//!
//! Many connections over few threads: they are opened by a few threads in the client's
//! namespace, and an exchange writes on every connection at once and collects the answers
//! in one poll(2) loop, bounded by [`EXCHANGE_TIMEOUT`].
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read as _, Write as _};
use std::net::TcpStream;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::client::{connect_from, on_threads_in};
use super::serve::{KEEP_OPEN, MAX_REQUEST_LEN};
use super::{Flow, Reply};

/// Every answer of an exchange must come within this (a lost segment is sent again within
/// a few hundred milliseconds); a connection without one counts as reset.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes of each request, newline included: a full-size segment from the client (MTU 1500,
/// TCP timestamps: 1448 bytes of data over IPv4; over IPv6 1428 and then the rest), so that
/// every exchange also carries the largest outer header a load balancer adds to it.
pub const REQUEST_LEN: usize = 1448;
const _: () = assert!(REQUEST_LEN <= MAX_REQUEST_LEN, "the server reads requests up to MAX_REQUEST_LEN");
/// Longest answer: a backend's name and a newline.
const MAX_ANSWER_LEN: usize = 64;

/// What one exchange on a connection found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The backend that answered when the connection opened answered again.
    Same,
    /// Another backend answered (its name).
    Moved(String),
    /// The connection is gone: reset, closed by the other end, or no answer within
    /// [`EXCHANGE_TIMEOUT`] (why).
    Reset(String),
}

/// A connection after an exchange.
#[derive(Clone, Debug)]
pub struct Checked {
    pub flow: Flow,
    /// The backend that answered when it opened.
    pub backend: String,
    pub outcome: Outcome,
}

/// What one exchange on every open connection found, in the order they were opened.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub connections: Vec<Checked>,
}

impl Exchange {
    /// The flows of the connections that are gone.
    pub fn reset(&self) -> BTreeSet<Flow> {
        self.flows_where(|o| matches!(o, Outcome::Reset(_)))
    }

    /// The flows of the connections another backend answered.
    pub fn moved(&self) -> BTreeSet<Flow> {
        self.flows_where(|o| matches!(o, Outcome::Moved(_)))
    }

    pub fn same(&self) -> usize {
        self.connections.iter().filter(|c| c.outcome == Outcome::Same).count()
    }

    fn flows_where(&self, wanted: impl Fn(&Outcome) -> bool) -> BTreeSet<Flow> {
        self.connections.iter().filter(|c| wanted(&c.outcome)).map(|c| c.flow).collect()
    }

    /// "240 connections: 180 same backend, 60 reset, 0 moved; e.g. ...": for messages.
    pub fn summary(&self) -> String {
        let example = self.connections.iter().find(|c| c.outcome != Outcome::Same);
        let example = example.map_or(String::new(), |c| {
            format!(
                "; e.g. {}:{} -> {} (first {}): {:?}",
                c.flow.source().ip(),
                c.flow.sport,
                c.flow.vip,
                c.backend,
                c.outcome
            )
        });
        format!(
            "{} connections: {} same backend, {} reset, {} moved{example}",
            self.connections.len(),
            self.same(),
            self.reset().len(),
            self.moved().len()
        )
    }
}

/// An open connection and the backend that answered when it opened.
struct Connection {
    flow: Flow,
    backend: String,
    stream: TcpStream,
}

/// Long-lived connections from the client's namespace (see the module's documentation).
/// Dropping it closes them.
pub struct Connections {
    ns: String,
    threads: usize,
    open: Vec<Connection>,
}

impl Connections {
    /// No connection yet; they will be opened from the client namespace `ns` by `threads` threads.
    pub fn new(ns: &str, threads: usize) -> Connections {
        Connections { ns: ns.to_owned(), threads, open: Vec::new() }
    }

    /// The connections open (answered at their last exchange).
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The flows of the open connections.
    pub fn flows(&self) -> Vec<Flow> {
        self.open.iter().map(|c| c.flow).collect()
    }

    /// Opens one connection per flow, from its source port, and exchanges once on each:
    /// where each landed (its reply, in the order of `flows`). Those answered stay open.
    pub fn open(&mut self, flows: &[Flow]) -> anyhow::Result<Vec<Reply>> {
        let connected =
            on_threads_in(&self.ns, flows, self.threads, |flow| connect(flow).map_err(|e| format!("{e:#}")))?;
        let streams: Vec<&TcpStream> = connected.iter().filter_map(|c| c.as_ref().ok()).collect();
        let mut answers = exchange_all(&streams)?.into_iter();
        let mut replies = Vec::with_capacity(flows.len());
        for (flow, connected) in flows.iter().zip(connected) {
            let answer = match connected {
                Ok(stream) => {
                    let answer = answers.next().context("an answer per connection")?;
                    if let Ok(backend) = &answer {
                        self.open.push(Connection { flow: *flow, backend: backend.clone(), stream });
                    }
                    answer
                }
                Err(why) => Err(why),
            };
            replies.push(Reply { flow: *flow, answer });
        }
        Ok(replies)
    }

    /// One more exchange on every open connection. Those not answered by the backend that
    /// answered first are closed (a connection gone stays gone).
    pub fn exchange(&mut self) -> anyhow::Result<Exchange> {
        let streams: Vec<&TcpStream> = self.open.iter().map(|c| &c.stream).collect();
        let answers = exchange_all(&streams)?;
        let connections: Vec<Checked> = self
            .open
            .iter()
            .zip(answers)
            .map(|(c, answer)| {
                let outcome = match answer {
                    Ok(name) if name == c.backend => Outcome::Same,
                    Ok(name) => Outcome::Moved(name),
                    Err(why) => Outcome::Reset(why),
                };
                Checked { flow: c.flow, backend: c.backend.clone(), outcome }
            })
            .collect();
        let mut outcomes = connections.iter().map(|c| &c.outcome);
        self.open.retain(|_| outcomes.next() == Some(&Outcome::Same));
        Ok(Exchange { connections })
    }
}

/// Connects from the flow's source port (the calling thread is in the client's namespace),
/// non-blocking from then on, requests sent at once.
fn connect(flow: &Flow) -> anyhow::Result<TcpStream> {
    let stream = connect_from(flow.source(), flow.vip)?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    stream.set_nonblocking(true).context("O_NONBLOCK")?;
    Ok(stream)
}

/// The request: [`KEEP_OPEN`], padded to [`REQUEST_LEN`] with a newline.
fn request() -> Vec<u8> {
    let mut request = format!("{KEEP_OPEN}{}", " ".repeat(REQUEST_LEN - KEEP_OPEN.len() - 1)).into_bytes();
    request.push(b'\n');
    request
}

/// Where one connection's exchange stands.
struct Pending {
    unsent: usize,
    received: Vec<u8>,
    answer: Option<Result<String, String>>,
}

/// Sends a request on every (non-blocking) stream and waits for every answer, or until
/// [`EXCHANGE_TIMEOUT`]: each stream's answer (a backend's name) or why there is none.
fn exchange_all(streams: &[&TcpStream]) -> anyhow::Result<Vec<Result<String, String>>> {
    let request = request();
    let deadline = Instant::now() + EXCHANGE_TIMEOUT;
    let mut pending: Vec<Pending> =
        streams.iter().map(|_| Pending { unsent: request.len(), received: Vec::new(), answer: None }).collect();
    loop {
        let waiting: Vec<usize> = (0..streams.len()).filter(|&i| pending[i].answer.is_none()).collect();
        let left = deadline.saturating_duration_since(Instant::now());
        if waiting.is_empty() {
            break;
        }
        if left.is_zero() {
            for &i in &waiting {
                pending[i].answer = Some(Err(format!("no answer within {EXCHANGE_TIMEOUT:?}")));
            }
            break;
        }
        let mut fds: Vec<libc::pollfd> = waiting
            .iter()
            .map(|&i| {
                let output = if pending[i].unsent > 0 { libc::POLLOUT } else { 0 };
                libc::pollfd { fd: streams[i].as_raw_fd(), events: libc::POLLIN | output, revents: 0 }
            })
            .collect();
        let timeout_ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: fds is a valid array of fds.len() pollfd structures.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err).context("poll(2) on the connections");
        }
        for (fd, &i) in fds.iter().zip(&waiting).filter(|(fd, _)| fd.revents != 0) {
            let state = &mut pending[i];
            if fd.revents & libc::POLLOUT != 0 && state.unsent > 0 {
                let mut stream = streams[i];
                match stream.write(&request[request.len() - state.unsent..]) {
                    Ok(n) => state.unsent -= n,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {}
                    Err(err) => state.answer = Some(Err(format!("sending: {err}"))),
                }
            }
            if state.answer.is_none() && fd.revents & !libc::POLLOUT != 0 {
                state.answer = receive(streams[i], &mut state.received);
            }
        }
    }
    Ok(pending.into_iter().map(|p| p.answer.unwrap_or_else(|| Err("no answer".to_owned()))).collect())
}

/// Reads what `stream` has: the answer once a line is complete, an error if the
/// connection is gone, None while the line is still incomplete.
fn receive(mut stream: &TcpStream, received: &mut Vec<u8>) -> Option<Result<String, String>> {
    let mut buf = [0u8; MAX_ANSWER_LEN];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(Err("closed by the other end (EOF)".to_owned())),
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                if let Some(end) = received.iter().position(|&b| b == b'\n') {
                    return Some(Ok(String::from_utf8_lossy(&received[..end]).trim().to_owned()));
                }
                if received.len() > MAX_ANSWER_LEN {
                    return Some(Err(format!("no answer line: {:?}", String::from_utf8_lossy(received))));
                }
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => return None,
            Err(err) if err.kind() == ErrorKind::Interrupted => {}
            Err(err) => return Some(Err(format!("receiving: {err}"))),
        }
    }
}
