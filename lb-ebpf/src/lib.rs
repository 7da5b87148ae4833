//! Pieces shared by ballast's XDP programs: the load balancer (`lb-ebpf`), the backend
//! side decapsulator (`lb-decap`) and the bench's reference programs (`lb-baseline`).
#![no_std]

pub mod parse;
pub mod push;
