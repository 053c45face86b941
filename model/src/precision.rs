//! What precision a model runs at: the float weights, every quantized weight at `b` bits, or a
//! named per-layer profile stored in the checkpoint (a bit-width per quantized weight).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use kernels::double_rounding::{MIN_BITS, STORED_BITS};

/// Named per-layer profiles: profile name → quantized weight name → bits.
pub type Profiles = BTreeMap<String, BTreeMap<String, u32>>;

/// A precision a request or an evaluation asks for. Ordered float first, then bit-widths upwards,
/// then profiles by name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Precision {
    /// The float model (only from a float source).
    Float,
    /// Every quantized weight at this many bits (2..=8), derived from the INT8 codes.
    Bits(u32),
    /// A per-layer profile of the checkpoint, by name.
    Profile(String),
}

impl Precision {
    /// The bit-width of the quantized weight `name` (`None` at float precision), with the
    /// checkpoint's `profiles` for [`Precision::Profile`].
    pub fn bits_for(&self, name: &str, profiles: &Profiles) -> Result<Option<u32>> {
        Ok(match self {
            Precision::Float => None,
            Precision::Bits(b) => Some(*b),
            Precision::Profile(p) => {
                let profile = profiles.get(p).with_context(|| {
                    let known: Vec<&str> = profiles.keys().map(String::as_str).collect();
                    format!(
                        "profile `{p}` is not in this checkpoint (it has: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    )
                })?;
                Some(*profile.get(name).with_context(|| format!("profile `{p}` has no bit-width for `{name}`"))?)
            }
        })
    }
}

/// Whether `name` can name a profile: a letter, then letters, digits, `-`, `_` or `.` (so it
/// never reads as a bit-width or `fp`).
pub fn is_profile_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !matches!(name, "fp" | "float" | "f32")
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fp" | "float" | "f32" => Ok(Precision::Float),
            t if is_profile_name(t) => Ok(Precision::Profile(t.to_string())),
            t => match t.parse::<u32>() {
                Ok(b) if (MIN_BITS..=STORED_BITS).contains(&b) => Ok(Precision::Bits(b)),
                _ => bail!("precision `{s}` is invalid: use `fp`, a bit-width from {MIN_BITS} to {STORED_BITS}, or a profile name"),
            },
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precision::Float => write!(f, "fp"),
            Precision::Bits(b) => write!(f, "{b}"),
            Precision::Profile(p) => write!(f, "{p}"),
        }
    }
}

/// Parses a comma-separated precision list such as `fp,8,4,2`.
pub fn parse_list(s: &str) -> Result<Vec<Precision>> {
    let list = s.split(',').map(str::parse).collect::<Result<Vec<Precision>>>()?;
    if list.is_empty() {
        bail!("empty precision list");
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(
            parse_list("fp,8,4,2").unwrap(),
            vec![Precision::Float, Precision::Bits(8), Precision::Bits(4), Precision::Bits(2)]
        );
        assert_eq!("mix-4.5_a".parse::<Precision>().unwrap(), Precision::Profile("mix-4.5_a".into()));
        for bad in ["9", "1", "0", "", "4.5", "4x", "-a", "a b", "a/b"] {
            let err = bad.parse::<Precision>().unwrap_err().to_string();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
    }
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    #[test]
    fn profiles_resolve_per_weight() {
        let mut profiles = Profiles::new();
        profiles.insert("mix".into(), BTreeMap::from([("a".to_string(), 8), ("b".to_string(), 3)]));
        let mix = Precision::Profile("mix".into());
        assert_eq!(mix.bits_for("a", &profiles).unwrap(), Some(8));
        assert_eq!(mix.bits_for("b", &profiles).unwrap(), Some(3));
        assert!(mix.bits_for("c", &profiles).unwrap_err().to_string().contains("`c`"));
        let err = Precision::Profile("nope".into()).bits_for("a", &profiles).unwrap_err().to_string();
        assert!(err.contains("nope") && err.contains("mix"), "{err}");
        assert_eq!(Precision::Bits(4).bits_for("z", &profiles).unwrap(), Some(4));
        assert_eq!(Precision::Float.bits_for("a", &profiles).unwrap(), None);
    }
}
