//! The kernel/user contract of the benchmark (`cargo xtask bench`): what the harness program
//! (tests/bench/ebpf/src/harness.rs) and the bench (tests/bench/src/programs.rs) both rely
//! on: the layout of the frame template, the harness's counter indices, and the names of
//! the maps and programs the bench looks up in the two objects. Neither side restates any
//! of it.
//!
//! `no_std`, so the eBPF crate can use it; the `user` feature adds the `aya::Pod` impls.
#![no_std]

#[cfg(test)]
extern crate std;

use bytemuck::{Pod, Zeroable};

/// Largest template, in 8-byte words.
pub const TEMPLATE_WORDS: usize = 32;
/// Largest template, in bytes.
pub const TEMPLATE_MAX_BYTES: usize = TEMPLATE_WORDS * 8;

/// The frame every harness run starts from: entry 0 of [`MAP_TEMPLATE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Template {
    /// Frame length in bytes: a multiple of 8, at most [`TEMPLATE_MAX_BYTES`].
    pub len: u32,
    /// Offset of the 16-bit source port to vary per packet; 0 keeps one flow.
    pub vary_port_offset: u32,
    /// Offset of the 32-bit source address word to vary with it.
    pub vary_addr_offset: u32,
    /// `bench_generator` redirects to this interface.
    pub redirect_ifindex: u32,
    /// The frame's bytes, 8 to a word in memory order (the harness stores each word as it is).
    pub words: [u64; TEMPLATE_WORDS],
}

/// Why a frame cannot be a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameNotTemplate {
    pub len: usize,
}

impl core::fmt::Display for FrameNotTemplate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "a template frame is a multiple of 8 bytes, at most {TEMPLATE_MAX_BYTES}; got {}", self.len)
    }
}

impl Template {
    /// The template of `frame`; the offsets 0 keep one flow.
    pub fn of_frame(
        frame: &[u8],
        vary_port_offset: u32,
        vary_addr_offset: u32,
        redirect_ifindex: u32,
    ) -> Result<Template, FrameNotTemplate> {
        if !frame.len().is_multiple_of(8) || frame.len() > TEMPLATE_MAX_BYTES {
            return Err(FrameNotTemplate { len: frame.len() });
        }
        let mut words = [0u64; TEMPLATE_WORDS];
        for (word, chunk) in words.iter_mut().zip(frame.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(bytes);
        }
        Ok(Template { len: frame.len() as u32, vary_port_offset, vary_addr_offset, redirect_ifindex, words })
    }

    /// The frame's bytes (what the harness writes into the packet).
    pub fn frame(&self) -> &[u8] {
        let bytes: &[u8] = bytemuck::cast_slice(&self.words);
        &bytes[..(self.len as usize).min(TEMPLATE_MAX_BYTES)]
    }
}

/// The indices of [`MAP_COUNTERS`], a per-CPU array of `u64`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarnessCounter {
    /// The per-CPU sequence number that varies the flow (not a count of anything).
    Sequence = 0,
    /// The frame could not be put back as the template.
    RestoreFailed = 1,
    /// The tail call into the program under test failed.
    TailCallFailed = 2,
    /// Frames `bench_sink` received, and how many of them were IPIP / IP6IP6.
    SinkReceived = 3,
    SinkEncapsulated = 4,
}

impl HarnessCounter {
    pub const ALL: [HarnessCounter; 5] = [
        HarnessCounter::Sequence,
        HarnessCounter::RestoreFailed,
        HarnessCounter::TailCallFailed,
        HarnessCounter::SinkReceived,
        HarnessCounter::SinkEncapsulated,
    ];
    /// Entries of [`MAP_COUNTERS`].
    pub const COUNT: u32 = HarnessCounter::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

/// The harness object's maps (the statics' names in harness.rs).
pub const MAP_TEMPLATE: &str = "BENCH_TEMPLATE";
/// One slot: the program `bench_harness` tail-calls.
pub const MAP_TARGET: &str = "BENCH_TARGET";
pub const MAP_COUNTERS: &str = "BENCH_COUNTERS";

/// The harness object's programs: restore and tail-call; restore and redirect (live frames);
/// count and drop.
pub const PROGRAM_HARNESS: &str = "bench_harness";
pub const PROGRAM_GENERATOR: &str = "bench_generator";
pub const PROGRAM_SINK: &str = "bench_sink";

/// The reference object's programs (baseline.rs).
pub const PROGRAM_BASELINE: &str = "baseline";
pub const PROGRAM_HELPER_CALL: &str = "helper_call";
pub const PROGRAM_ENCAP_FLOOR: &str = "encap_floor";
pub const PROGRAM_GUE_FLOOR: &str = "gue_floor";
pub const PROGRAM_XDP_DROP: &str = "xdp_drop";

/// The two objects, as ballast-bench-ebpf's bins are named (and as the bench's build script
/// copies them into its OUT_DIR).
pub const OBJECT_HARNESS: &str = "lb-bench-harness";
pub const OBJECT_REFERENCE: &str = "lb-baseline";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), four u32 then u64s: no padding (bytemuck::Pod is derived).
    unsafe impl aya::Pod for super::Template {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_no_padding_and_the_kernel_layout() {
        assert_eq!(core::mem::size_of::<Template>(), 16 + TEMPLATE_MAX_BYTES);
        assert_eq!(core::mem::offset_of!(Template, words), 16);
    }

    #[test]
    fn a_frame_round_trips_through_its_template() {
        let frame: std::vec::Vec<u8> = (0..64u8).collect();
        let template = Template::of_frame(&frame, 34, 26, 7).map_err(|e| e.len);
        assert_eq!(template.map(|t| t.frame().to_vec()), Ok(frame));
    }

    #[test]
    fn frames_that_are_not_whole_words_or_too_long_are_refused() {
        assert_eq!(Template::of_frame(&[0; 60], 0, 0, 0), Err(FrameNotTemplate { len: 60 }));
        assert!(Template::of_frame(&[0; TEMPLATE_MAX_BYTES + 8], 0, 0, 0).is_err());
        assert!(Template::of_frame(&[0; TEMPLATE_MAX_BYTES], 0, 0, 0).is_ok());
    }

    #[test]
    fn counter_indices_are_dense() {
        for (i, counter) in HarnessCounter::ALL.iter().enumerate() {
            assert_eq!(counter.index() as usize, i);
        }
    }
}
