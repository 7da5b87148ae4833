//! ballast: an immutable eBPF/XDP layer-4 load balancer (user space).
pub mod config;
pub mod daemon;
pub mod decap;
pub mod generation;
pub mod generations;
pub mod inspect;
pub mod kernel;
pub mod loader;
pub mod netns;
pub mod pins;
pub mod preflight;
pub mod state;
pub mod artifact;
pub mod attach;
pub mod demo;
pub mod status;
pub mod bench;
