//! Calibration searches: the scale (clipping ratio), zero point and number format that minimise a
//! quantization error on calibration data, plus [`ActStats`], the running activation statistics
//! the searches run on.
//!
//! Everything here works on host `f32` slices: a search runs once per layer at calibration time.
//! The quantizer is the one of [`super::quantizer::fake_quantize`], evaluated element by element
//! in `f32` by [`quantize_value`] (same operations in the same order, so the same numbers):
//!
//! - signed formats: `q(x) = s * round(x / s)` with `s = ratio * absmax(x) / format.max()`;
//! - unsigned formats (`format.signed() == false`: `ueXmY`, `uintN`): a zero point `z` is searched
//!   jointly with the scale, `q(x) = z + s * round((x - z) / s)` with `s` covering `[z, max(x)]`,
//!   `s = ratio * (max(x) - z) / format.max()`, and `z = t * min(min(x), 0)` for `t` on a grid in
//!   `[0, 1]` (so `z` runs over `[min(x), 0]`; `t = 1` with `ratio = 1` is classic min-max
//!   asymmetric quantization).
//!
//! `round` saturates at the grid's ends, so `ratio < 1` clips the largest values.
//! The ratio grid is `clip_grid` evenly spaced points in `[clip_min, clip_max]` (just `clip_max`
//! when `clip_grid = 1`); the zero-point grid is `zero_point_grid` points `t = j / (n - 1)`
//! (just `t = 1` when `n = 1`). Ties between candidates keep the first one in grid order
//! (smallest `t` first, then smallest ratio).
//!
//! Granularity: one scale per tensor, per output channel (dimension 0: the rows of a `[C, K]`
//! matrix, or `[C, ..]` for a conv kernel), or per group of `group_size` consecutive elements
//! along the last dimension (the layout of [`super::quantizer::fake_quantize_grouped`]). Every
//! granularity cuts the row-major data into equal contiguous blocks, one scale per block.
//!
//! Objectives ([`Objective`]): with the tensor MSE `||q(x) - x||^2 / n` each block is searched
//! independently (the error is a sum over blocks). With a caller-supplied closure (e.g. a layer
//! forward returning the layer-output MSE) the error is not separable, so one clipping ratio
//! (and one zero-point fraction `t`) is shared by all blocks, each block still scaled by its own
//! range; per tensor that is the same search as with the tensor MSE.

use serde::{Deserialize, Serialize};

use rayon::prelude::*;

use super::format::{Format, Round, Rounder};
use crate::error::Result;
use crate::rng::{SeededRng, stream};

/// How many elements share one scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per slice along dimension 0 (output channel).
    #[default]
    PerChannel,
    /// One scale per `group_size` consecutive elements along the last dimension.
    PerGroup,
}

/// Which error a calibration search minimises, as named in a config file. The searches take an
/// [`Objective`]; `output_mse` tells the caller (the calibration stage) to pass
/// [`Objective::Output`] with a closure that runs the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    #[default]
    TensorMse,
    OutputMse,
}

/// Settings of the calibration searches (a plain config section: unknown keys are rejected,
/// missing ones take the defaults below).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibConfig {
    /// Number of clipping ratios tried (default 100).
    pub clip_grid: usize,
    /// Smallest clipping ratio (default 0.1; heavy-tailed activations can want small ratios).
    pub clip_min: f64,
    /// Largest clipping ratio (default 1.0 = min-max, no clipping).
    pub clip_max: f64,
    /// Number of zero points tried for unsigned formats, evenly spaced in `[min(x), 0]`
    /// (default 20).
    pub zero_point_grid: usize,
    /// Scale granularity of weight searches (default `per_channel`). Activation searches run on a
    /// flat reservoir sample and are always per tensor.
    pub granularity: Granularity,
    /// Group size for `per_group` (default 128); must divide the tensor's last dimension.
    pub group_size: usize,
    /// Which error the calibration stage minimises (default `tensor_mse`).
    pub objective: ObjectiveKind,
    /// Reservoir size of the activation statistics, values per quantized input (default 65536).
    pub sample_size: usize,
}

impl Default for CalibConfig {
    fn default() -> Self {
        Self {
            clip_grid: 100,
            clip_min: 0.1,
            clip_max: 1.0,
            zero_point_grid: 20,
            granularity: Granularity::PerChannel,
            group_size: 128,
            objective: ObjectiveKind::TensorMse,
            sample_size: 65536,
        }
    }
}

impl CalibConfig {
    /// Checks every field; errors are usage errors naming the key as `{section}.{key}` (just
    /// `{key}` when `section` is empty).
    pub fn validate(&self, section: &str) -> Result<()> {
        let key = |k: &str| {
            if section.is_empty() { k.to_string() } else { format!("{section}.{k}") }
        };
        for (k, v) in [
            ("clip_grid", self.clip_grid),
            ("zero_point_grid", self.zero_point_grid),
            ("group_size", self.group_size),
            ("sample_size", self.sample_size),
        ] {
            if v == 0 {
                usage!("{} = 0 is out of range: it must be at least 1", key(k));
            }
        }
        if !(self.clip_min.is_finite() && self.clip_min > 0.0 && self.clip_min <= 1.0) {
            usage!("{} = {} is out of range: it must be in (0, 1]", key("clip_min"), self.clip_min);
        }
        if !(self.clip_max.is_finite() && self.clip_max >= self.clip_min && self.clip_max <= 2.0) {
            usage!(
                "{} = {} is out of range: it must be in [clip_min = {}, 2]",
                key("clip_max"),
                self.clip_max,
                self.clip_min
            );
        }
        Ok(())
    }

    /// The clipping ratios tried, ascending.
    pub fn ratios(&self) -> Vec<f64> {
        linspace(self.clip_min, self.clip_max, self.clip_grid)
    }

    /// The zero-point fractions `t` tried (`z = t * min(min(x), 0)`), ascending.
    pub fn zero_point_fractions(&self) -> Vec<f64> {
        linspace(0.0, 1.0, self.zero_point_grid)
    }
}

/// `n` evenly spaced points from `lo` to `hi` inclusive; `[hi]` when `n == 1`.
fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if n <= 1 {
        return vec![hi];
    }
    (0..n).map(|i| if i == n - 1 { hi } else { lo + (hi - lo) * i as f64 / (n - 1) as f64 }).collect()
}

/// The error a search minimises.
pub enum Objective<'a> {
    /// Tensor MSE `||q(x) - x||^2 / n`.
    TensorMse,
    /// Any error of the quantized tensor, e.g. the MSE of a layer's output: the closure gets the
    /// whole quantized tensor (row-major, the shape of the data) and returns the error to
    /// minimise. For example, with a `Linear` layer and its full-precision output `y`:
    ///
    /// ```ignore
    /// let f = |xq: &[f32]| mse(&layer_forward(xq), &y);
    /// let best = search_clipping(&format, &x, &shape, &cfg, &Objective::Output(&f))?;
    /// ```
    ///
    /// Per-channel / per-group searches share one clipping ratio (and zero-point fraction)
    /// across blocks under this objective; see the module docs. The closure runs once per
    /// candidate: `clip_grid` times, times `zero_point_grid` for unsigned formats.
    Output(&'a dyn Fn(&[f32]) -> f64),
}

/// A calibrated quantizer: format, scales (and zero points) and the error they reach.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipResult {
    /// The format's canonical spec.
    pub spec: String,
    /// One scale per block, blocks in row-major order.
    pub scales: Vec<f32>,
    /// One zero point per block for unsigned formats, `None` for signed ones.
    pub zero_points: Option<Vec<f32>>,
    /// Shape the scales broadcast with against the data: `[1, .., 1]` per tensor,
    /// `[C, 1, .., 1]` per channel, `[numel / group, 1]` per group (the grouped view of
    /// [`super::quantizer::to_groups`]).
    pub scale_shape: Vec<usize>,
    /// The clipping ratio chosen for each block.
    pub ratios: Vec<f32>,
    /// The minimised error: the MSE over all elements for [`Objective::TensorMse`], the
    /// closure's value for [`Objective::Output`].
    pub error: f64,
}

/// One candidate of a format search and the best error it reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FormatError {
    pub spec: String,
    pub error: f64,
}

/// The result of a format search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FormatSearch {
    /// The winning format with its clipping.
    pub best: ClipResult,
    /// Every candidate's best error, in candidate order (for reports).
    pub errors: Vec<FormatError>,
}

/// The quantizer of [`super::quantizer::fake_quantize`] on one value: `s * round(x / s)`, or
/// `z + s * round((x - z) / s)` with a zero point, in `f32` (equal as numbers to the tensor
/// path; a rounded negative zero may differ in sign, see `grid_round_ste`).
#[inline]
pub fn quantize_value(format: &Format, x: f32, s: f32, z: Option<f32>) -> f32 {
    match z {
        Some(z) => format.round((x - z) / s) * s + z,
        None => format.round(x / s) * s,
    }
}

/// Fake-quantizes row-major `data` whose consecutive blocks of `block_len` elements share a
/// scale (and zero point): the host mirror of the tensor fake quantizer.
pub fn quantize_blocks(
    format: &Format,
    data: &[f32],
    block_len: usize,
    scales: &[f32],
    zero_points: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(data.len(), block_len * scales.len(), "blocks do not tile the data");
    data.chunks(block_len)
        .enumerate()
        .flat_map(|(b, block)| {
            let (s, z) = (scales[b], zero_points.map(|z| z[b]));
            block.iter().map(move |&x| quantize_value(format, x, s, z))
        })
        .collect()
}

/// `(block_len, scale_shape)` of a tensor of shape `shape` under `granularity`.
pub fn blocking(shape: &[usize], granularity: Granularity, group_size: usize) -> Result<(usize, Vec<usize>)> {
    let numel: usize = shape.iter().product();
    if shape.is_empty() || numel == 0 {
        usage!("cannot calibrate a tensor of shape {shape:?}: it has no elements");
    }
    Ok(match granularity {
        Granularity::PerTensor => (numel, vec![1; shape.len()]),
        Granularity::PerChannel => {
            let mut s = vec![1; shape.len()];
            s[0] = shape[0];
            (numel / shape[0], s)
        }
        Granularity::PerGroup => {
            let last = shape[shape.len() - 1];
            if group_size == 0 || !last.is_multiple_of(group_size) {
                usage!("group size {group_size} does not divide the last dimension {last} of {shape:?}");
            }
            (group_size, vec![numel / group_size, 1])
        }
    })
}

fn check_data(data: &[f32], shape: &[usize]) -> Result<()> {
    let numel: usize = shape.iter().product();
    if data.len() != numel {
        usage!("calibration data has {} values but shape {shape:?} needs {numel}", data.len());
    }
    if let Some(i) = data.iter().position(|x| !x.is_finite()) {
        runtime!("calibration data holds a non-finite value {} at index {i}", data[i]);
    }
    Ok(())
}

/// Min and max of a non-empty finite block.
fn min_max(block: &[f32]) -> (f32, f32) {
    block.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// The scale covering `range` (a positive span of data) at clipping `ratio`, kept in f32's
/// normal range; a block without spread gets scale 1 (any scale reproduces it exactly).
fn scale_for(range: f64, ratio: f64, format: &Format) -> f32 {
    if range <= 0.0 {
        return 1.0;
    }
    ((ratio * range / format.max() as f64) as f32).max(f32::MIN_POSITIVE)
}

/// Scale and zero point of one block for a ratio and zero-point fraction.
fn block_params(format: &Format, lo: f32, hi: f32, ratio: f64, t: f64) -> (f32, Option<f32>) {
    if format.signed() {
        let absmax = lo.abs().max(hi.abs()) as f64;
        (scale_for(absmax, ratio, format), None)
    } else {
        let z = (t * lo.min(0.0) as f64) as f32;
        (scale_for(hi as f64 - z as f64, ratio, format), Some(z))
    }
}

/// Sum of squared errors of one block, giving up (returning something `>= bound`) as soon as
/// the partial sum reaches `bound`. Generic over the rounder's kind so the loop is monomorphic;
/// the same arithmetic as [`quantize_value`].
fn block_sse<R: Round>(r: R, block: &[f32], s: f32, z: Option<f32>, bound: f64) -> f64 {
    let mut sse = 0.0f64;
    for chunk in block.chunks(256) {
        for &x in chunk {
            let q = match z {
                Some(z) => r.round((x - z) / s) * s + z,
                None => r.round(x / s) * s,
            };
            let d = (q - x) as f64;
            sse += d * d;
        }
        if sse >= bound {
            return sse;
        }
    }
    sse
}

/// The best `(sse, scale, zero point, ratio)` of one block over the ratio and zero-point grids.
fn best_for_block<R: Round>(
    r: R,
    format: &Format,
    block: &[f32],
    (lo, hi): (f32, f32),
    ratios: &[f64],
    fractions: &[f64],
) -> (f64, f32, f32, f32) {
    let mut best = (f64::INFINITY, 0.0, 0.0, 0.0);
    for &t in fractions {
        for &ratio in ratios {
            let (s, z) = block_params(format, lo, hi, ratio, t);
            let sse = block_sse(r, block, s, z, best.0);
            if sse < best.0 {
                best = (sse, s, z.unwrap_or(0.0), ratio as f32);
            }
        }
    }
    best
}

/// Clipping-ratio (and, for unsigned formats, zero-point) grid search for one format.
///
/// `data` is row-major with shape `shape`; the granularity and grids come from `cfg`.
pub fn search_clipping(
    format: &Format,
    data: &[f32],
    shape: &[usize],
    cfg: &CalibConfig,
    objective: &Objective,
) -> Result<ClipResult> {
    cfg.validate("")?;
    check_data(data, shape)?;
    let (block_len, scale_shape) = blocking(shape, cfg.granularity, cfg.group_size)?;
    let ratios = cfg.ratios();
    let fractions = if format.signed() { vec![0.0] } else { cfg.zero_point_fractions() };
    let ranges: Vec<(f32, f32)> = data.chunks(block_len).map(min_max).collect();
    let nblocks = ranges.len();
    let mut scales = vec![0.0f32; nblocks];
    let mut zeros = vec![0.0f32; nblocks];
    let mut chosen = vec![0.0f32; nblocks];
    let error = match objective {
        Objective::TensorMse => {
            // Blocks are independent: searched in parallel, summed in block order (the same
            // result as one after the other, whatever the thread count).
            let rounder = format.rounder();
            let best: Vec<(f64, f32, f32, f32)> = data
                .par_chunks(block_len)
                .zip(ranges.par_iter())
                .map(|(block, &range)| match rounder {
                    Rounder::Int(r) => best_for_block(r, format, block, range, &ratios, &fractions),
                    Rounder::Float(r) => best_for_block(r, format, block, range, &ratios, &fractions),
                })
                .collect();
            let mut total = 0.0f64;
            for (b, &(sse, s, z, ratio)) in best.iter().enumerate() {
                (scales[b], zeros[b], chosen[b]) = (s, z, ratio);
                total += sse;
            }
            total / data.len() as f64
        }
        Objective::Output(f) => {
            let mut best = f64::INFINITY;
            let mut buf = vec![0.0f32; data.len()];
            let (mut s_try, mut z_try) = (vec![0.0f32; nblocks], vec![0.0f32; nblocks]);
            for &t in &fractions {
                for &ratio in &ratios {
                    for (b, &(lo, hi)) in ranges.iter().enumerate() {
                        let (s, z) = block_params(format, lo, hi, ratio, t);
                        s_try[b] = s;
                        z_try[b] = z.unwrap_or(0.0);
                    }
                    let zp = (!format.signed()).then_some(z_try.as_slice());
                    for (b, (out, block)) in buf.chunks_mut(block_len).zip(data.chunks(block_len)).enumerate()
                    {
                        let (s, z) = (s_try[b], zp.map(|z| z[b]));
                        for (o, &x) in out.iter_mut().zip(block) {
                            *o = quantize_value(format, x, s, z);
                        }
                    }
                    let err = f(&buf);
                    if !err.is_finite() {
                        runtime!(
                            "the calibration objective returned {err} for {} at clipping ratio {ratio}",
                            format.spec()
                        );
                    }
                    if err < best {
                        best = err;
                        scales.copy_from_slice(&s_try);
                        zeros.copy_from_slice(&z_try);
                        chosen.fill(ratio as f32);
                    }
                }
            }
            best
        }
    };
    Ok(ClipResult {
        spec: format.spec().to_string(),
        scales,
        zero_points: (!format.signed()).then_some(zeros),
        scale_shape,
        ratios: chosen,
        error,
    })
}

/// Every exponent/mantissa split of a `bits`-wide minifloat that [`Format::parse`] accepts:
/// signed `eXmY` with `1 + X + Y = bits`, or unsigned `ueXmY` with `X + Y = bits`, `X >= 1`,
/// in order of increasing `X`.
pub fn fp_formats(bits: u32, signed: bool) -> Vec<Format> {
    let payload = if signed { bits.saturating_sub(1) } else { bits };
    (1..=payload)
        .filter_map(|x| {
            let spec = format!("{}e{x}m{}", if signed { "" } else { "u" }, payload - x);
            Format::parse(&spec).ok()
        })
        .collect()
}

/// Runs [`search_clipping`] for every candidate format and keeps the best (the first one on a
/// tie); every candidate's error is reported.
pub fn search_formats(
    candidates: &[Format],
    data: &[f32],
    shape: &[usize],
    cfg: &CalibConfig,
    objective: &Objective,
) -> Result<FormatSearch> {
    if candidates.is_empty() {
        usage!("the format search has no candidate formats");
    }
    let mut best: Option<ClipResult> = None;
    let mut errors = Vec::with_capacity(candidates.len());
    for format in candidates {
        let r = search_clipping(format, data, shape, cfg, objective)?;
        errors.push(FormatError { spec: r.spec.clone(), error: r.error });
        if best.as_ref().is_none_or(|b| r.error < b.error) {
            best = Some(r);
        }
    }
    Ok(FormatSearch { best: best.expect("at least one candidate"), errors })
}

/// [`search_formats`] over all FP splits of `bits` ([`fp_formats`]).
pub fn search_fp_formats(
    bits: u32,
    signed: bool,
    data: &[f32],
    shape: &[usize],
    cfg: &CalibConfig,
    objective: &Objective,
) -> Result<FormatSearch> {
    let candidates = fp_formats(bits, signed);
    if candidates.is_empty() {
        usage!("no {} FP format has {bits} bits", if signed { "signed" } else { "unsigned" });
    }
    search_formats(&candidates, data, shape, cfg, objective)
}

/// Running statistics of one quantized input's activations over many calibration batches and
/// timesteps: exact min, max, count, sum and sum of squares of every finite value, the number
/// of non-finite values (skipped), and a uniform reservoir sample of at most `capacity` values
/// for the searches to run on.
///
/// The reservoir uses Vitter's/Li's skip-based "Algorithm L" (a few random draws per accepted
/// value, none per skipped one), driven by a [`SeededRng`] stream derived from the seed: the same
/// seed and the same sequence of `observe` calls give the same sample, whatever the batch sizes.
#[derive(Debug, Clone)]
pub struct ActStats {
    pub min: f32,
    pub max: f32,
    /// Finite values seen.
    pub count: u64,
    /// Non-finite values seen (and skipped).
    pub nonfinite: u64,
    pub sum: f64,
    pub sum_sq: f64,
    capacity: usize,
    sample: Vec<f32>,
    rng: SeededRng,
    /// Algorithm L's threshold: the largest random key among the sampled values.
    w: f64,
    /// Index (among finite values) of the next value that enters the reservoir.
    next: u64,
}

impl ActStats {
    /// Empty statistics keeping a reservoir of at most `capacity` values.
    pub fn new(capacity: usize, seed: u64) -> Self {
        assert!(capacity > 0, "reservoir capacity must be positive");
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
            nonfinite: 0,
            sum: 0.0,
            sum_sq: 0.0,
            capacity,
            sample: Vec::new(),
            rng: SeededRng::derived(seed, stream::CALIB_RESERVOIR),
            w: 1.0,
            next: capacity as u64,
        }
    }

    /// A uniform draw in the open interval (0, 1) with 53 random bits.
    fn open_unit(&mut self) -> f64 {
        let hi = self.rng.below(1 << 26) as u64;
        let lo = self.rng.below(1 << 27) as u64;
        (((hi << 27) | lo) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Draws how many values to skip before the next one enters a full reservoir.
    fn advance(&mut self) {
        let k = self.capacity as f64;
        self.w *= (self.open_unit().ln() / k).exp();
        let skip = (self.open_unit().ln() / (-self.w).ln_1p()).floor();
        // Saturating: with a tiny threshold the skip is astronomically long.
        let skip = if skip.is_finite() && skip < 1e18 { skip as u64 } else { u64::MAX / 2 };
        self.next = self.next.saturating_add(skip).saturating_add(1);
    }

    /// Adds a batch of activation values.
    pub fn observe(&mut self, values: &[f32]) {
        for &x in values {
            if !x.is_finite() {
                self.nonfinite += 1;
                continue;
            }
            self.min = self.min.min(x);
            self.max = self.max.max(x);
            self.sum += x as f64;
            self.sum_sq += (x as f64) * (x as f64);
            let i = self.count;
            self.count += 1;
            if self.sample.len() < self.capacity {
                self.sample.push(x);
                if self.sample.len() == self.capacity {
                    // Reservoir just filled: start skipping.
                    self.w = 1.0;
                    self.next = i;
                    self.advance();
                }
            } else if i == self.next {
                let slot = self.rng.below(self.capacity);
                self.sample[slot] = x;
                self.advance();
            }
        }
    }

    /// Folds `other` in: exact statistics add up, and the reservoir becomes a uniform sample of
    /// both streams (exactly so when both have the same capacity), drawn with `self`'s generator.
    pub fn merge(&mut self, other: &ActStats) {
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.nonfinite += other.nonfinite;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        let (n1, n2) = (self.count, other.count);
        self.count = n1 + n2;
        let total = self.count;
        if total as u128 <= self.capacity as u128 {
            self.sample.extend_from_slice(&other.sample);
            if self.sample.len() == self.capacity {
                self.w = 1.0;
                self.next = total - 1;
                self.advance();
            }
            return;
        }
        // Simple random sampling without replacement from the union: each draw comes from a
        // stream with probability proportional to its not-yet-drawn population, and is a random
        // not-yet-drawn member of that stream's (uniform) sample.
        let mut a = std::mem::take(&mut self.sample);
        let mut b = other.sample.clone();
        let (mut r1, mut r2) = (n1, n2);
        let mut out = Vec::with_capacity(self.capacity);
        while out.len() < self.capacity && !(a.is_empty() && b.is_empty()) {
            let from_a = if a.is_empty() {
                false
            } else if b.is_empty() {
                true
            } else {
                (self.rng.below((r1 + r2) as usize) as u64) < r1
            };
            let (v, r) = if from_a { (&mut a, &mut r1) } else { (&mut b, &mut r2) };
            let j = self.rng.below(v.len());
            out.push(v.swap_remove(j));
            *r = r.saturating_sub(1);
        }
        self.sample = out;
        if self.sample.len() == self.capacity {
            // Algorithm L's state after `total` values: the threshold is the k-th smallest of
            // `total` uniform keys; draw it through the order statistics, then the next skip.
            let k = self.capacity as u64;
            let mut w = 0.0f64;
            for j in 0..k {
                let u = self.open_unit();
                w = 1.0 - (1.0 - w) * u.powf(1.0 / (total - j) as f64);
            }
            self.w = w;
            let skip = (self.open_unit().ln() / (-w).ln_1p()).floor();
            let skip = if skip.is_finite() && skip < 1e18 { skip as u64 } else { u64::MAX / 2 };
            self.next = total.saturating_add(skip);
        } else {
            self.next = total;
        }
    }

    /// The reservoir sample (in no particular order).
    pub fn sample(&self) -> &[f32] {
        &self.sample
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// `max(|min|, |max|)`; 0 before any value.
    pub fn absmax(&self) -> f32 {
        if self.count == 0 { 0.0 } else { self.min.abs().max(self.max.abs()) }
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let m = self.mean();
        (self.sum_sq / self.count as f64 - m * m).max(0.0).sqrt()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn fmt(spec: &str) -> Format {
        spec.parse().expect("valid spec")
    }

    /// Student-t with `nu` degrees of freedom: Z / sqrt(chi2_nu / nu).
    pub(crate) fn student_t(rng: &mut SeededRng, n: usize, nu: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let z = rng.normal();
                let chi2: f32 = (0..nu).map(|_| rng.normal().powi(2)).sum();
                z / (chi2 / nu as f32).sqrt()
            })
            .collect()
    }

    /// Laplace(0, 1) by inverse CDF.
    pub(crate) fn laplace(rng: &mut SeededRng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u = rng.uniform() - 0.5;
                let a = (1.0 - 2.0 * u.abs()).max(f32::MIN_POSITIVE);
                -u.signum() * a.ln()
            })
            .collect()
    }

    pub(crate) fn silu(x: f32) -> f32 {
        x / (1.0 + (-x).exp())
    }

    fn mse(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.len() as f64
    }

    fn cfg(granularity: Granularity) -> CalibConfig {
        CalibConfig {
            clip_grid: 50,
            clip_min: 0.1,
            granularity,
            zero_point_grid: 12,
            ..CalibConfig::default()
        }
    }

    /// Min-max: the single ratio 1.0 (and, unsigned, z = min).
    fn min_max_cfg(granularity: Granularity) -> CalibConfig {
        CalibConfig {
            clip_grid: 1,
            clip_min: 1.0,
            clip_max: 1.0,
            zero_point_grid: 1,
            granularity,
            ..CalibConfig::default()
        }
    }

    #[test]
    fn grids() {
        let c = CalibConfig {
            clip_grid: 5,
            clip_min: 0.6,
            clip_max: 1.0,
            zero_point_grid: 3,
            ..CalibConfig::default()
        };
        let r = c.ratios();
        assert_eq!(r.len(), 5);
        assert!((r[0] - 0.6).abs() < 1e-12 && (r[2] - 0.8).abs() < 1e-12 && r[4] == 1.0);
        assert_eq!(c.zero_point_fractions(), [0.0, 0.5, 1.0]);
        assert_eq!(min_max_cfg(Granularity::PerTensor).ratios(), [1.0]);
        assert_eq!(min_max_cfg(Granularity::PerTensor).zero_point_fractions(), [1.0]);
        let d = CalibConfig::default();
        assert_eq!((d.ratios().len(), d.ratios()[99]), (100, 1.0));
    }

    #[test]
    fn searches_beat_min_max_on_heavy_tails() {
        let mut rng = SeededRng::new(11);
        let t = student_t(&mut rng, 16 * 1024, 3);
        let l = laplace(&mut rng, 16 * 1024);
        for (name, data) in [("student-t(3)", &t), ("laplace", &l)] {
            for spec in ["e2m1", "int4"] {
                let format = fmt(spec);
                for (gran, shape) in
                    [(Granularity::PerTensor, vec![data.len()]), (Granularity::PerChannel, vec![16, 1024])]
                {
                    let obj = Objective::TensorMse;
                    let searched = search_clipping(&format, data, &shape, &cfg(gran), &obj).expect("search");
                    let minmax =
                        search_clipping(&format, data, &shape, &min_max_cfg(gran), &obj).expect("min-max");
                    let nblocks = if gran == Granularity::PerTensor { 1 } else { 16 };
                    assert_eq!(searched.scales.len(), nblocks);
                    assert_eq!(searched.zero_points, None);
                    // The reported error is the MSE of the quantizer it returns.
                    let q = quantize_blocks(&format, data, data.len() / nblocks, &searched.scales, None);
                    assert!((mse(&q, data) - searched.error).abs() < 1e-9 * searched.error);
                    let mean_ratio = searched.ratios.iter().sum::<f32>() / searched.ratios.len() as f32;
                    eprintln!(
                        "{name} {spec} {gran:?}: searched MSE {:.5} (mean ratio {mean_ratio:.3}) vs min-max {:.5}",
                        searched.error, minmax.error
                    );
                    assert!(
                        searched.error < 0.9 * minmax.error,
                        "{name} {spec} {gran:?}: {} vs {}",
                        searched.error,
                        minmax.error
                    );
                    assert!(searched.ratios.iter().all(|&r| r < 1.0));
                }
            }
        }
    }

    #[test]
    fn per_group_search_and_shapes() {
        let mut rng = SeededRng::new(5);
        let data = laplace(&mut rng, 4 * 64);
        let format = fmt("e2m1");
        let c =
            CalibConfig { granularity: Granularity::PerGroup, group_size: 32, ..cfg(Granularity::PerGroup) };
        let r = search_clipping(&format, &data, &[4, 64], &c, &Objective::TensorMse).unwrap();
        assert_eq!((r.scales.len(), r.scale_shape.clone()), (8, vec![8, 1]));
        let per_tensor =
            search_clipping(&format, &data, &[4, 64], &cfg(Granularity::PerTensor), &Objective::TensorMse)
                .unwrap();
        assert!(r.error <= per_tensor.error);
        let bad = CalibConfig { group_size: 48, ..c.clone() };
        let e = search_clipping(&format, &data, &[4, 64], &bad, &Objective::TensorMse).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Usage);
        assert!(e.message.contains("48"), "{}", e.message);
        let ch =
            search_clipping(&format, &data, &[4, 64], &cfg(Granularity::PerChannel), &Objective::TensorMse)
                .unwrap();
        assert_eq!(ch.scale_shape, [4, 1]);
    }

    #[test]
    fn unsigned_search_finds_a_zero_point() {
        let mut rng = SeededRng::new(3);
        let data: Vec<f32> = rng.normals(8000).into_iter().map(silu).collect();
        let (lo, _) = min_max(&data);
        for spec in ["ue2m2", "uint4"] {
            let format = fmt(spec);
            let r = search_clipping(
                &format,
                &data,
                &[data.len()],
                &cfg(Granularity::PerTensor),
                &Objective::TensorMse,
            )
            .unwrap();
            let z = r.zero_points.as_ref().expect("unsigned formats get a zero point")[0];
            assert!(lo <= z && z <= 0.0, "{spec}: z = {z}, min {lo}");
            let q = quantize_blocks(&format, &data, data.len(), &r.scales, Some(&[z]));
            assert!((mse(&q, &data) - r.error).abs() < 1e-9 * r.error);
            let mm = search_clipping(
                &format,
                &data,
                &[data.len()],
                &min_max_cfg(Granularity::PerTensor),
                &Objective::TensorMse,
            )
            .unwrap();
            assert_eq!(mm.zero_points.as_ref().unwrap()[0], lo);
            assert!(r.error < mm.error, "{spec}: {} vs {}", r.error, mm.error);
        }
    }

    #[test]
    fn output_objective_is_a_pluggable_closure() {
        let mut rng = SeededRng::new(9);
        let data = student_t(&mut rng, 2048, 4);
        let format = fmt("e2m1");
        let c = cfg(Granularity::PerTensor);
        // A closure computing the tensor MSE itself lands on the same quantizer.
        let f = |q: &[f32]| mse(q, &data);
        let via_closure = search_clipping(&format, &data, &[2048], &c, &Objective::Output(&f)).unwrap();
        let direct = search_clipping(&format, &data, &[2048], &c, &Objective::TensorMse).unwrap();
        assert_eq!(via_closure.scales, direct.scales);
        assert!((via_closure.error - direct.error).abs() < 1e-12);

        // A layer-output objective: y = W x for a [4, 512] input and a 3x4 mixing matrix.
        let w = [[0.5f32, -1.0, 0.25, 2.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.3, -0.7, 0.1]];
        let forward = |x: &[f32]| -> Vec<f32> {
            (0..3)
                .flat_map(|o| (0..512).map(move |j| (0..4).map(|i| w[o][i] * x[i * 512 + j]).sum()))
                .collect()
        };
        let y = forward(&data);
        let calls = std::cell::Cell::new(0);
        let layer_mse = |q: &[f32]| {
            calls.set(calls.get() + 1);
            mse(&forward(q), &y)
        };
        let pc = cfg(Granularity::PerChannel);
        let r = search_clipping(&format, &data, &[4, 512], &pc, &Objective::Output(&layer_mse)).unwrap();
        assert_eq!(calls.get(), pc.clip_grid);
        assert_eq!(r.scales.len(), 4);
        // One shared ratio; the result is no worse than min-max under the same objective.
        assert!(r.ratios.iter().all(|&x| x == r.ratios[0]));
        let mm = search_clipping(
            &format,
            &data,
            &[4, 512],
            &min_max_cfg(Granularity::PerChannel),
            &Objective::Output(&layer_mse),
        )
        .unwrap();
        assert!(r.error < mm.error, "{} vs {}", r.error, mm.error);
        // A failing objective is reported, not silently minimised.
        let nan = |_: &[f32]| f64::NAN;
        assert!(search_clipping(&format, &data, &[2048], &c, &Objective::Output(&nan)).is_err());
    }

    #[test]
    fn silu_activations_prefer_unsigned_fp_with_zero_point() {
        // MSFP's premise: after SiLU (min about -0.278), the 16 levels of an unsigned 4-bit FP
        // with a zero point beat the symmetric signed grid.
        let mut rng = SeededRng::new(2024);
        let data: Vec<f32> = rng.normals(20_000).into_iter().map(silu).collect();
        let c = cfg(Granularity::PerTensor);
        let n = [data.len()];
        let unsigned = search_clipping(&fmt("ue2m2"), &data, &n, &c, &Objective::TensorMse).unwrap();
        let signed = search_clipping(&fmt("e2m1"), &data, &n, &c, &Objective::TensorMse).unwrap();
        eprintln!(
            "SiLU(N(0,1)), 20k samples: ue2m2 + zero point MSE {:.3e} (s {:.4}, z {:.4}) vs e2m1 MSE {:.3e} (s {:.4}); ratio {:.2}",
            unsigned.error,
            unsigned.scales[0],
            unsigned.zero_points.as_ref().unwrap()[0],
            signed.error,
            signed.scales[0],
            signed.error / unsigned.error
        );
        assert!(unsigned.error < signed.error, "ue2m2 {} vs e2m1 {}", unsigned.error, signed.error);

        let search = search_fp_formats(4, false, &data, &n, &c, &Objective::TensorMse).unwrap();
        let specs: Vec<&str> = search.errors.iter().map(|e| e.spec.as_str()).collect();
        assert_eq!(specs, ["ue1m3", "ue2m2", "ue3m1", "ue4m0"]);
        for e in &search.errors {
            eprintln!("  {}: MSE {:.3e}", e.spec, e.error);
            assert!(e.error.is_finite() && e.error > 0.0);
            assert!(search.best.error <= e.error);
        }
        assert!(search.errors.iter().any(|e| e.spec == search.best.spec));
        // No mantissa bit is a poor fit for a smooth, bell-shaped bulk.
        assert_ne!(search.best.spec, "ue4m0");
        let best_signed = search_fp_formats(4, true, &data, &n, &c, &Objective::TensorMse).unwrap();
        eprintln!(
            "  best unsigned {} {:.3e}, best signed {} {:.3e}",
            search.best.spec, search.best.error, best_signed.best.spec, best_signed.best.error
        );
        assert!(search.best.error < best_signed.best.error);
    }

    #[test]
    fn fp_formats_enumerates_parseable_splits() {
        let names = |bits, signed| -> Vec<String> {
            fp_formats(bits, signed).iter().map(|f| f.spec().to_string()).collect()
        };
        assert_eq!(names(4, true), ["e1m2", "e2m1", "e3m0"]);
        assert_eq!(names(6, false).len(), 6);
        // ue8m0 overflows f32 and is skipped.
        assert_eq!(names(8, false).last().unwrap(), "ue7m1");
        assert_eq!(names(8, true).len(), 7);
        assert!(names(5, true).is_empty());
        assert!(
            search_fp_formats(5, true, &[1.0], &[1], &CalibConfig::default(), &Objective::TensorMse).is_err()
        );
    }

    #[test]
    fn degenerate_and_bad_data() {
        let c = cfg(Granularity::PerTensor);
        let zeros = [0.0f32; 16];
        for spec in ["e2m1", "ue2m2"] {
            let r = search_clipping(&fmt(spec), &zeros, &[16], &c, &Objective::TensorMse).unwrap();
            assert_eq!(r.error, 0.0);
            assert!(r.scales[0] > 0.0);
        }
        let e = search_clipping(&fmt("e2m1"), &[1.0, f32::NAN], &[2], &c, &Objective::TensorMse).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Runtime);
        assert!(search_clipping(&fmt("e2m1"), &[1.0], &[2], &c, &Objective::TensorMse).is_err());
        assert!(search_clipping(&fmt("e2m1"), &[], &[0], &c, &Objective::TensorMse).is_err());
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_bad_keys() {
        let c: CalibConfig = toml::from_str("clip_grid = 10\ngranularity = \"per_group\"").unwrap();
        assert_eq!(c.clip_grid, 10);
        assert_eq!(c.granularity, Granularity::PerGroup);
        assert_eq!(c.clip_max, 1.0);
        assert_eq!(c.objective, ObjectiveKind::TensorMse);
        c.validate("calib").unwrap();
        let o: CalibConfig = toml::from_str("objective = \"output_mse\"").unwrap();
        assert_eq!(o.objective, ObjectiveKind::OutputMse);
        assert!(toml::from_str::<CalibConfig>("clip_grdi = 10").is_err());
        assert!(toml::from_str::<CalibConfig>("granularity = \"per_row\"").is_err());
        for (bad, key) in [
            ("clip_grid = 0", "calib.clip_grid"),
            ("clip_min = 0.0", "calib.clip_min"),
            ("clip_min = 0.9\nclip_max = 0.8", "calib.clip_max"),
            ("clip_max = 3.0", "calib.clip_max"),
            ("zero_point_grid = 0", "calib.zero_point_grid"),
            ("group_size = 0", "calib.group_size"),
            ("sample_size = 0", "calib.sample_size"),
        ] {
            let c: CalibConfig = toml::from_str(bad).unwrap();
            let e = c.validate("calib").unwrap_err();
            assert_eq!(e.kind, ErrorKind::Usage);
            assert!(e.message.starts_with(key), "{bad}: {}", e.message);
        }
        let e = CalibConfig { clip_min: f64::NAN, ..CalibConfig::default() }.validate("").unwrap_err();
        assert!(e.message.starts_with("clip_min"), "{}", e.message);
    }

    #[test]
    fn act_stats_track_exact_statistics_and_a_bounded_sample() {
        let mut rng = SeededRng::new(1);
        let data = rng.normals(50_000);
        let mut s = ActStats::new(4096, 7);
        for chunk in data.chunks(999) {
            s.observe(chunk);
        }
        s.observe(&[f32::NAN, f32::INFINITY]);
        let (lo, hi) = min_max(&data);
        assert_eq!((s.min, s.max, s.count, s.nonfinite), (lo, hi, 50_000, 2));
        assert_eq!(s.absmax(), lo.abs().max(hi.abs()));
        assert!(s.mean().abs() < 0.02 && (s.std() - 1.0).abs() < 0.02);
        assert_eq!(s.sample().len(), 4096);
        // Every sampled value comes from the data; the sample looks like the data.
        let set: std::collections::HashSet<u32> = data.iter().map(|x| x.to_bits()).collect();
        assert!(s.sample().iter().all(|x| set.contains(&x.to_bits())));
        let m = s.sample().iter().map(|&x| x as f64).sum::<f64>() / 4096.0;
        let frac_pos = s.sample().iter().filter(|&&x| x > 1.0).count() as f64 / 4096.0;
        assert!(m.abs() < 0.06, "sample mean {m}");
        assert!((frac_pos - 0.1587).abs() < 0.02, "P(x > 1) {frac_pos}");
        // The sample is not biased to the start of the stream: about a fifth of it comes from
        // the last fifth.
        let tail: std::collections::HashSet<u32> = data[40_000..].iter().map(|x| x.to_bits()).collect();
        let from_tail = s.sample().iter().filter(|x| tail.contains(&x.to_bits())).count();
        assert!((from_tail as f64 / 4096.0 - 0.2).abs() < 0.03, "{from_tail}");

        // Deterministic given the seed, whatever the batch sizes.
        let mut again = ActStats::new(4096, 7);
        for chunk in data.chunks(4096) {
            again.observe(chunk);
        }
        assert_eq!(again.sample(), s.sample());
        let mut other_seed = ActStats::new(4096, 8);
        other_seed.observe(&data);
        assert_ne!(other_seed.sample(), s.sample());

        // Below capacity the sample is everything.
        let mut small = ActStats::new(100, 0);
        small.observe(&data[..60]);
        assert_eq!(small.sample(), &data[..60]);
    }

    #[test]
    fn act_stats_merge() {
        let mut rng = SeededRng::new(4);
        // Two streams with different distributions, the second twice as long.
        let a: Vec<f32> = rng.normals(10_000);
        let b: Vec<f32> = (0..20_000).map(|_| 10.0 + rng.uniform()).collect();
        let mut sa = ActStats::new(3000, 1);
        sa.observe(&a);
        let mut sb = ActStats::new(3000, 2);
        sb.observe(&b);
        let mut m = sa.clone();
        m.merge(&sb);
        assert_eq!(m.count, 30_000);
        assert_eq!(m.min, sa.min.min(sb.min));
        assert_eq!(m.max, sb.max);
        assert!((m.sum - (sa.sum + sb.sum)).abs() < 1e-6);
        assert_eq!(m.sample().len(), 3000);
        let from_b = m.sample().iter().filter(|&&x| x >= 10.0).count() as f64 / 3000.0;
        assert!((from_b - 2.0 / 3.0).abs() < 0.03, "share of b {from_b}");
        // The merged stats keep sampling new values uniformly.
        let c: Vec<f32> = (0..30_000).map(|_| -10.0 - rng.uniform()).collect();
        m.observe(&c);
        let from_c = m.sample().iter().filter(|&&x| x <= -10.0).count() as f64 / 3000.0;
        assert!((from_c - 0.5).abs() < 0.04, "share of c {from_c}");
        // Small streams merge into a plain concatenation.
        let mut x = ActStats::new(100, 0);
        x.observe(&[1.0, 2.0]);
        let mut y = ActStats::new(100, 0);
        y.observe(&[-3.0]);
        x.merge(&y);
        assert_eq!(x.sample(), [1.0, 2.0, -3.0]);
        assert_eq!((x.min, x.max, x.count), (-3.0, 2.0, 3));
        // Merging an empty one changes nothing but the generator.
        let before = x.sample().to_vec();
        x.merge(&ActStats::new(100, 5));
        assert_eq!(x.sample(), before);
    }
}
