//! The Prometheus endpoint of `ballast run`: traffic counters read from the kernel at each
//! scrape (per VIP, per backend, per verdict reason), and the daemon's own state (health,
//! fail-open, swaps, reloads, the running generation's digest).
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

use super::health::BackendId;
use crate::status;

/// What the daemon knows that the kernel does not.
#[derive(Debug, Default)]
pub struct DaemonState {
    pub healthy: BTreeMap<BackendId, bool>,
    pub fail_open: BTreeMap<String, bool>,
    pub swaps: BTreeMap<&'static str, u64>,
    pub reloads: BTreeMap<&'static str, u64>,
}

pub type SharedState = Arc<Mutex<DaemonState>>;

#[derive(Debug)]
struct BallastCollector {
    iface: String,
    state: SharedState,
}

type Labels = Vec<(&'static str, String)>;

fn counter(
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
        if let Ok(status) = status::status(&self.iface) {
            let vips = &status.vips;
            let per_vip = |f: fn(&status::VipStatus) -> u64| -> Vec<(Labels, u64)> {
                vips.iter().map(|v| (vec![("vip", v.vip.clone())], f(v))).collect()
            };
            counter(&mut encoder, "ballast_vip_packets", "Packets forwarded per VIP", &per_vip(|v| v.packets))?;
            counter(&mut encoder, "ballast_vip_bytes", "Bytes (inner IP) forwarded per VIP", &per_vip(|v| v.bytes))?;
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
                &per_backend(|b| b.packets),
            )?;
            counter(
                &mut encoder,
                "ballast_backend_bytes",
                "Bytes (inner IP) forwarded per backend",
                &per_backend(|b| b.bytes),
            )?;
            let reasons: Vec<(Labels, u64)> =
                status.reasons.iter().map(|(r, n)| (vec![("reason", (*r).to_owned())], *n)).collect();
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
        }
        let Ok(state) = self.state.lock() else { return Ok(()) };
        let healthy: Vec<(Labels, i64)> = state
            .healthy
            .iter()
            .map(|(id, up)| (vec![("vip", id.vip.clone()), ("backend", id.backend.to_string())], i64::from(*up)))
            .collect();
        gauge(&mut encoder, "ballast_backend_healthy", "1 if the backend passes its health check", &healthy)?;
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
        Ok(())
    }
}

/// Serves GET /metrics on `address` until the task is dropped.
pub async fn serve(address: SocketAddr, iface: String, state: SharedState) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address).await.map_err(|e| anyhow::anyhow!("--metrics {address}: {e}"))?;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(BallastCollector { iface, state }));
    let registry = Arc::new(registry);
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let registry = Arc::clone(&registry);
        // Counters are read with blocking syscalls: off the async workers.
        tokio::task::spawn(async move {
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).await.unwrap_or(0);
            let wanted = request[..n].starts_with(b"GET /metrics ") || request[..n].starts_with(b"GET /metrics?");
            let response = if wanted {
                let body = tokio::task::spawn_blocking(move || {
                    let mut body = String::new();
                    prometheus_client::encoding::text::encode(&mut body, &registry).map(|()| body)
                })
                .await;
                match body {
                    Ok(Ok(body)) => format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    ),
                    _ => "HTTP/1.0 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_owned(),
                }
            } else {
                "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned()
            };
            let _client_gone = stream.write_all(response.as_bytes()).await;
        });
    }
}
