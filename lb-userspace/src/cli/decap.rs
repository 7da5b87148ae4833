//! `ballast decap attach|detach|status`: the backend side.
use std::collections::BTreeMap;
use std::net::IpAddr;

use super::args::DecapAction;
use crate::{ops::decap, Result};

pub fn run(action: DecapAction) -> Result<()> {
    match action {
        DecapAction::Attach { target, addresses, mode } => {
            let iface = target.enter()?;
            let addresses = decap::attach(&iface, &addresses, mode)?;
            let list: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
            super::out(&format!("decapsulator attached to {iface} for {}\n", list.join(", ")))
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
                // {"iface": ..., "counters": {reason: count}}
                let by_reason: BTreeMap<&str, u64> = counters.iter().copied().collect();
                super::print(&serde_json::json!({ "iface": iface, "counters": by_reason }), true, |_| String::new())
            } else {
                super::out(&render_counters(&counters))
            }
        }
    }
}

pub fn render_counters(counters: &[(&str, u64)]) -> String {
    counters.iter().map(|(reason, count)| format!("{reason:<24} {count}\n")).collect()
}
