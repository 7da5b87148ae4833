//! Differential testing: the same frames through the loaded XDP program and through the
//! reference model (`lb_common::model`), which must agree on the verdict, the output bytes and
//! every counter; the one allowance is the ICMP budget, which the model does not know
//! ([`judged`]).
use std::collections::BTreeMap;
use std::fmt;

use anyhow::anyhow;
use ballast::generation::artifact::Artifact;
use ballast::generation::config::Config;
use ballast::generation::lineage::LineageOptions;
use ballast::generation::program::LOAD_BALANCER;
use ballast::kernel::counters::CounterSnapshot;
use ballast::kernel::loader::HostParams;
use lb_common::maps::{Counter, Reason};
use lb_common::model::{decide, Decision, GenerationView, HostView};

use crate::harness::{CounterDelta, Harness, Verdict};
use crate::{action_name, hex, XDP_ABORTED};

/// Largest frame BPF_PROG_TEST_RUN hands an XDP program whole: a page (4096) less the XDP
/// headroom (256) and the aligned `skb_shared_info` (320). Larger frames are accepted, but
/// the bytes past this limit go into fragments that a program without `xdp.frags` never sees.
pub const TEST_RUN_LINEAR_LIMIT: usize = 3520;
/// Largest frame BPF_PROG_TEST_RUN accepts for XDP at all: the linear part and
/// MAX_SKB_FRAGS (17) pages of fragments; one byte more fails with ENOMEM.
pub const TEST_RUN_MAX_FRAME: usize = TEST_RUN_LINEAR_LIMIT + 17 * 4096;
/// Shortest frame the kernel runs XDP on (an Ethernet header); shorter ones fail with EINVAL.
pub const MIN_FRAME_LEN: usize = 14;

/// The model's decision for `frame` as BPF_PROG_TEST_RUN delivers it: the program sees the
/// linear part only, and whatever lies beyond stays behind the (possibly rewritten) head;
/// except after a too-big answer, which is cut to its own length, fragments and all.
pub fn model_decision(view: &GenerationView<'_>, host: &HostView, frame: &[u8]) -> Decision {
    let visible = &frame[..frame.len().min(TEST_RUN_LINEAR_LIMIT)];
    let mut decision = decide(visible, view, host);
    if let Some(output) = decision.output.as_mut().filter(|_| decision.reason != Reason::TooBigAnswered) {
        output.extend_from_slice(&frame[visible.len()..]);
    }
    decision
}

/// A frame on which kernel and model disagree.
#[derive(Clone, Debug)]
pub struct Divergence {
    /// Where the frame came from (fuzz seed and index, a regression file, ...).
    pub origin: String,
    pub frame: Vec<u8>,
    pub model: Reason,
    /// What differed, with both sides.
    pub what: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: the model says {}; {}\nframe ({} bytes){}",
            self.origin,
            self.model.name(),
            self.what,
            self.frame.len(),
            hex(&self.frame)
        )
    }
}

/// A frame to check and where it came from.
#[derive(Clone, Debug)]
pub struct Case {
    pub origin: String,
    pub frame: Vec<u8>,
}

/// A generation loaded into the kernel, checked frame by frame against the model.
pub struct Differential {
    pub lb: Harness,
    host: HostView,
}

impl Differential {
    pub fn load(config_toml: &str, host: HostParams) -> anyhow::Result<Differential> {
        Ok(Differential::of_harness(Harness::load(config_toml, host)?))
    }

    /// The generation `lb` loaded (a lineage generation, say), against the model.
    pub fn of_harness(lb: Harness) -> Differential {
        let host = lb.host.view();
        Differential { lb, host }
    }

    /// `config_toml`'s generation built after `predecessors` (oldest first, each built after
    /// the one before with `Artifact::build_after`), so with their lineage, loaded for `host`.
    pub fn load_after(
        config_toml: &str,
        predecessors: &[Config],
        options: &LineageOptions,
        host: HostParams,
    ) -> anyhow::Result<Differential> {
        let config = Config::from_toml_str(config_toml).map_err(|e| anyhow!("test config: {e}"))?;
        let mut artifact: Option<Artifact> = None;
        for config in predecessors.iter().chain([&config]) {
            artifact = Some(match &artifact {
                None => Artifact::build(config, LOAD_BALANCER)?,
                Some(previous) => Artifact::build_after(config, LOAD_BALANCER, previous, options)?,
            });
        }
        let generation = artifact.map(|a| a.generation).ok_or_else(|| anyhow!("no generation"))?;
        Ok(Differential::of_harness(Harness::of_generation(generation, host)?))
    }

    pub fn view(&self) -> GenerationView<'_> {
        self.lb.generation.view()
    }

    /// Runs one frame through the kernel and the model: the model's decision if they agree on
    /// the action and the output bytes.
    pub fn compare(&self, view: &GenerationView<'_>, case: &Case) -> Result<Decision, Divergence> {
        let decision = model_decision(view, &self.host, &case.frame);
        let model = decision.reason;
        let diverged =
            |what: String| Divergence { origin: case.origin.clone(), frame: case.frame.clone(), model, what };
        let verdict = self.lb.run(&case.frame).map_err(|e| diverged(format!("the kernel refused the frame: {e:#}")))?;
        let decision = judged(decision, &verdict, &case.frame);
        let expected_action = decision.reason.action();
        if verdict.action == XDP_ABORTED || verdict.action != expected_action {
            return Err(diverged(format!(
                "the kernel returned {} ({}), the model {} ({expected_action}); kernel output{}",
                action_name(verdict.action),
                verdict.action,
                action_name(expected_action),
                hex(&verdict.output)
            )));
        }
        let expected_output = decision.output.as_deref().unwrap_or(&case.frame);
        if verdict.output != expected_output {
            return Err(diverged(format!(
                "output bytes differ\nkernel{}\nmodel{}",
                hex(&verdict.output),
                hex(expected_output)
            )));
        }
        Ok(decision)
    }

    /// Checks every case, then the counters they moved (one look at the counters for all of
    /// them). A counter difference is narrowed down to one frame by bisection. Returns the
    /// reasons the cases were counted under, or every divergence found.
    pub fn compare_batch(&self, cases: &[Case]) -> Result<BTreeMap<&'static str, u64>, Vec<Divergence>> {
        self.compare_batch_from(&self.lb.counters(), cases).map(|(reasons, _)| reasons)
    }

    /// [`Differential::compare_batch`] from counters read before (the previous batch's
    /// `after`, saving a look): also returns the counters after this batch.
    pub fn compare_batch_from(
        &self,
        before: &CounterSnapshot,
        cases: &[Case],
    ) -> Result<(BTreeMap<&'static str, u64>, CounterSnapshot), Vec<Divergence>> {
        let view = self.view();
        let mut expected = CounterDelta::default();
        let mut divergences = Vec::new();
        for case in cases {
            match self.compare(&view, case) {
                Ok(decision) => tally(&mut expected, &decision),
                Err(divergence) => divergences.push(divergence),
            }
        }
        if !divergences.is_empty() {
            return Err(divergences);
        }
        let after = self.lb.counters();
        if CounterDelta::between(before, &after) != expected {
            return Err(vec![self.locate_counter_divergence(&view, cases)]);
        }
        Ok((expected.reasons, after))
    }

    /// The counters `cases` moved in the kernel, and what the model says they should move.
    fn counter_deltas(&self, view: &GenerationView<'_>, cases: &[Case]) -> (CounterDelta, CounterDelta) {
        let before = self.lb.counters();
        let mut expected = CounterDelta::default();
        for case in cases {
            // Verdicts were already compared: only the counters are of interest here (and
            // whether the budget let an answer out, which may differ from the first run).
            let decision = model_decision(view, &self.host, &case.frame);
            let decision = match self.lb.run(&case.frame) {
                Ok(verdict) => judged(decision, &verdict, &case.frame),
                Err(_) => decision,
            };
            tally(&mut expected, &decision);
        }
        (CounterDelta::between(&before, &self.lb.counters()), expected)
    }

    /// Bisects `cases` (whose counters disagree with the model) down to one frame.
    fn locate_counter_divergence(&self, view: &GenerationView<'_>, cases: &[Case]) -> Divergence {
        let mut suspects = cases;
        while suspects.len() > 1 {
            let (first, second) = suspects.split_at(suspects.len() / 2);
            let (moved, expected) = self.counter_deltas(view, first);
            suspects = if moved != expected { first } else { second };
        }
        let (moved, expected) = self.counter_deltas(view, suspects);
        let case = &suspects[0];
        Divergence {
            origin: case.origin.clone(),
            frame: case.frame.clone(),
            model: model_decision(view, &self.host, &case.frame).reason,
            what: format!("counters differ (alone, this frame moved {moved:?}, the model expects {expected:?})"),
        }
    }
}

/// The model's `decision` for `frame` given what the kernel did: an answer the model sends
/// (`too_big_answered`, `echo_answered`) that the kernel dropped with the frame unchanged was
/// over the per-CPU ICMP budget, which the model does not know (README "ICMP and path MTU"):
/// `icmp_rate_limited`. Any other difference stays one.
pub fn judged(decision: Decision, verdict: &Verdict, frame: &[u8]) -> Decision {
    let answered = matches!(decision.reason, Reason::TooBigAnswered | Reason::EchoAnswered);
    if answered && verdict.action == Reason::IcmpRateLimited.action() && verdict.output == frame {
        return Decision { reason: Reason::IcmpRateLimited, output: None, forwarded: None, steered: None };
    }
    decision
}

/// Adds what `decision` counts to `delta`: its reason, and for a forwarded frame its VIP and
/// backend by one packet of the inner IP length.
pub fn tally(delta: &mut CounterDelta, decision: &Decision) {
    *delta.reasons.entry(decision.reason.name()).or_default() += 1;
    if let Some(forwarded) = decision.forwarded {
        let bytes = forwarded.ip_len as u64;
        add(&mut delta.vips, forwarded.selection.vip_index as usize, bytes);
        add(&mut delta.backends, forwarded.selection.backend_index as usize, bytes);
    }
}

fn add(counters: &mut BTreeMap<usize, Counter>, index: usize, bytes: u64) {
    let counter = counters.entry(index).or_default();
    counter.packets += 1;
    counter.bytes += bytes;
}
