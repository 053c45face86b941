//! Double Rounding (METHOD.md §1): one stored INT8 code per weight, every lower precision derived
//! from it by an integer second rounding, one scale tensor shared by all precisions.
//!
//! ```text
//! first rounding   q_h = clip(round(W / s), −128, 127)                     (stored)
//! second rounding  q_l = clip(round(q_h / 2^Δ), −2^(l−1), 2^(l−1) − 1)     Δ = 8 − l
//! dequantize       Ŵ_l = q_l · s · 2^Δ
//! ```

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Bit-width of the stored codes.
pub const STORED_BITS: u32 = 8;
/// Lowest supported bit-width (a 1-bit symmetric grid {−1, 0} is useless).
pub const MIN_BITS: u32 = 2;

/// Tie rule of the second rounding. Ties are frequent (one code in 2^Δ sits exactly at .5), so the
/// rule matters and is recorded in checkpoint metadata; training and serving must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TieRule {
    /// Round half to even: unbiased on ties.
    #[default]
    HalfEven,
    /// Round half up, `(q + 2^(Δ−1)) >> Δ`: what a hardware add-and-shift does.
    HalfUp,
}

impl TieRule {
    /// Metadata name: "even" or "up".
    pub fn name(self) -> &'static str {
        match self {
            TieRule::HalfEven => "even",
            TieRule::HalfUp => "up",
        }
    }
}

impl fmt::Display for TieRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TieRule {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "even" => Ok(TieRule::HalfEven),
            "up" => Ok(TieRule::HalfUp),
            other => Err(KernelError::UnknownTieRule(other.to_string())),
        }
    }
}

/// Errors of the Double Rounding kernels (bad arguments; nothing here can fail otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// A bit-width outside `MIN_BITS..=STORED_BITS`.
    InvalidBits(u32),
    /// A scale group of zero columns.
    ZeroGroup,
    /// A buffer whose length does not match the layout.
    LengthMismatch { what: &'static str, expected: usize, got: usize },
    /// `rows · cols` does not fit in `usize`.
    TooLarge { rows: usize, cols: usize },
    /// A tie-rule name other than "even" / "up".
    UnknownTieRule(String),
    /// A granularity name other than "channel" / "group:N" (N ≥ 1).
    UnknownGranularity(String),
    /// A kernel batch outside `1..=MAX_BATCH` activation rows.
    InvalidBatch(usize),
    /// A kernel backend this CPU cannot run (by name).
    BackendUnavailable(&'static str),
    /// A row index at or past the number of rows.
    RowOutOfRange { row: usize, rows: usize },
    /// A correction (of `bits`, at `index` of its factors) that is zero, infinite or NaN.
    BadCorrection { bits: u32, index: usize },
    /// Corrections of `bits` that are neither one per row nor one per scale group.
    CorrectionCount { bits: u32, rows: usize, groups: usize, got: usize },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::InvalidBits(b) => {
                write!(f, "bit-width {b} is outside {MIN_BITS}..={STORED_BITS}")
            }
            KernelError::ZeroGroup => f.write_str("scale group size must be at least 1"),
            KernelError::LengthMismatch { what, expected, got } => {
                write!(f, "{what} has length {got}, expected {expected}")
            }
            KernelError::TooLarge { rows, cols } => {
                write!(f, "{rows}x{cols} elements overflow usize")
            }
            KernelError::UnknownTieRule(s) => {
                write!(f, "unknown tie rule {s:?} (expected \"even\" or \"up\")")
            }
            KernelError::UnknownGranularity(s) => {
                write!(f, "unknown granularity {s:?} (expected \"channel\" or \"group:N\")")
            }
            KernelError::InvalidBatch(n) => {
                write!(f, "batch of {n} activation rows is outside 1..=64")
            }
            KernelError::BackendUnavailable(b) => {
                write!(f, "kernel backend {b} is not supported by this CPU")
            }
            KernelError::RowOutOfRange { row, rows } => {
                write!(f, "row {row} is out of range for a weight of {rows} rows")
            }
            KernelError::BadCorrection { bits, index } => {
                write!(f, "correction {index} at {bits} bits is not a finite nonzero factor")
            }
            KernelError::CorrectionCount { bits, rows, groups, got } => write!(
                f,
                "{got} corrections at {bits} bits: expected one per row ({rows}) or one per scale group ({groups})"
            ),
        }
    }
}

impl std::error::Error for KernelError {}

/// Checks that `rows` is a row range within a weight of `total` rows.
pub fn check_row_range(rows: &std::ops::Range<usize>, total: usize) -> Result<(), KernelError> {
    if rows.start > rows.end || rows.end > total {
        return Err(KernelError::RowOutOfRange { row: rows.end.max(rows.start), rows: total });
    }
    Ok(())
}

/// Checks that `bits` is a servable bit-width.
pub fn check_bits(bits: u32) -> Result<(), KernelError> {
    if (MIN_BITS..=STORED_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(KernelError::InvalidBits(bits))
    }
}

/// First rounding of `v = W / s`: round half to even, clipped to the int8 range. Clamping before
/// rounding gives the same result as after (rounding is monotonic) and keeps the magic-number
/// trick valid: adding 1.5·2^23 leaves no fraction bits, so IEEE default rounding (half to even)
/// does the work without a libm call, and the loop vectorizes. NaN maps to 0 (callers reject it).
#[inline]
pub fn first_round(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    let c = v.clamp(-128.0, 127.0);
    ((c + MAGIC) - MAGIC) as i8
}

/// Second rounding: `q_l = clip(round(q_h / 2^Δ), −2^(l−1), 2^(l−1) − 1)` with Δ = 8 − bits, in
/// integers. `bits == 8` returns `q_h`.
///
/// # Panics
/// If `bits` is outside `2..=8` (see [`check_bits`]).
#[inline]
pub fn second_round(q_h: i8, bits: u32, tie: TieRule) -> i8 {
    assert!((MIN_BITS..=STORED_BITS).contains(&bits), "bit-width {bits} outside 2..=8");
    let delta = STORED_BITS - bits;
    if delta == 0 {
        return q_h;
    }
    let q = i32::from(q_h);
    let half = 1i32 << (delta - 1);
    let rounded = match tie {
        TieRule::HalfUp => (q + half) >> delta,
        TieRule::HalfEven => {
            let floor = q >> delta;
            let rem = q - (floor << delta); // in 0..2^Δ
            floor + i32::from(rem > half || (rem == half && floor & 1 == 1))
        }
    };
    // Only the top can overflow: floor(−128 / 2^Δ) is exactly −2^(l−1), and rounding adds ≥ 0.
    rounded.min((1i32 << (bits - 1)) - 1) as i8
}

/// `floor(q_h / 2^Δ)`: the top `bits` bits of `q_h` (arithmetic shift).
///
/// # Panics
/// If `bits` is outside `2..=8`.
#[inline]
pub fn floor_bits(q_h: i8, bits: u32) -> i8 {
    assert!((MIN_BITS..=STORED_BITS).contains(&bits), "bit-width {bits} outside 2..=8");
    q_h >> (STORED_BITS - bits)
}

/// Carry bit `c_l = q_l − floor(q_h / 2^Δ)`, always 0 or 1: a layout can store the top bits plus
/// one carry per lower precision, so precision `l` reads `l + 1` bits.
///
/// # Panics
/// If `bits` is outside `2..=8`.
#[inline]
pub fn carry(q_h: i8, bits: u32, tie: TieRule) -> u8 {
    (second_round(q_h, bits, tie) - floor_bits(q_h, bits)) as u8
}

/// Index of code `q` in a 256-entry table.
#[inline]
pub fn code_index(q: i8) -> usize {
    (i16::from(q) + 128) as usize
}

/// The second rounding at one bit-width as a table: the level of every stored code and, since
/// rounding is monotonic, the first and last code of every level. Lets a stored code move without
/// changing what this precision serves.
#[derive(Debug, Clone)]
pub struct LevelCodes {
    bits: u32,
    of_code: [i8; 256],
    /// First and last code of each level, at `slot(level)`.
    codes: Vec<(i8, i8)>,
}

impl LevelCodes {
    /// The table of `bits` under `tie`.
    ///
    /// # Panics
    /// If `bits` is outside `2..=8` (see [`check_bits`]).
    pub fn new(bits: u32, tie: TieRule) -> Self {
        let mut table = LevelCodes { bits, of_code: [0; 256], codes: vec![(i8::MAX, i8::MIN); 1 << bits] };
        for c in i8::MIN..=i8::MAX {
            let level = second_round(c, bits, tie);
            table.of_code[code_index(c)] = level;
            let slot = table.slot(level);
            let range = &mut table.codes[slot];
            *range = (range.0.min(c), range.1.max(c));
        }
        table
    }

    /// Where `level`'s first and last code sit in `codes`.
    fn slot(&self, level: i8) -> usize {
        (i32::from(level) - i32::from(self.level_range().0)) as usize
    }

    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// `2^Δ`: one level in units of the stored scale.
    pub fn step(&self) -> f32 {
        (1u32 << (STORED_BITS - self.bits)) as f32
    }

    /// The level `code` is served at.
    pub fn level(&self, code: i8) -> i8 {
        self.of_code[code_index(code)]
    }

    /// The lowest and highest level.
    pub fn level_range(&self) -> (i8, i8) {
        let min = -(1i32 << (self.bits - 1));
        (min as i8, (-min - 1) as i8)
    }

    /// The first and last code served at `level`.
    ///
    /// # Panics
    /// If `level` is outside [`LevelCodes::level_range`].
    pub fn codes_of(&self, level: i8) -> (i8, i8) {
        self.codes[self.slot(level)]
    }
}

/// The first and last code served at the same level as `code` at every bit-width of `tables`:
/// where a code may move when those precisions must serve exactly what they did.
pub fn codes_keeping(code: i8, tables: &[LevelCodes]) -> (i8, i8) {
    tables.iter().fold((i8::MIN, i8::MAX), |(lo, hi), t| {
        let (a, z) = t.codes_of(t.level(code));
        (lo.max(a), hi.min(z))
    })
}

/// `q_l · 2^Δ` for every stored code, indexed by [`code_index`]: the bit-`bits` value of each
/// code in units of the stored scale, so `Ŵ_l = table[code_index(q_h)] · s`.
pub fn level_table(bits: u32, tie: TieRule) -> Result<[f32; 256], KernelError> {
    check_bits(bits)?;
    let step = (1u32 << (STORED_BITS - bits)) as f32;
    let mut table = [0f32; 256];
    for (i, slot) in table.iter_mut().enumerate() {
        let q = (i as i16 - 128) as i8;
        *slot = f32::from(second_round(q, bits, tie)) * step;
    }
    Ok(table)
}

/// Scale layout of a `[rows, cols]` weight: one scale per row per group of `group` consecutive
/// input columns. Per-channel is `group == cols`. When `group` does not divide `cols` the last
/// group of each row is shorter. Scales are row-major `[rows, n_groups]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScaleLayout {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
}

impl ScaleLayout {
    /// A validated layout.
    pub fn new(rows: usize, cols: usize, group: usize) -> Result<Self, KernelError> {
        let layout = ScaleLayout { rows, cols, group };
        layout.validate()?;
        Ok(layout)
    }

    /// One scale per output row.
    pub fn per_channel(rows: usize, cols: usize) -> Result<Self, KernelError> {
        Self::new(rows, cols, cols.max(1))
    }

    /// Checks `group ≥ 1` and that `rows · cols` (hence every buffer length) fits in `usize`.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.group == 0 {
            return Err(KernelError::ZeroGroup);
        }
        self.rows.checked_mul(self.cols).map(|_| ()).ok_or(KernelError::TooLarge { rows: self.rows, cols: self.cols })
    }

    /// Groups per row, `ceil(cols / group)` (0 for an invalid layout with `group == 0`).
    pub fn n_groups(&self) -> usize {
        self.cols.checked_div(self.group).map_or(0, |_| self.cols.div_ceil(self.group))
    }

    /// Number of weights, `rows · cols`.
    pub fn n_weights(&self) -> usize {
        self.rows * self.cols
    }

    /// Number of scales, `rows · n_groups`.
    pub fn n_scales(&self) -> usize {
        self.rows * self.n_groups()
    }

    /// Column range of group `g` within a row (the last one may be shorter).
    pub fn group_cols(&self, g: usize) -> std::ops::Range<usize> {
        let start = g * self.group;
        start..(start + self.group).min(self.cols)
    }
}

/// Scale granularity: one scale per output row, or per group of input columns within a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Granularity {
    #[default]
    Channel,
    /// Groups of this many input columns (≥ 1; the last group of a row may be shorter).
    Group(usize),
}

impl Granularity {
    /// The scale layout of a `[rows, cols]` weight.
    pub fn layout(self, rows: usize, cols: usize) -> Result<ScaleLayout, KernelError> {
        Ok(match self {
            Granularity::Channel => ScaleLayout::per_channel(rows, cols)?,
            Granularity::Group(g) => ScaleLayout::new(rows, cols, g)?,
        })
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Granularity::Channel => f.write_str("channel"),
            Granularity::Group(g) => write!(f, "group:{g}"),
        }
    }
}

impl FromStr for Granularity {
    type Err = KernelError;

    /// "channel" or "group:N" with N ≥ 1.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KernelError::UnknownGranularity(s.to_string());
        if s == "channel" {
            return Ok(Granularity::Channel);
        }
        let g: usize = s.strip_prefix("group:").ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if g == 0 {
            return Err(bad());
        }
        Ok(Granularity::Group(g))
    }
}

/// A quantized `[rows, cols]` weight: int8 codes (row-major) and scales (f16-representable when
/// quantized by drq) laid out by `layout`, and optional per-precision scale corrections.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    pub codes: Vec<i8>,
    pub scales: Vec<f32>,
    pub layout: ScaleLayout,
    /// Per-precision corrections α_b (bit-width → factors): served at `b` bits, a weight in row
    /// `r`, group `g` is `q_b · 2^Δ · (s[r, g] · α_b)`, with one factor per row (`rows` values,
    /// α_b[r]) or one per scale group (`rows · n_groups`, α_b[r, g], the scales' layout). The
    /// codes stay the one source of every precision; a correction only changes the scale a
    /// precision is served with, so the kernels read the corrected scales instead of the stored
    /// ones at no extra cost ([`corrected_scales`]). Bit-widths without an entry are uncorrected.
    pub corrections: BTreeMap<u32, Vec<f32>>,
}

impl QuantizedWeight {
    /// A weight without corrections.
    pub fn new(codes: Vec<i8>, scales: Vec<f32>, layout: ScaleLayout) -> Self {
        QuantizedWeight { codes, scales, layout, corrections: BTreeMap::new() }
    }

    /// The corrections of `bits`, if it has them.
    pub fn correction(&self, bits: u32) -> Option<&[f32]> {
        self.corrections.get(&bits).map(Vec::as_slice)
    }

    /// Checks the corrections: valid bit-widths, one finite nonzero factor per row or per group.
    pub fn validate_corrections(&self) -> Result<(), KernelError> {
        check_corrections(&self.corrections, &self.layout)
    }

    /// The scales `bits` is served with: the stored ones, corrected when `bits` has corrections.
    pub fn served_scales(&self, bits: u32) -> Result<Cow<'_, [f32]>, KernelError> {
        check_bits(bits)?;
        match self.correction(bits) {
            Some(alpha) => {
                check_corrections(&self.corrections, &self.layout)?;
                Ok(Cow::Owned(corrected_scales(&self.scales, alpha, &self.layout)))
            }
            None => Ok(Cow::Borrowed(&self.scales)),
        }
    }

    /// The weight served at `bits`.
    pub fn dequantize(&self, bits: u32, tie: TieRule) -> Result<Vec<f32>, KernelError> {
        let mut out = vec![0f32; self.codes.len()];
        dequantize(&self.codes, &self.served_scales(bits)?, &self.layout, bits, tie, &mut out)?;
        Ok(out)
    }
}

/// Checks per-precision corrections for a weight laid out by `layout`: bit-widths in
/// `MIN_BITS..=STORED_BITS`, each with one finite nonzero factor per row or per scale group.
pub fn check_corrections(corrections: &BTreeMap<u32, Vec<f32>>, layout: &ScaleLayout) -> Result<(), KernelError> {
    for (&bits, alpha) in corrections {
        check_bits(bits)?;
        if alpha.len() != layout.rows && alpha.len() != layout.n_scales() {
            let (rows, groups) = (layout.rows, layout.n_scales());
            return Err(KernelError::CorrectionCount { bits, rows, groups, got: alpha.len() });
        }
        if let Some(index) = alpha.iter().position(|a| !(a.is_finite() && *a != 0.0)) {
            return Err(KernelError::BadCorrection { bits, index });
        }
    }
    Ok(())
}

/// The scales corrected by `alpha` (one factor per row or per scale group, checked by
/// [`check_corrections`]): `s[r, g] · α[r]` or `s[r, g] · α[r, g]`, in f32. The one place a
/// corrected scale is computed, so every path serves the same values.
pub fn corrected_scales(scales: &[f32], alpha: &[f32], layout: &ScaleLayout) -> Vec<f32> {
    if alpha.len() == scales.len() {
        return scales.iter().zip(alpha).map(|(&s, &a)| s * a).collect();
    }
    let ng = layout.n_groups().max(1);
    scales.chunks(ng).zip(alpha).flat_map(|(row, &a)| row.iter().map(move |&s| s * a)).collect()
}

/// Dequantizes a `[rows, cols]` weight at `bits`: `out = q_l · s · 2^Δ`.
pub fn dequantize(
    codes: &[i8],
    scales: &[f32],
    layout: &ScaleLayout,
    bits: u32,
    tie: TieRule,
    out: &mut [f32],
) -> Result<(), KernelError> {
    layout.validate()?;
    let table = level_table(bits, tie)?;
    let n = layout.n_weights();
    for (what, got, expected) in
        [("codes", codes.len(), n), ("scales", scales.len(), layout.n_scales()), ("out", out.len(), n)]
    {
        if got != expected {
            return Err(KernelError::LengthMismatch { what, expected, got });
        }
    }
    let cols = layout.cols;
    if cols == 0 {
        return Ok(());
    }
    let row_scales = scales.chunks_exact(layout.n_groups());
    for ((row_codes, row_out), row_scales) in codes.chunks_exact(cols).zip(out.chunks_exact_mut(cols)).zip(row_scales) {
        for ((group_codes, group_out), &s) in
            row_codes.chunks(layout.group).zip(row_out.chunks_mut(layout.group)).zip(row_scales)
        {
            for (o, &q) in group_out.iter_mut().zip(group_codes) {
                *o = table[code_index(q)] * s;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference second rounding in f64 with explicit tie handling.
    fn reference(q_h: i8, bits: u32, tie: TieRule) -> i8 {
        let x = f64::from(q_h) / f64::from(1u32 << (8 - bits));
        let floor = x.floor();
        let frac = x - floor;
        let r = if frac > 0.5 {
            floor + 1.0
        } else if frac < 0.5 {
            floor
        } else {
            match tie {
                TieRule::HalfUp => floor + 1.0,
                TieRule::HalfEven if floor.rem_euclid(2.0) == 0.0 => floor,
                TieRule::HalfEven => floor + 1.0,
            }
        };
        let lo = -f64::from(1u32 << (bits - 1));
        r.clamp(lo, -lo - 1.0) as i8
    }

    fn all_cases() -> impl Iterator<Item = (i8, u32, TieRule)> {
        (i8::MIN..=i8::MAX).flat_map(|q| {
            (MIN_BITS..=STORED_BITS).flat_map(move |b| [TieRule::HalfEven, TieRule::HalfUp].map(|t| (q, b, t)))
        })
    }

    #[test]
    fn second_round_matches_reference_exhaustively() {
        for (q, bits, tie) in all_cases() {
            assert_eq!(second_round(q, bits, tie), reference(q, bits, tie), "q={q} bits={bits} {tie}");
        }
    }

    #[test]
    fn carry_is_zero_or_one() {
        for (q, bits, tie) in all_cases() {
            let c = i16::from(second_round(q, bits, tie)) - i16::from(floor_bits(q, bits));
            assert!(c == 0 || c == 1, "q={q} bits={bits} {tie}: carry {c}");
            assert_eq!(i16::from(carry(q, bits, tie)), c);
        }
    }

    #[test]
    fn floor_bits_is_arithmetic_shift() {
        for q in i8::MIN..=i8::MAX {
            for bits in MIN_BITS..=STORED_BITS {
                let expected = (f64::from(q) / f64::from(1u32 << (8 - bits))).floor() as i8;
                assert_eq!(floor_bits(q, bits), expected);
            }
        }
    }

    #[test]
    fn clip_edges() {
        assert_eq!(second_round(127, 2, TieRule::HalfUp), 1);
        assert_eq!(second_round(127, 2, TieRule::HalfEven), 1);
        assert_eq!(second_round(-128, 2, TieRule::HalfUp), -2);
        assert_eq!(second_round(-128, 2, TieRule::HalfEven), -2);
        assert_eq!(second_round(127, 4, TieRule::HalfUp), 7);
        assert_eq!(second_round(-128, 4, TieRule::HalfEven), -8);
        assert_eq!(second_round(-97, 2, TieRule::HalfEven), -2);
        for (q, tie) in [(127, TieRule::HalfUp), (-128, TieRule::HalfEven), (5, TieRule::HalfUp)] {
            assert_eq!(second_round(q, 8, tie), q);
        }
    }

    #[test]
    fn ties_follow_rule() {
        // Δ = 6 at 2 bits: ±32 and ±96 are the ties.
        let even = [(32, 0), (-32, 0), (96, 1), (-96, -2)]; // 96 → 2 → clipped to 1
        let up = [(32, 1), (-32, 0), (96, 1), (-96, -1)];
        for (q, r) in even {
            assert_eq!(second_round(q, 2, TieRule::HalfEven), r, "even q={q}");
        }
        for (q, r) in up {
            assert_eq!(second_round(q, 2, TieRule::HalfUp), r, "up q={q}");
        }
    }

    #[test]
    fn first_round_half_even_and_clip() {
        let cases = [
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.5, 0),
            (-1.5, -2),
            (0.49, 0),
            (-2.51, -3),
            (126.5, 126),
            (127.4, 127),
            (1e9, 127),
            (-1e9, -128),
            (-128.4, -128),
            (f32::INFINITY, 127),
            (f32::NEG_INFINITY, -128),
        ];
        for (v, q) in cases {
            assert_eq!(first_round(v), q, "v={v}");
        }
    }

    #[test]
    fn tie_rule_names_round_trip() {
        for tie in [TieRule::HalfEven, TieRule::HalfUp] {
            assert_eq!(tie.to_string().parse::<TieRule>(), Ok(tie));
        }
        assert_eq!("even".parse(), Ok(TieRule::HalfEven));
        assert_eq!("up".parse(), Ok(TieRule::HalfUp));
        assert!("half_up".parse::<TieRule>().is_err());
        assert_eq!(TieRule::default(), TieRule::HalfEven);
    }

    #[test]
    fn layout_groups() {
        let l = ScaleLayout::new(3, 576, 128).unwrap();
        assert_eq!(l.n_groups(), 5);
        assert_eq!(l.n_scales(), 15);
        assert_eq!(l.group_cols(4), 512..576);
        let c = ScaleLayout::per_channel(4, 576).unwrap();
        assert_eq!((c.n_groups(), c.group_cols(0)), (1, 0..576));
        assert_eq!(ScaleLayout::new(2, 4, 0), Err(KernelError::ZeroGroup));
        assert_eq!(ScaleLayout { rows: 1, cols: 1, group: 0 }.n_groups(), 0);
        assert!(matches!(ScaleLayout::new(usize::MAX, 2, 1), Err(KernelError::TooLarge { .. })));
    }

    #[test]
    fn dequantize_ragged_groups() {
        // 2 rows × 5 cols, groups of 2: [2, 2, 1] per row.
        let layout = ScaleLayout::new(2, 5, 2).unwrap();
        let codes: Vec<i8> = vec![127, -128, 32, 96, -33, 1, 2, 3, 4, 5];
        let scales = [1.0, 0.5, 2.0, 3.0, 4.0, 5.0];
        let mut out = vec![0f32; 10];
        for (bits, tie) in [(8, TieRule::HalfEven), (2, TieRule::HalfUp), (4, TieRule::HalfEven)] {
            dequantize(&codes, &scales, &layout, bits, tie, &mut out).unwrap();
            let step = (1u32 << (8 - bits)) as f32;
            for (i, (&q, &o)) in codes.iter().zip(&out).enumerate() {
                let s = scales[(i / 5) * 3 + (i % 5) / 2];
                assert_eq!(o, f32::from(second_round(q, bits, tie)) * step * s, "i={i} bits={bits}");
            }
        }
    }

    #[test]
    fn dequantize_rejects_bad_input() {
        let layout = ScaleLayout::new(2, 4, 3).unwrap(); // 2 groups per row
        let codes = [0i8; 8];
        let scales = [1f32; 4];
        let mut out = [0f32; 8];
        let t = TieRule::HalfEven;
        assert!(dequantize(&codes, &scales, &layout, 4, t, &mut out).is_ok());
        assert_eq!(
            dequantize(&codes[..7], &scales, &layout, 4, t, &mut out),
            Err(KernelError::LengthMismatch { what: "codes", expected: 8, got: 7 })
        );
        assert_eq!(
            dequantize(&codes, &scales[..2], &layout, 4, t, &mut out),
            Err(KernelError::LengthMismatch { what: "scales", expected: 4, got: 2 })
        );
        assert_eq!(
            dequantize(&codes, &scales, &layout, 4, t, &mut out[..1]),
            Err(KernelError::LengthMismatch { what: "out", expected: 8, got: 1 })
        );
        for bits in [0, 1, 9] {
            assert_eq!(dequantize(&codes, &scales, &layout, bits, t, &mut out), Err(KernelError::InvalidBits(bits)));
        }
        let bad = ScaleLayout { rows: 2, cols: 4, group: 0 };
        assert_eq!(dequantize(&codes, &scales, &bad, 4, t, &mut out), Err(KernelError::ZeroGroup));
        let empty = ScaleLayout::new(0, 0, 1).unwrap();
        assert!(dequantize(&[], &[], &empty, 2, t, &mut []).is_ok());
    }

    #[test]
    fn level_table_matches_second_round() {
        let table = level_table(3, TieRule::HalfUp).unwrap();
        for q in i8::MIN..=i8::MAX {
            assert_eq!(table[code_index(q)], f32::from(second_round(q, 3, TieRule::HalfUp)) * 32.0);
        }
        assert_eq!(level_table(1, TieRule::HalfEven), Err(KernelError::InvalidBits(1)));
    }

    #[test]
    fn level_codes_are_exactly_the_codes_of_each_level() {
        for bits in MIN_BITS..=STORED_BITS {
            for tie in [TieRule::HalfEven, TieRule::HalfUp] {
                let t = LevelCodes::new(bits, tie);
                let (min, max) = t.level_range();
                for level in min..=max {
                    let (first, last) = t.codes_of(level);
                    let inside: Vec<i8> =
                        (i8::MIN..=i8::MAX).filter(|&c| second_round(c, bits, tie) == level).collect();
                    assert_eq!((inside[0], *inside.last().unwrap()), (first, last), "bits {bits} {tie} level {level}");
                    assert_eq!(inside.len(), (i16::from(last) - i16::from(first) + 1) as usize, "not consecutive");
                }
            }
        }
    }

    #[test]
    fn codes_keeping_serve_the_same_level_at_every_table() {
        let tie = TieRule::HalfEven;
        let tables = [LevelCodes::new(4, tie), LevelCodes::new(2, tie)];
        for code in i8::MIN..=i8::MAX {
            let (lo, hi) = codes_keeping(code, &tables);
            assert!(lo <= code && code <= hi);
            for c in i8::MIN..=i8::MAX {
                let same = [4, 2].iter().all(|&b| second_round(c, b, tie) == second_round(code, b, tie));
                assert_eq!(same, (lo..=hi).contains(&c), "code {code}, candidate {c}");
            }
        }
        assert_eq!(codes_keeping(5, &[]), (i8::MIN, i8::MAX));
    }
}
