//! Counters read back from the kernel, and slots zeroed for identities new to them.
use std::path::Path;

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use aya::Pod;
use lb_common::maps::{Counter, MAP_BACKEND_COUNTERS, MAP_REASON_COUNTERS, MAP_VIP_COUNTERS, REASON_COUNT};

use crate::{
    error::Context as _,
    generation::counter_slots::{Assignment, CounterDiscount},
    other,
};

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CounterSnapshot {
    pub vips: Vec<Counter>,
    pub backends: Vec<Counter>,
    pub reasons: Vec<u64>,
}

fn sum_counters(map: &Map) -> crate::Result<Vec<Counter>> {
    let array = PerCpuArray::<_, Counter>::try_from(map)?;
    (0..array.len())
        .map(|i| {
            let per_cpu = array.get(&i, 0)?;
            Ok(per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
                packets: acc.packets + c.packets,
                bytes: acc.bytes + c.bytes,
            }))
        })
        .collect()
}

/// `len` slots summed over CPUs; slots past the map's end read 0: counter maps pinned by an
/// older program, with fewer reasons, stay readable.
fn sum_per_cpu<T: Pod + Into<u64>>(map: &Map, len: u32) -> crate::Result<Vec<u64>> {
    let array = PerCpuArray::<_, T>::try_from(map)?;
    (0..len)
        .map(|i| if i < array.len() { Ok(array.get(&i, 0)?.iter().map(|v| (*v).into()).sum()) } else { Ok(0) })
        .collect()
}

impl CounterSnapshot {
    /// These counters less what pre-flight probes added to them.
    pub(crate) fn discounted(mut self, discount: &CounterDiscount) -> CounterSnapshot {
        let subtract = |counters: &mut Vec<Counter>, by: &std::collections::BTreeMap<u32, (u64, u64)>| {
            for (slot, (packets, bytes)) in by {
                if let Some(counter) = counters.get_mut(*slot as usize) {
                    counter.packets = counter.packets.saturating_sub(*packets);
                    counter.bytes = counter.bytes.saturating_sub(*bytes);
                }
            }
        };
        subtract(&mut self.vips, &discount.vips);
        subtract(&mut self.backends, &discount.backends);
        for (reason, packets) in &discount.reasons {
            if let Some(count) = self.reasons.get_mut(*reason as usize) {
                *count = count.saturating_sub(*packets);
            }
        }
        self
    }

    /// Reads the counter maps found by `lookup` (a loaded program's, or pinned ones).
    pub fn read<'a>(lookup: impl Fn(&str) -> crate::Result<&'a Map>) -> crate::Result<Self> {
        Ok(CounterSnapshot {
            vips: sum_counters(lookup(MAP_VIP_COUNTERS)?)?,
            backends: sum_counters(lookup(MAP_BACKEND_COUNTERS)?)?,
            reasons: sum_per_cpu::<u64>(lookup(MAP_REASON_COUNTERS)?, REASON_COUNT)?,
        })
    }
}

/// Zeroes the slots new to their identity in the pinned counter maps of `dir`, if any: a
/// slot may hold the counts of an identity long gone.
pub(crate) fn zero_fresh_slots(assignment: &Assignment, dir: &Path) -> crate::Result<()> {
    for (name, fresh) in
        [(MAP_VIP_COUNTERS, &assignment.fresh_vips), (MAP_BACKEND_COUNTERS, &assignment.fresh_backends)]
    {
        let path = dir.join(name);
        if !path.exists() || fresh.is_empty() {
            continue;
        }
        let mut map = Map::from_map_data(MapData::from_pin(&path).with_context(|| format!("{}", path.display()))?)?;
        let mut counters = PerCpuArray::<_, Counter>::try_from(&mut map)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| other!("counting CPUs: {e}"))?;
        for slot in fresh {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus])?;
            counters.set(*slot, zeros, 0).with_context(|| format!("zeroing {name}[{slot}]"))?;
        }
    }
    Ok(())
}
