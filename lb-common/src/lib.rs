//! Types and algorithms shared by the XDP program and user space.
//!
//! Everything here is `no_std` so the kernel side can use it; the `user` feature adds the
//! allocating Maglev table builder, `aya::Pod` impls and [`model`], the reference model of the
//! XDP program's decision that the tests compare the kernel against.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod encap;
pub mod flow;
pub mod health;
pub mod icmp;
#[cfg(feature = "user")]
pub mod maglev;
pub mod maps;
#[cfg(feature = "user")]
pub mod model;
pub mod vip_index;
pub mod wire;

pub use maps::{Backend, Counter, Reason, VipKey, VipMeta};
