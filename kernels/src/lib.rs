//! Double Rounding integer math, weight kernels and the element-wise ops of a step. Depends on no other drq crate.
pub mod cuda;
pub mod double_rounding;
pub mod ops;
pub mod planar;

pub use double_rounding::{
    carry, check_bits, check_corrections, code_index, codes_keeping, corrected_scales, dequantize, first_round,
    floor_bits, level_table, second_round, Granularity, KernelError, LevelCodes, QuantizedWeight, ScaleLayout, TieRule,
    MIN_BITS, STORED_BITS,
};
pub use planar::{
    decode_code, encode_code, matmul_group, run_shares, ActPath, Backend, KernelConfig, MatmulPart, PlanarWeight,
    WeightParts, MAX_BATCH, WORD_BITS,
};
