//! Quantization core: number formats (signed and unsigned minifloats, integers) and the fake
//! quantizer `q(x) = z + s * grid_round((x - z) / s)` used for calibration and QAT.
//!
//! `Format::round` is the scalar reference; the tensor path in `quantizer` must agree with it
//! bit for bit, and both are checked against ml_dtypes (tests/fixtures/fp_rounding).

pub mod calib;
pub mod cli;
pub mod format;
pub mod fused;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod fused_cube;
pub mod hadamard;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod hadamard_cube;
pub mod layer;
pub mod mixup;
pub mod pack;
pub mod plan;
pub mod quantizer;

pub use format::{Encoding, FloatRounder, Format, IntRounder, Kind, Round, Rounder};
pub use quantizer::{fake_quantize, fake_quantize_grouped, fake_quantize_ops, grid_round, grid_round_ste};

/// Reference vectors written by tools/gen_fp_vectors.py from ml_dtypes.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::path::PathBuf;

    /// The signed formats ml_dtypes implements (e4m3 as float8_e4m3fn).
    pub const REFERENCE_FORMATS: [&str; 5] = ["e2m1", "e2m3", "e3m2", "e4m3", "e5m2"];

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fp_rounding")
    }

    /// (input, ml_dtypes' round-to-nearest-even result) pairs.
    pub fn vectors(name: &str) -> Vec<(f32, f32)> {
        let path = dir().join(format!("{name}.bin"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(bytes.len() % 8, 0, "{}", path.display());
        let f = |b: &[u8]| f32::from_le_bytes(b.try_into().expect("4 bytes"));
        bytes.chunks_exact(8).map(|p| (f(&p[..4]), f(&p[4..]))).collect()
    }

    /// Every finite value of the format according to ml_dtypes, ascending.
    pub fn grid(name: &str) -> Vec<f32> {
        let path = dir().join("grids.json");
        let text = std::fs::read_to_string(&path).expect("grids.json");
        let grids: std::collections::HashMap<String, Vec<f32>> =
            serde_json::from_str(&text).expect("grids.json is a map of arrays");
        grids[name].clone()
    }

    /// Every spec the parser accepts (all but ue8m0, whose max 2^128 overflows f32).
    pub fn all_specs() -> Vec<String> {
        let mut specs = Vec::new();
        for total in [4u32, 6, 8] {
            for x in 1..total {
                specs.push(format!("e{x}m{}", total - 1 - x));
            }
        }
        for total in 3u32..=8 {
            for x in 1..=total {
                if (x, total) != (8, 8) {
                    specs.push(format!("ue{x}m{}", total - x));
                }
            }
        }
        for n in 2..=8 {
            specs.push(format!("int{n}"));
            specs.push(format!("uint{n}"));
        }
        specs
    }
}
