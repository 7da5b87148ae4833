//! The benchmark's own XDP programs, built from tests/bench/ebpf by build.rs: the harness
//! object (`bench_harness`, `bench_generator`, `bench_sink`) and the reference object
//! (`baseline`, `helper_call`, `encap_floor`, `gue_floor`, `xdp_drop`). See tests/bench/ebpf/src/harness.rs
//! for what the harness does each run; the template's layout, the counter indices and every
//! name looked up here come from ballast-bench-common, as the kernel side's do.
use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, PerCpuArray, ProgramArray},
    programs::{xdp::XdpLink, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
pub use ballast_bench_common::HarnessCounter;
use ballast_bench_common::{
    Template, MAP_COUNTERS, MAP_TARGET, MAP_TEMPLATE, PROGRAM_BASELINE, PROGRAM_ENCAP_FLOOR, PROGRAM_GENERATOR,
    PROGRAM_GUE_FLOOR, PROGRAM_HARNESS, PROGRAM_HELPER_CALL, PROGRAM_SINK, PROGRAM_XDP_DROP,
};

use super::plan::Frame;

/// The two objects (ballast_bench_common::OBJECT_HARNESS and OBJECT_REFERENCE).
pub static HARNESS_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench-harness"));
pub static REFERENCE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-baseline"));

/// One BPF_PROG_TEST_RUN in repeat mode: the last run's verdict and the kernel's mean time.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub action: u32,
    pub ns_per_packet: f64,
}

pub struct Harness {
    ebpf: Ebpf,
    frame: Vec<u8>,
    /// The interface runs come in on (0: the namespace's loopback, the kernel's default).
    ingress_ifindex: u32,
}

impl Harness {
    pub fn load() -> anyhow::Result<Harness> {
        let mut ebpf = Ebpf::load(HARNESS_OBJECT).context("creating the bench harness's maps")?;
        for name in [PROGRAM_HARNESS, PROGRAM_GENERATOR, PROGRAM_SINK] {
            xdp_mut(&mut ebpf, name)?.load().with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Harness { ebpf, frame: Vec::new(), ingress_ifindex: 0 })
    }

    /// The frame every run starts from; `new_flow` varies the source per packet;
    /// `bench_generator` redirects to `redirect_ifindex`.
    pub fn set_frame(&mut self, frame: &Frame, new_flow: bool, redirect_ifindex: u32) -> anyhow::Result<()> {
        let offset = |o: usize| if new_flow { o as u32 } else { 0 };
        let template = Template::of_frame(
            &frame.bytes,
            offset(frame.sport_offset),
            offset(frame.saddr_word_offset),
            redirect_ifindex,
        )
        .map_err(|e| anyhow!("{e}"))?;
        let map = self.ebpf.map_mut(MAP_TEMPLATE).ok_or_else(|| anyhow!("map {MAP_TEMPLATE} missing"))?;
        Array::<_, Template>::try_from(map)?.set(0, template, 0).context("writing the template")?;
        self.frame = frame.bytes.clone();
        Ok(())
    }

    /// The program `bench_harness` tail-calls.
    pub fn set_target(&mut self, target: &Xdp) -> anyhow::Result<()> {
        let fd = target.fd().context("the target program is not loaded")?;
        let map = self.ebpf.map_mut(MAP_TARGET).ok_or_else(|| anyhow!("map {MAP_TARGET} missing"))?;
        ProgramArray::try_from(map)?.set(0, fd, 0).context("putting the target into the harness's program array")
    }

    /// Runs come in on the interface `ifindex` of the calling thread's namespace from now on
    /// (0: its loopback), for targets that look at it (the decapsulator's FIB lookups).
    pub fn set_ingress(&mut self, ifindex: u32) {
        self.ingress_ifindex = ifindex;
    }

    /// Runs harness + target `repeat` times on the frame.
    pub fn run(&self, repeat: u32) -> anyhow::Result<Run> {
        let program = xdp(&self.ebpf, PROGRAM_HARNESS)?;
        if self.ingress_ifindex == 0 {
            return run_repeat(program, &self.frame, repeat);
        }
        let context = ballast::ops::decap::test_run_context(self.frame.len(), self.ingress_ifindex)?;
        let options =
            TestRunOptions { data_in: Some(&self.frame), ctx_in: Some(&context), repeat, ..TestRunOptions::new() };
        let result = program.test_run(options).context("BPF_PROG_TEST_RUN from an interface")?;
        Ok(Run { action: result.return_value, ns_per_packet: result.duration.as_nanos() as f64 })
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
        let result = xdp(&self.ebpf, PROGRAM_GENERATOR)?
            .test_run(options)
            .context("BPF_PROG_TEST_RUN (live frames) of the generator")?;
        Ok(result.duration.as_nanos() as f64)
    }

    pub fn counter(&self, which: HarnessCounter) -> anyhow::Result<u64> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or_else(|| anyhow!("map {MAP_COUNTERS} missing"))?;
        let array = PerCpuArray::<_, u64>::try_from(map)?;
        Ok(array.get(&which.index(), 0).context("reading the harness counters")?.iter().sum())
    }

    /// Attaches `bench_sink` (count and drop) to an interface of this thread's namespace.
    pub fn attach_sink(&mut self, if_index: u32) -> anyhow::Result<XdpLink> {
        attach_native(xdp_mut(&mut self.ebpf, PROGRAM_SINK)?, if_index)
    }
}

/// The reference programs of tests/bench/ebpf/src/baseline.rs.
pub struct Reference {
    ebpf: Ebpf,
}

impl Reference {
    pub fn load() -> anyhow::Result<Reference> {
        let mut ebpf = Ebpf::load(REFERENCE_OBJECT).context("creating the reference programs")?;
        for name in [PROGRAM_BASELINE, PROGRAM_HELPER_CALL, PROGRAM_ENCAP_FLOOR, PROGRAM_GUE_FLOOR, PROGRAM_XDP_DROP] {
            xdp_mut(&mut ebpf, name)?.load().with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Reference { ebpf })
    }

    pub fn baseline(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, PROGRAM_BASELINE)
    }

    pub fn helper_call(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, PROGRAM_HELPER_CALL)
    }

    pub fn encap_floor(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, PROGRAM_ENCAP_FLOOR)
    }

    pub fn gue_floor(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, PROGRAM_GUE_FLOOR)
    }

    pub fn xdp_drop(&self) -> anyhow::Result<&Xdp> {
        xdp(&self.ebpf, PROGRAM_XDP_DROP)
    }

    pub fn attach_baseline(&mut self, if_index: u32) -> anyhow::Result<XdpLink> {
        attach_native(xdp_mut(&mut self.ebpf, PROGRAM_BASELINE)?, if_index)
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

#[cfg(test)]
mod tests {
    use super::*;
    use ballast_bench_common::OBJECT_HARNESS;

    /// Every map and program the bench looks up is in the objects build.rs embedded (read
    /// without a kernel), so a name changed on one side only fails here, not in a root run.
    #[test]
    fn the_embedded_objects_hold_every_name_the_bench_looks_up() -> anyhow::Result<()> {
        let harness = aya_obj::Object::parse(HARNESS_OBJECT).with_context(|| format!("parsing {OBJECT_HARNESS}"))?;
        for map in [MAP_TEMPLATE, MAP_TARGET, MAP_COUNTERS] {
            assert!(harness.maps.contains_key(map), "map {map} missing from the harness object");
        }
        for program in [PROGRAM_HARNESS, PROGRAM_GENERATOR, PROGRAM_SINK] {
            assert!(harness.programs.contains_key(program), "program {program} missing from the harness object");
        }
        let reference = aya_obj::Object::parse(REFERENCE_OBJECT).context("parsing the reference object")?;
        for program in [PROGRAM_BASELINE, PROGRAM_HELPER_CALL, PROGRAM_ENCAP_FLOOR, PROGRAM_GUE_FLOOR, PROGRAM_XDP_DROP]
        {
            assert!(reference.programs.contains_key(program), "program {program} missing from the reference object");
        }
        Ok(())
    }

    /// The template map's value is the shared `Template`, as the kernel side declares it.
    #[test]
    fn the_template_map_holds_one_shared_template() -> anyhow::Result<()> {
        let harness = aya_obj::Object::parse(HARNESS_OBJECT)?;
        let map = harness.maps.get(MAP_TEMPLATE).context("no template map")?;
        assert_eq!(map.value_size() as usize, std::mem::size_of::<Template>());
        assert_eq!(map.max_entries(), 1);
        let counters = harness.maps.get(MAP_COUNTERS).context("no counters map")?;
        assert_eq!(counters.max_entries(), HarnessCounter::COUNT);
        Ok(())
    }
}
