//! The `msfp formats` and `msfp quantize` subcommands: inspect a grid, and fake-quantize numbers
//! through the same tensor code that training uses, so both can be checked from outside.

use burn::tensor::{Device, Tensor, TensorData};
use serde::Serialize;

use super::format::Format;
use super::quantizer::fake_quantize;
use crate::error::{Error, Result};

/// What `msfp formats SPEC` prints.
#[derive(Debug, Serialize)]
pub struct FormatInfo {
    pub spec: String,
    pub signed: bool,
    pub exp_bits: u32,
    pub man_bits: u32,
    pub bias: i32,
    pub max: f32,
    /// Every representable value, ascending.
    pub values: Vec<f32>,
}

impl From<&Format> for FormatInfo {
    fn from(f: &Format) -> Self {
        Self {
            spec: f.spec().to_string(),
            signed: f.signed(),
            exp_bits: f.exp_bits(),
            man_bits: f.man_bits(),
            bias: f.bias(),
            max: f.max(),
            values: f.values(),
        }
    }
}

/// `msfp formats SPEC`: the format as one JSON object.
pub fn formats(spec: &str) -> Result<String> {
    let format = Format::parse(spec)?;
    Ok(serde_json::to_string(&FormatInfo::from(&format)).expect("json"))
}

/// `msfp quantize`: fake-quantizes the JSON array of numbers in `input` with scale
/// `max / format.max()` (default 1) and zero point `zero_point` (default 0), returning the
/// quantized JSON array.
pub fn quantize(spec: &str, max: Option<f64>, zero_point: Option<f64>, input: &str) -> Result<String> {
    let format = Format::parse(spec)?;
    let max = max.unwrap_or(format.max() as f64);
    if !(max.is_finite() && max > 0.0) {
        return Err(Error::usage(format!("--max must be a positive finite number, not {max}")));
    }
    let scale = (max / format.max() as f64) as f32;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::usage(format!("--max {max} gives a scale {scale} outside f32's positive range")));
    }
    let zero = zero_point.map(|z| z as f32);
    if let Some(z) = zero
        && !z.is_finite()
    {
        return Err(Error::usage(format!(
            "--zero-point must be a finite f32, not {}",
            zero_point.unwrap_or_default()
        )));
    }

    let numbers: Vec<f64> = serde_json::from_str(input)
        .map_err(|e| Error::usage(format!("stdin must be a JSON array of numbers: {e}")))?;
    let xs = numbers
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let v = x as f32;
            if v.is_finite() {
                Ok(v)
            } else {
                Err(Error::usage(format!("input value {x} at index {i} is not a finite f32")))
            }
        })
        .collect::<Result<Vec<f32>>>()?;
    if xs.is_empty() {
        return Ok("[]".into());
    }

    let device = Device::flex();
    let n = xs.len();
    let x = Tensor::<1>::from_data(TensorData::new(xs, [n]), &device);
    let s = Tensor::<1>::full([1], scale, &device);
    let z = zero.map(|z| Tensor::<1>::full([1], z, &device));
    let q = fake_quantize(x, &format, s, z)
        .into_data()
        .try_into_vec::<f32>()
        .map_err(|e| Error::runtime(format!("reading the quantized values: {e:?}")))?;
    Ok(serde_json::to_string(&q).expect("json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn parse(json: &str) -> Vec<f64> {
        serde_json::from_str(json).expect("JSON array")
    }

    #[test]
    fn formats_json_lists_the_grid() {
        let v: serde_json::Value = serde_json::from_str(&formats("ue2m2").unwrap()).unwrap();
        assert_eq!(v["spec"], "ue2m2");
        assert_eq!(v["signed"], false);
        assert_eq!((v["exp_bits"].as_u64(), v["man_bits"].as_u64()), (Some(2), Some(2)));
        assert_eq!(v["bias"], 1);
        assert_eq!(v["max"], 7.0);
        assert_eq!(v["values"].as_array().unwrap().len(), 16);
    }

    #[test]
    fn quantize_scales_and_shifts() {
        let q = |max, z, input| parse(&quantize("e2m1", max, z, input).unwrap());
        assert_eq!(q(None, None, "[0.25, 0.75, 2.5, 5, 7, -0.3]"), [0., 1., 2., 4., 6., -0.5]);
        assert_eq!(q(Some(12.0), None, "[1, 3, 5, 13, -7]"), [1., 3., 4., 12., -8.]);
        assert_eq!(q(None, Some(1.0), "[1.25, 0, 8, -7]"), [1., 0., 7., -5.]);
        assert_eq!(q(None, None, "[]"), Vec::<f64>::new());
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for (max, z, input) in [
            (None, None, "[1, "),
            (None, None, "{\"a\": 1}"),
            (None, None, "[1, null]"),
            (None, None, "[1e39]"),
            (None, None, "[1e999]"),
            (Some(0.0), None, "[1]"),
            (Some(-1.0), None, "[1]"),
            (Some(f64::NAN), None, "[1]"),
            (Some(f64::INFINITY), None, "[1]"),
            (Some(1e-300), None, "[1]"),
            (None, Some(f64::NAN), "[1]"),
            (None, Some(1e39), "[1]"),
        ] {
            let err = quantize("e2m1", max, z, input).expect_err(input);
            assert_eq!(err.kind, ErrorKind::Usage, "{input} {max:?} {z:?}");
            assert!(!err.message.contains('\n'), "{}", err.message);
        }
        assert_eq!(quantize("e9m9", None, None, "[1]").unwrap_err().kind, ErrorKind::Usage);
    }
}
