//! Post-training quantization of a whole model into one drq checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;
use kernels::QuantizedWeight;
use model::checkpoint::{self, CheckpointContents, ProvenanceMeta, QuantizationMeta};
use model::source::{FloatModel, Provenance};
use model::Weights;

use crate::ptq::{quantize_weight, reconstruction_error, QuantSpec};
use crate::report::LayerReport;

/// A model quantized in memory: what a checkpoint stores.
#[derive(Clone)]
pub struct QuantizedModel {
    pub quantization: QuantizationMeta,
    pub quantized: BTreeMap<String, QuantizedWeight>,
    pub float: BTreeMap<String, Tensor>,
    pub report: Vec<LayerReport>,
}

/// Which weights are quantized: every matrix, except those whose name contains one of
/// `keep_float` (e.g. `embed_tokens`, `lm_head`).
pub fn quantizable(config: &model::ModelConfig, keep_float: &[String]) -> Vec<(String, usize, usize)> {
    Weights::expected_shapes(config)
        .into_iter()
        .filter(|(name, shape)| shape.len() == 2 && !keep_float.iter().any(|k| name.contains(k.as_str())))
        .map(|(name, shape)| (name, shape[0], shape[1]))
        .collect()
}

/// Quantizes every quantizable weight of `float` with `spec`. `on_weight` is called after each
/// (progress reporting).
pub fn quantize_model(
    float: &FloatModel,
    spec: &QuantSpec,
    keep_float: &[String],
    mut on_weight: impl FnMut(&str),
) -> Result<QuantizedModel> {
    spec.validate()?;
    let targets = quantizable(&float.config, keep_float);
    let mut quantized = BTreeMap::new();
    let mut report = Vec::with_capacity(targets.len());
    for (name, rows, cols) in &targets {
        let w: Vec<f32> = float.weights.get(name, &[*rows, *cols])?.flatten_all()?.to_vec1()?;
        let q = quantize_weight(&w, *rows, *cols, &spec.for_weight(name)?)
            .with_context(|| format!("quantizing `{name}`"))?;
        let relative_error = spec
            .bits
            .iter()
            .map(|&b| Ok((b, reconstruction_error(&w, &q, b, spec.tie)?)))
            .collect::<Result<Vec<_>, crate::PtqError>>()?;
        report.push(LayerReport { name: name.clone(), rows: *rows, cols: *cols, relative_error, output_error: None });
        quantized.insert(name.clone(), q);
        on_weight(name);
    }
    let float_tensors = float
        .weights
        .iter()
        .filter(|(name, _)| !quantized.contains_key(*name))
        .map(|(name, t)| (name.clone(), t.clone()))
        .collect();
    let quantization = quantization_meta(spec, spec.scale_method(), quantized.keys().cloned().collect())?;
    Ok(QuantizedModel { quantization, quantized, float: float_tensors, report })
}

/// The metadata of the weights `names` quantized by `spec` with nearest rounding, scales made by
/// `scale_method`: what every quantizer first writes (the granularity overrides resolved to the
/// weights they cover).
pub fn quantization_meta(spec: &QuantSpec, scale_method: String, names: Vec<String>) -> Result<QuantizationMeta> {
    let overrides = spec.stored_overrides(&names)?;
    let mut meta = QuantizationMeta::nearest(&spec.bits, spec.granularity, spec.tie, scale_method, names);
    meta.granularity_overrides = overrides;
    Ok(meta)
}

/// Quantizes `float` as `settings` say, without calibration text: the scale search, then any
/// corrections fitted in weight space. What the tools that quantize on the fly use
/// (`drq-serve`, `drq-synth`, `drq-eval` on a float model).
pub fn quantize_with(
    float: &FloatModel,
    settings: &crate::recipe::PtqSettings,
    on_weight: impl FnMut(&str),
) -> Result<QuantizedModel> {
    let mut q = quantize_model(float, &settings.spec, &settings.keep_float, on_weight)?;
    q.quantization.widen_rows(&settings.wide_rows, &float.config)?;
    if !settings.corrections.is_empty() {
        let granularity = settings.correction_granularity;
        crate::corrections::correct_model(float, &mut q, &settings.corrections, granularity, None, |_| {})?;
    }
    Ok(q)
}

/// Writes `q` as a checkpoint at `path` (atomically).
pub fn write_checkpoint(path: &Path, float: &FloatModel, provenance: &Provenance, q: &QuantizedModel) -> Result<()> {
    write_checkpoint_as(path, float, provenance, q, "drq-quantize")
}

/// [`write_checkpoint`] recording `tool` (e.g. `drq-train`) and this version in the provenance.
pub fn write_checkpoint_as(
    path: &Path,
    float: &FloatModel,
    provenance: &Provenance,
    q: &QuantizedModel,
    tool: &str,
) -> Result<()> {
    let provenance = ProvenanceMeta {
        source: provenance.source.clone(),
        source_sha256: provenance.sha256.clone(),
        tool: format!("{tool} {}", env!("CARGO_PKG_VERSION")),
    };
    checkpoint::write(
        path,
        &CheckpointContents {
            config: &float.config,
            tokenizer: &float.tokenizer,
            add_bos: float.add_bos,
            chat_template: float.chat_template.as_deref(),
            quantization: &q.quantization,
            provenance: &provenance,
            quantized: &q.quantized,
            float: &q.float,
        },
    )
}
