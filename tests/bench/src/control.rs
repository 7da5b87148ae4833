//! Control plane and kernel memory: Maglev table builds; a generation's parse, build, load
//! (create and fill the maps, verify, freeze) and native attach to the lab's veth; the
//! bpf_link_update that replaces it; `ballast attach` and `ballast swap` end to end (library
//! calls of the commands, pre-flight included); and each map's memlock from fdinfo.
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context as _};
use aya::programs::XdpMode;
use ballast::{
    generation::{address::format_mac, artifact::load_generation_file, config::Config, Generation},
    kernel::loader::{map_data, AttachMode, HostParams, LoadedGeneration, VerifierStats},
    ops::{
        attach::{self, AttachRequest},
        swap::swap,
        Change, Target,
    },
    state::StateDir,
};
use lb_common::maglev::{build_table, MaglevBackend};
use serde::Serialize;

use super::{
    lab::{memlock, LB_IF},
    plan::{VipPlan, HASH_SEED, SMALL_TABLE},
    progress,
    stats::Summary,
    Settings,
};

/// Maglev paper (NSDI 2016, section 5.3): table build times for 1000 backends.
const MAGLEV_BACKENDS: usize = 1000;
const MAGLEV_SIZES: [(u32, f64); 2] = [(65_537, 1.8), (655_373, 22.9)];

#[derive(Serialize)]
pub struct ControlPlane {
    pub runs: usize,
    pub maglev: Vec<MaglevRow>,
    pub generations: Vec<GenerationRow>,
}

#[derive(Serialize)]
pub struct MaglevRow {
    pub table_size: u32,
    pub backends: usize,
    pub ms: Summary,
    pub paper_ms: f64,
}

#[derive(Serialize)]
pub struct GenerationRow {
    pub vips: usize,
    pub backends_per_vip: usize,
    pub backends: usize,
    pub table_size: u32,
    pub table_entries: usize,
    /// Config text to validated config; to generation (Maglev tables); to a loaded, frozen
    /// program; to attached (native, veth).
    pub parse_ms: Summary,
    pub build_ms: Summary,
    pub load_ms: Summary,
    pub attach_ms: Summary,
    /// bpf_link_update to another generation, already loaded.
    pub link_update_ms: Summary,
    /// `ballast attach --config` and `ballast swap --generation` (a config), end to end.
    pub ballast_attach_ms: Summary,
    pub ballast_swap_ms: Summary,
    pub verifier: VerifierStats,
    pub memory: Memory,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub maps: Vec<MapMemory>,
    pub program_bytes: u64,
    /// Maps and program.
    pub total_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MapMemory {
    pub name: String,
    pub bytes: u64,
}

/// The generation sizes measured: 4096 VIPs get 4 backends each, 16384 being MAX_BACKENDS.
pub fn generation_plans() -> [VipPlan; 3] {
    [VipPlan::mixed(1, 8), VipPlan::mixed(512, 8), VipPlan::mixed(4096, 4)]
}

pub fn measure(settings: &Settings, host: &HostParams, lb_index: u32) -> anyhow::Result<ControlPlane> {
    let maglev = MAGLEV_SIZES
        .iter()
        .map(|&(size, paper_ms)| {
            progress(&format!("Maglev table M={size}, N={MAGLEV_BACKENDS}"));
            maglev_row(settings.control_runs, size, paper_ms)
        })
        .collect::<anyhow::Result<_>>()?;
    let generations = generation_plans()
        .iter()
        .map(|plan| {
            progress(&format!("generation of {} VIPs x {} backends: lifecycle", plan.vips(), plan.backends_per_vip));
            generation_row(settings.control_runs, plan, host, lb_index)
                .with_context(|| format!("control plane of {} VIPs", plan.vips()))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(ControlPlane { runs: settings.control_runs, maglev, generations })
}

fn maglev_row(runs: usize, size: u32, paper_ms: f64) -> anyhow::Result<MaglevRow> {
    let backends: Vec<MaglevBackend> = (0..MAGLEV_BACKENDS as u32)
        .map(|i| MaglevBackend { addr: [u32::from_be(0x0a00_0000 + i), 0, 0, 0], weight: 1 })
        .collect();
    let times = (0..runs)
        .map(|_| {
            let start = Instant::now();
            build_table(&backends, size, HASH_SEED).ok_or_else(|| anyhow!("no table built"))?;
            Ok(ms(start))
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(MaglevRow { table_size: size, backends: MAGLEV_BACKENDS, ms: Summary::of(&times), paper_ms })
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// The times of one run of a generation's life.
#[derive(Default)]
struct Lifecycle {
    parse: Vec<f64>,
    build: Vec<f64>,
    load: Vec<f64>,
    attach: Vec<f64>,
    link_update: Vec<f64>,
    ballast_attach: Vec<f64>,
    ballast_swap: Vec<f64>,
}

fn generation_row(runs: usize, plan: &VipPlan, host: &HostParams, lb_index: u32) -> anyhow::Result<GenerationRow> {
    let text = plan.toml(false);
    let variant = plan.toml(true);
    let mut times = Lifecycle::default();
    let mut facts = None;
    for _ in 0..runs {
        let these = library_lifecycle(&mut times, &text, &variant, host, lb_index)?;
        facts.get_or_insert(these);
        commands_lifecycle(&mut times, &text, &variant, host)?;
    }
    let Facts { memory, verifier, table_entries } = facts.ok_or_else(|| anyhow!("no run"))?;
    Ok(GenerationRow {
        vips: plan.vips(),
        backends_per_vip: plan.backends_per_vip,
        backends: plan.vips() * plan.backends_per_vip,
        table_size: plan.table_size.unwrap_or(SMALL_TABLE),
        table_entries,
        parse_ms: Summary::of(&times.parse),
        build_ms: Summary::of(&times.build),
        load_ms: Summary::of(&times.load),
        attach_ms: Summary::of(&times.attach),
        link_update_ms: Summary::of(&times.link_update),
        ballast_attach_ms: Summary::of(&times.ballast_attach),
        ballast_swap_ms: Summary::of(&times.ballast_swap),
        verifier,
        memory,
    })
}

fn parse(text: &str) -> anyhow::Result<Config> {
    Config::from_toml_str(text).map_err(|e| anyhow!("bench config: {e}"))
}

/// What a loaded generation is, beside how long it took.
struct Facts {
    memory: Memory,
    verifier: VerifierStats,
    table_entries: usize,
}

/// Parse, build, load, attach, replace with the variant.
fn library_lifecycle(
    times: &mut Lifecycle,
    text: &str,
    variant: &str,
    host: &HostParams,
    lb_index: u32,
) -> anyhow::Result<Facts> {
    let start = Instant::now();
    let config = parse(text)?;
    times.parse.push(ms(start));
    let start = Instant::now();
    let generation = Generation::build(&config)?;
    times.build.push(ms(start));
    let start = Instant::now();
    let mut loaded = LoadedGeneration::load(&generation, host, None)?;
    times.load.push(ms(start));
    let start = Instant::now();
    let link = loaded.attach(lb_index, XdpMode::Driver)?;
    times.attach.push(ms(start));
    let mut next = LoadedGeneration::load(&Generation::build(&parse(variant)?)?, host, None)?;
    let start = Instant::now();
    next.replace_on(link)?;
    times.link_update.push(ms(start));
    Ok(Facts {
        memory: memory_of(&loaded)?,
        verifier: loaded.verifier_stats()?,
        table_entries: generation.maglev.len(),
    })
}

/// What the `ballast attach` and `ballast swap` commands do, through their library calls,
/// with a private state directory; detached again afterwards.
fn commands_lifecycle(times: &mut Lifecycle, text: &str, variant: &str, host: &HostParams) -> anyhow::Result<()> {
    let session = CommandSession::create(text, variant)?;
    let request = AttachRequest {
        generation: session.config.clone(),
        iface: LB_IF.to_owned(),
        gateway_mac: format_mac(&host.gateway_mac),
        sources: Vec::new(),
        mode: AttachMode::Native,
    };
    let start = Instant::now();
    attach::attach(&session.state, &request).context("ballast attach")?;
    times.ballast_attach.push(ms(start));
    let start = Instant::now();
    let artifact = load_generation_file(&session.variant)?;
    swap(&session.state, &Target::new(LB_IF)?, &artifact, &Change::command("swap")).context("ballast swap")?;
    times.ballast_swap.push(ms(start));
    Ok(())
}

/// A private state directory and the two config files; detaches and removes them on drop.
struct CommandSession {
    dir: PathBuf,
    state: StateDir,
    config: PathBuf,
    variant: PathBuf,
}

impl CommandSession {
    fn create(text: &str, variant: &str) -> anyhow::Result<CommandSession> {
        let dir = std::env::temp_dir().join(format!("ballast-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let config = write("a.toml", text)?;
        let variant = write("b.toml", variant)?;
        let state = StateDir::open(Some(&dir.join("state")))?;
        Ok(CommandSession { dir, state, config, variant })
    }
}

impl Drop for CommandSession {
    fn drop(&mut self) {
        let _nothing_attached = attach::detach(&self.state, LB_IF);
        remove_dir(&self.dir);
    }
}

fn remove_dir(dir: &Path) {
    if let Err(err) = std::fs::remove_dir_all(dir) {
        eprintln!("bench: could not remove {}: {err}", dir.display());
    }
}

/// memlock of every map of the generation and of its program.
pub fn memory_of(loaded: &LoadedGeneration) -> anyhow::Result<Memory> {
    let mut maps = loaded
        .maps()
        .map(|(name, map)| Ok(MapMemory { name: name.to_owned(), bytes: memlock(map_data(map)?.fd().as_fd())? }))
        .collect::<anyhow::Result<Vec<_>>>()?;
    maps.sort_by(|a, b| a.name.cmp(&b.name));
    let program_bytes = memlock(loaded.program()?.fd().context("program fd")?.as_fd())?;
    let total_bytes = maps.iter().map(|m| m.bytes).sum::<u64>() + program_bytes;
    Ok(Memory { maps, program_bytes, total_bytes })
}
