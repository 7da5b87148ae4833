//! Maps and `.rodata` globals; names and layouts come from `lb_common::maps`.
use aya_ebpf::{
    bindings::BPF_F_RDONLY_PROG,
    macros::map,
    maps::{Array, PerCpuArray},
    Global,
};
use lb_common::{
    flow::{FlowKeys, FLOW_WORDS},
    maps::{
        maglev_position, Backend, Counter, Lineage, MaglevChunk, MaglevEntry, VipKey, VipMeta, BACKEND_COUNTER_SLOTS,
        MAGLEV_LINEAGE_FLAG, REASON_COUNT, VIP_COUNTER_SLOTS,
    },
    vip_index::{self, VipSlot},
    wire::{IPPROTO_TCP, IPPROTO_UDP},
};

// Config maps: max_entries is set by the loader; read-only for this program, frozen after load.
#[map]
pub static VIPS: Array<VipSlot> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);
#[map]
pub static MAGLEV: Array<MaglevChunk> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);
#[map]
pub static LINEAGES: Array<Lineage> = Array::with_max_entries(1, BPF_F_RDONLY_PROG);

// State: counters, sized to the limits so they can outlive a generation.
#[map]
pub static VIP_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(VIP_COUNTER_SLOTS, 0);
#[map]
pub static BACKEND_COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(BACKEND_COUNTER_SLOTS, 0);
#[map]
pub static REASON_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(REASON_COUNT, 0);
/// `lb_common::icmp::spend_icmp_budget`'s `due`, per CPU.
#[map]
pub static ICMP_BUDGET: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `lb_common::flow::flow_keys` of the generation's hash_seed.
#[unsafe(no_mangle)]
pub static FLOW_KEYS: Global<FlowKeys> = Global::new([0; FLOW_WORDS + 1]);
#[unsafe(no_mangle)]
pub static HAS_IPV4: Global<u8> = Global::new(1);
#[unsafe(no_mangle)]
pub static HAS_IPV6: Global<u8> = Global::new(1);
#[unsafe(no_mangle)]
pub static HAS_ANY_PORT: Global<u8> = Global::new(1);
#[unsafe(no_mangle)]
pub static HAS_LINEAGE: Global<u8> = Global::new(1);
#[unsafe(no_mangle)]
pub static ETH_ADDRESSES: Global<[u32; 3]> = Global::new([0; 3]);
#[unsafe(no_mangle)]
pub static OUTER_SOURCE_V4: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static OUTER_SOURCE_V6: Global<[u32; 4]> = Global::new([0; 4]);
#[unsafe(no_mangle)]
pub static MTU: Global<u32> = Global::new(1500);
#[unsafe(no_mangle)]
pub static VIP_INDEX_SEED: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
pub static VIP_INDEX_MASK: Global<u32> = Global::new(0);
/// Never read by the program: there for user space to read back from the kernel.
#[unsafe(no_mangle)]
pub static GENERATION_ID: Global<[u8; lb_common::maps::GENERATION_ID_LEN]> =
    Global::new([0; lb_common::maps::GENERATION_ID_LEN]);

/// FLOW_KEYS where they lie, for the cold paths: `FLOW_KEYS.load()` copies all 88 bytes to
/// the stack, which the program's main body can afford and its callees cannot. The pointer
/// goes through a volatile read so that the compiler cannot see the global's initial value
/// behind it (the loader overrides it) and fold it, as `load` prevents for the copy.
#[inline(always)]
pub fn flow_keys_in_place() -> &'static FlowKeys {
    let global = &FLOW_KEYS as *const Global<FlowKeys> as *const FlowKeys;
    // SAFETY: Global is repr(transparent) over an initialised FlowKeys; read_volatile of a
    // local pointer is a plain load.
    unsafe { &*core::ptr::read_volatile(&global) }
}

#[inline(always)]
pub fn count(counters: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = counters.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written by this CPU only.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(c) = REASON_COUNTERS.get_ptr_mut(reason) {
        // SAFETY: as above.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn lookup_vip(key: &VipKey) -> Option<VipMeta> {
    vip_index::lookup(key, VIP_INDEX_SEED.load(), VIP_INDEX_MASK.load(), |i| VIPS.get(i))
}

/// The VIP entry for (address, port, protocol), falling back to the address's every-port
/// VIP. Address markers are not VIPs.
#[inline(always)]
pub fn find_vip(mut key: VipKey) -> Option<VipMeta> {
    let mut meta = lookup_vip(&key);
    if meta.is_none() && HAS_ANY_PORT.load() != 0 {
        key.port = 0;
        meta = lookup_vip(&key);
    }
    meta.filter(|m| m.flags & lb_common::maps::VIP_FLAG_ADDRESS_ONLY == 0)
}

/// Whether some VIP listens on this address and protocol (any port): decides whether a
/// fragment or malformed packet is "toward a VIP". Only rare paths ask, from several places:
/// one out-of-line copy (a BPF-to-BPF call) instead of an inlined probe loop at each.
#[inline(never)]
pub fn is_vip_address(key: &VipKey) -> bool {
    let marker = VipKey { port: 0, ..*key };
    lookup_vip(&marker).is_some()
}

/// Whether some TCP or UDP VIP uses this address: ICMP toward it is the load balancer's.
#[inline(always)]
pub fn is_vip_host(addr: [u32; 4], family: u8) -> bool {
    let tcp = VipKey { addr, port: 0, protocol: IPPROTO_TCP, family };
    is_vip_address(&tcp) || is_vip_address(&VipKey { protocol: IPPROTO_UDP, ..tcp })
}

/// What a flow hash selects in a VIP's table: the slot's owner and, if the slot changed
/// owner in the generation's lineage, its previous owners.
pub struct Pick {
    pub backend: Backend,
    pub lineage: Option<&'static Lineage>,
}

#[inline(always)]
pub fn pick_backend(meta: &VipMeta, hash: u32) -> Option<Pick> {
    let index = meta.table_offset + lb_common::flow::table_slot(hash, meta.table_size);
    let (chunk, lane) = maglev_position(index);
    let entry = *MAGLEV.get(chunk)?.get(lane)?;
    // Without a lineage the verifier prunes this branch whole, the entry's flag test with it:
    // today's program, today's cost.
    if HAS_LINEAGE.load() != 0 {
        return pick_with_lineage(entry);
    }
    Some(Pick { backend: *BACKENDS.get(u32::from(entry))?, lineage: None })
}

#[inline(always)]
fn pick_with_lineage(entry: MaglevEntry) -> Option<Pick> {
    if entry & MAGLEV_LINEAGE_FLAG == 0 {
        return Some(Pick { backend: *BACKENDS.get(u32::from(entry))?, lineage: None });
    }
    let lineage = LINEAGES.get(u32::from(entry & !MAGLEV_LINEAGE_FLAG))?;
    Some(Pick { backend: *BACKENDS.get(lineage.owner)?, lineage: Some(lineage) })
}
