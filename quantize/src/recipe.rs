//! PTQ recipes: TOML files in `configs/ptq/` naming a quantization spec, so a result can be
//! reproduced from a file instead of a command line. Command-line flags override the file.

use std::path::Path;

use anyhow::{Context, Result};
use kernels::{Granularity, TieRule};
use serde::Deserialize;

use crate::gptq::GptqSpec;
use crate::ptq::{QuantSpec, SearchObjective};

/// A PTQ recipe; every field optional (missing fields keep their defaults).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtqRecipe {
    pub bits: Option<Vec<u32>>,
    pub granularity: Option<String>,
    pub tie: Option<String>,
    pub objective: Option<String>,
    pub keep_float: Option<Vec<String>>,
    /// Hessian-aware rounding: the bit-widths in priority order, e.g. `"8"` (see [`crate::gptq`]).
    pub gptq: Option<String>,
    /// GPTQ dampening (fraction of the input Hessian's mean diagonal).
    pub gptq_damp: Option<f64>,
}

impl PtqRecipe {
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
        if let Some(t) = &self.tie {
            spec.tie = t.parse::<TieRule>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        if let Some(o) = &self.objective {
            spec.objective = o.parse::<SearchObjective>().map_err(|e| anyhow::anyhow!("recipe: {e}"))?;
        }
        spec.validate()?;
        Ok((spec, self.keep_float.clone().unwrap_or_default()))
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
