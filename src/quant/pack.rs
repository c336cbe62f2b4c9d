//! Real storage of quantized tensors: every value as its code in the format (a few bits), the
//! codes bit-packed into bytes, plus `f32` scales and zero points; sets of named packed tensors
//! are saved as safetensors files.
//!
//! # Codes
//! A quantized value is `q = c * s`, or `q = c * s + z` with a zero point, where `c` is a value
//! of the format's grid. `c` is stored as a `bits`-wide code:
//!
//! - signed minifloat `eXmY`: `sign << (X + Y) | index`, where `index` is the position of `|c|`
//!   among the format's non-negative magnitudes in ascending order, which is exactly its
//!   exponent-then-mantissa bit pattern. Codes are therefore the OCP / IEEE-style bit patterns:
//!   e2m1 `0b0111` = 6, `0b1001` = -0.5; e4m3 `0x7e` = 448, `0xfe` = -448. Zero is always written
//!   as code 0 (+0), as the tensor fake quantizer returns +0; the negative-zero code
//!   `1 << (bits - 1)` is never written but decodes to -0 if found. The patterns the 8-bit formats
//!   reserve for NaN/inf (e4m3: `0x7f`, `0xff`; e5m2: exponent all ones) are never written.
//! - unsigned minifloat `ueXmY`: the exponent-then-mantissa bit pattern, i.e. the index of `c`
//!   among the magnitudes (ue2m2: code 15 = 7).
//! - `intN`: two's complement of `c` in `-(2^(N-1) - 1) ..= 2^(N-1) - 1` (int4 -7 = `0b1001`,
//!   -1 = `0b1111`); the code `-2^(N-1)` (`0b1000` for int4) is outside the symmetric grid and
//!   never written.
//! - `uintN`: `c` itself, `0 ..= 2^N - 1`.
//!
//! Codes that are never written decode to NaN (negative zero aside) and make a file invalid.
//!
//! # Bit packing
//! The codes of the elements in row-major order form one little-endian bit stream: code `i`
//! occupies stream bits `i * bits .. (i + 1) * bits`, least significant bit first, and stream
//! bit `b` is bit `b % 8` (value `1 << (b % 8)`) of byte `b / 8`. So with 4 bits element `2j`
//! sits in the low nibble of byte `j` and element `2j + 1` in its high nibble; with 6 bits four
//! codes fill three bytes (`c0 | c1 << 6`, `c1 >> 2 | c2 << 4`, `c2 >> 4 | c3 << 2`); with 8 bits
//! each code is a byte. Any width 2..=8 works the same way. `n` codes take `ceil(n * bits / 8)`
//! bytes; the unused high bits of the last byte are zero.
//!
//! # Scales and zero points
//! `scales` holds one `f32` per block of `numel / scales.len()` consecutive row-major elements:
//! one block per tensor, per output channel (`shape[0]` blocks) or per group of `G` elements
//! along the last dimension (`numel / G` blocks). `scale_shape` is the shape they broadcast with
//! against the tensor (`[1, .., 1]`, `[C, 1, .., 1]` or `[numel / G, 1]`, the grouped view).
//! `zero_points`, when present, has the same layout. Element `i` decodes to
//! `grid(code_i) * scales[i / block]` (`+ zero_points[i / block]`) in `f32`: the operations of
//! the fake quantizer, so unpacking reproduces `fake_quantize` bit for bit.
//!
//! # File
//! A safetensors file. For a tensor named `name`: `name.codes` (U8, shape `[nbytes]`),
//! `name.scales` (F32, `scale_shape`) and, with zero points, `name.zero_points` (F32,
//! `scale_shape`); all little-endian as safetensors prescribes. The metadata key `msfp.packed`
//! holds JSON: `{"version": 1, "tensors": {"name": {"spec": "e2m1", "bits": 4, "shape": [..],
//! "scale_shape": [..], "zero_points": false}}}`, and `msfp.layout` a one-line reminder of this
//! layout. Files are written atomically (temporary name, then rename).

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::format::{Format, Kind};
use crate::base::params::{HostTensor, NamedTensors};
use crate::error::{Error, Result};

/// Metadata key of the JSON description.
pub const META_KEY: &str = "msfp.packed";
const LAYOUT_KEY: &str = "msfp.layout";
const LAYOUT: &str = "codes: row-major little-endian bit stream, LSB first (4-bit: low nibble first); \
signed FP = sign bit + magnitude index (OCP bit pattern), unsigned FP = index, intN = two's \
complement, uintN = value; value = grid(code) * scale (+ zero_point), one scale per block of \
numel / len(scales) consecutive elements";
const VERSION: u32 = 1;

/// Maps grid values to codes and back for one format.
#[derive(Debug, Clone)]
pub struct Codec {
    format: Format,
    /// Non-negative magnitudes in code order.
    magnitudes: Vec<f32>,
    /// Grid value of every code; NaN for codes that are never written.
    table: Vec<f32>,
}

impl Codec {
    pub fn new(format: &Format) -> Self {
        let values = format.values();
        let magnitudes = if format.signed() { values[(values.len() - 1) / 2..].to_vec() } else { values };
        let bits = format.bits();
        let codes = 1u32 << bits;
        let half = 1u32 << (bits - 1);
        let table = (0..codes)
            .map(|code| match (format.kind(), format.signed()) {
                (Kind::Int { .. }, true) => {
                    let v = if code >= half { code as i64 - codes as i64 } else { code as i64 };
                    if v == -(half as i64) { f32::NAN } else { v as f32 }
                }
                (Kind::Float { .. }, true) => {
                    let m = magnitudes.get((code & (half - 1)) as usize).copied().unwrap_or(f32::NAN);
                    if code & half != 0 { -m } else { m }
                }
                // Unsigned grids use every code.
                (_, false) => magnitudes[code as usize],
            })
            .collect();
        Self { format: format.clone(), magnitudes, table }
    }

    pub fn bits(&self) -> u32 {
        self.format.bits()
    }

    /// The code of grid value `c` (a value of the format's grid; +0 for either zero).
    pub fn encode(&self, c: f32) -> u32 {
        let bits = self.bits();
        let mask = (1u32 << bits) - 1;
        match (self.format.kind(), self.format.signed()) {
            (Kind::Int { .. }, true) => (c as i32 as u32) & mask,
            (Kind::Int { .. }, false) => c as u32,
            (Kind::Float { .. }, signed) => {
                let a = c.abs();
                let index = self
                    .magnitudes
                    .binary_search_by(|m| m.total_cmp(&a))
                    .unwrap_or_else(|_| panic!("{c} is not on the {} grid", self.format))
                    as u32;
                let negative = signed && c < 0.0;
                ((negative as u32) << (bits - 1)) | index
            }
        }
    }

    /// The grid value of `code` (NaN for codes that are never written).
    #[inline]
    pub fn decode(&self, code: u32) -> f32 {
        self.table[code as usize]
    }

    /// Whether `code` is a value of the grid (i.e. could be in a valid file).
    pub fn is_valid(&self, code: u32) -> bool {
        (code as usize) < self.table.len() && !self.table[code as usize].is_nan()
    }
}

/// Packs `bits`-wide codes into a little-endian, LSB-first bit stream (see the module docs).
pub fn pack_bits(codes: &[u32], bits: u32) -> Vec<u8> {
    assert!((1..=8).contains(&bits), "code width {bits}");
    let mut out = Vec::with_capacity(packed_len(codes.len(), bits).unwrap_or(0));
    let (mut acc, mut filled) = (0u32, 0u32);
    for &c in codes {
        debug_assert!(c < (1 << bits), "code {c} wider than {bits} bits");
        acc |= c << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// The first `n` codes of a bit stream written by [`pack_bits`]; `bytes` must hold them.
pub fn unpack_bits(bytes: &[u8], bits: u32, n: usize) -> Vec<u32> {
    assert!((1..=8).contains(&bits), "code width {bits}");
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(n);
    let (mut acc, mut filled, mut pos) = (0u32, 0u32, 0usize);
    for _ in 0..n {
        while filled < bits {
            acc |= (bytes[pos] as u32) << filled;
            pos += 1;
            filled += 8;
        }
        out.push(acc & mask);
        acc >>= bits;
        filled -= bits;
    }
    out
}

/// Bytes taken by `n` codes of `bits` bits, `None` on overflow.
pub fn packed_len(n: usize, bits: u32) -> Option<usize> {
    n.checked_mul(bits as usize).map(|b| b.div_ceil(8))
}

/// A quantized tensor in its real storage form (layout in the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedTensor {
    pub format: Format,
    pub shape: Vec<usize>,
    /// Bit-packed codes, row-major.
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub scale_shape: Vec<usize>,
    pub zero_points: Option<Vec<f32>>,
}

impl PackedTensor {
    /// Quantizes row-major `values` of shape `shape` with `z + s * round((x - z) / s)` (the fake
    /// quantizer; values it already produced come back unchanged) and stores the codes.
    ///
    /// `scales` has one scale per block of `numel / scales.len()` consecutive elements and
    /// broadcasts as `scale_shape`; `zero_points`, if any, has the same length.
    pub fn pack(
        values: &[f32],
        shape: &[usize],
        format: &Format,
        scales: &[f32],
        scale_shape: &[usize],
        zero_points: Option<&[f32]>,
    ) -> Result<Self> {
        let numel: usize = shape.iter().product();
        if values.len() != numel {
            usage!("cannot pack {} values as shape {shape:?} ({numel} elements)", values.len());
        }
        check_scales(numel, scales, scale_shape, zero_points)?;
        if let Some(i) = values.iter().position(|x| !x.is_finite()) {
            runtime!("cannot pack non-finite value {} at index {i}", values[i]);
        }
        let codec = Codec::new(format);
        let block = numel / scales.len();
        let codes: Vec<u32> = values
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let b = i / block;
                let s = scales[b];
                let c = match zero_points {
                    Some(z) => format.round((x - z[b]) / s),
                    None => format.round(x / s),
                };
                codec.encode(c)
            })
            .collect();
        Ok(Self {
            format: format.clone(),
            shape: shape.to_vec(),
            codes: pack_bits(&codes, format.bits()),
            scales: scales.to_vec(),
            scale_shape: scale_shape.to_vec(),
            zero_points: zero_points.map(<[f32]>::to_vec),
        })
    }

    pub fn spec(&self) -> &str {
        self.format.spec()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The unpacked codes, one per element.
    pub fn code_values(&self) -> Vec<u32> {
        unpack_bits(&self.codes, self.format.bits(), self.numel())
    }

    /// The dequantized values, `grid(code) * scale (+ zero point)` per element, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let codec = Codec::new(&self.format);
        let n = self.numel();
        let block = n / self.scales.len().max(1);
        self.code_values()
            .into_iter()
            .enumerate()
            .map(|(i, code)| {
                let b = i / block;
                let c = codec.decode(code) * self.scales[b];
                match &self.zero_points {
                    Some(z) => c + z[b],
                    None => c,
                }
            })
            .collect()
    }

    /// Checks the internal consistency of a packed tensor (sizes, scales, codes, padding).
    pub fn validate(&self) -> Result<()> {
        let numel = self
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::runtime(format!("shape {:?} overflows", self.shape)))?;
        let bits = self.format.bits();
        let want = packed_len(numel, bits)
            .ok_or_else(|| Error::runtime(format!("shape {:?} overflows", self.shape)))?;
        if self.codes.len() != want {
            runtime!("{} code bytes, but {numel} elements of {bits} bits take {want}", self.codes.len());
        }
        check_scales(numel, &self.scales, &self.scale_shape, self.zero_points.as_deref())
            .map_err(|e| Error::runtime(e.message))?;
        let codec = Codec::new(&self.format);
        let codes = self.code_values();
        if let Some(i) = codes.iter().position(|&c| !codec.is_valid(c)) {
            runtime!("element {i} has code {:#x}, which is not a value of {}", codes[i], self.format);
        }
        let used = numel * bits as usize;
        if !used.is_multiple_of(8) && self.codes[used / 8] >> (used % 8) != 0 {
            runtime!("the padding bits of the last code byte are not zero");
        }
        Ok(())
    }
}

fn check_scales(
    numel: usize,
    scales: &[f32],
    scale_shape: &[usize],
    zero_points: Option<&[f32]>,
) -> Result<()> {
    if scales.is_empty() || !numel.is_multiple_of(scales.len()) {
        usage!("{} scales do not split {numel} elements into equal blocks", scales.len());
    }
    if scale_shape.iter().product::<usize>() != scales.len() {
        usage!("scale shape {scale_shape:?} does not hold {} scales", scales.len());
    }
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        usage!("scale {i} is {}: scales must be positive and finite", scales[i]);
    }
    if let Some(z) = zero_points {
        if z.len() != scales.len() {
            usage!("{} zero points for {} scales", z.len(), scales.len());
        }
        if let Some(i) = z.iter().position(|z| !z.is_finite()) {
            usage!("zero point {i} is {}", z[i]);
        }
    }
    Ok(())
}

/// The JSON in the `msfp.packed` metadata entry.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeta {
    version: u32,
    tensors: BTreeMap<String, TensorMeta>,
    /// Plain `f32` tensors stored beside the packed ones (a packed model's biases, norms, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    dense: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorMeta {
    spec: String,
    bits: u32,
    shape: Vec<usize>,
    scale_shape: Vec<usize>,
    zero_points: bool,
}

fn key(name: &str, part: &str) -> String {
    format!("{name}.{part}")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Serialises without validating (the caller validates; tests use it to write bad files).
fn to_bytes(
    tensors: &BTreeMap<String, PackedTensor>,
    dense: &NamedTensors,
    extra_meta: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = FileMeta { version: VERSION, tensors: BTreeMap::new(), dense: Vec::new() };
    for (name, t) in dense {
        buffers.push((name.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
        meta.dense.push(name.clone());
    }
    for (name, t) in tensors {
        buffers.push((key(name, "codes"), Dtype::U8, vec![t.codes.len()], t.codes.clone()));
        buffers.push((key(name, "scales"), Dtype::F32, t.scale_shape.clone(), f32_bytes(&t.scales)));
        if let Some(z) = &t.zero_points {
            buffers.push((key(name, "zero_points"), Dtype::F32, t.scale_shape.clone(), f32_bytes(z)));
        }
        meta.tensors.insert(
            name.clone(),
            TensorMeta {
                spec: t.format.spec().to_string(),
                bits: t.format.bits(),
                shape: t.shape.clone(),
                scale_shape: t.scale_shape.clone(),
                zero_points: t.zero_points.is_some(),
            },
        );
    }
    let views = buffers
        .iter()
        .map(|(k, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::runtime(format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut info = extra_meta.clone();
    info.insert(META_KEY.to_string(), serde_json::to_string(&meta).expect("json"));
    info.insert(LAYOUT_KEY.to_string(), LAYOUT.to_string());
    crate::base::params::serialize_canonical(views, &info).map_err(|e| Error::runtime(e.to_string()))
}

/// Saves named packed tensors to a safetensors file, atomically (temporary name, then rename).
/// Every tensor is validated first.
pub fn save_packed(path: &Path, tensors: &BTreeMap<String, PackedTensor>) -> Result<()> {
    save_packed_file(path, &PackedFile { packed: tensors.clone(), ..Default::default() })
}

/// Everything a packed file holds: packed tensors, plain `f32` tensors and string metadata.
#[derive(Debug, Clone, Default)]
pub struct PackedFile {
    pub packed: BTreeMap<String, PackedTensor>,
    pub dense: NamedTensors,
    /// Extra metadata (the `msfp.packed` and `msfp.layout` keys are the packer's own).
    pub meta: BTreeMap<String, String>,
}

/// Saves a [`PackedFile`] atomically, validating every packed tensor first.
pub fn save_packed_file(path: &Path, file: &PackedFile) -> Result<()> {
    for (name, t) in &file.packed {
        t.validate().map_err(|e| e.context(format!("{}: tensor `{name}`", path.display())))?;
    }
    let bytes = to_bytes(&file.packed, &file.dense, &file.meta)
        .map_err(|e| e.context(format!("{}: cannot serialise", path.display())))?;
    crate::base::fs::atomic_write(path, &bytes)
}

/// Loads a whole packed file (see [`load_packed`] for the checks).
pub fn load_packed_file(path: &Path) -> Result<PackedFile> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::usage(format!("{}: file not found", path.display())),
        _ => Error::runtime(format!("{}: {e}", path.display())),
    })?;
    parse(&bytes).map_err(|why| {
        Error::runtime(format!("{}: not a valid msfp packed-tensor file: {why}", path.display()))
    })
}

/// Loads every packed tensor of a file written by [`save_packed`], checking everything the
/// layout promises; a damaged or foreign file is a runtime error naming the file.
pub fn load_packed(path: &Path) -> Result<BTreeMap<String, PackedTensor>> {
    load_packed_file(path).map(|f| f.packed)
}

fn parse(bytes: &[u8]) -> std::result::Result<PackedFile, String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| format!("no `{META_KEY}` metadata (not written by msfp's packer)"))?;
    let meta: FileMeta = serde_json::from_str(json).map_err(|e| format!("bad `{META_KEY}` metadata: {e}"))?;
    if meta.version != VERSION {
        return Err(format!("layout version {} (this build reads {VERSION})", meta.version));
    }
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut expected = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for (name, m) in meta.tensors {
        let bad = |why: String| format!("tensor `{name}`: {why}");
        let format = Format::parse(&m.spec).map_err(|e| bad(e.message))?;
        if format.bits() != m.bits {
            return Err(bad(format!("{} has {} bits, metadata says {}", m.spec, format.bits(), m.bits)));
        }
        let view = |part: &str, dtype: Dtype| {
            let k = key(&name, part);
            let v = st.tensor(&k).map_err(|_| bad(format!("tensor `{k}` is missing")))?;
            if v.dtype() != dtype {
                return Err(bad(format!("`{k}` has dtype {:?}, expected {dtype:?}", v.dtype())));
            }
            Ok((k, v))
        };
        let read_f32 = |part: &str| -> std::result::Result<(String, Vec<f32>), String> {
            let (k, v) = view(part, Dtype::F32)?;
            if v.shape() != m.scale_shape.as_slice() {
                return Err(bad(format!(
                    "`{k}` has shape {:?}, metadata says {:?}",
                    v.shape(),
                    m.scale_shape
                )));
            }
            let data =
                v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok((k, data))
        };
        let (ck, codes) = view("codes", Dtype::U8)?;
        let (sk, scales) = read_f32("scales")?;
        expected.insert(ck);
        expected.insert(sk);
        let zero_points = if m.zero_points {
            let (zk, z) = read_f32("zero_points")?;
            expected.insert(zk);
            Some(z)
        } else {
            None
        };
        let t = PackedTensor {
            format,
            shape: m.shape,
            codes: codes.data().to_vec(),
            scales,
            scale_shape: m.scale_shape,
            zero_points,
        };
        t.validate().map_err(|e| bad(e.message))?;
        out.insert(name, t);
    }
    let mut dense = BTreeMap::new();
    for name in &meta.dense {
        let v = st.tensor(name).map_err(|_| format!("dense tensor `{name}` is missing"))?;
        if v.dtype() != Dtype::F32 {
            return Err(format!("dense tensor `{name}` has dtype {:?}, expected F32", v.dtype()));
        }
        let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        dense.insert(name.clone(), HostTensor { shape: v.shape().to_vec(), data });
        expected.insert(name.clone());
    }
    let mut extra: Vec<&str> = st.names().into_iter().filter(|n| !expected.contains(*n)).collect();
    extra.sort();
    if let Some(n) = extra.first() {
        return Err(format!("tensor `{n}` is not described by the `{META_KEY}` metadata"));
    }
    let mut file_meta = header.metadata().clone().unwrap_or_default().into_iter().collect::<BTreeMap<_, _>>();
    file_meta.remove(META_KEY);
    file_meta.remove(LAYOUT_KEY);
    Ok(PackedFile { packed: out, dense, meta: file_meta })
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::error::ErrorKind;
    use crate::quant::calib::quantize_value;
    use crate::quant::fixtures::all_specs;
    use crate::quant::quantizer::fake_quantize;
    use crate::rng::SeededRng;

    fn fmt(spec: &str) -> Format {
        spec.parse().expect("valid spec")
    }

    #[test]
    fn codes_by_hand() {
        let e2m1 = fmt("e2m1");
        let v = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, 0.25, -0.1];
        let p = PackedTensor::pack(&v, &[12], &e2m1, &[1.0], &[1], None).unwrap();
        assert_eq!(p.code_values(), [0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 0, 0]);
        assert_eq!(p.codes, [0x10, 0x32, 0x54, 0x76, 0xf9, 0x00]);
        // -0.1 rounds to -0 on the grid, stored as +0.
        assert_eq!(p.unpack()[11].to_bits(), 0f32.to_bits());
        let c = Codec::new(&e2m1);
        assert_eq!(c.decode(0b1000).to_bits(), (-0.0f32).to_bits());

        let p = PackedTensor::pack(&[-7.0, -1.0, 0.0, 7.0, -9.0], &[5], &fmt("int4"), &[1.0], &[1], None)
            .unwrap();
        assert_eq!(p.code_values(), [0b1001, 0b1111, 0, 7, 0b1001]);
        assert_eq!(p.codes, [0xf9, 0x70, 0x09]);
        assert!(Codec::new(&fmt("int4")).decode(0b1000).is_nan());

        // Six bits: four codes in three bytes.
        let p = PackedTensor::pack(&[1.0, 2.0, 3.0, 4.0], &[4], &fmt("uint6"), &[1.0], &[1], None).unwrap();
        assert_eq!(p.codes, [0x81, 0x30, 0x10]);

        // OCP bit patterns for FP8; the NaN / inf patterns are never values.
        let e4m3 = Codec::new(&fmt("e4m3"));
        assert_eq!((e4m3.encode(448.0), e4m3.encode(-448.0)), (0x7e, 0xfe));
        assert_eq!(e4m3.encode(1.0), 0x38);
        assert!(!e4m3.is_valid(0x7f) && !e4m3.is_valid(0xff));
        let e5m2 = Codec::new(&fmt("e5m2"));
        assert_eq!(e5m2.encode(57344.0), 0x7b);
        assert!((0x7c..=0x7f).all(|c| !e5m2.is_valid(c)));
        let ue2m2 = Codec::new(&fmt("ue2m2"));
        assert_eq!((ue2m2.encode(7.0), ue2m2.decode(13)), (15, 5.0));
    }

    #[test]
    fn bit_streams_round_trip_for_every_width() {
        let mut rng = SeededRng::new(3);
        for bits in 1..=8u32 {
            for n in [0usize, 1, 2, 3, 7, 8, 9, 100, 101] {
                let codes: Vec<u32> = (0..n).map(|_| rng.below(1 << bits) as u32).collect();
                let bytes = pack_bits(&codes, bits);
                assert_eq!(bytes.len(), (n * bits as usize).div_ceil(8));
                assert_eq!(unpack_bits(&bytes, bits, n), codes, "{bits} bits, {n} codes");
            }
        }
    }

    /// Row-major values of `shape` ([C, K]), per-channel scales and (unsigned) zero points.
    fn sample(
        format: &Format,
        c: usize,
        k: usize,
        rng: &mut SeededRng,
    ) -> (Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
        let mut x: Vec<f32> = Vec::with_capacity(c * k);
        for ch in 0..c {
            let sigma = 0.3 + ch as f32;
            x.extend((0..k).map(|_| rng.normal() * sigma));
        }
        // Zeros, negative zero and tiny negatives (which round to -0 on signed grids).
        x[0] = 0.0;
        x[1] = -0.0;
        x[2] = -1e-7;
        let mut scales = Vec::new();
        let mut zeros = Vec::new();
        for row in x.chunks(k) {
            let lo = row.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if format.signed() {
                scales.push(0.7 * lo.abs().max(hi) / format.max());
            } else {
                let z = 0.6 * lo.min(0.0);
                scales.push(0.8 * (hi - z) / format.max());
                zeros.push(z);
            }
        }
        (x, scales, (!format.signed()).then_some(zeros))
    }

    fn fake_quant_tensor(
        format: &Format,
        x: &[f32],
        c: usize,
        k: usize,
        s: &[f32],
        z: Option<&[f32]>,
    ) -> Vec<f32> {
        let device = Device::flex();
        let t = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [c, k]), &device);
        let st = Tensor::<2>::from_data(TensorData::new(s.to_vec(), [c, 1]), &device);
        let zt = z.map(|z| Tensor::<2>::from_data(TensorData::new(z.to_vec(), [c, 1]), &device));
        fake_quantize(t, format, st, zt).into_data().try_into_vec::<f32>().expect("f32")
    }

    #[test]
    fn packed_round_trip_is_bit_exact_for_every_format() {
        let (c, k) = (5, 27); // 135 elements: the last byte is partly padding for odd widths
        let mut rng = SeededRng::new(42);
        let mut tensors = BTreeMap::new();
        let mut want = BTreeMap::new();
        let mut inputs = BTreeMap::new();
        let specs = all_specs();
        for spec in &specs {
            let format = fmt(spec);
            let (x, s, z) = sample(&format, c, k, &mut rng);
            let fq = fake_quant_tensor(&format, &x, c, k, &s, z.as_deref());
            let p = PackedTensor::pack(&x, &[c, k], &format, &s, &[c, 1], z.as_deref()).unwrap();
            // Packing the fake-quantized values gives the same codes (idempotent).
            let again = PackedTensor::pack(&fq, &[c, k], &format, &s, &[c, 1], z.as_deref()).unwrap();
            assert_eq!(again.codes, p.codes, "{spec}: re-packing quantized values");
            assert_eq!(p.codes.len(), (c * k * format.bits() as usize).div_ceil(8), "{spec}");
            tensors.insert(format!("layer.{spec}.weight"), p);
            want.insert(format!("layer.{spec}.weight"), fq);
            inputs.insert(format!("layer.{spec}.weight"), x);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("packed.safetensors");
        save_packed(&path, &tensors).unwrap();
        let loaded = load_packed(&path).unwrap();
        assert_eq!(loaded.len(), specs.len());
        assert_eq!(loaded, tensors);
        for (name, t) in &loaded {
            let got = t.unpack();
            let fq = &want[name];
            let bad: Vec<_> = got
                .iter()
                .zip(fq)
                .enumerate()
                .filter(|(_, (g, w))| g.to_bits() != w.to_bits())
                .take(3)
                .collect();
            assert!(bad.is_empty(), "{name}: (index, (unpacked, fake-quantized)) {bad:?}");
            // The scalar reference `Format::round` agrees as numbers (it may keep a -0).
            let block = t.numel() / t.scales.len();
            let x = &inputs[name];
            for (i, g) in got.iter().enumerate() {
                let b = i / block;
                let z = t.zero_points.as_ref().map(|z| z[b]);
                let want = quantize_value(&t.format, x[i], t.scales[b], z);
                assert_eq!(*g, want, "{name}[{i}]");
            }
        }
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["packed.safetensors"]);
    }

    #[test]
    fn four_bit_file_is_an_eighth_of_f32() {
        let (c, k) = (512, 512);
        let format = fmt("e2m1");
        let mut rng = SeededRng::new(8);
        let (x, s, _) = sample(&format, c, k, &mut rng);
        let p = PackedTensor::pack(&x, &[c, k], &format, &s, &[c, 1], None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w4.safetensors");
        save_packed(&path, &BTreeMap::from([("w".to_string(), p)])).unwrap();
        let size = std::fs::metadata(&path).unwrap().len() as f64;
        let ratio = size / (4 * c * k) as f64;
        eprintln!("4-bit file: {size} bytes, {ratio:.4} of f32");
        assert!(ratio > 0.125 && ratio < 0.13, "{ratio}");
    }

    #[test]
    fn bad_inputs_and_damaged_files_give_clear_errors() {
        let f = fmt("e2m1");
        assert_eq!(
            PackedTensor::pack(&[1.0; 6], &[2, 4], &f, &[1.0], &[1], None).unwrap_err().kind,
            ErrorKind::Usage
        );
        assert!(PackedTensor::pack(&[1.0; 6], &[6], &f, &[1.0; 4], &[4], None).is_err());
        assert!(PackedTensor::pack(&[1.0; 6], &[6], &f, &[0.0], &[1], None).is_err());
        assert!(PackedTensor::pack(&[1.0; 6], &[6], &f, &[1.0; 2], &[1], None).is_err());
        assert!(PackedTensor::pack(&[f32::NAN], &[1], &f, &[1.0], &[1], None).is_err());
        assert!(PackedTensor::pack(&[1.0; 2], &[2], &f, &[1.0], &[1], Some(&[0.0, 1.0])).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.safetensors");
        let good =
            PackedTensor::pack(&[0.5, -1.0, 3.0, 6.0, 0.0], &[5], &fmt("e4m3"), &[0.01], &[1], None).unwrap();
        let one = |t: PackedTensor| BTreeMap::from([("w".to_string(), t)]);
        save_packed(&path, &one(good.clone())).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        let check = |name: &str, contents: &[u8], needle: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, contents).unwrap();
            let e = load_packed(&p).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Runtime, "{name}");
            assert!(e.message.contains(&p.display().to_string()), "{name}: {}", e.message);
            assert!(e.message.contains(needle), "{name}: {}", e.message);
            assert!(!e.message.contains('\n'), "{}", e.message);
        };
        check("truncated.safetensors", &bytes[..bytes.len() - 3], "not a valid msfp packed-tensor file");
        check("empty.safetensors", &[], "not a valid");
        check("garbage.safetensors", b"\xff\xff\xff\xff\xff\xff\xff\x7fhello", "not a valid");
        // A valid safetensors file that is not a packed file.
        let plain_bytes = f32_bytes(&[1.0, 2.0]);
        let plain = safetensors::serialize(
            [("w", TensorView::new(Dtype::F32, vec![2], &plain_bytes).unwrap())],
            None,
        )
        .unwrap();
        check("plain.safetensors", &plain, "msfp.packed");
        // Metadata that disagrees with the data.
        let mut wrong_shape = good.clone();
        wrong_shape.shape = vec![7];
        check(
            "shape.safetensors",
            &to_bytes(&one(wrong_shape), &BTreeMap::new(), &BTreeMap::new()).unwrap(),
            "code bytes",
        );
        // A NaN code of e4m3.
        let mut nan_code = good.clone();
        nan_code.codes[1] = 0x7f;
        check(
            "nan.safetensors",
            &to_bytes(&one(nan_code.clone()), &BTreeMap::new(), &BTreeMap::new()).unwrap(),
            "not a value of e4m3",
        );
        // save refuses it too, naming the file and tensor.
        let e = save_packed(&dir.path().join("x.safetensors"), &one(nan_code)).unwrap_err();
        assert!(e.message.contains("x.safetensors") && e.message.contains("`w`"), "{}", e.message);
        let mut neg_scale = good.clone();
        neg_scale.scales = vec![-1.0];
        check(
            "scale.safetensors",
            &to_bytes(&one(neg_scale), &BTreeMap::new(), &BTreeMap::new()).unwrap(),
            "positive",
        );
        // A flipped metadata byte (spec e4m3 -> e4m9).
        let at = bytes.windows(6).position(|w| w == b"e4m3\\\"" || w == b"\"e4m3\"").unwrap();
        let mut tampered = bytes.clone();
        let digit = at + if tampered[at] == b'"' { 4 } else { 3 };
        tampered[digit] = b'9';
        check("spec.safetensors", &tampered, "e4m9");

        let e = load_packed(&dir.path().join("missing.safetensors")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Usage);
        assert!(e.message.contains("missing.safetensors"), "{}", e.message);
    }
}
