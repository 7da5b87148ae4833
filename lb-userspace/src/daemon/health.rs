//! Health checks of backends, sent from the load balancer host: a TCP connect or an HTTP GET
//! per interval, turned into healthy / unhealthy by rise and fall counts.
//!
//! A check goes one of two ways ([`Route`]): directly, to the backend's own address, or
//! through the tunnel: to the VIP's address, from a socket marked for that backend, whose
//! packets the daemon's TC egress program (`kernel::health_tunnel`) encapsulates toward the
//! backend, as the load balancer forwards a client's. The backend decapsulates, the VIP on its
//! loopback answers, straight back to this host (direct server return; the load balancer's
//! XDP program passes the answer, which is not to a VIP). So a pass through the tunnel proves
//! what real traffic needs, and a broken decapsulator or a VIP missing on the backend fails it.
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    generation::config::{HealthCheck, HealthProbe},
    kernel::health_tunnel::TunnelCounters,
};

/// One backend of one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    /// The VIP as `describe` prints it (address:port/protocol).
    pub vip: String,
    pub backend: IpAddr,
}

pub struct Report {
    pub id: BackendId,
    pub outcome: Outcome,
}

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Up,
    Down,
    /// The check could not be made for a reason of this host, not of the backend (no file
    /// descriptor, no memory, no local port): it says nothing about the backend, so it counts
    /// neither way. Whatever starves this host (idle metrics connections, say) must not take
    /// healthy backends out.
    Unchecked(String),
}
/// The rise/fall state of one backend. Backends start healthy, except those a restarted
/// daemon finds missing from the generation that runs ([`Health::unhealthy`]): a restart must
/// neither take every backend out before the first checks come back nor put back the ones it
/// had taken out.
#[derive(Clone, Copy, Debug)]
pub struct Health {
    pub healthy: bool,
    successes: u32,
    failures: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health { healthy: true, successes: 0, failures: 0 }
    }
}

impl Health {
    /// Out until `rise` checks in a row pass.
    pub fn unhealthy() -> Health {
        Health { healthy: false, successes: 0, failures: 0 }
    }

    /// Records one check; true when the backend changed state.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> bool {
        if ok {
            self.successes += 1;
            self.failures = 0;
            if !self.healthy && self.successes >= rise {
                self.healthy = true;
                return true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.healthy && self.failures >= fall {
                self.healthy = false;
                return true;
            }
        }
        false
    }
}

/// How one backend's checks reach it.
#[derive(Clone)]
pub(crate) enum Route {
    Direct,
    /// To `vip`, from sockets with `mark`: the tunnel program's target `index` (its counters).
    Tunnel {
        vip: IpAddr,
        mark: u32,
        index: u32,
        counters: Arc<TunnelCounters>,
        iface: String,
    },
}

/// Checks `id` forever by `route`, sending each result.
pub(crate) fn spawn_checker(
    id: BackendId,
    check: HealthCheck,
    route: Route,
    reports: mpsc::Sender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(check.interval_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let outcome = match &route {
                Route::Direct => probe(&check, id.backend).await,
                Route::Tunnel { vip, mark, index, counters, iface } => {
                    probe_through_tunnel(&check, *vip, *mark, counters, *index, iface).await
                }
            };
            if reports.send(Report { id: id.clone(), outcome }).await.is_err() {
                return;
            }
        }
    })
}

/// Errors that say "this host could not try", not "the backend did not answer".
fn local_failure(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL | libc::EAGAIN)
    )
}

/// A direct check: to the backend's own address.
pub async fn probe(check: &HealthCheck, backend: IpAddr) -> Outcome {
    probe_at(check, SocketAddr::new(backend, check.port), None).await
}

/// A check through the tunnel: to the VIP, from a socket marked for the tunnel program's
/// target `index`. It says something about the backend only if the program encapsulated its
/// packets: otherwise (the VIP is an address of this host, its route leaves by another
/// interface, the program could not make room) the probe went elsewhere or nowhere, and it is
/// "could not check".
pub(crate) async fn probe_through_tunnel(
    check: &HealthCheck,
    vip: IpAddr,
    mark: u32,
    counters: &TunnelCounters,
    index: u32,
    iface: &str,
) -> Outcome {
    let before = match counters.read(index) {
        Ok(counters) => counters,
        Err(err) => return Outcome::Unchecked(format!("{err:#}")),
    };
    let outcome = probe_at(check, SocketAddr::new(vip, check.port), Some(mark)).await;
    let after = match counters.read(index) {
        Ok(counters) => counters,
        Err(err) => return Outcome::Unchecked(format!("{err:#}")),
    };
    if after.failed > before.failed {
        return Outcome::Unchecked(format!("the tunnel program on {iface} could not encapsulate the probe"));
    }
    if after.encapsulated == before.encapsulated && !matches!(outcome, Outcome::Unchecked(_)) {
        return Outcome::Unchecked(format!(
            "no packet of the probe to {vip} left through the tunnel program on {iface} (is the VIP an address of \
             this host, or does its route leave by another interface?)"
        ));
    }
    outcome
}

/// One check of `address`, from a socket with `mark` (SO_MARK) when given.
async fn probe_at(check: &HealthCheck, address: SocketAddr, mark: Option<u32>) -> Outcome {
    // The socket first: failing to get one is this host's problem, never the backend's.
    let socket = match if address.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() } {
        Ok(socket) => socket,
        Err(err) => return Outcome::Unchecked(format!("no socket for the check: {err}")),
    };
    if let Some(mark) = mark {
        if let Err(err) = set_mark(&socket, mark) {
            return Outcome::Unchecked(format!("marking the probe's socket (SO_MARK needs CAP_NET_ADMIN): {err}"));
        }
    }
    let attempt = async {
        let mut stream = match socket.connect(address).await {
            Ok(stream) => stream,
            Err(err) if local_failure(&err) => return Err(format!("connecting: {err}")),
            Err(_) => return Ok(false),
        };
        match &check.probe {
            HealthProbe::Tcp => Ok(true),
            HealthProbe::Http { path, expect_status } => {
                let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nUser-Agent: ballast\r\n\r\n");
                if stream.write_all(request.as_bytes()).await.is_err() {
                    return Ok(false);
                }
                // The status line, however the backend splits it (at most 64 bytes are read).
                let mut head = [0u8; 64];
                let mut n = 0;
                while n < head.len() && !head[..n].contains(&b'\n') {
                    match stream.read(&mut head[n..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(read) => n += read,
                    }
                }
                Ok(http_status(&head[..n]) == Some(*expect_status))
            }
        }
    };
    match tokio::time::timeout(Duration::from_millis(check.timeout_ms), attempt).await {
        Ok(Ok(true)) => Outcome::Up,
        Ok(Ok(false)) | Err(_) => Outcome::Down,
        Ok(Err(local)) => Outcome::Unchecked(local),
    }
}

fn set_mark(socket: &TcpSocket, mark: u32) -> std::io::Result<()> {
    // SAFETY: setsockopt with a u32 option value on an open socket.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The status code of an HTTP status line ("HTTP/1.1 200 OK").
fn http_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/"))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall() {
        let mut h = Health::default();
        assert!(h.healthy);
        assert!(!h.record(false, 2, 3));
        assert!(!h.record(false, 2, 3));
        assert!(h.record(false, 2, 3), "third failure: down");
        assert!(!h.healthy);
        assert!(!h.record(true, 2, 3));
        assert!(!h.record(false, 2, 3), "a failure resets the successes");
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3), "two successes in a row: up");
        assert!(h.healthy);
    }

    #[test]
    fn a_restart_seeds_missing_backends_unhealthy() {
        let mut h = Health::unhealthy();
        assert!(!h.healthy);
        assert!(!h.record(true, 2, 3));
        assert!(h.record(true, 2, 3), "rise passes bring it in");
    }

    #[test]
    fn only_this_hosts_shortages_are_unchecked() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::EADDRNOTAVAIL] {
            assert!(local_failure(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [libc::ECONNREFUSED, libc::EHOSTUNREACH, libc::ENETUNREACH, libc::ETIMEDOUT] {
            assert!(!local_failure(&std::io::Error::from_raw_os_error(errno)), "{errno}");
        }
    }

    /// With no descriptor left, a check reports "could not check", not a failed backend.
    /// (Run in a child process: lowering RLIMIT_NOFILE in this test binary would hit the
    /// other tests.)
    #[test]
    fn a_check_without_descriptors_is_unchecked() {
        if std::env::var_os("BALLAST_HEALTH_EMFILE_CHILD").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new(exe)
                .args(["--exact", "daemon::health::tests::a_check_without_descriptors_is_unchecked", "--nocapture"])
                .env("BALLAST_HEALTH_EMFILE_CHILD", "1")
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let check = HealthCheck {
            probe: HealthProbe::Tcp,
            port,
            via: None,
            interval_ms: 100,
            timeout_ms: 500,
            rise: 1,
            fall: 1,
        };
        let backend: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(runtime.block_on(probe(&check, backend)), Outcome::Up);
        // Use up every descriptor below a limit just above what is open now.
        let limit = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
        // SAFETY: setrlimit with a valid struct; this child process is ours alone.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut hoard = Vec::new();
        while let Ok(file) = std::fs::File::open("/dev/null") {
            hoard.push(file);
        }
        let outcome = runtime.block_on(probe(&check, backend));
        assert!(matches!(outcome, Outcome::Unchecked(ref why) if why.contains("socket")), "{outcome:?}");
        drop(hoard);
        assert_eq!(runtime.block_on(probe(&check, backend)), Outcome::Up);
    }

    /// A status line that arrives in pieces is read whole; a backend that answers otherwise,
    /// or not at all, is down.
    #[tokio::test]
    async fn http_checks_read_the_whole_status_line() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            for answer in [&[&b"HTTP/1.1 2"[..], b"00 OK\r\n\r\n"][..], &[b"HTTP/1.1 503 No\r\n\r\n"], &[]] {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = [0u8; 256];
                let _ = stream.read(&mut request).await.unwrap();
                for piece in answer {
                    stream.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                if answer.is_empty() {
                    // Silent until the check gives up.
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            }
        });
        let check = HealthCheck {
            probe: HealthProbe::Http { path: "/health".to_owned(), expect_status: 200 },
            port,
            via: None,
            interval_ms: 100,
            timeout_ms: 300,
            rise: 1,
            fall: 1,
        };
        let backend: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(probe(&check, backend).await, Outcome::Up, "a status line in two segments");
        assert_eq!(probe(&check, backend).await, Outcome::Down, "503");
        assert_eq!(probe(&check, backend).await, Outcome::Down, "no answer");
        server.await.unwrap();
    }

    #[test]
    fn status_lines() {
        assert_eq!(http_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(http_status(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"), Some(503));
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(http_status(b""), None);
    }
}
