//! The resident form of a checkpoint: every quantized weight converted ONCE into the kernels'
//! bit-plane layout ([`PlanarWeight`], shared through an `Arc`), the tensors kept in float as
//! candle tensors. One resident model serves every precision 2..=8 and any per-layer mix:
//! [`crate::Transformer::from_resident`] builds a transformer at a precision without copying or
//! decoding any weight.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Tensor;
use kernels::{PlanarWeight, TieRule};

use crate::checkpoint::{Checkpoint, LeadingRows, QuantizationMeta};
use crate::config::ModelConfig;
use crate::precision::Profiles;
use crate::weights::Weights;

/// One resident copy of a checkpoint's weights.
pub struct ResidentModel {
    config: ModelConfig,
    tie: TieRule,
    planar: BTreeMap<String, Arc<PlanarWeight>>,
    float: BTreeMap<String, Tensor>,
    /// The checkpoint's quantization metadata: its profiles and wide rows.
    quantization: QuantizationMeta,
}

impl ResidentModel {
    /// Converts every quantized weight of `checkpoint` (codes, scales, tie rule) into the bit-plane
    /// layout and copies the float tensors out of the mapping. The checkpoint can be dropped after.
    /// Weights are converted on up to `available_parallelism` threads.
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        let config = checkpoint.config().clone();
        let tie = checkpoint.tie_rule();
        let mut quantized = Vec::new();
        let mut float = BTreeMap::new();
        for (name, shape) in Weights::expected_shapes(&config) {
            if checkpoint.is_quantized(&name) {
                quantized.push((shape.iter().product::<usize>(), name));
            } else {
                let tensor = checkpoint.float_tensor(&name)?;
                float.insert(name, tensor);
            }
        }
        let convert = |name: &str| -> Result<Arc<PlanarWeight>> {
            let w = checkpoint.quantized(name)?;
            let planar = PlanarWeight::from_quantized(&w, tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
            Ok(Arc::new(planar))
        };
        // Largest first so the threads finish together (the embedding alone is a fifth of SmolLM2).
        quantized.sort_by(|a, b| b.cmp(a));
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(quantized.len()).max(1);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let converted: Vec<Vec<(String, Result<Arc<PlanarWeight>>)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((_, name)) = quantized.get(i) else { break };
                            out.push((name.clone(), convert(name)));
                        }
                        out
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().expect("conversion threads do not panic")).collect()
        });
        let mut planar = BTreeMap::new();
        for (name, result) in converted.into_iter().flatten() {
            planar.insert(
                name,
                result.with_context(|| format!("{}: building the resident weights", checkpoint.path().display()))?,
            );
        }
        Ok(Self { config, tie, planar, float, quantization: checkpoint.quantization().clone() })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint's named per-layer profiles.
    pub fn profiles(&self) -> &Profiles {
        &self.quantization.profiles
    }

    /// The rows of the quantized weight `name` served wider when it is at `bits`, if any.
    pub fn leading_rows(&self, name: &str, bits: u32) -> Option<LeadingRows> {
        self.quantization.leading_rows(name, bits)
    }

    /// The tie rule of the second rounding, baked into the planes.
    pub fn tie_rule(&self) -> TieRule {
        self.tie
    }

    /// The resident weight of the quantized tensor `name`, if it is quantized.
    pub fn planar(&self, name: &str) -> Option<&Arc<PlanarWeight>> {
        self.planar.get(name)
    }

    /// The float tensor `name` (norm, bias, weight kept in float), if it is one.
    pub fn float(&self, name: &str) -> Option<&Tensor> {
        self.float.get(name)
    }

    /// Every quantized weight, by name.
    pub fn planar_weights(&self) -> impl Iterator<Item = (&str, &Arc<PlanarWeight>)> {
        self.planar.iter().map(|(n, w)| (n.as_str(), w))
    }

    /// Bytes held: the planes and scales of every quantized weight plus the float tensors (f32).
    pub fn resident_bytes(&self) -> usize {
        self.planar.values().map(|w| w.resident_bytes()).sum::<usize>()
            + self.float.values().map(|t| t.elem_count() * 4).sum::<usize>()
    }
}
