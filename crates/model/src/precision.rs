//! What precision a model runs at: the float weights, or every quantized weight at `b` bits.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use kernels::double_rounding::{MIN_BITS, STORED_BITS};

/// A precision a request or an evaluation asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    /// The float model (only from a float source).
    Float,
    /// Every quantized weight at this many bits (2..=8), derived from the INT8 codes.
    Bits(u32),
}

impl Precision {
    /// The bit-width of the quantized weight `name`, or `None` at float precision.
    pub fn bits_for(&self, _name: &str) -> Option<u32> {
        match self {
            Precision::Float => None,
            Precision::Bits(b) => Some(*b),
        }
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "fp" | "float" | "f32" => Ok(Precision::Float),
            t => match t.parse::<u32>() {
                Ok(b) if (MIN_BITS..=STORED_BITS).contains(&b) => Ok(Precision::Bits(b)),
                _ => bail!("precision `{s}` is invalid: use `fp` or a bit-width from {MIN_BITS} to {STORED_BITS}"),
            },
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precision::Float => write!(f, "fp"),
            Precision::Bits(b) => write!(f, "{b}"),
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
        assert_eq!(parse_list("fp,8,4,2").unwrap(), vec![Precision::Float, Precision::Bits(8), Precision::Bits(4), Precision::Bits(2)]);
        for bad in ["9", "1", "0", "x", "", "4.5"] {
            let err = bad.parse::<Precision>().unwrap_err().to_string();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
    }
}
