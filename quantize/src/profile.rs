//! Per-layer precision profiles: TOML files in `configs/profiles/` giving a default bit-width and
//! rules matching weight names; resolved at quantization time into an explicit bit-width per
//! quantized weight and stored in the checkpoint, where `drq-serve` and `drq-eval` find them by
//! name (`"precision": "NAME"`, `--precision NAME`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

/// A profile file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileRules {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Bits of every weight no rule matches.
    pub default: u32,
    /// First match wins.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A substring of the weight name, e.g. `embed_tokens`, `self_attn`, `layers.0.`.
    #[serde(rename = "match")]
    pub pattern: String,
    pub bits: u32,
}

impl ProfileRules {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read profile {}", path.display()))?;
        let rules: Self = toml::from_str(&text).with_context(|| format!("invalid profile {}", path.display()))?;
        rules.check().with_context(|| format!("invalid profile {}", path.display()))?;
        Ok(rules)
    }

    /// Every file of a tool's repeatable `--profile`, loaded before any work starts.
    pub fn load_all(paths: &[std::path::PathBuf]) -> Result<Vec<Self>> {
        paths.iter().map(|p| Self::load(p)).collect()
    }

    fn check(&self) -> Result<()> {
        ensure!(
            model::precision::is_profile_name(&self.name),
            "name `{}`: a letter, then letters, digits, `-`, `_`, `.`",
            self.name
        );
        for bits in std::iter::once(self.default).chain(self.rules.iter().map(|r| r.bits)) {
            kernels::check_bits(bits).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        Ok(())
    }

    /// The profile of an explicit bit-width per weight (e.g. an allocation): the most common
    /// bit-width as the default, one rule per other weight by its full name.
    pub fn explicit(name: &str, description: &str, bits: &BTreeMap<String, u32>) -> Self {
        let mut counts = BTreeMap::new();
        for &b in bits.values() {
            *counts.entry(b).or_insert(0usize) += 1;
        }
        let default = counts.iter().max_by_key(|&(&b, &n)| (n, b)).map_or(kernels::STORED_BITS, |(&b, _)| b);
        let rules =
            bits.iter().filter(|&(_, &b)| b != default).map(|(w, &b)| Rule { pattern: w.clone(), bits: b }).collect();
        Self { name: name.to_string(), description: description.to_string(), default, rules }
    }

    /// The profile as a `configs/profiles/` file.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }

    /// A bit-width for each of `weights`. A rule that matches nothing is logged (a typo, or a
    /// weight this model lacks, e.g. `lm_head` when it is tied to the embedding).
    pub fn resolve(&self, weights: &[String]) -> Result<BTreeMap<String, u32>> {
        self.check()?;
        ensure!(!weights.is_empty(), "profile `{}`: the model has no quantized weights", self.name);
        for rule in &self.rules {
            if !weights.iter().any(|w| w.contains(&rule.pattern)) {
                tracing::warn!("profile `{}`: rule `{}` matches no quantized weight", self.name, rule.pattern);
            }
        }
        Ok(weights
            .iter()
            .map(|w| {
                let bits = self.rules.iter().find(|r| w.contains(&r.pattern)).map_or(self.default, |r| r.bits);
                (w.clone(), bits)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn first_matching_rule_wins_else_the_default() {
        let p: ProfileRules = toml::from_str(
            "name = \"mix\"\ndefault = 4\n[[rule]]\nmatch = \"embed\"\nbits = 8\n[[rule]]\nmatch = \"layers.0.\"\nbits = 3\n[[rule]]\nmatch = \"q_proj\"\nbits = 6\n",
        )
        .unwrap();
        let r = p.resolve(&names()).unwrap();
        assert_eq!(r.values().copied().collect::<Vec<_>>(), vec![8, 3, 3]);
    }

    #[test]
    fn explicit_profiles_round_trip_through_toml() {
        let bits: BTreeMap<String, u32> = names().into_iter().zip([8, 3, 3]).collect();
        let p = ProfileRules::explicit("hasb-3.0", "an allocation", &bits);
        assert_eq!((p.default, p.rules.len()), (3, 1));
        let back: ProfileRules = toml::from_str(&p.to_toml().unwrap()).unwrap();
        assert_eq!(back.resolve(&names()).unwrap(), bits);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let bad = |t: &str| {
            toml::from_str::<ProfileRules>(t).map_err(anyhow::Error::from).and_then(|p| p.resolve(&names()).map(|_| ()))
        };
        assert!(bad("name = \"a\"\ndefault = 9").unwrap_err().to_string().contains("9"));
        assert!(bad("name = \"4x\"\ndefault = 4").unwrap_err().to_string().contains("name"));
        assert!(bad("name = \"a\"\ndefault = 4\n[[rule]]\nmatch = \"x\"\nbits = 1")
            .unwrap_err()
            .to_string()
            .contains("1"));
        assert!(bad("name = \"a\"\ndefault = 4\nbitz = 3").is_err());
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/profiles");
        for entry in std::fs::read_dir(&shipped).unwrap() {
            ProfileRules::load(&entry.unwrap().path()).unwrap();
        }
    }
}
