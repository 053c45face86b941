//! PTQ recipes: TOML files in `configs/ptq/` naming a quantization spec, so a result can be
//! reproduced from a file instead of a command line. Command-line flags override the file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use kernels::{Granularity, TieRule};
use serde::Deserialize;

use model::checkpoint::{CorrectionGranularity, WideRowsSpec};

use crate::gptq::GptqSpec;
use crate::ptq::{Grid, QuantSpec, SearchObjective};

/// A PTQ recipe; every field optional (missing fields keep their defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtqRecipe {
    pub bits: Option<Vec<u32>>,
    pub granularity: Option<String>,
    /// Name pattern → granularity for the weights laid out otherwise, e.g.
    /// `granularity_overrides = { embed_tokens = "group:32" }`.
    pub granularity_overrides: Option<BTreeMap<String, String>>,
    pub tie: Option<String>,
    pub objective: Option<String>,
    /// `symmetric` or `max-negative` (see [`Grid`]).
    pub grid: Option<String>,
    pub keep_float: Option<Vec<String>>,
    /// Hessian-aware rounding: the bit-widths in priority order, e.g. `"8"` (see [`crate::gptq`]).
    pub gptq: Option<String>,
    /// GPTQ dampening (fraction of the input Hessian's mean diagonal).
    pub gptq_damp: Option<f64>,
    /// Per-precision corrections for these bit-widths (see `quantize::corrections`).
    pub corrections: Option<Vec<u32>>,
    /// `row` or `group`: what one correction factor covers (default `row`).
    pub correction_granularity: Option<String>,
    /// The leading lm_head rows served wider, `ROWS:+BITS` or `none` (the default; see
    /// [`WideRowsSpec`]).
    pub wide_rows: Option<WideRowsSpec>,
}

/// A PTQ recipe resolved: the scale search, the weights kept in float, and the corrections
/// fitted after it (in weight space when there is no calibration text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtqSettings {
    pub spec: QuantSpec,
    pub keep_float: Vec<String>,
    pub corrections: Vec<u32>,
    pub correction_granularity: CorrectionGranularity,
    pub wide_rows: WideRowsSpec,
}

impl std::fmt::Display for PtqSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.spec)?;
        if !self.keep_float.is_empty() {
            write!(f, " keep_float {}", self.keep_float.join(","))?;
        }
        if !self.corrections.is_empty() {
            let bits: Vec<String> = self.corrections.iter().map(u32::to_string).collect();
            write!(f, " corrections {} per {}", bits.join(","), self.correction_granularity)?;
        }
        if self.wide_rows != WideRowsSpec::None {
            write!(f, " wide_rows {}", self.wide_rows)?;
        }
        Ok(())
    }
}

impl PtqRecipe {
    /// The recipe of every tool that quantizes a float model it was given no recipe for
    /// (`drq-quantize`, `drq-serve`, `drq-synth`, `drq-eval`): scales per group of 128 columns (of
    /// 32 for the embedding and an lm_head: on SmolLM2 W4 −8% and W3 −36% in perplexity for +0.07
    /// bits per weight) on the max-negative grid for bits 8, 4, 2, nearest rounding, the lm_head's
    /// 4,096 first rows one bit wider ([`WideRowsSpec::DEFAULT`]). The best of what needs no
    /// calibration text on SmolLM2 (docs/RESULTS.md, "Low-bit quality"); GPTQ and block-wise
    /// reconstruction are one flag or one `configs/` file away.
    pub fn default_recipe() -> Self {
        PtqRecipe {
            granularity: Some("group:128".to_string()),
            granularity_overrides: Some(
                [("embed_tokens", "group:32"), ("lm_head", "group:32")]
                    .map(|(name, g)| (name.to_string(), g.to_string()))
                    .into(),
            ),
            grid: Some("max-negative".to_string()),
            wide_rows: Some(WideRowsSpec::DEFAULT),
            ..PtqRecipe::default()
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid recipe {}", path.display()))
    }

    /// The spec and keep-float list of this recipe, with `QuantSpec::default()` for what it
    /// leaves out.
    pub fn resolve(&self) -> Result<(QuantSpec, Vec<String>)> {
        let mut spec = QuantSpec::default();
        if let Some(bits) = &self.bits {
            spec.bits = bits.clone();
        }
        if let Some(g) = &self.granularity {
            spec.granularity = g.parse::<Granularity>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        if let Some(table) = &self.granularity_overrides {
            spec.granularity_overrides =
                QuantSpec::parse_overrides(table).map_err(|e| anyhow::anyhow!("recipe: granularity_overrides: {e}"))?;
        }
        if let Some(t) = &self.tie {
            spec.tie = t.parse::<TieRule>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        if let Some(o) = &self.objective {
            spec.objective = o.parse::<SearchObjective>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        if let Some(g) = &self.grid {
            spec.grid = g.parse::<Grid>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        spec.validate()?;
        Ok((spec, self.keep_float.clone().unwrap_or_default()))
    }

    /// The resolved settings: [`Self::resolve`] and the corrections (checked).
    pub fn settings(&self) -> Result<PtqSettings> {
        let (spec, keep_float) = self.resolve()?;
        let corrections = self.corrections.clone().unwrap_or_default();
        for &b in &corrections {
            kernels::check_bits(b).map_err(|e| anyhow::anyhow!("recipe: corrections: {e}"))?;
            anyhow::ensure!(b < kernels::STORED_BITS, "recipe: corrections: {b} bits are the stored codes themselves");
        }
        let correction_granularity = match &self.correction_granularity {
            Some(g) => g.parse().context("recipe: correction_granularity")?,
            None => CorrectionGranularity::default(),
        };
        let wide_rows = self.wide_rows.unwrap_or(WideRowsSpec::None);
        Ok(PtqSettings { spec, keep_float, corrections, correction_granularity, wide_rows })
    }

    /// The recipe's GPTQ settings, if it asks for Hessian-aware rounding.
    pub fn gptq(&self) -> Result<Option<GptqSpec>> {
        let Some(order) = &self.gptq else {
            anyhow::ensure!(self.gptq_damp.is_none(), "recipe: gptq_damp without gptq");
            return Ok(None);
        };
        let mut spec: GptqSpec = order.parse().context("recipe: gptq")?;
        if let Some(d) = self.gptq_damp {
            spec.damp = d;
        }
        spec.validate()?;
        Ok(Some(spec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_recipe_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/ptq");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let recipe = PtqRecipe::load(&path).unwrap();
            recipe.resolve().unwrap();
            recipe.gptq().unwrap();
            n += 1;
        }
        assert!(n >= 3, "expected the shipped recipes in {}", dir.display());
    }

    #[test]
    fn rejects_unknown_fields_and_bad_values() {
        let err = toml::from_str::<PtqRecipe>("bitz = [8]").unwrap_err().to_string();
        assert!(err.contains("bitz"), "{err}");
        let recipe: PtqRecipe = toml::from_str("bits = [9]").unwrap();
        assert!(recipe.resolve().is_err());
        let recipe: PtqRecipe = toml::from_str("granularity = \"rows\"").unwrap();
        assert!(recipe.resolve().unwrap_err().to_string().contains("rows"));
        let recipe: PtqRecipe = toml::from_str("gptq = \"4,8\"\ngptq_damp = 0.05").unwrap();
        assert_eq!(recipe.gptq().unwrap().map(|g| (g.order, g.damp)), Some((vec![4, 8], 0.05)));
        for bad in ["gptq = \"8,4\"", "gptq = \"4\"\ngptq_damp = -1.0", "gptq_damp = 0.1"] {
            let recipe: PtqRecipe = toml::from_str(bad).unwrap();
            assert!(recipe.gptq().is_err(), "{bad}");
        }
    }
}
