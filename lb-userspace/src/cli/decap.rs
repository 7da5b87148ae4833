//! `ballast decap attach|detach|status|metrics`: the backend side.
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use tokio::signal::unix::{signal, SignalKind};

use super::args::DecapAction;
use crate::{daemon::metrics, error::Context as _, ops::decap, Result};

pub fn run(action: DecapAction) -> Result<()> {
    match action {
        DecapAction::Attach { target, addresses, mode } => {
            let iface = target.enter()?;
            let addresses = decap::attach(&iface, &addresses, mode)?;
            let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
            super::out(&format!("decapsulator attached to {iface} for {}\n", list.join(", ")))?;
            for switch in decap::forwarding_off(&iface, &addresses) {
                // A closed stderr is no reason to fail: the decapsulator is attached.
                let _ = writeln!(
                    std::io::stderr(),
                    "ballast: warning: {switch} is 0: second-chance packets of flows this host does not know \
                     cannot be sent on to their next hop; they are counted forward_failed and decapsulated here"
                );
            }
            Ok(())
        }
        DecapAction::Detach { target } => {
            let iface = target.enter()?;
            decap::detach(&iface)?;
            super::out(&format!("decapsulator detached from {iface}\n"))
        }
        DecapAction::Status { target, json } => {
            let iface = target.enter()?;
            let counters = decap::counters(&iface)?;
            if json {
                // {"iface": ..., "counters": {reason: count}}: every reason, zeros included.
                let by_reason: BTreeMap<&str, u64> = counters.iter().copied().collect();
                super::print(&serde_json::json!({ "iface": iface, "counters": by_reason }), true, |_| String::new())
            } else {
                super::out(&render_counters(&counters))
            }
        }
        DecapAction::Metrics { target, listen } => {
            let iface = target.enter()?;
            serve_metrics(iface, listen)
        }
    }
}

pub fn render_counters(counters: &[(&str, u64)]) -> String {
    counters.iter().map(|(reason, count)| format!("{reason:<24} {count}\n")).collect()
}

/// Serves `ballast_decap_packets_total{iface, reason}` at http://ADDR/metrics with the
/// daemon's HTTP endpoint (its bounds on clients included) until SIGTERM or SIGINT. The
/// counters are read from the kernel at each scrape; a scrape while no decapsulator runs on
/// the interface has no samples. The runtime's threads inherit the network namespace the
/// caller entered, so the pins they read are the interface's.
fn serve_metrics(iface: String, address: SocketAddr) -> Result<()> {
    // Refused at once, before listening, when nothing runs there.
    decap::counters(&iface)?;
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = metrics::bind_for("--listen", address)?;
        let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        super::out(&format!("serving the decapsulator's counters on {iface} at http://{address}/metrics\n"))?;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(DecapCollector { iface }));
        tokio::select! {
            served = metrics::serve_registry(listener, registry) => served,
            _ = terminate.recv() => Ok(()),
            _ = interrupt.recv() => Ok(()),
        }
    })
}

#[derive(Debug)]
struct DecapCollector {
    iface: String,
}

impl Collector for DecapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let Ok(counters) = decap::counters(&self.iface) else { return Ok(()) };
        let samples: Vec<_> = counters
            .iter()
            .map(|(reason, count)| (vec![("iface", self.iface.clone()), ("reason", (*reason).to_owned())], *count))
            .collect();
        metrics::counter(
            &mut encoder,
            "ballast_decap_packets",
            "Packets the backend's decapsulator saw, by reason (README, `ballast decap`)",
            &samples,
        )
    }
}
