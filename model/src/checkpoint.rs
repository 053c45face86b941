//! The drq checkpoint: one safetensors file holding INT8 codes, one shared scale tensor per
//! quantized weight, the tensors kept in float, and metadata. The layout is specified in
//! `docs/CHECKPOINT.md`; this module is its only reader and writer.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use half::f16;
use kernels::double_rounding::{self as dr, Granularity, QuantizedWeight, ScaleLayout, TieRule};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::precision::{is_profile_name, Precision, Profiles};
use crate::weights::Weights;

/// `format` metadata value identifying a drq checkpoint.
pub const FORMAT: &str = "drq-checkpoint";
/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Suffixes of the two tensors that hold a quantized weight `NAME`.
pub const CODES_SUFFIX: &str = ".codes";
pub const SCALES_SUFFIX: &str = ".scales";
/// Suffix of the optional per-precision corrections of a quantized weight `NAME`:
/// `[corrected_bits.len(), rows, k]` F16 (`k` = 1 per row, or the scales' groups per row), slice
/// `i` for `corrected_bits[i]`.
pub const CORRECTIONS_SUFFIX: &str = ".corrections";
/// The tokenizer JSON, stored as a U8 tensor to keep the header small.
pub const TOKENIZER_TENSOR: &str = "drq.tokenizer_json";

/// How the weights were quantized (`quantization` metadata, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantizationMeta {
    /// The bit-widths the checkpoint was built for (the scale search minimised their summed error).
    pub bits: Vec<u32>,
    /// `channel` or `group:N`: the scale layout of every quantized weight not named in
    /// `granularity_overrides`.
    pub granularity: String,
    /// Quantized weights laid out otherwise (full name → `channel` or `group:N`), e.g. a finer
    /// grouping for the embedding. Absent when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub granularity_overrides: BTreeMap<String, String>,
    /// Tie rule of the second rounding: `even` or `up`.
    pub tie_rule: String,
    /// How the initial scales were chosen (e.g. `search:normalized`).
    pub scale_method: String,
    /// How the codes were rounded given the scales: `nearest`, or `gptq:4,8` (Hessian-aware,
    /// bit-widths in priority order; see `quantize::gptq`). Absent in older checkpoints: nearest.
    #[serde(default = "nearest_rounding")]
    pub rounding: String,
    /// Names of the quantized weights, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub quantized: Vec<String>,
    /// Named per-layer profiles: a bit-width (2..8) for every quantized weight.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: Profiles,
    /// The bit-widths served with corrected scales (`NAME.corrections`), the same for every
    /// quantized weight; empty (absent) when none are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub corrected_bits: Vec<u32>,
    /// What one correction factor covers: an output row or one scale group of it.
    #[serde(default, skip_serializing_if = "CorrectionGranularity::is_row")]
    pub correction_granularity: CorrectionGranularity,
    /// The leading rows of one weight served wider than the rest of it (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wide_rows: Option<WideRows>,
}

/// Rows `0..rows` of the quantized weight `weight` served at `extra_bits` more than a precision
/// gives the weight (at most the stored 8), in every role the weight has. Meant for the weight
/// that computes the logits (the embedding when tied): a BPE vocabulary lists its tokens in merge
/// order, most frequent first, and the lm_head rows of the frequent tokens carry most of what a
/// low precision loses (docs/RESULTS.md, "Wider lm_head rows for the frequent tokens").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WideRows {
    pub weight: String,
    pub rows: usize,
    pub extra_bits: u32,
}

/// How many leading rows of the weight that computes the logits a quantizer widens, and by how
/// many bits: `ROWS:+BITS` (e.g. `4096:+1`), or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WideRowsSpec {
    None,
    Head { rows: usize, extra_bits: u32 },
}

impl WideRowsSpec {
    /// What the quantizers write unless told otherwise: the 4,096 first rows one bit wider
    /// (SmolLM2, WikiText-2: W3 −22 to −23%, W4 −3 to −6% for +0.017 bits per weight; docs/RESULTS.md).
    pub const DEFAULT: WideRowsSpec = WideRowsSpec::Head { rows: 4096, extra_bits: 1 };

    /// The wide rows of a model with `config` whose weights `quantized` are quantized: on the
    /// embedding when tied, else on the lm_head, at most its rows; none when that weight is float.
    pub fn resolve(&self, config: &ModelConfig, quantized: &[String]) -> Option<WideRows> {
        let WideRowsSpec::Head { rows, extra_bits } = *self else { return None };
        let weight = if config.tie_word_embeddings { crate::weights::EMBED } else { crate::weights::LM_HEAD };
        quantized.iter().any(|q| q == weight).then(|| WideRows {
            weight: weight.to_string(),
            rows: rows.min(config.vocab_size),
            extra_bits,
        })
    }
}

impl std::str::FromStr for WideRowsSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "none" {
            return Ok(WideRowsSpec::None);
        }
        let parsed = s.split_once(":+").and_then(|(rows, bits)| Some((rows.parse().ok()?, bits.parse().ok()?)));
        let Some((rows, extra_bits)) = parsed else {
            bail!("wide rows {s:?}: expected ROWS:+BITS (e.g. 4096:+1) or none")
        };
        ensure!(
            (1..=dr::STORED_BITS - dr::MIN_BITS).contains(&extra_bits),
            "wide rows {s:?}: {extra_bits} extra bits (1..={})",
            dr::STORED_BITS - dr::MIN_BITS
        );
        Ok(if rows == 0 { WideRowsSpec::None } else { WideRowsSpec::Head { rows, extra_bits } })
    }
}

impl Serialize for WideRowsSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WideRowsSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl std::fmt::Display for WideRowsSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WideRowsSpec::None => f.write_str("none"),
            WideRowsSpec::Head { rows, extra_bits } => write!(f, "{rows}:+{extra_bits}"),
        }
    }
}

/// Rows `0..rows` of a weight served at `bits` (the rest at the weight's own bit-width): a
/// [`WideRows`] at one precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeadingRows {
    pub rows: usize,
    pub bits: u32,
}

impl LeadingRows {
    /// The non-empty row ranges of a weight of `rows` rows served at `bits` with `lead`, each with
    /// its bit-width: `0..lead.rows` at `lead.bits`, then the rest at `bits`.
    pub fn ranges(lead: Option<LeadingRows>, rows: usize, bits: u32) -> Vec<(std::ops::Range<usize>, u32)> {
        let split = lead.map_or(0, |l| l.rows.min(rows));
        let wide = lead.map_or(bits, |l| l.bits);
        [(0..split, wide), (split..rows, bits)].into_iter().filter(|(r, _)| !r.is_empty()).collect()
    }
}

/// What one per-precision correction factor covers (see `kernels::QuantizedWeight::corrections`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorrectionGranularity {
    /// One factor per output row: 16 bits per row and corrected precision.
    #[default]
    Row,
    /// One factor per scale group: 16 bits per group (as many as the scales) and precision.
    Group,
}

impl CorrectionGranularity {
    fn is_row(&self) -> bool {
        *self == CorrectionGranularity::Row
    }

    /// Factors per row of a weight laid out by `layout`.
    pub fn per_row(self, layout: &ScaleLayout) -> usize {
        match self {
            CorrectionGranularity::Row => 1,
            CorrectionGranularity::Group => layout.n_groups(),
        }
    }
}

impl std::fmt::Display for CorrectionGranularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CorrectionGranularity::Row => "row",
            CorrectionGranularity::Group => "group",
        })
    }
}

impl std::str::FromStr for CorrectionGranularity {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "row" => Ok(CorrectionGranularity::Row),
            "group" => Ok(CorrectionGranularity::Group),
            other => bail!("unknown correction granularity {other:?} (expected \"row\" or \"group\")"),
        }
    }
}

fn nearest_rounding() -> String {
    "nearest".to_string()
}

impl QuantizationMeta {
    /// Codes rounded to nearest on scales made by `scale_method`, as every quantizer first writes
    /// them: no profiles and no corrections yet (the tools that make those add them).
    pub fn nearest(
        bits: &[u32],
        granularity: Granularity,
        tie: TieRule,
        scale_method: String,
        quantized: Vec<String>,
    ) -> Self {
        QuantizationMeta {
            bits: bits.to_vec(),
            granularity: granularity.to_string(),
            granularity_overrides: BTreeMap::new(),
            tie_rule: tie.to_string(),
            scale_method,
            rounding: nearest_rounding(),
            quantized,
            profiles: Profiles::default(),
            corrected_bits: Vec::new(),
            correction_granularity: CorrectionGranularity::Row,
            wide_rows: None,
        }
    }

    /// The rows of the quantized weight `name` served wider when the weight is at `bits`, if any.
    pub fn leading_rows(&self, name: &str, bits: u32) -> Option<LeadingRows> {
        let w = self.wide_rows.as_ref().filter(|w| w.weight == name && w.rows > 0)?;
        let wide = (bits + w.extra_bits).min(dr::STORED_BITS);
        (wide > bits).then_some(LeadingRows { rows: w.rows, bits: wide })
    }

    /// Sets the wide rows `spec` gives a model with `config` (clears them for `none`), checked
    /// against the model's weight shapes.
    pub fn widen_rows(&mut self, spec: &WideRowsSpec, config: &ModelConfig) -> Result<()> {
        let wide_rows = spec.resolve(config, &self.quantized);
        let old = std::mem::replace(&mut self.wide_rows, wide_rows);
        if let Err(e) = self.check_wide_rows(config) {
            self.wide_rows = old;
            return Err(e);
        }
        Ok(())
    }

    /// The wide rows name a quantized weight, fit inside it and widen by 1..=6 bits.
    fn check_wide_rows(&self, config: &ModelConfig) -> Result<()> {
        let Some(w) = &self.wide_rows else { return Ok(()) };
        ensure!(
            self.quantized.binary_search(&w.weight).is_ok(),
            "metadata `quantization.wide_rows` names `{}`, which is not a quantized weight",
            w.weight
        );
        let rows = Weights::expected_shapes(config)
            .into_iter()
            .find(|(name, _)| *name == w.weight)
            .map_or(0, |(_, shape)| shape[0]);
        ensure!(
            w.rows <= rows,
            "metadata `quantization.wide_rows`: {} rows of `{}`, which has {rows}",
            w.rows,
            w.weight
        );
        ensure!(
            (1..=dr::STORED_BITS - dr::MIN_BITS).contains(&w.extra_bits),
            "metadata `quantization.wide_rows`: {} extra bits (1..={})",
            w.extra_bits,
            dr::STORED_BITS - dr::MIN_BITS
        );
        Ok(())
    }

    pub fn tie(&self) -> Result<TieRule> {
        self.tie_rule.parse().map_err(|e| anyhow::anyhow!("checkpoint tie_rule: {e}"))
    }

    /// The scale granularity of the quantized weight `name`.
    pub fn granularity_of(&self, name: &str) -> Result<Granularity> {
        let (text, field) = match self.granularity_overrides.get(name) {
            Some(g) => (g, "granularity_overrides"),
            None => (&self.granularity, "granularity"),
        };
        text.parse().map_err(|e| anyhow::anyhow!("checkpoint {field} of `{name}`: {e}"))
    }

    /// The scale layout of the quantized `[rows, cols]` weight `name`.
    pub fn layout(&self, name: &str, rows: usize, cols: usize) -> Result<ScaleLayout> {
        self.granularity_of(name)?.layout(rows, cols).map_err(|e| anyhow::anyhow!("`{name}` ({rows}x{cols}): {e}"))
    }

    /// The granularities written as one phrase: `group:128` or `group:128, embed_tokens group:32`.
    pub fn granularity_summary(&self) -> String {
        let mut text = self.granularity.clone();
        for (name, g) in &self.granularity_overrides {
            text.push_str(&format!(", {name} {g}"));
        }
        text
    }

    /// Bits the quantized `[rows, cols]` weight `name` occupies when served at `bits`: its codes
    /// at that bit-width, its f16 scales and, where that precision is corrected, its f16
    /// corrections, and the extra bits of its wide rows. The one count behind
    /// `Checkpoint::bits_per_weight` and HASB's budgets.
    pub fn matrix_bits(&self, name: &str, rows: usize, cols: usize, bits: u32) -> Result<u64> {
        let layout = self.layout(name, rows, cols)?;
        let corrections = if self.corrected_bits.contains(&bits) {
            16 * (rows * self.correction_granularity.per_row(&layout)) as u64
        } else {
            0
        };
        let wide =
            self.leading_rows(name, bits).map_or(0, |l| (l.rows.min(rows) * cols) as u64 * u64::from(l.bits - bits));
        Ok((rows * cols) as u64 * u64::from(bits) + 16 * layout.n_scales() as u64 + corrections + wide)
    }

    /// Every precision this checkpoint can be run at: each bit-width from the lowest a second
    /// rounding derives up to the stored codes' own, then the profiles by name.
    pub fn precisions(&self) -> Vec<Precision> {
        (dr::MIN_BITS..=dr::STORED_BITS)
            .map(Precision::Bits)
            .chain(self.profiles.keys().cloned().map(Precision::Profile))
            .collect()
    }

    /// Adds a named per-layer profile, refusing an invalid name, a name already taken, or bits
    /// that are not a valid bit-width for exactly the quantized weights.
    pub fn add_profile(&mut self, name: &str, bits: BTreeMap<String, u32>) -> Result<()> {
        ensure!(!self.profiles.contains_key(name), "a profile named `{name}` exists already");
        self.check_profile(name, &bits)?;
        self.profiles.insert(name.to_string(), bits);
        Ok(())
    }

    fn check_profile(&self, name: &str, bits: &BTreeMap<String, u32>) -> Result<()> {
        ensure!(
            is_profile_name(name),
            "profile name `{name}` is invalid (a letter, then letters, digits, `-`, `_`, `.`)"
        );
        ensure!(
            bits.keys().eq(self.quantized.iter()),
            "profile `{name}` must give a bit-width to exactly the quantized weights"
        );
        if let Some((w, b)) = bits.iter().find(|(_, &b)| dr::check_bits(b).is_err()) {
            bail!("profile `{name}`: {b} bits for `{w}` is outside 2..=8");
        }
        Ok(())
    }

    /// The granularity and every override parse, and each override names a quantized weight.
    fn check_granularities(&self) -> Result<()> {
        self.granularity
            .parse::<Granularity>()
            .map_err(|e| anyhow::anyhow!("metadata `quantization.granularity`: {e}"))?;
        for name in self.granularity_overrides.keys() {
            ensure!(
                self.quantized.binary_search(name).is_ok(),
                "metadata `quantization.granularity_overrides` names `{name}`, which is not a quantized weight"
            );
            self.granularity_of(name)?;
        }
        Ok(())
    }

    fn check_profiles(&self) -> Result<()> {
        self.profiles.iter().try_for_each(|(name, bits)| self.check_profile(name, bits))
    }
}

/// Where the checkpoint came from (`provenance` metadata, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProvenanceMeta {
    pub source: String,
    pub source_sha256: String,
    /// `drq-quantize <version>`.
    pub tool: String,
}

/// Everything a checkpoint holds, for writing.
pub struct CheckpointContents<'a> {
    pub config: &'a ModelConfig,
    pub tokenizer: &'a Tokenizer,
    pub add_bos: bool,
    pub chat_template: Option<&'a str>,
    pub quantization: &'a QuantizationMeta,
    pub provenance: &'a ProvenanceMeta,
    pub quantized: &'a BTreeMap<String, QuantizedWeight>,
    /// Tensors kept in float (norms, biases, unquantized weights), f32.
    pub float: &'a BTreeMap<String, Tensor>,
}

/// Writes a checkpoint atomically: to `PATH.tmp` first, renamed into place when complete.
pub fn write(path: &Path, contents: &CheckpointContents) -> Result<()> {
    let q = contents.quantization;
    ensure!(
        q.quantized.iter().eq(contents.quantized.keys()),
        "quantization metadata must list exactly the quantized tensors, in name order"
    );
    q.check_granularities()?;
    q.check_profiles()?;
    q.check_wide_rows(contents.config)?;
    let tokenizer_json = contents
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("cannot serialize the tokenizer: {e}"))?
        .into_bytes();

    // Owned byte buffers first; the safetensors views borrow them.
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in contents.quantized {
        let l = t.layout;
        ensure!(t.codes.len() == l.n_weights(), "`{name}`: {} codes for a {}x{} layout", t.codes.len(), l.rows, l.cols);
        ensure!(t.scales.len() == l.n_scales(), "`{name}`: {} scales, layout needs {}", t.scales.len(), l.n_scales());
        ensure!(
            l == q.layout(name, l.rows, l.cols)?,
            "`{name}`: group {} disagrees with granularity {}",
            l.group,
            q.granularity_of(name)?
        );
        let mut scale_bytes = Vec::with_capacity(t.scales.len() * 2);
        for &s in &t.scales {
            let h = f16::from_f32(s);
            ensure!(
                h.to_f32() == s && s.is_finite() && s != 0.0,
                "`{name}`: scale {s} is not a nonzero f16 value (the quantizer must pick f16 scales)"
            );
            scale_bytes.extend_from_slice(&h.to_le_bytes());
        }
        let codes = t.codes.iter().map(|&c| c as u8).collect();
        buffers.push((format!("{name}{CODES_SUFFIX}"), Dtype::I8, vec![l.rows, l.cols], codes));
        buffers.push((format!("{name}{SCALES_SUFFIX}"), Dtype::F16, vec![l.rows, l.n_groups()], scale_bytes));
        ensure!(
            t.corrections.keys().eq(q.corrected_bits.iter().collect::<std::collections::BTreeSet<_>>()),
            "`{name}`: corrections for bits {:?}, metadata lists {:?}",
            t.corrections.keys().collect::<Vec<_>>(),
            q.corrected_bits
        );
        t.validate_corrections().map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
        if !q.corrected_bits.is_empty() {
            let k = q.correction_granularity.per_row(&l);
            let mut bytes = Vec::with_capacity(q.corrected_bits.len() * l.rows * k * 2);
            for b in &q.corrected_bits {
                ensure!(
                    t.corrections[b].len() == l.rows * k,
                    "`{name}`: {} corrections at {b} bits, {} per {} expected",
                    t.corrections[b].len(),
                    l.rows * k,
                    q.correction_granularity
                );
                for &a in &t.corrections[b] {
                    let h = f16::from_f32(a);
                    ensure!(h.to_f32() == a, "`{name}`: correction {a} at {b} bits is not an f16 value");
                    bytes.extend_from_slice(&h.to_le_bytes());
                }
            }
            buffers.push((
                format!("{name}{CORRECTIONS_SUFFIX}"),
                Dtype::F16,
                vec![q.corrected_bits.len(), l.rows, k],
                bytes,
            ));
        }
    }
    for (name, t) in contents.float {
        let t = t.to_dtype(candle_core::DType::F32)?;
        let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), Dtype::F32, t.dims().to_vec(), bytes));
    }
    let tokenizer_len = tokenizer_json.len();
    buffers.push((TOKENIZER_TENSOR.to_string(), Dtype::U8, vec![tokenizer_len], tokenizer_json));

    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    metadata.insert("model_config".to_string(), serde_json::to_string(contents.config)?);
    metadata.insert("quantization".to_string(), serde_json::to_string(q)?);
    metadata.insert("provenance".to_string(), serde_json::to_string(contents.provenance)?);
    metadata.insert("add_bos".to_string(), contents.add_bos.to_string());
    if let Some(t) = contents.chat_template {
        metadata.insert("chat_template".to_string(), t.to_string());
    }

    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.as_str(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    write_through_tmp(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        readable_by_all(tmp)
    })
}

/// safetensors writes through a private (0600) temporary file; a checkpoint is a model file others
/// serve and evaluate, so it gets the usual 0644.
fn readable_by_all(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Runs `write` on `PATH.tmp`, then renames it to `path`; on any error the temporary file is
/// removed and `path` is left as it was (checkpoints, training states, reports).
pub fn write_through_tmp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = tmp_path(path);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `PATH.tmp`, in the same directory so the final rename is atomic.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Whether `path` is a safetensors file whose metadata says it is a drq checkpoint.
/// Reads the header only.
pub fn is_checkpoint(path: &Path) -> Result<bool> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    if file.read_exact(&mut len).is_err() {
        return Ok(false);
    }
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Ok(false);
    }
    let mut header = vec![0u8; len as usize];
    if file.read_exact(&mut header).is_err() {
        return Ok(false);
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return Ok(false);
    };
    Ok(json.pointer("/__metadata__/format").and_then(|f| f.as_str()) == Some(FORMAT))
}

/// A checkpoint opened for reading: memory-mapped, every field validated on open.
pub struct Checkpoint {
    path: PathBuf,
    mmap: memmap2::Mmap,
    config: ModelConfig,
    quantization: QuantizationMeta,
    provenance: ProvenanceMeta,
    add_bos: bool,
    chat_template: Option<String>,
    tie: TieRule,
}

impl Checkpoint {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        // SAFETY: the file is opened read-only; drq never writes a checkpoint in place (writes go
        // to a temporary name and are renamed), so the mapping is not mutated under us.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map checkpoint {}", path.display()))?;
        let (config, quantization, provenance, add_bos, chat_template, tie) =
            Self::validate(&mmap).with_context(|| format!("invalid checkpoint {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), mmap, config, quantization, provenance, add_bos, chat_template, tie })
    }

    #[allow(clippy::type_complexity)]
    fn validate(
        bytes: &[u8],
    ) -> Result<(ModelConfig, QuantizationMeta, ProvenanceMeta, bool, Option<String>, TieRule)> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("not a complete safetensors file (truncated or corrupted?): {e}"))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        let meta = header.metadata().clone().context("no metadata: not a drq checkpoint")?;
        let field = |key: &str| meta.get(key).with_context(|| format!("metadata field `{key}` is missing"));
        ensure!(field("format")? == FORMAT, "metadata `format` is `{}`, not `{FORMAT}`", field("format")?);
        let version: u32 = field("format_version")?
            .parse()
            .with_context(|| format!("metadata `format_version` `{}` is not a number", meta["format_version"]))?;
        ensure!(
            version == FORMAT_VERSION,
            "checkpoint format version {version} is not supported (this drq reads version {FORMAT_VERSION})"
        );
        let config: ModelConfig =
            serde_json::from_str(field("model_config")?).context("metadata `model_config` is not valid")?;
        config.validate()?;
        let quantization: QuantizationMeta =
            serde_json::from_str(field("quantization")?).context("metadata `quantization` is not valid")?;
        let provenance: ProvenanceMeta =
            serde_json::from_str(field("provenance")?).context("metadata `provenance` is not valid")?;
        let add_bos: bool = field("add_bos")?.parse().context("metadata `add_bos` must be true or false")?;
        let chat_template = meta.get("chat_template").cloned();
        let tie = quantization.tie()?;
        ensure!(!quantization.bits.is_empty(), "metadata `quantization.bits` is empty");
        for &b in &quantization.bits {
            dr::check_bits(b).map_err(|e| anyhow::anyhow!("metadata `quantization.bits`: {e}"))?;
        }
        for (i, &b) in quantization.corrected_bits.iter().enumerate() {
            dr::check_bits(b).map_err(|e| anyhow::anyhow!("metadata `quantization.corrected_bits`: {e}"))?;
            ensure!(
                !quantization.corrected_bits[..i].contains(&b),
                "metadata `quantization.corrected_bits` lists {b} twice"
            );
        }

        // Every tensor of the model must be present exactly once: quantized as codes + scales,
        // or in float; nothing else but the tokenizer.
        let quantized: std::collections::HashSet<&str> = quantization.quantized.iter().map(String::as_str).collect();
        let mut expected_names = std::collections::HashSet::new();
        for (name, shape) in Weights::expected_shapes(&config) {
            if quantized.contains(name.as_str()) {
                ensure!(shape.len() == 2, "`{name}` is listed as quantized but is not a matrix");
                let (rows, cols) = (shape[0], shape[1]);
                let layout = quantization.layout(&name, rows, cols)?;
                check_tensor(&st, &format!("{name}{CODES_SUFFIX}"), Dtype::I8, &[rows, cols])?;
                check_tensor(&st, &format!("{name}{SCALES_SUFFIX}"), Dtype::F16, &[rows, layout.n_groups()])?;
                // Scales are 1/cols of the codes at most: checking them all is cheap, and a zero
                // or NaN scale would otherwise surface only as garbage outputs.
                let scales = st.tensor(&format!("{name}{SCALES_SUFFIX}"))?;
                if let Some(bad) = scales
                    .data()
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .find(|s| !(s.is_finite() && s.to_f32() != 0.0))
                {
                    bail!("`{name}{SCALES_SUFFIX}` holds the scale {bad}; scales must be nonzero and finite");
                }
                expected_names.insert(format!("{name}{CODES_SUFFIX}"));
                expected_names.insert(format!("{name}{SCALES_SUFFIX}"));
                if !quantization.corrected_bits.is_empty() {
                    let corrections = format!("{name}{CORRECTIONS_SUFFIX}");
                    let k = quantization.correction_granularity.per_row(&layout);
                    check_tensor(&st, &corrections, Dtype::F16, &[quantization.corrected_bits.len(), rows, k])?;
                    if let Some(bad) = st
                        .tensor(&corrections)?
                        .data()
                        .chunks_exact(2)
                        .map(|b| f16::from_le_bytes([b[0], b[1]]))
                        .find(|a| !(a.is_finite() && a.to_f32() != 0.0))
                    {
                        bail!("`{corrections}` holds the correction {bad}; corrections must be nonzero and finite");
                    }
                    expected_names.insert(corrections);
                }
            } else {
                check_tensor(&st, &name, Dtype::F32, &shape)?;
                expected_names.insert(name);
            }
        }
        ensure!(
            quantization.quantized.windows(2).all(|w| w[0] < w[1]),
            "metadata `quantization.quantized` must be sorted without duplicates"
        );
        for q in &quantization.quantized {
            ensure!(
                expected_names.contains(&format!("{q}{CODES_SUFFIX}")),
                "`{q}` is listed as quantized but is not a weight of this model"
            );
        }
        quantization.check_granularities()?;
        quantization.check_profiles()?;
        quantization.check_wide_rows(&config)?;
        let tok = st.tensor(TOKENIZER_TENSOR).context("the tokenizer tensor is missing")?;
        ensure!(tok.dtype() == Dtype::U8, "`{TOKENIZER_TENSOR}` must be U8");
        expected_names.insert(TOKENIZER_TENSOR.to_string());
        if let Some(extra) = st.names().into_iter().find(|n| !expected_names.contains(*n)) {
            bail!("unexpected tensor `{extra}`");
        }
        Ok((config, quantization, provenance, add_bos, chat_template, tie))
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated on open")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn quantization(&self) -> &QuantizationMeta {
        &self.quantization
    }

    /// Adds a named per-layer profile in memory (the file is not changed), checked as on open.
    pub fn add_profile(&mut self, name: &str, bits: BTreeMap<String, u32>) -> Result<()> {
        self.quantization.add_profile(name, bits).with_context(|| format!("{}", self.path.display()))
    }

    /// Sets the wide rows `spec` gives this model in memory (the file is not changed), checked
    /// as on open.
    pub fn widen_rows(&mut self, spec: &WideRowsSpec) -> Result<()> {
        let config = self.config.clone();
        self.quantization.widen_rows(spec, &config).with_context(|| format!("{}", self.path.display()))
    }

    /// Drops a profile in memory; whether there was one of that name.
    pub fn remove_profile(&mut self, name: &str) -> bool {
        self.quantization.profiles.remove(name).is_some()
    }

    pub fn provenance(&self) -> &ProvenanceMeta {
        &self.provenance
    }

    /// Writes this checkpoint, with whatever profiles were added in memory, to `path` (atomically,
    /// so `path` may be the file it was opened from: the mapping keeps the old file alive).
    pub fn save_as(&self, path: &Path) -> Result<()> {
        let mut quantized = BTreeMap::new();
        for name in &self.quantization.quantized {
            quantized.insert(name.clone(), self.quantized(name)?);
        }
        let mut float = BTreeMap::new();
        for (name, _) in Weights::expected_shapes(&self.config) {
            if !self.is_quantized(&name) {
                float.insert(name.clone(), self.float_tensor(&name)?);
            }
        }
        write(
            path,
            &CheckpointContents {
                config: &self.config,
                tokenizer: &self.tokenizer()?,
                add_bos: self.add_bos,
                chat_template: self.chat_template.as_deref(),
                quantization: &self.quantization,
                provenance: &self.provenance,
                quantized: &quantized,
                float: &float,
            },
        )
    }

    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    pub fn tie_rule(&self) -> TieRule {
        self.tie
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let st = self.tensors();
        let view = st.tensor(TOKENIZER_TENSOR)?;
        Tokenizer::from_bytes(view.data())
            .map_err(|e| anyhow::anyhow!("{}: the stored tokenizer is invalid: {e}", self.path.display()))
    }

    /// The codes (borrowed from the mapping) and scales of a quantized weight.
    pub fn quantized(&self, name: &str) -> Result<QuantizedWeight> {
        let st = self.tensors();
        let codes =
            st.tensor(&format!("{name}{CODES_SUFFIX}")).with_context(|| format!("`{name}` is not quantized"))?;
        let scales = st.tensor(&format!("{name}{SCALES_SUFFIX}"))?;
        let (rows, cols) = (codes.shape()[0], codes.shape()[1]);
        let layout = self.quantization.layout(name, rows, cols)?;
        let codes: &[i8] = bytemuck::cast_slice(codes.data());
        let f16s = |bytes: &[u8]| -> Vec<f32> {
            bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
        };
        let mut weight = QuantizedWeight::new(codes.to_vec(), f16s(scales.data()), layout);
        if !self.quantization.corrected_bits.is_empty() {
            let all = f16s(st.tensor(&format!("{name}{CORRECTIONS_SUFFIX}"))?.data());
            let k = self.quantization.correction_granularity.per_row(&layout);
            for (&b, alpha) in self.quantization.corrected_bits.iter().zip(all.chunks_exact((rows * k).max(1))) {
                weight.corrections.insert(b, alpha.to_vec());
            }
        }
        Ok(weight)
    }

    /// Whether `name` is stored quantized (codes + scales) rather than in float.
    pub fn is_quantized(&self, name: &str) -> bool {
        self.quantization.quantized.binary_search_by(|q| q.as_str().cmp(name)).is_ok()
    }

    /// A tensor kept in float (norm, bias, unquantized weight), copied out of the mapping as f32.
    pub fn float_tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.tensors();
        let view = st.tensor(name).with_context(|| format!("`{name}` is not a float tensor of this checkpoint"))?;
        ensure!(view.dtype() == Dtype::F32, "`{name}` is not a float tensor of this checkpoint");
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok(Tensor::from_vec(data, view.shape(), &candle_core::Device::Cpu)?)
    }

    /// Bits per weight of the model's matrices served at `precision`: each quantized weight at its
    /// bit-width plus its f16 scales, matrices kept in float at their stored 32 bits (norms and
    /// biases are not counted).
    pub fn bits_per_weight(&self, precision: &Precision) -> Result<f64> {
        let (mut bits, mut weights) = (0f64, 0f64);
        for (name, shape) in Weights::expected_shapes(&self.config) {
            let &[rows, cols] = shape.as_slice() else { continue };
            let n = (rows * cols) as f64;
            weights += n;
            bits += if self.is_quantized(&name) {
                let b = precision
                    .bits_for(&name, &self.quantization.profiles)?
                    .with_context(|| format!("precision `{precision}` has no bit-width for the quantized `{name}`"))?;
                self.quantization.matrix_bits(&name, rows, cols, b)? as f64
            } else {
                32.0 * n
            };
        }
        Ok(bits / weights)
    }

    /// Float weights of the model decoded at `precision` (every quantized weight at its bits,
    /// through the second rounding). `Precision::Float` is an error: a checkpoint stores no
    /// float copy of its quantized weights.
    pub fn weights_at(&self, precision: &Precision) -> Result<Weights> {
        let mut weights = Weights::new();
        for (name, shape) in Weights::expected_shapes(&self.config) {
            if self.is_quantized(&name) {
                let bits = precision.bits_for(&name, &self.quantization.profiles)?.with_context(|| {
                    format!("{}: precision `{precision}` is not available from a checkpoint (it stores no float copy of quantized weights)", self.path.display())
                })?;
                let w = self.quantized(&name)?;
                let mut out = w.dequantize(bits, self.tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
                if let Some(lead) = self.quantization.leading_rows(&name, bits) {
                    let wide = w.dequantize(lead.bits, self.tie).map_err(|e| anyhow::anyhow!("`{name}`: {e}"))?;
                    let n = lead.rows * w.layout.cols;
                    out[..n].copy_from_slice(&wide[..n]);
                }
                weights.insert(name, Tensor::from_vec(out, shape, &candle_core::Device::Cpu)?)?;
            } else {
                let tensor = self.float_tensor(&name)?;
                weights.insert(name, tensor)?;
            }
        }
        Ok(weights)
    }
}

fn check_tensor(st: &SafeTensors, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
    let t = st.tensor(name).with_context(|| format!("tensor `{name}` is missing"))?;
    ensure!(t.dtype() == dtype, "tensor `{name}` has dtype {:?}, expected {dtype:?}", t.dtype());
    ensure!(t.shape() == shape, "tensor `{name}` has shape {:?}, expected {shape:?}", t.shape());
    Ok(())
}
