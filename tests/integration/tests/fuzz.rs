//! Differential fuzzing of the data plane: random and mutated frames through the loaded XDP
//! program (BPF_PROG_TEST_RUN) and through the reference model (`lb_common::model`), which
//! must agree on the verdict, the output bytes (so the backend) and, per batch, every counter.
//! No divergence and no XDP_ABORTED is allowed; the one allowance is the ICMP budget, which the
//! model does not know: an answer it sends may come out `icmp_rate_limited` (dropped,
//! unchanged). The frames include ICMP echo requests and errors quoting VIP flows (and
//! mutations of them) and TCP/UDP too big once encapsulated.
//!
//! Lineage generations (built with `Artifact::build_after`, slots that changed owner) get half
//! as many again, with every TCP flags byte to changed and unchanged slots.
//!
//! CI runs 1,000,000 frames with a fixed seed. Longer or other runs:
//! `BALLAST_FUZZ_FRAMES=N BALLAST_FUZZ_SEED=S cargo test -p ballast-tests --test fuzz -- --nocapture`
//! (or `cargo xtask fuzz --frames N --seed S`). A divergence prints its reproducer and is
//! saved in `regressions/` of this crate (a random scenario's config in `tests/fixtures/`),
//! whose every file is replayed by `regressions_replay`.
//! Needs root; skips without it unless CI is set.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::{Duration, Instant};

use ballast::generation::config::Config;
use ballast::generation::lineage::LineageOptions;
use ballast_test_support::{fixture, require_root};
use ballast_tests::differential::{
    model_decision, Case, Differential, Divergence, MIN_FRAME_LEN, TEST_RUN_LINEAR_LIMIT, TEST_RUN_MAX_FRAME,
};
use ballast_tests::fuzz_frames::{frame_rng, FrameFuzzer};
use ballast_tests::regressions::{load_all, regressions_dir, Reproducer};
use ballast_tests::scenarios::{fixed_scenarios, random_scenario, Scenario};
use ballast_tests::*;
use lb_common::maps::Reason;
use lb_common::model::GenerationView;

const DEFAULT_FRAMES: u64 = 1_000_000;
const DEFAULT_SEED: u64 = 0xba11_a57f_0220;
/// Frames between two looks at the counters (a look reads ~20,000 per-CPU counters).
const BATCH: u64 = 10_000;
/// Mixed into the seed of the lineage run, so that it writes other frames than the random run.
const LINEAGE_SEED: u64 = 0x11e4_a9e5;
/// Frames of each lineage generation whose paths are counted.
const PATH_SAMPLE: u64 = 20_000;
/// Random generations besides the fixed ones, per million frames (at least 4).
const RANDOM_SCENARIOS_PER_MILLION: u64 = 4;
/// At most this many divergences are printed and saved per run.
const MAX_REPORTED: usize = 20;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number"))
        }
        Err(_) => default,
    }
}

/// The fixed scenarios and `count` random ones derived from `seed`.
fn scenarios(seed: u64, count: u64) -> Vec<Scenario> {
    let mut all = fixed_scenarios();
    all.extend((0..count).map(|i| random_scenario(frame_rng(seed, u64::MAX - i).next_u64())));
    all
}

/// What a run of frames through one or more scenarios counted.
#[derive(Default)]
struct Tally {
    frames: u64,
    reasons: BTreeMap<&'static str, u64>,
    divergences: Vec<(Scenario, Divergence)>,
    kernel_time: Duration,
}

impl Tally {
    fn add_reasons(&mut self, reasons: BTreeMap<&'static str, u64>) {
        for (reason, count) in reasons {
            *self.reasons.entry(reason).or_default() += count;
        }
    }

    /// Counts a batch of `frames`: the reasons they were counted under, or their divergences.
    fn record(
        &mut self,
        scenario: &Scenario,
        frames: usize,
        outcome: Result<BTreeMap<&'static str, u64>, Vec<Divergence>>,
    ) {
        self.frames += frames as u64;
        match outcome {
            Ok(reasons) => self.add_reasons(reasons),
            Err(found) => self.divergences.extend(found.into_iter().map(|d| (scenario.clone(), d))),
        }
    }

    fn print_reasons(&self) {
        for reason in Reason::ALL {
            println!("  {:<22} {:>10}", reason.name(), self.reasons.get(reason.name()).copied().unwrap_or(0));
        }
    }
}

/// Runs frames `first..first + count` of the run seeded `seed` through `scenario`.
fn fuzz_scenario(scenario: &Scenario, seed: u64, first: u64, count: u64, tally: &mut Tally) {
    let differential = Differential::load(&scenario.config, scenario.host.clone())
        .unwrap_or_else(|e| panic!("loading scenario {}: {e:#}\n{}", scenario.name, scenario.config));
    fuzz_generation(&differential, scenario, seed, first, count, FrameFuzzer::frame, tally);
}

/// Runs frames `first..first + count` of the run seeded `seed`, as `write` writes them,
/// through `differential` (`scenario`'s generation). A second thread writes the next batch
/// while this one runs the current one.
fn fuzz_generation(
    differential: &Differential,
    scenario: &Scenario,
    seed: u64,
    first: u64,
    count: u64,
    write: fn(&FrameFuzzer, u64, u64) -> Vec<u8>,
    tally: &mut Tally,
) {
    let fuzzer = FrameFuzzer::new(&differential.lb.generation, scenario.host.mtu);
    let (sender, batches) = sync_channel::<Vec<Case>>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for start in (first..first + count).step_by(BATCH as usize) {
                let cases = (start..(start + BATCH).min(first + count))
                    .map(|index| Case {
                        origin: format!("fuzz seed {seed:#x} frame #{index}"),
                        frame: write(&fuzzer, seed, index),
                    })
                    .collect();
                if sender.send(cases).is_err() {
                    return; // the comparing side panicked
                }
            }
        });
        let started = Instant::now();
        let waited = compare_batches(differential, scenario, batches, tally);
        println!(
            "  {}: {count} frames in {:.1} s ({:.1} s of it waiting for frames)",
            scenario.name,
            started.elapsed().as_secs_f64(),
            waited.as_secs_f64()
        );
    });
}

/// Compares every batch received from `batches`, reading the counters once between two;
/// how long it waited for batches.
fn compare_batches(
    differential: &Differential,
    scenario: &Scenario,
    batches: Receiver<Vec<Case>>,
    tally: &mut Tally,
) -> Duration {
    let mut counters = differential.lb.counters();
    let mut waited = Duration::ZERO;
    loop {
        let waiting = Instant::now();
        let Ok(cases) = batches.recv() else { return waited };
        waited += waiting.elapsed();
        let started = Instant::now();
        let (outcome, after) = match differential.compare_batch_from(&counters, &cases) {
            Ok((reasons, after)) => (Ok(reasons), after),
            Err(found) => (Err(found), differential.lb.counters()),
        };
        counters = after;
        tally.kernel_time += started.elapsed();
        tally.record(scenario, cases.len(), outcome);
    }
}

/// Prints and, with `save`, saves (as `regressions/found-*.json`, a random scenario's config
/// as its fixture) the first divergences; panics if any.
fn report_divergences(divergences: &[(Scenario, Divergence)], save: bool) {
    if divergences.is_empty() {
        return;
    }
    for (scenario, divergence) in divergences.iter().take(MAX_REPORTED) {
        let reproducer = reproducer_of(scenario, divergence);
        let saved = if save {
            scenario.save_fixture().and_then(|()| reproducer.save(&regressions_dir()))
        } else {
            Err(anyhow::anyhow!("not saved: a reproducer names a generation without lineage"))
        };
        println!(
            "DIVERGENCE in scenario {} (host {:?}):\n{divergence}\nconfig:\n{}\nsaved: {saved:?}\n",
            scenario.name, scenario.host, scenario.config
        );
    }
    panic!(
        "{} frames on which the kernel and the model disagree (the first {} printed above and saved)",
        divergences.len(),
        MAX_REPORTED.min(divergences.len())
    );
}

fn reproducer_of(scenario: &Scenario, divergence: &Divergence) -> Reproducer {
    let tag: String = divergence.origin.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    Reproducer::of(
        format!("found-{}-{}", scenario.name, tag.trim_matches('-')),
        scenario,
        &divergence.origin,
        &divergence.frame,
        &divergence.what,
        divergence.model.name(),
    )
}

#[test]
fn random_and_mutated_frames_agree_with_the_model() {
    if !require_root("random_and_mutated_frames_agree_with_the_model") {
        return;
    }
    let frames = env_number("BALLAST_FUZZ_FRAMES", DEFAULT_FRAMES);
    let seed = env_number("BALLAST_FUZZ_SEED", DEFAULT_SEED);
    let scenarios =
        scenarios(seed, RANDOM_SCENARIOS_PER_MILLION.max(frames * RANDOM_SCENARIOS_PER_MILLION / 1_000_000));
    println!("differential fuzz: {frames} frames, seed {seed:#x}, {} generations", scenarios.len());
    let started = Instant::now();
    let mut tally = Tally::default();
    let share = frames.div_ceil(scenarios.len() as u64);
    for (i, scenario) in scenarios.iter().enumerate() {
        let first = i as u64 * share;
        fuzz_scenario(scenario, seed, first, share.min(frames.saturating_sub(first)), &mut tally);
    }
    let elapsed = started.elapsed();
    println!(
        "{} frames in {:.1} s: {:.0} frames/s ({:.1} s running and comparing; frames are written meanwhile on a second thread)",
        tally.frames,
        elapsed.as_secs_f64(),
        tally.frames as f64 / elapsed.as_secs_f64(),
        tally.kernel_time.as_secs_f64()
    );
    tally.print_reasons();
    report_divergences(&tally.divergences, true);
    if frames >= 100_000 {
        let never_expected = [Reason::DropEncapFailed.name(), Reason::DropTableMiss.name()];
        let missed: Vec<&str> = Reason::ALL
            .iter()
            .map(|r| r.name())
            .filter(|r| !never_expected.contains(r) && !tally.reasons.contains_key(r))
            .collect();
        assert!(missed.is_empty(), "the fuzzer never produced {missed:?}: it no longer covers every rule");
    }
}

/// Two predecessors of `config_toml`, oldest first: without each VIP's last backend (or,
/// where that leaves no weight, with that backend at another address), then with each VIP's
/// first backend 2 heavier. A generation built after them has slots that changed owner once
/// (a backend joined, a weight went back) or twice.
fn predecessors(config_toml: &str) -> Vec<Config> {
    let config = Config::from_toml_str(config_toml).unwrap_or_else(|e| panic!("{e}\n{config_toml}"));
    let mut older = config.clone();
    for vip in &mut older.vips {
        let (last, others) = vip.backends.split_last_mut().unwrap_or_else(|| unreachable!("a VIP has backends"));
        if others.iter().any(|b| b.weight > 0) {
            vip.backends.pop();
        } else {
            last.address = match last.address {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ 0x80)),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ 0x8000)),
            };
        }
    }
    let mut heavier = config;
    for vip in &mut heavier.vips {
        vip.backends[0].weight += 2;
    }
    vec![older, heavier]
}

/// The paths the model sends the first `count` frames of a lineage run on, by name.
fn count_paths(differential: &Differential, scenario: &Scenario, seed: u64, count: u64, paths: &mut Tally) {
    let fuzzer = FrameFuzzer::new(&differential.lb.generation, scenario.host.mtu);
    let view = differential.view();
    let plain = GenerationView::new(view.hash_seed, view.vips, view.backends, view.maglev);
    let host = differential.lb.host.view();
    for index in 0..count {
        let frame = fuzzer.second_chance_frame(seed, index);
        let decision = model_decision(&view, &host, &frame);
        let too_big = matches!(decision.reason, Reason::DropTooBig | Reason::TooBigAnswered);
        let path = match (decision.forwarded, decision.steered) {
            (Some(forwarded), _) if forwarded.second_chance => "gue_to_a_changed_slot",
            (Some(forwarded), _) if forwarded.selection.lineage.is_some() => "ipip_to_a_changed_slot",
            (Some(_), _) => "ipip_to_an_unchanged_slot",
            (None, Some(steered)) if steered.lineage.is_some() => "icmp_steered_to_a_changed_slot",
            (None, None) if too_big && model_decision(&plain, &host, &frame).reason == Reason::Forwarded => {
                "too_big_for_gue_only"
            }
            _ => continue,
        };
        *paths.reasons.entry(path).or_default() += 1;
    }
}

/// Lineage generations: each scenario's config built after [`predecessors`], through
/// `Artifact::build_after`, as `ballast swap` builds them; frames as the random run's, and
/// every other one to a VIP with each TCP flags byte in turn (or UDP), to changed and
/// unchanged slots. Half of `BALLAST_FUZZ_FRAMES`. Divergences are printed, not saved:
/// a reproducer names the config of a generation without lineage.
#[test]
fn lineage_generations_agree_with_the_model() {
    if !require_root("lineage_generations_agree_with_the_model") {
        return;
    }
    let frames = env_number("BALLAST_FUZZ_FRAMES", DEFAULT_FRAMES) / 2;
    let seed = env_number("BALLAST_FUZZ_SEED", DEFAULT_SEED) ^ LINEAGE_SEED;
    let scenarios = scenarios(seed, 2);
    println!("lineage fuzz: {frames} frames, seed {seed:#x}, {} generations", scenarios.len());
    let share = frames.div_ceil(scenarios.len() as u64);
    let (mut tally, mut paths) = (Tally::default(), Tally::default());
    for scenario in &scenarios {
        let differential = Differential::load_after(
            &scenario.config,
            &predecessors(&scenario.config),
            &LineageOptions::default(),
            scenario.host.clone(),
        )
        .unwrap_or_else(|e| panic!("loading scenario {} after its predecessors: {e:#}", scenario.name));
        let changed = differential.lb.generation.lineage.len();
        assert!(changed > 0, "{}: no slot changed owner", scenario.name);
        println!("  {}: {changed} of {} slots changed owner", scenario.name, differential.lb.generation.maglev.len());
        fuzz_generation(&differential, scenario, seed, 0, share, FrameFuzzer::second_chance_frame, &mut tally);
        count_paths(&differential, scenario, seed, share.min(PATH_SAMPLE), &mut paths);
    }
    tally.print_reasons();
    println!("paths (the first {PATH_SAMPLE} frames of each generation): {:?}", paths.reasons);
    report_divergences(&tally.divergences, false);
    if frames >= 100_000 {
        for path in [
            "gue_to_a_changed_slot",
            "ipip_to_a_changed_slot",
            "ipip_to_an_unchanged_slot",
            "too_big_for_gue_only",
            "icmp_steered_to_a_changed_slot",
        ] {
            assert!(paths.reasons.contains_key(path), "the lineage fuzzer never took {path}");
        }
    }
}

/// Well-formed frames of every kind (ICMP messages among them), cut at every length from 14
/// bytes on.
#[test]
fn every_truncation_agrees_with_the_model() {
    if !require_root("every_truncation_agrees_with_the_model") {
        return;
    }
    let mut tally = Tally::default();
    for scenario in fixed_scenarios() {
        let differential = Differential::load(&scenario.config, scenario.host.clone()).unwrap();
        let fuzzer = FrameFuzzer::new(&differential.lb.generation, scenario.host.mtu);
        let mut cases = Vec::new();
        for template in 0..300u64 {
            let rng = &mut frame_rng(0x7a11, template);
            let frame = if template < 200 { fuzzer.ip_frame(rng) } else { fuzzer.icmp_frame(rng) };
            for len in MIN_FRAME_LEN..=frame.len().min(160) {
                cases.push(Case {
                    origin: format!("template #{template} cut to {len} bytes"),
                    frame: frame[..len].to_vec(),
                });
            }
        }
        tally.record(&scenario, cases.len(), differential.compare_batch(&cases));
    }
    println!("{} truncated frames", tally.frames);
    tally.print_reasons();
    report_divergences(&tally.divergences, true);
}

#[test]
fn frames_shorter_than_ethernet_are_refused_by_the_kernel() {
    if !require_root("frames_shorter_than_ethernet_are_refused_by_the_kernel") {
        return;
    }
    let lb = Differential::load(&fixture("mixed").unwrap(), host_params(DEFAULT_MTU)).unwrap().lb;
    let before = lb.counters();
    for len in 0..MIN_FRAME_LEN {
        let error = lb.run(&vec![0x08; len]).expect_err("the kernel runs XDP on no frame shorter than 14 bytes");
        let text = format!("{error:#}");
        assert!(text.contains("os error 22"), "a {len}-byte frame: expected EINVAL, got {text}");
    }
    assert_eq!(
        CounterDelta::between(&before, &lb.counters()),
        CounterDelta::default(),
        "a refused frame counts nowhere"
    );
}

/// BPF_PROG_TEST_RUN hands the program at most 3520 bytes (a page less the headroom and the
/// shared info); up to 73,152 bytes it accepts, the tail in fragments the program does not
/// see. A VIP packet longer than what the program sees is dropped as truncated.
#[test]
fn test_run_frame_size_limits() {
    if !require_root("test_run_frame_size_limits") {
        return;
    }
    let scenario = &fixed_scenarios()[1]; // MTU 9000
    let differential = Differential::load(&scenario.config, scenario.host.clone()).unwrap();
    let (client, vip): (std::net::IpAddr, std::net::IpAddr) =
        ("198.51.100.7".parse().unwrap(), "192.0.2.10".parse().unwrap());
    let largest_whole = Packet::udp(client, vip, 1, 53).with_payload_len(TEST_RUN_LINEAR_LIMIT - 14 - 28).frame();
    let one_more = Packet::udp(client, vip, 1, 53).with_payload_len(TEST_RUN_LINEAR_LIMIT - 14 - 27).frame();
    let mut padded_past_the_limit = Packet::udp(client, vip, 1, 53).with_payload_len(100).frame();
    padded_past_the_limit.resize(TEST_RUN_MAX_FRAME, 0xee);
    let cases = [
        (largest_whole, Reason::Forwarded),
        (one_more, Reason::DropTruncated),
        (padded_past_the_limit, Reason::Forwarded),
    ];
    let view = differential.view();
    for (frame, reason) in cases {
        let case = Case { origin: format!("a {}-byte frame", frame.len()), frame };
        let decision = differential.compare(&view, &case).unwrap_or_else(|d| panic!("{d}"));
        assert_eq!(decision.reason, reason, "{}", case.origin);
    }
    let error = differential.lb.run(&vec![0; TEST_RUN_MAX_FRAME + 1]).expect_err("past the fragments' room");
    assert!(format!("{error:#}").contains("os error 12"), "expected ENOMEM: {error:#}");
}

/// The comparison itself must catch a model that is wrong: in the backend it picks (output
/// bytes), and in the counters alone (found by bisection down to one frame).
#[test]
fn the_comparison_catches_a_wrong_model() {
    if !require_root("the_comparison_catches_a_wrong_model") {
        return;
    }
    let scenario = &fixed_scenarios()[0];
    let frames = |lb: &Harness| -> Vec<Case> {
        let fuzzer = FrameFuzzer::new(&lb.generation, scenario.host.mtu);
        (0..2000)
            .map(|i| Case { origin: format!("frame #{i}"), frame: fuzzer.ip_frame(&mut frame_rng(0xbad, i)) })
            .collect()
    };
    // The kernel keeps its tables; only the model's copy of the generation is changed.
    let mut wrong_seed = Differential::load(&scenario.config, scenario.host.clone()).unwrap();
    wrong_seed.lb.generation.hash_seed ^= 1;
    let cases = frames(&wrong_seed.lb);
    let found = wrong_seed.compare_batch(&cases).expect_err("a model with another hash seed");
    assert!(
        found.iter().all(|d| d.model == Reason::Forwarded && d.what.contains("output bytes differ")),
        "{}",
        found[0]
    );

    let mut wrong_counters = Differential::load(&scenario.config, scenario.host.clone()).unwrap();
    for meta in wrong_counters.lb.generation.vip_entries.values_mut() {
        meta.vip_index ^= 1; // VIPs 0 and 1 (and 2 and 3, ...) swap their counters
    }
    let found = wrong_counters.compare_batch(&cases).expect_err("a model that counts under other VIPs");
    assert_eq!(found.len(), 1, "bisected down to one frame");
    assert!(found[0].model == Reason::Forwarded && found[0].what.contains("counters differ"), "{}", found[0]);
    println!("caught: {}", found[0]);
}

/// Every file in regressions/: kernel and model agree, and give the recorded reason.
#[test]
fn regressions_replay() {
    if !require_root("regressions_replay") {
        return;
    }
    let reproducers = load_all(&regressions_dir()).unwrap();
    assert!(!reproducers.is_empty(), "no reproducer in {}", regressions_dir().display());
    // Reproducers of one generation share its loaded program.
    let mut loaded: BTreeMap<String, Differential> = BTreeMap::new();
    let mut failures = Vec::new();
    for reproducer in &reproducers {
        let differential = loaded.entry(format!("{:?}{}", reproducer.host, reproducer.fixture)).or_insert_with(|| {
            let config = reproducer.config().unwrap_or_else(|e| panic!("{}: {e:#}", reproducer.name));
            Differential::load(&config, reproducer.host.clone())
                .unwrap_or_else(|e| panic!("{}: loading its generation: {e:#}", reproducer.name))
        });
        let case =
            Case { origin: format!("{} ({})", reproducer.name, reproducer.origin), frame: reproducer.frame.clone() };
        match differential.compare_batch(std::slice::from_ref(&case)) {
            Ok(reasons) if reasons.contains_key(reproducer.reason.as_str()) => {}
            Ok(reasons) => {
                failures.push(format!("{}: expected {}, both gave {reasons:?}", reproducer.name, reproducer.reason))
            }
            Err(found) => failures.extend(found.iter().map(|d| format!("{}: {d}", reproducer.name))),
        }
    }
    println!("{} reproducers replayed", reproducers.len());
    assert!(
        failures.is_empty(),
        "{} of {} reproducers fail:\n{}",
        failures.len(),
        reproducers.len(),
        failures.join("\n\n")
    );
}
