//! Kernel access: everything that makes a syscall lives under here.
pub mod counters;
pub mod health_tunnel;
pub mod loader;
pub mod netns;
pub mod pins;
pub mod running;
pub mod sys;
