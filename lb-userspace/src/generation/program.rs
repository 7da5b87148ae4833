//! The XDP programs this binary carries, compiled from lb-ebpf by build.rs.

/// The load balancer (`lb-ebpf`).
pub static LOAD_BALANCER: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The backend-side decapsulator (`lb-decap`).
pub static DECAPSULATOR: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-decap"));

/// The daemon's TC egress program for health checks through the tunnel (`lb-health`).
pub static HEALTH_TUNNEL: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-health"));
