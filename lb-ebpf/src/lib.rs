//! Pieces shared by ballast's XDP programs: the load balancer (`lb-ebpf`) and the backend
//! side decapsulator (`lb-decap`).
#![no_std]

pub mod parse;
