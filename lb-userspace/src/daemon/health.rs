//! Health checks of backends, sent from the load balancer host: a TCP connect or an HTTP GET
//! per interval, turned into healthy / unhealthy by rise and fall counts.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::config::{HealthCheck, HealthProbe};

/// One backend of one VIP.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId {
    /// The VIP as `describe` prints it (address:port/protocol).
    pub vip: String,
    pub backend: IpAddr,
}

pub struct Report {
    pub id: BackendId,
    pub ok: bool,
}

/// The rise/fall state of one backend. Backends start healthy: a daemon that starts (or
/// restarts) must not take every backend out before the first checks come back.
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

/// Checks `id` forever, sending each result.
pub fn spawn_checker(id: BackendId, check: HealthCheck, reports: mpsc::Sender<Report>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(check.interval_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let ok = probe(&check, id.backend).await;
            if reports.send(Report { id: id.clone(), ok }).await.is_err() {
                return;
            }
        }
    })
}

pub async fn probe(check: &HealthCheck, backend: IpAddr) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(SocketAddr::new(backend, check.port)).await.ok()?;
        match &check.probe {
            HealthProbe::Tcp => Some(true),
            HealthProbe::Http { path, expect_status } => {
                let host = SocketAddr::new(backend, check.port);
                let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: ballast\r\n\r\n");
                stream.write_all(request.as_bytes()).await.ok()?;
                let mut head = [0u8; 64];
                let n = stream.read(&mut head).await.ok()?;
                Some(http_status(&head[..n]) == Some(*expect_status))
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_millis(check.timeout_ms), attempt).await, Ok(Some(true)))
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
    fn status_lines() {
        assert_eq!(http_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(http_status(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"), Some(503));
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(http_status(b""), None);
    }
}
