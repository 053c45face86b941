//! PTQ recipes: TOML files in `configs/ptq/` naming a quantization spec, so a result can be
//! reproduced from a file instead of a command line. Command-line flags override the file.

use std::path::Path;

use anyhow::{Context, Result};
use kernels::{Granularity, TieRule};
use serde::Deserialize;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_recipe_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/ptq");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            PtqRecipe::load(&path).unwrap().resolve().unwrap();
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
    }
}
