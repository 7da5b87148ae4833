//! Pieces shared by ballast's XDP programs: the load balancer (`lb-ebpf`), the backend
//! side decapsulator (`lb-decap`), and the bench's programs (tests/bench/ebpf), which use
//! the same parsing and header pushing. Also the one panic handler every program links.
#![no_std]

pub mod parse;
pub mod push;

/// The panic handler of every XDP program linking this library (each uses `parse`). A
/// program that could reach it would hold an endless loop, which the verifier refuses.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
