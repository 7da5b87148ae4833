//! The Prometheus endpoint of `ballast run`: traffic counters read from the kernel at each
//! scrape (per VIP, per backend, per verdict reason), and the daemon's own state (health,
//! fail-open, swaps, reloads, drift, the running generation's digest).
//!
//! Its clients are network peers, so nothing they do may cost the daemon more than a bounded
//! share of its resources: at most [`MAX_CONNECTIONS`] connections at once (when full, the
//! oldest one still waiting for its request makes room for the new one; when none waits, the
//! new one is closed at once), [`REQUEST_TIMEOUT`] to send a request of at most
//! [`MAX_REQUEST`] bytes, [`WRITE_TIMEOUT`] to take the answer, and a pause, not a spin, when
//! accepting fails for want of descriptors or memory.
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
};

use super::health::BackendId;
use crate::{generation::config::HealthVia, ops::status, state::StateDir};

/// One backend's health and how it was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub healthy: bool,
    pub via: HealthVia,
}

/// What the daemon knows that the kernel does not.
#[derive(Debug, Default)]
pub struct DaemonState {
    pub healthy: BTreeMap<BackendId, BackendHealth>,
    pub fail_open: BTreeMap<String, bool>,
    pub swaps: BTreeMap<&'static str, u64>,
    pub reloads: BTreeMap<&'static str, u64>,
    /// Changes of what runs that the daemon did not make, by kind (swapped, detached, link_dead).
    pub drift: BTreeMap<&'static str, u64>,
    /// True while what runs is not the generation the daemon wants (drift not yet undone).
    pub drifted: bool,
    /// Health checks this host could not make (no descriptor, no memory, no local port).
    pub unchecked: u64,
    /// Health checks made, by how (tunnel, direct) and result (up, down, unchecked).
    pub checks: BTreeMap<(HealthVia, &'static str), u64>,
}

pub type SharedState = Arc<Mutex<DaemonState>>;

#[derive(Debug)]
struct BallastCollector {
    iface: String,
    state_dir: StateDir,
    state: SharedState,
    /// The highest value served per kernel counter series. Readers subtract pre-flight probes
    /// (`CounterDiscount`) once the swap that ran them has recorded them, so for that moment
    /// a raw counter can read a few packets high; a counter served must never go down.
    served: Mutex<BTreeMap<(&'static str, Labels), u64>>,
}

type Labels = Vec<(&'static str, String)>;

impl BallastCollector {
    fn monotonic(&self, name: &'static str, samples: Vec<(Labels, u64)>) -> Vec<(Labels, u64)> {
        let Ok(mut served) = self.served.lock() else { return samples };
        samples
            .into_iter()
            .map(|(labels, value)| {
                let highest = served.entry((name, labels.clone())).or_default();
                *highest = (*highest).max(value);
                (labels, *highest)
            })
            .collect()
    }
}

/// A counter family `name` with one sample per label set.
pub(crate) fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// One sample without labels (`name value`, not `name{} value`, which parsers refuse).
fn single(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
    is_counter: bool,
) -> Result<(), std::fmt::Error> {
    if is_counter {
        let metric = ConstCounter::new(value);
        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
    } else {
        let metric = ConstGauge::new(value as i64);
        metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    for (labels, value) in samples {
        ConstGauge::new(*value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for BallastCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The kernel side: what runs and what it counted. A scrape while nothing runs (or the
        // maps cannot be read) still serves the daemon's own metrics.
        if let Ok(status) = status::status(&self.state_dir, &self.iface) {
            let vips = &status.vips;
            let per_vip = |f: fn(&status::VipStatus) -> u64| -> Vec<(Labels, u64)> {
                vips.iter().map(|v| (vec![("vip", v.vip.clone())], f(v))).collect()
            };
            let vip_packets = self.monotonic("vip_packets", per_vip(|v| v.packets));
            counter(&mut encoder, "ballast_vip_packets", "Packets forwarded per VIP", &vip_packets)?;
            let vip_bytes = self.monotonic("vip_bytes", per_vip(|v| v.bytes));
            counter(&mut encoder, "ballast_vip_bytes", "Bytes (inner IP) forwarded per VIP", &vip_bytes)?;
            let per_backend = |f: fn(&status::BackendStatus) -> u64| -> Vec<(Labels, u64)> {
                vips.iter()
                    .flat_map(|v| {
                        v.backends
                            .iter()
                            .map(move |b| (vec![("vip", v.vip.clone()), ("backend", b.address.clone())], f(b)))
                    })
                    .collect()
            };
            counter(
                &mut encoder,
                "ballast_backend_packets",
                "Packets forwarded per backend",
                &self.monotonic("backend_packets", per_backend(|b| b.packets)),
            )?;
            counter(
                &mut encoder,
                "ballast_backend_bytes",
                "Bytes (inner IP) forwarded per backend",
                &self.monotonic("backend_bytes", per_backend(|b| b.bytes)),
            )?;
            let reasons = self.monotonic(
                "verdicts",
                status.reasons.iter().map(|(r, n)| (vec![("reason", (*r).to_owned())], *n)).collect(),
            );
            counter(
                &mut encoder,
                "ballast_verdicts",
                "Packets by verdict reason (see the README's data plane rules)",
                &reasons,
            )?;
            if let Some(digest) = &status.generation {
                gauge(
                    &mut encoder,
                    "ballast_generation_info",
                    "The running generation (value 1)",
                    &[(vec![("digest", digest.clone())], 1)],
                )?;
            }
            let hops = status.lineage.as_ref().map_or(0, |l| l.slots_with_hops as u64);
            single(
                &mut encoder,
                "ballast_lineage_slots",
                "Table slots of the running generation that carry hops for the second chance (0: settled)",
                hops,
                false,
            )?;
        }
        let Ok(state) = self.state.lock() else { return Ok(()) };
        let healthy: Vec<(Labels, i64)> = state
            .healthy
            .iter()
            .map(|(id, health)| {
                let labels = vec![
                    ("vip", id.vip.clone()),
                    ("backend", id.backend.to_string()),
                    ("via", health.via.name().to_owned()),
                ];
                (labels, i64::from(health.healthy))
            })
            .collect();
        gauge(
            &mut encoder,
            "ballast_backend_healthy",
            "1 if the backend passes its health check; via: tunnel (to the VIP, encapsulated) or direct",
            &healthy,
        )?;
        let fail_open: Vec<(Labels, i64)> =
            state.fail_open.iter().map(|(v, open)| (vec![("vip", v.clone())], i64::from(*open))).collect();
        gauge(
            &mut encoder,
            "ballast_vip_fail_open",
            "1 while too few backends are healthy and the VIP keeps its last good set",
            &fail_open,
        )?;
        let swaps: Vec<(Labels, u64)> =
            state.swaps.iter().map(|(c, n)| (vec![("cause", (*c).to_owned())], *n)).collect();
        counter(&mut encoder, "ballast_swaps", "Generations swapped in by the daemon, by cause", &swaps)?;
        let reloads: Vec<(Labels, u64)> =
            state.reloads.iter().map(|(r, n)| (vec![("result", (*r).to_owned())], *n)).collect();
        counter(&mut encoder, "ballast_config_reloads", "Config reloads, by result", &reloads)?;
        let drift: Vec<(Labels, u64)> =
            state.drift.iter().map(|(k, n)| (vec![("kind", (*k).to_owned())], *n)).collect();
        counter(
            &mut encoder,
            "ballast_drift",
            "Changes of what runs that the daemon did not make (then undid), by kind",
            &drift,
        )?;
        single(
            &mut encoder,
            "ballast_generation_drifted",
            "1 while what runs on the interface is not the generation the daemon wants",
            u64::from(state.drifted),
            false,
        )?;
        let checks: Vec<(Labels, u64)> = state
            .checks
            .iter()
            .map(|((via, result), n)| (vec![("via", via.name().to_owned()), ("result", (*result).to_owned())], *n))
            .collect();
        counter(
            &mut encoder,
            "ballast_health_checks",
            "Health checks made, by way (tunnel: to the VIP, encapsulated; direct) and result (up, down, unchecked)",
            &checks,
        )?;
        single(
            &mut encoder,
            "ballast_health_unchecked",
            "Health checks this host could not make (no descriptor, memory or local port); they count neither way",
            state.unchecked,
            true,
        )?;
        Ok(())
    }
}

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take the answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request (line and headers) read.
pub const MAX_REQUEST: usize = 8192;
/// Scrapes read the kernel's maps (a whole generation's tables) one at a time, at least this
/// far apart; a scrape that came while another waited is answered with that one's body (read
/// after it came). However many clients scrape, the health checks keep their CPU.
pub const SCRAPE_GAP: Duration = Duration::from_millis(100);
/// Pauses after accept(2) failed for want of descriptors or memory: from the first to the last.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// Connections the kernel queues before they are accepted.
const BACKLOG: u32 = 1024;

/// Binds the metrics address: at start, before the kernel is touched, so a taken address stops
/// the daemon at once. Needs the runtime (the listener registers with it).
pub fn bind(address: SocketAddr) -> crate::Result<TcpListener> {
    bind_for("--metrics", address)
}

/// [`bind`] for the command-line flag `flag` (named in the error).
pub fn bind_for(flag: &str, address: SocketAddr) -> crate::Result<TcpListener> {
    let bound = (|| {
        let socket = if address.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(address)?;
        socket.listen(BACKLOG)
    })();
    bound.map_err(|e| crate::other!("{flag} {address}: cannot listen there: {e}"))
}

/// The connections open, and those of them still waiting for their request (oldest first):
/// those are the ones a new connection may push out.
#[derive(Default)]
struct Connections {
    open: usize,
    waiting: VecDeque<Arc<Slot>>,
}

#[derive(Default)]
struct Slot {
    /// Told to close: a newer connection took its place.
    evicted: Notify,
    /// Its place was given away (it no longer counts as open).
    pushed_out: AtomicBool,
}

/// One admitted connection; dropping it frees its place.
struct Admitted {
    slot: Arc<Slot>,
    connections: Arc<Mutex<Connections>>,
}

impl Admitted {
    /// Admits a new connection, pushing out the oldest one still waiting for its request when
    /// all places are taken; None when every place serves a request.
    fn new(connections: &Arc<Mutex<Connections>>) -> Option<Admitted> {
        let mut c = connections.lock().ok()?;
        if c.open >= MAX_CONNECTIONS {
            let oldest = c.waiting.pop_front()?;
            oldest.pushed_out.store(true, Ordering::Relaxed);
            // A permit if its task is not waiting right now: it closes at its next look.
            oldest.evicted.notify_one();
            c.open -= 1;
        }
        c.open += 1;
        let slot = Arc::new(Slot::default());
        c.waiting.push_back(Arc::clone(&slot));
        Some(Admitted { slot, connections: Arc::clone(connections) })
    }

    /// The request is in: no longer one to push out. False if it was pushed out meanwhile.
    fn serving(&self) -> bool {
        let Ok(mut c) = self.connections.lock() else { return false };
        if self.slot.pushed_out.load(Ordering::Relaxed) {
            return false;
        }
        c.waiting.retain(|s| !Arc::ptr_eq(s, &self.slot));
        true
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut c) = self.connections.lock() {
            c.waiting.retain(|s| !Arc::ptr_eq(s, &self.slot));
            if !self.slot.pushed_out.load(Ordering::Relaxed) {
                c.open = c.open.saturating_sub(1);
            }
        }
    }
}

/// Serves GET /metrics on `listener` (bound by [`bind`]) until the task is dropped.
pub async fn serve(listener: TcpListener, iface: String, state_dir: StateDir, state: SharedState) -> crate::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BallastCollector { iface, state_dir, state, served: Mutex::default() }));
    serve_registry(listener, registry).await
}

/// Serves GET /metrics from `registry` on `listener`, within the bounds above, until the task
/// is dropped: the daemon's endpoint and `ballast decap metrics`.
pub async fn serve_registry(listener: TcpListener, registry: Registry) -> crate::Result<()> {
    let registry = Arc::new(registry);
    let scrapes = Arc::new(Scrapes::default());
    let connections = Arc::new(Mutex::new(Connections::default()));
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut starved = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) if resource_shortage(&err) => {
                if !starved {
                    warn!("metrics: accepting a connection failed ({err}): pausing accepts until it works again");
                    starved = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
            Err(_) => {
                // A connection reset before it was accepted, and the like: the next one.
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        if starved {
            info!("metrics: accepting connections again");
            starved = false;
        }
        backoff = ACCEPT_BACKOFF.0;
        let Some(admitted) = Admitted::new(&connections) else {
            // Every place serves a request: this one is closed at once.
            let _best_effort = stream.try_write(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
            continue;
        };
        let (registry, scrapes) = (Arc::clone(&registry), Arc::clone(&scrapes));
        tokio::spawn(connection(stream, admitted, registry, scrapes));
    }
}

fn resource_shortage(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Reads the request head: up to the blank line, at most [`MAX_REQUEST`] bytes.
async fn read_request(stream: &mut TcpStream) -> Result<Vec<u8>, &'static str> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| "read failed")?;
        if n == 0 {
            return if request.is_empty() { Err("closed") } else { Ok(request) };
        }
        request.extend_from_slice(&chunk[..n]);
        if request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n") {
            return Ok(request);
        }
        if request.len() >= MAX_REQUEST {
            return Err("too large");
        }
    }
}

/// The last scrape's body, and one encoder at a time.
#[derive(Default)]
struct Scrapes {
    last: tokio::sync::Mutex<Option<LastScrape>>,
}

struct LastScrape {
    started: tokio::time::Instant,
    finished: tokio::time::Instant,
    body: Arc<String>,
}

impl Scrapes {
    /// The body of a scrape that began reading after `arrived`: the last one if it did, else
    /// a new one by `encode` (on a blocking thread, [`SCRAPE_GAP`] after the last).
    async fn body(
        &self,
        arrived: tokio::time::Instant,
        encode: impl FnOnce() -> Option<String> + Send + 'static,
    ) -> Option<Arc<String>> {
        let mut last = self.last.lock().await;
        if let Some(scrape) = last.as_ref() {
            if scrape.started >= arrived {
                return Some(Arc::clone(&scrape.body));
            }
            tokio::time::sleep_until(scrape.finished + SCRAPE_GAP).await;
        }
        let started = tokio::time::Instant::now();
        let body = Arc::new(tokio::task::spawn_blocking(encode).await.ok().flatten()?);
        *last = Some(LastScrape { started, finished: tokio::time::Instant::now(), body: Arc::clone(&body) });
        Some(body)
    }
}

async fn connection(mut stream: TcpStream, admitted: Admitted, registry: Arc<Registry>, scrapes: Arc<Scrapes>) {
    let request = tokio::select! {
        read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)) => read,
        () = admitted.slot.evicted.notified() => return,
    };
    if !admitted.serving() {
        return;
    }
    let arrived = tokio::time::Instant::now();
    let response = match request {
        Err(_) | Ok(Err("closed" | "read failed")) => return,
        Ok(Err(_)) => "HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n".to_owned(),
        Ok(Ok(request)) if request.starts_with(b"GET /metrics ") || request.starts_with(b"GET /metrics?") => {
            // Counters are read with blocking syscalls: off the async workers, once per period.
            let body = scrapes
                .body(arrived, move || {
                    let mut body = String::new();
                    prometheus_client::encoding::text::encode(&mut body, &registry).ok().map(|()| body)
                })
                .await;
            match body {
                Some(body) => format!(
                    "HTTP/1.0 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_owned(),
            }
        }
        Ok(Ok(_)) => "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
    };
    let _client_gone_or_slow = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(response.as_bytes())).await;
    drop(admitted);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full of connections waiting for their request, a new one pushes out the oldest; full of
    /// connections being served, a new one is refused; a place freed is taken again.
    #[test]
    fn the_cap_pushes_out_idle_connections_and_refuses_beyond_busy_ones() {
        let connections = Arc::new(Mutex::new(Connections::default()));
        let mut admitted: Vec<Admitted> = (0..MAX_CONNECTIONS).map(|_| Admitted::new(&connections).unwrap()).collect();
        let newest = Admitted::new(&connections).expect("a new connection is refused while idle ones wait");
        assert!(admitted[0].slot.pushed_out.load(Ordering::Relaxed), "the oldest was not pushed out");
        assert!(!admitted[0].serving(), "a pushed-out connection went on to serve");
        assert_eq!(connections.lock().unwrap().open, MAX_CONNECTIONS);
        drop(admitted.remove(0));
        assert_eq!(connections.lock().unwrap().open, MAX_CONNECTIONS, "a pushed-out connection freed a place twice");
        admitted.push(newest);
        for a in &admitted {
            assert!(a.serving());
        }
        assert!(Admitted::new(&connections).is_none(), "admitted beyond the cap");
        drop(admitted.pop());
        assert!(Admitted::new(&connections).is_some(), "a freed place was not taken");
    }

    /// However many scrapes come at once, the kernel is read once for all that came while one
    /// read; a scrape after that reads it again.
    #[tokio::test]
    async fn a_scrape_flood_reads_the_kernel_once_per_wave() {
        let scrapes = Arc::new(Scrapes::default());
        let encoded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let scrape = |scrapes: Arc<Scrapes>, encoded: Arc<std::sync::atomic::AtomicUsize>| async move {
            let arrived = tokio::time::Instant::now();
            scrapes
                .body(arrived, move || {
                    encoded.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    Some("body".to_owned())
                })
                .await
        };
        let clients: Vec<_> =
            (0..50).map(|_| tokio::spawn(scrape(Arc::clone(&scrapes), Arc::clone(&encoded)))).collect();
        for client in clients {
            assert_eq!(client.await.unwrap().as_deref().map(String::as_str), Some("body"));
        }
        let waves = encoded.load(Ordering::SeqCst);
        assert!(waves <= 2, "50 scrapes at once read the kernel {waves} times");
        scrape(Arc::clone(&scrapes), Arc::clone(&encoded)).await;
        assert_eq!(encoded.load(Ordering::SeqCst), waves + 1, "a later scrape was not read afresh");
    }

    #[tokio::test]
    async fn requests_are_read_whole_and_bounded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            // A request in two segments.
            stream.write_all(b"GET /metrics HTTP/1.0\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(b"Host: x\r\n\r\n").await.unwrap();
            let mut big = TcpStream::connect(address).await.unwrap();
            big.write_all(&vec![b'a'; MAX_REQUEST + 10]).await.unwrap();
            (stream, big)
        });
        let (mut first, _) = listener.accept().await.unwrap();
        assert!(read_request(&mut first).await.unwrap().starts_with(b"GET /metrics HTTP/1.0\r\nHost"));
        let (mut second, _) = listener.accept().await.unwrap();
        assert_eq!(read_request(&mut second).await, Err("too large"));
        drop(client.await.unwrap());
    }
}
