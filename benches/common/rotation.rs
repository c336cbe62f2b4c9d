//! The cost of HQ-DiT's online Hadamard rotation (`quant/hadamard.rs`) against the matmul of the
//! layer it feeds and against a copy of its input, at DiT-XL/2's shapes: 2 x 256 tokens (latent
//! 32, patch 2, batch 2), the inputs of `attn.qkv` (1152 -> 3456, blocks of 128), `attn.proj`
//! (1152 -> 1152) and `mlp.fc2` (4608 -> 1152, blocks of 512). The fused rotation on flex and on
//! the CubeCL backends; for those also the tensor-op version it replaced. Each timed call reads
//! one value back, so a GPU has finished.

#![allow(dead_code)] // each bench uses part of it

use burn::tensor::{Device, Tensor, TensorData};
use msfp::quant::hadamard::{Hadamard, HadamardSpec};
use msfp::rng::SeededRng;

use super::timing::median_ms;

/// Medians of `runs` after one warm-up, one JSON row per layer.
pub fn cost(device: &Device, runs: usize) -> Vec<serde_json::Value> {
    let tokens = 2 * 256;
    let on_flex = msfp::kernels::on_flex(device);
    let mut rng = SeededRng::new(0);
    let mut rows = Vec::new();
    for (layer, d_in, d_out) in [("attn.qkv", 1152, 3456), ("attn.proj", 1152, 1152), ("mlp.fc2", 4608, 1152)]
    {
        let x = Tensor::<2>::from_data(TensorData::new(rng.normals(tokens * d_in), [tokens, d_in]), device);
        let w = Tensor::<2>::from_data(TensorData::new(rng.normals(d_out * d_in), [d_out, d_in]), device);
        let spec = HadamardSpec::for_width(d_in, 1).expect("even width");
        let h = Hadamard::new(spec, d_in);
        let wait = |t: Tensor<2>| t.slice([0..1, 0..1]).into_scalar::<f32>();
        let (matmul_ms, _) = median_ms(1, runs, || {
            wait(burn::tensor::module::linear(x.clone(), w.clone().transpose(), None));
        });
        let (rotate_ms, _) = median_ms(1, runs, || {
            wait(h.rotate(x.clone()));
        });
        let (copy_ms, _) = median_ms(1, runs, || {
            wait(x.clone() * 1.0);
        });
        let ops_ms = (!on_flex).then(|| {
            median_ms(1, runs, || {
                wait(h.rotate_ops(x.clone()));
            })
            .0
        });
        eprintln!(
            "{layer}: matmul {matmul_ms:.3} ms, rotation {rotate_ms:.3} ms (tensor ops {ops_ms:?}), copy {copy_ms:.3} ms"
        );
        rows.push(serde_json::json!({
            "layer": layer, "tokens": tokens, "d_in": d_in, "d_out": d_out, "block": spec.block,
            "matmul_ms": matmul_ms, "rotation_ms": rotate_ms, "copy_of_input_ms": copy_ms,
            "rotation_vs_matmul": rotate_ms / matmul_ms, "rotation_vs_copy": rotate_ms / copy_ms,
            "tensor_op_rotation_ms": ops_ms,
        }));
    }
    rows
}
