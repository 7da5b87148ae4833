//! The benchmark's own XDP programs, built from lb-ebpf like ballast's: the harness object
//! (`bench_harness`, `bench_generator`, `bench_sink`) and the reference object (`baseline`,
//! `helper_call`, `encap_floor`, `xdp_drop`). See lb-ebpf/src/bench_harness.rs for what the harness does each run.
use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{xdp::XdpLink, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, Pod,
};

use super::plan::Frame;

static HARNESS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-harness"));
static REFERENCE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-baseline"));

const HARNESS: &str = "bench_harness";
const GENERATOR: &str = "bench_generator";
const SINK: &str = "bench_sink";
const BASELINE: &str = "baseline";
const HELPER_CALL: &str = "helper_call";
const ENCAP_FLOOR: &str = "encap_floor";
const XDP_DROP_PROGRAM: &str = "xdp_drop";
const TEMPLATE_MAP: &str = "BENCH_TEMPLATE";
const TARGET_MAP: &str = "BENCH_TARGET";
const COUNTERS_MAP: &str = "BENCH_COUNTERS";

/// Mirrors `Template` in bench_harness.rs.
const TEMPLATE_WORDS: usize = 32;
#[repr(C)]
#[derive(Clone, Copy)]
struct Template {
    len: u32,
    vary_port_offset: u32,
    vary_addr_offset: u32,
    redirect_ifindex: u32,
    words: [u64; TEMPLATE_WORDS],
}
// SAFETY: repr(C), four u32 then u64s: no padding.
unsafe impl Pod for Template {}

/// BENCH_COUNTERS indices, as in bench_harness.rs.
#[derive(Clone, Copy, Debug)]
pub enum HarnessCounter {
    RestoreFailed = 1,
    TailCallFailed = 2,
    SinkReceived = 3,
    SinkEncapsulated = 4,
}

/// One BPF_PROG_TEST_RUN in repeat mode: the last run's verdict and the kernel's mean time.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub action: u32,
    pub ns_per_packet: f64,
}

pub struct Harness {
    ebpf: Ebpf,
    frame: Vec<u8>,
}

impl Harness {
    pub fn load() -> anyhow::Result<Harness> {
        let mut ebpf = Ebpf::load(HARNESS_OBJECT).context("creating the bench harness's maps")?;
        for name in [HARNESS, GENERATOR, SINK] {
            xdp_mut(&mut ebpf, name)?.load().with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Harness { ebpf, frame: Vec::new() })
    }

    /// The frame every run starts from; `new_flow` varies the source per packet;
    /// `bench_generator` redirects to `redirect_ifindex`.
    pub fn set_frame(&mut self, frame: &Frame, new_flow: bool, redirect_ifindex: u32) -> anyhow::Result<()> {
        if !frame.bytes.len().is_multiple_of(8) || frame.bytes.len() > TEMPLATE_WORDS * 8 {
            bail!(
                "a template frame is a multiple of 8 bytes, at most {}; got {}",
                TEMPLATE_WORDS * 8,
                frame.bytes.len()
            );
        }
        let mut words = [0u64; TEMPLATE_WORDS];
        for (word, chunk) in words.iter_mut().zip(frame.bytes.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(bytes);
        }
        let offset = |o: usize| if new_flow { o as u32 } else { 0 };
        let template = Template {
            len: frame.bytes.len() as u32,
            vary_port_offset: offset(frame.sport_offset),
            vary_addr_offset: offset(frame.saddr_word_offset),
            redirect_ifindex,
            words,
        };
        let map = self.ebpf.map_mut(TEMPLATE_MAP).ok_or_else(|| anyhow!("map {TEMPLATE_MAP} missing"))?;
        Array::<_, Template>::try_from(map)?.set(0, template, 0).context("writing the template")?;
        self.frame = frame.bytes.clone();
        Ok(())
    }

    /// The program `bench_harness` tail-calls.
    pub fn set_target(&mut self, target: &Xdp) -> anyhow::Result<()> {
        let fd = target.fd().context("the target program is not loaded")?;
        let map = self.ebpf.map_mut(TARGET_MAP).ok_or_else(|| anyhow!("map {TARGET_MAP} missing"))?;
        ProgramArray::try_from(map)?.set(0, fd, 0).context("putting the target into the harness's program array")
    }

    /// Runs harness + target `repeat` times on the frame.
    pub fn run(&self, repeat: u32) -> anyhow::Result<Run> {
        run_repeat(xdp(&self.ebpf, HARNESS)?, &self.frame, repeat)
    }

    /// Sends `frames` frames through `bench_generator` in live-frames mode (they really leave
    /// through the redirect), `batch` to a batch; returns the kernel's ns per frame (the
    /// softirqs the batches raise, veth's NAPI polls, run within the time measured).
    pub fn generate(&self, frames: u32, batch: u32) -> anyhow::Result<f64> {
        let options = TestRunOptions {
            data_in: Some(&self.frame),
            repeat: frames,
            attrs: TestRunAttrs::new().xdp_live_frames(batch),
            ..TestRunOptions::new()
        };
        let result = xdp(&self.ebpf, GENERATOR)?
            .test_run(options)
            .context("BPF_PROG_TEST_RUN (live frames) of the generator")?;
        Ok(result.duration.as_nanos() as f64)
    }

    pub fn counter(&self, which: HarnessCounter) -> anyhow::Result<u64> {
        let map = self.ebpf.map(COUNTERS_MAP).ok_or_else(|| anyhow!("map {COUNTERS_MAP} missing"))?;
        let array = PerCpuArray::<_, u64>::try_from(map)?;
        Ok(array.get(&(which as u32), 0).context("reading the harness counters")?.iter().sum())
    }

    /// Attaches `bench_sink` (count and drop) to an interface of this thread's namespace.
    pub fn attach_sink(&mut self, if_index: u32) -> anyhow::Result<XdpLink> {
        attach_native(xdp_mut(&mut self.ebpf, SINK)?, if_index)
    }
}

/// The reference programs of lb-ebpf/src/baseline.rs.
pub struct Reference {
    ebpf: Ebpf,
}

impl Reference {
    pub fn load() -> anyhow::Result<Reference> {
        let mut ebpf = Ebpf::load(REFERENCE_OBJECT).context("creating the reference programs")?;
        for name in [BASELINE, HELPER_CALL, ENCAP_FLOOR, XDP_DROP_PROGRAM] {
            xdp_mut(&mut ebpf, name)?.load().with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Reference { ebpf })
    }

    pub fn baseline(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, BASELINE)
    }

    pub fn helper_call(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, HELPER_CALL)
    }

    pub fn encap_floor(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, ENCAP_FLOOR)
    }

    pub fn xdp_drop(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, XDP_DROP_PROGRAM)
    }

    pub fn attach_baseline(&mut self, if_index: u32) -> anyhow::Result<XdpLink> {
        attach_native(xdp_mut(&mut self.ebpf, BASELINE)?, if_index)
    }
}

/// BPF_PROG_TEST_RUN in repeat mode: `program` runs `repeat` times on one copy of `frame`.
pub fn run_repeat(program: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<Run> {
    let options = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::new() };
    let result = program.test_run(options).context("BPF_PROG_TEST_RUN")?;
    Ok(Run { action: result.return_value, ns_per_packet: result.duration.as_nanos() as f64 })
}

fn xdp<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Xdp> {
    let program = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing from its object"))?;
    program.try_into().with_context(|| format!("program {name} is not XDP"))
}

fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from its object"))?;
    program.try_into().with_context(|| format!("program {name} is not XDP"))
}

/// Native (driver) mode; the returned link detaches when dropped.
fn attach_native(program: &mut Xdp, if_index: u32) -> anyhow::Result<XdpLink> {
    let id = program.attach_to_if_index(if_index, XdpMode::Driver).context("attaching in native mode")?;
    program.take_link(id).context("taking the XDP link")
}
