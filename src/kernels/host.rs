//! Flex tensors as host slices: read in place, overwrite in place when nobody else holds them.

use std::borrow::Cow;

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;

/// The values of `t` in logical order (copied only when it is not contiguous).
pub(crate) fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => Cow::Borrowed(v),
        None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("f32 tensor").to_vec()),
    }
}

/// The values of `t` to overwrite in place: `Some` when `t` alone owns exactly its contiguous
/// storage (an intermediate nobody else holds).
pub(crate) fn values_mut(t: &mut FlexTensor) -> Option<&mut [f32]> {
    let n = t.layout().num_elements();
    if t.layout().contiguous_offsets() != Some((0, n)) {
        return None;
    }
    t.try_storage_mut::<f32>().filter(|v| v.len() == n)
}

/// `t` itself when its memory may be overwritten ([`values_mut`]), else a contiguous copy.
pub(crate) fn writable(mut t: FlexTensor) -> FlexTensor {
    if values_mut(&mut t).is_some() {
        return t;
    }
    // A strided view (a broadcast gradient) becomes a fresh contiguous tensor of its own.
    let mut c = t.to_contiguous();
    drop(t);
    if values_mut(&mut c).is_some() {
        return c;
    }
    let copy = values(&c).into_owned();
    tensor_like(copy, &c)
}

/// A new tensor of `like`'s shape holding `values`.
pub(crate) fn tensor_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    tensor(values, like.layout().shape())
}

/// A new tensor of shape `shape` holding `values`.
pub(crate) fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}
