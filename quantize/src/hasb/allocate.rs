//! HASB's allocation (METHOD.md §3): a bit-width b_l per quantized matrix minimising
//! Σ_l s_l·‖Q_{b_l}(W_l) − W_l‖² (s_l = Tr(H_l)/n_l, the sensitivity per weight) under a budget
//! of bits per weight counted as `drq-eval` counts them. A multiple-choice knapsack, solved
//! exactly by dynamic programming over the sizes in units of their greatest common divisor.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use kernels::{QuantizedWeight, TieRule};
use model::checkpoint::{Checkpoint, QuantizationMeta};
use model::Weights;
use rayon::prelude::*;

use crate::train::data::splitmix64;

/// One way to quantize an item: its bit-width, the bits it occupies, and its cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub bits: u32,
    pub size: u64,
    pub cost: f64,
}

/// What the solver chooses one candidate for: one matrix, or matrices that must share a
/// bit-width (e.g. the projections reading the same input).
#[derive(Debug, Clone)]
pub struct Item {
    pub names: Vec<String>,
    /// Weights of each of those matrices.
    pub weights: Vec<u64>,
    /// In increasing bits.
    pub candidates: Vec<Candidate>,
}

/// The solver's answer: a candidate index per item.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub choices: Vec<usize>,
    pub cost: f64,
    pub size: u64,
    /// Whether the sizes were solved exactly; `false` when the table would have been too large
    /// and sizes were rounded up to a coarser unit (the answer is feasible, maybe not optimal).
    pub exact: bool,
}

/// Cells of the dynamic programme's choice table beyond which sizes are coarsened.
const MAX_CELLS: u64 = 20_000_000;

/// The cheapest choice of one candidate per item whose sizes sum to at most `capacity`.
pub fn solve(items: &[Item], capacity: u64) -> Result<Solution> {
    ensure!(items.iter().all(|i| !i.candidates.is_empty()), "an item has no candidate");
    let floor: u64 = items.iter().map(|i| i.candidates.iter().map(|c| c.size).min().unwrap_or(0)).sum();
    if floor > capacity {
        bail!("the budget holds {capacity} bits; the smallest choice of every item needs {floor}");
    }
    // Sizes above each item's smallest: every item can take 0, so every capacity is feasible.
    let extra: Vec<Vec<u64>> = items
        .iter()
        .map(|i| {
            let min = i.candidates.iter().map(|c| c.size).min().unwrap_or(0);
            i.candidates.iter().map(|c| c.size - min).collect()
        })
        .collect();
    let spare = (capacity - floor).min(extra.iter().map(|e| e.iter().max().copied().unwrap_or(0)).sum());
    let mut unit = extra.iter().flatten().fold(0, |g, &s| gcd(g, s)).max(1);
    let mut exact = true;
    let width = |unit: u64| spare / unit + 1;
    if width(unit) * items.len() as u64 > MAX_CELLS {
        unit = unit.max(spare.div_ceil(MAX_CELLS / items.len().max(1) as u64 - 1));
        exact = false;
    }
    let width = width(unit) as usize;
    let units: Vec<Vec<usize>> = extra.iter().map(|e| e.iter().map(|&s| s.div_ceil(unit) as usize).collect()).collect();

    // best[c]: the least cost of the items so far within c units; choice[i][c]: item i's pick.
    let mut best = vec![0f64; width];
    let mut choice = vec![vec![0u8; width]; items.len()];
    for (i, item) in items.iter().enumerate() {
        let mut next = vec![f64::INFINITY; width];
        for (j, cand) in item.candidates.iter().enumerate() {
            let u = units[i][j];
            for c in u..width {
                let cost = best[c - u] + cand.cost;
                if cost < next[c] {
                    next[c] = cost;
                    choice[i][c] = j as u8;
                }
            }
        }
        best = next;
    }
    let mut choices = vec![0; items.len()];
    let mut c = width - 1;
    for i in (0..items.len()).rev() {
        let j = choice[i][c] as usize;
        choices[i] = j;
        c -= units[i][j];
    }
    let size = items.iter().zip(&choices).map(|(i, &j)| i.candidates[j].size).sum();
    let cost = items.iter().zip(&choices).map(|(i, &j)| i.candidates[j].cost).sum();
    Ok(Solution { choices, cost, size, exact })
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What the budget averages over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weighting {
    /// Bits per weight as `drq-eval` reports them: every matrix weighted by its size, scales and
    /// corrections included, matrices kept in float at 32 bits (a memory budget).
    #[default]
    Parameters,
    /// The plain mean of the quantized matrices' bit-widths.
    Matrices,
}

impl std::str::FromStr for Weighting {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "parameters" => Ok(Weighting::Parameters),
            "matrices" => Ok(Weighting::Matrices),
            other => bail!("unknown weighting {other:?} (expected \"parameters\" or \"matrices\")"),
        }
    }
}

/// The allocation's settings besides the budget.
#[derive(Debug, Clone)]
pub struct AllocationSpec {
    /// Bit-widths a matrix may take.
    pub bits: Vec<u32>,
    pub weighting: Weighting,
    /// (name substring, least bits): e.g. (`embed_tokens`, 6).
    pub floors: Vec<(String, u32)>,
    /// One bit-width for the projections that read the same input (q/k/v, gate/up).
    pub tie_inputs: bool,
}

impl Default for AllocationSpec {
    fn default() -> Self {
        Self {
            bits: (kernels::MIN_BITS..=kernels::STORED_BITS).collect(),
            weighting: Weighting::Parameters,
            floors: Vec::new(),
            tie_inputs: false,
        }
    }
}

/// A `PATTERN=BITS` floor, as `--floor` takes it.
pub fn parse_floor(s: &str) -> Result<(String, u32)> {
    let (pattern, bits) = s.split_once('=').with_context(|| format!("floor {s:?}: expected PATTERN=BITS"))?;
    let bits: u32 = bits.trim().parse().with_context(|| format!("floor {s:?}: {bits:?} is not a bit-width"))?;
    kernels::check_bits(bits).map_err(|e| anyhow::anyhow!("floor {s:?}: {e}"))?;
    ensure!(!pattern.is_empty(), "floor {s:?}: empty pattern");
    Ok((pattern.to_string(), bits))
}

/// The group of matrices reading the same input as `name` (its own name when it shares none).
fn input_group(name: &str) -> String {
    name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
}

/// ‖Q_b(W) − W‖² of every quantized matrix (`quantized(name)`: its codes, scales and
/// corrections) against the float `weights`, for each of `bits`, served as the checkpoint serves
/// them (second rounding with `tie`, corrections included).
pub fn quantization_errors(
    names: &[String],
    quantized: impl Fn(&str) -> Result<QuantizedWeight> + Sync,
    tie: TieRule,
    weights: &Weights,
    bits: &[u32],
) -> Result<BTreeMap<String, Vec<f64>>> {
    names
        .par_iter()
        .map(|name| {
            let w: Vec<f32> = weights
                .iter()
                .find(|(n, _)| *n == name)
                .with_context(|| format!("the float model has no `{name}`"))?
                .1
                .flatten_all()?
                .to_vec1()?;
            let q = quantized(name)?;
            ensure!(q.codes.len() == w.len(), "`{name}`: the checkpoint's shape differs from the float model's");
            let errors = bits
                .iter()
                .map(|&b| {
                    let d = q.dequantize(b, tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
                    Ok(d.iter().zip(&w).map(|(&d, &w)| (f64::from(d) - f64::from(w)).powi(2)).sum())
                })
                .collect::<Result<Vec<f64>>>()?;
            Ok((name.clone(), errors))
        })
        .collect()
}

/// [`quantization_errors`] of a checkpoint's weights.
pub fn checkpoint_errors(ckpt: &Checkpoint, weights: &Weights, bits: &[u32]) -> Result<BTreeMap<String, Vec<f64>>> {
    quantization_errors(&ckpt.quantization().quantized, |name| ckpt.quantized(name), ckpt.tie_rule(), weights, bits)
}

/// One bit-width per quantized matrix, and what it measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub bits: BTreeMap<String, u32>,
    /// As the budget counts it (bits per weight, or mean bits per matrix).
    pub mean_bits: f64,
    /// Σ_l s_l·‖Q_{b_l}(W_l) − W_l‖².
    pub objective: f64,
    pub exact: bool,
}

/// The knapsack of one checkpoint: its items (with costs from sensitivities and errors), and
/// what the budget's mean is over.
#[derive(Debug, Clone)]
pub struct Problem {
    items: Vec<Item>,
    /// Bits outside the items (matrices kept in float), counted in the mean.
    fixed: u64,
    /// What the mean divides by: weights, or quantized matrices.
    denominator: f64,
}

impl Problem {
    /// `errors[name][i]` is ‖Q_b(W) − W‖² at `spec.bits[i]`; `sensitivity(name)` is s_l.
    pub fn new(
        meta: &QuantizationMeta,
        config: &model::ModelConfig,
        errors: &BTreeMap<String, Vec<f64>>,
        sensitivity: impl Fn(&str) -> Result<f64>,
        spec: &AllocationSpec,
    ) -> Result<Self> {
        ensure!(!spec.bits.is_empty(), "no bit-widths to allocate");
        for &b in &spec.bits {
            kernels::check_bits(b).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let mut groups: BTreeMap<String, Vec<(String, usize, usize)>> = BTreeMap::new();
        let (mut fixed, mut weights, mut matrices) = (0u64, 0u64, 0u64);
        for (name, shape) in Weights::expected_shapes(config) {
            let &[rows, cols] = shape.as_slice() else { continue };
            weights += (rows * cols) as u64;
            if meta.quantized.binary_search(&name).is_err() {
                fixed += 32 * (rows * cols) as u64;
                continue;
            }
            matrices += 1;
            let key = if spec.tie_inputs { input_group(&name) } else { name.clone() };
            groups.entry(key).or_default().push((name, rows, cols));
        }
        let mut items = Vec::with_capacity(groups.len());
        for members in groups.into_values() {
            let least = |name: &str| spec.floors.iter().filter(|(p, _)| name.contains(p.as_str())).map(|f| f.1).max();
            let floor = members.iter().filter_map(|(n, ..)| least(n)).max().unwrap_or(0);
            let mut candidates = Vec::new();
            let mut bits: Vec<u32> = spec.bits.iter().copied().filter(|&b| b >= floor).collect();
            bits.sort_unstable();
            bits.dedup();
            let mut member_costs = Vec::with_capacity(members.len());
            for (name, ..) in &members {
                let s = sensitivity(name)?;
                ensure!(s.is_finite(), "`{name}`: sensitivity {s} is not finite");
                let e = errors.get(name).with_context(|| format!("no quantization error for `{name}`"))?;
                member_costs.push((s, e));
            }
            for b in bits {
                let i = spec.bits.iter().position(|&x| x == b).expect("from the list");
                let (mut size, mut cost) = (0u64, 0f64);
                for ((name, rows, cols), (s, errors)) in members.iter().zip(&member_costs) {
                    size += match spec.weighting {
                        Weighting::Parameters => meta.matrix_bits(name, *rows, *cols, b)?,
                        Weighting::Matrices => u64::from(b),
                    };
                    cost += s * errors[i];
                }
                candidates.push(Candidate { bits: b, size, cost });
            }
            let weights = members.iter().map(|(_, rows, cols)| (rows * cols) as u64).collect();
            let names: Vec<String> = members.into_iter().map(|(n, ..)| n).collect();
            ensure!(!candidates.is_empty(), "no bit-width of {:?} meets the floor of {}", spec.bits, names.join(", "));
            items.push(Item { names, weights, candidates });
        }
        let (fixed, denominator) = match spec.weighting {
            Weighting::Parameters => (fixed, weights as f64),
            Weighting::Matrices => (0, matrices as f64),
        };
        ensure!(denominator > 0.0, "the checkpoint quantizes no matrix");
        Ok(Self { items, fixed, denominator })
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The bits a `budget` (a mean) leaves for the items.
    fn capacity(&self, budget: f64) -> Result<u64> {
        ensure!(budget.is_finite() && budget > 0.0, "budget {budget} must be a positive number of bits");
        let total = (budget * self.denominator).floor() as u64;
        total.checked_sub(self.fixed).with_context(|| {
            format!(
                "budget {budget}: the matrices kept in float alone take {:.3}",
                self.fixed as f64 / self.denominator
            )
        })
    }

    fn allocation(&self, choices: &[usize], exact: bool) -> Allocation {
        let mut bits = BTreeMap::new();
        let (mut size, mut objective) = (self.fixed, 0.0);
        for (item, &j) in self.items.iter().zip(choices) {
            let c = item.candidates[j];
            size += c.size;
            objective += c.cost;
            for name in &item.names {
                bits.insert(name.clone(), c.bits);
            }
        }
        Allocation { bits, mean_bits: size as f64 / self.denominator, objective, exact }
    }

    /// The least-cost allocation within `budget`.
    pub fn allocate(&self, budget: f64) -> Result<Allocation> {
        let capacity = self.capacity(budget)?;
        let solution = solve(&self.items, capacity).with_context(|| format!("budget {budget}"))?;
        Ok(self.allocation(&solution.choices, solution.exact))
    }

    /// The objective of any allocation (e.g. one a baseline chose) under this problem's costs;
    /// NaN where it gives a matrix a bit-width this problem does not offer.
    pub fn objective(&self, allocation: &Allocation) -> f64 {
        self.items
            .iter()
            .map(|i| {
                let b = allocation.bits.get(&i.names[0]).copied();
                i.candidates.iter().find(|c| Some(c.bits) == b).map_or(f64::NAN, |c| c.cost)
            })
            .sum()
    }

    /// A random allocation within `budget` that uses it as the solver does: every item starts at
    /// its most bits, then items drawn at random step down one bit-width until the budget holds.
    pub fn random(&self, budget: f64, seed: u64) -> Result<Allocation> {
        let capacity = self.capacity(budget)?;
        let mut choices: Vec<usize> = self.items.iter().map(|i| i.candidates.len() - 1).collect();
        let mut size: u64 = self.items.iter().zip(&choices).map(|(i, &j)| i.candidates[j].size).sum();
        let mut next = splitmix64(seed ^ 0x243F_6A88_85A3_08D3);
        while size > capacity {
            let lowerable: Vec<usize> = (0..self.items.len()).filter(|&i| choices[i] > 0).collect();
            ensure!(!lowerable.is_empty(), "budget {budget}: below the least every matrix can take");
            let i = lowerable[(next() % lowerable.len() as u64) as usize];
            let c = &self.items[i].candidates;
            size = size - c[choices[i]].size + c[choices[i] - 1].size;
            choices[i] -= 1;
        }
        Ok(self.allocation(&choices, true))
    }
}

/// Which profiles to make at each budget.
#[derive(Debug, Clone)]
pub struct ProfileRequest {
    pub budgets: Vec<f64>,
    /// HASB's profiles are PREFIX-BUDGET.
    pub prefix: String,
    /// Also `tracefree-BUDGET`: the same solver with every matrix equally sensitive per weight.
    pub trace_free: bool,
    /// Also this many `random-BUDGET-sSEED`, seeds from `seed` on.
    pub random: usize,
    pub seed: u64,
}

/// A named allocation and a line saying what it is.
#[derive(Debug, Clone)]
pub struct NamedAllocation {
    pub name: String,
    pub description: String,
    pub allocation: Allocation,
}

/// HASB's allocation at each budget of `request` (sensitivities from `traces`), with the
/// baselines it asks for.
pub fn hasb_profiles(
    meta: &QuantizationMeta,
    config: &model::ModelConfig,
    errors: &BTreeMap<String, Vec<f64>>,
    traces: &super::TraceReport,
    spec: &AllocationSpec,
    request: &ProfileRequest,
) -> Result<(Problem, Vec<NamedAllocation>)> {
    ensure!(model::precision::is_profile_name(&request.prefix), "prefix `{}` is not a profile name", request.prefix);
    ensure!(!request.budgets.is_empty(), "no budgets");
    let hasb = Problem::new(meta, config, errors, |name| traces.sensitivity(name), spec)?;
    let trace_free =
        if request.trace_free { Some(Problem::new(meta, config, errors, |_| Ok(1.0), spec)?) } else { None };
    let mut out = Vec::new();
    for &budget in &request.budgets {
        out.push(NamedAllocation {
            name: profile_name(&request.prefix, budget),
            description: format!("HASB at {budget} bits ({:?} budget)", spec.weighting),
            allocation: hasb.allocate(budget)?,
        });
        if let Some(trace_free) = &trace_free {
            out.push(NamedAllocation {
                name: profile_name("tracefree", budget),
                description: format!("trace-free allocation at {budget} bits (the HASB solver, equal sensitivities)"),
                allocation: trace_free.allocate(budget)?,
            });
        }
        for seed in request.seed..request.seed + request.random as u64 {
            out.push(NamedAllocation {
                name: format!("{}-s{seed}", profile_name("random", budget)),
                description: format!("random allocation at {budget} bits (seed {seed})"),
                allocation: hasb.random(budget, seed)?,
            });
        }
    }
    Ok((hasb, out))
}

/// A profile's name for a budget: `PREFIX-3.0`, `PREFIX-2.5`.
pub fn profile_name(prefix: &str, budget: f64) -> String {
    if budget.fract() == 0.0 {
        format!("{prefix}-{budget:.1}")
    } else {
        format!("{prefix}-{budget}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of candidates, the cheapest within capacity.
    fn brute_force(items: &[Item], capacity: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; items.len()];
        loop {
            let size: u64 = items.iter().zip(&idx).map(|(i, &j)| i.candidates[j].size).sum();
            if size <= capacity {
                let cost: f64 = items.iter().zip(&idx).map(|(i, &j)| i.candidates[j].cost).sum();
                best = Some(best.map_or(cost, |b| b.min(cost)));
            }
            let mut k = 0;
            loop {
                if k == items.len() {
                    return best;
                }
                idx[k] += 1;
                if idx[k] < items[k].candidates.len() {
                    break;
                }
                idx[k] = 0;
                k += 1;
            }
        }
    }

    #[test]
    fn solver_matches_brute_force_on_random_instances() {
        let mut next = splitmix64(7);
        let mut uniform = move || (next() >> 11) as f64 / (1u64 << 53) as f64;
        for case in 0..300 {
            let n_items = 1 + (uniform() * 6.0) as usize;
            let items: Vec<Item> = (0..n_items)
                .map(|i| {
                    let n = 1 + (uniform() * 4.0) as usize;
                    let weight = 1 + (uniform() * 50.0) as u64;
                    let mut candidates: Vec<Candidate> = (0..n)
                        .map(|b| Candidate {
                            bits: 2 + b as u32,
                            size: weight * (2 + b as u64) + (uniform() * 7.0) as u64,
                            cost: uniform() * 10.0 / (1.0 + b as f64),
                        })
                        .collect();
                    candidates.sort_by_key(|c| c.bits);
                    Item { names: vec![format!("w{i}")], weights: vec![weight], candidates }
                })
                .collect();
            let least: u64 = items.iter().map(|i| i.candidates.iter().map(|c| c.size).min().unwrap()).sum();
            let most: u64 = items.iter().map(|i| i.candidates.iter().map(|c| c.size).max().unwrap()).sum();
            let capacity = least + ((most - least) as f64 * uniform()) as u64;
            let expected = brute_force(&items, capacity).expect("the least choice fits");
            let got = solve(&items, capacity).unwrap();
            assert!(got.exact);
            assert!(got.size <= capacity, "case {case}: size {} over {capacity}", got.size);
            assert!((got.cost - expected).abs() <= 1e-9 * expected.max(1.0), "case {case}: {} vs {expected}", got.cost);
            assert!(solve(&items, least.saturating_sub(1)).is_err() || least == 0);
        }
    }

    #[test]
    fn coarsened_tables_stay_within_capacity() {
        // Sizes with no common divisor and a capacity far beyond the table limit.
        let items: Vec<Item> = (0..4)
            .map(|i| Item {
                names: vec![format!("w{i}")],
                weights: vec![1_000_000_007],
                candidates: (2..=8)
                    .map(|b| {
                        let b64 = u64::from(b);
                        Candidate { bits: b, size: 1_000_000_007 * b64 + b64 * b64 + i, cost: 1.0 / f64::from(b) }
                    })
                    .collect(),
            })
            .collect();
        // Just short of 5 bits everywhere: the optimum is 5 bits but for one item at 4 (costs
        // are convex in bits).
        let capacity = items.iter().map(|i| i.candidates[3].size).sum::<u64>() - 1;
        let s = solve(&items, capacity).unwrap();
        assert!(!s.exact);
        assert!(s.size <= capacity);
        let mut bits: Vec<u32> = s.choices.iter().zip(&items).map(|(&j, i)| i.candidates[j].bits).collect();
        bits.sort_unstable();
        assert_eq!(bits, [4, 5, 5, 5]);
    }

    #[test]
    fn floors_names_and_bad_input() {
        assert_eq!(parse_floor("embed_tokens=6").unwrap(), ("embed_tokens".to_string(), 6));
        assert!(parse_floor("embed_tokens").is_err());
        assert!(parse_floor("embed_tokens=9").unwrap_err().to_string().contains("9"));
        assert!(parse_floor("=4").is_err());
        assert_eq!(profile_name("hasb", 3.0), "hasb-3.0");
        assert_eq!(profile_name("hasb", 2.75), "hasb-2.75");
        assert_eq!(input_group("model.layers.3.self_attn.v_proj.weight"), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(input_group("model.layers.3.mlp.up_proj.weight"), "model.layers.3.mlp.gate_proj.weight");
        assert_eq!(input_group("model.layers.3.mlp.down_proj.weight"), "model.layers.3.mlp.down_proj.weight");
    }
}
