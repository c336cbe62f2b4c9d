//! Flex tensors as host slices: read in place, overwrite in place when nobody else holds them.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use burn::backend::flex::FlexTensor;
use burn::tensor::TensorData;
use rayon::prelude::*;

/// Below this many values a fill or copy stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Values per parallel work item of a fill or copy.
const CHUNK: usize = 1 << 15;

/// The values of `t` in logical order (copied only when it is not contiguous).
pub(crate) fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => Cow::Borrowed(v),
        None => Cow::Owned(gather(t)),
    }
}

/// `n` values written on the pool, `item` at a time: `fill(k, run)` gets the `k`-th run of `item`
/// values (the last may be shorter).
///
/// # Safety
/// `fill` must write every value of the run it is given.
pub(crate) unsafe fn filled(
    n: usize,
    item: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(item.max(1)).enumerate().for_each(|(k, run)| fill(k, run));
    // SAFETY: the runs cover the first `n` values and the caller's `fill` wrote each of them.
    unsafe { v.set_len(n) };
    v
}

/// Writes `src` into `out` (the same length).
pub(crate) fn write(out: &mut [MaybeUninit<f32>], src: &[f32]) {
    out.iter_mut().zip(src).for_each(|(o, &x)| *o = MaybeUninit::new(x));
}

/// A strided view's values in logical order, copied once: rows (the last dimension) in parallel
/// when it is contiguous along them (a `narrow` or `cat`'s gradient); otherwise flex's own
/// tiled copy (transposes).
fn gather(t: &FlexTensor) -> Vec<f32> {
    let layout = t.layout();
    let (shape, strides) = (layout.shape(), layout.strides());
    let n = layout.num_elements();
    let d = shape.len();
    if n < PARALLEL_MIN || d == 0 || strides[d - 1] != 1 || !layout.has_positive_strides() {
        return t.to_contiguous().as_slice::<f32>().expect("f32 tensor").to_vec();
    }
    let (storage, start, inner) = (t.storage::<f32>(), layout.start_offset(), shape[d - 1]);
    let rows_per_item = (CHUNK / inner.max(1)).max(1);
    let fill = |item: usize, part: &mut [MaybeUninit<f32>]| {
        for (r, row) in part.chunks_mut(inner).enumerate() {
            // The row's first element: its index over the outer dimensions, times their strides.
            let (mut rest, mut at) = (item * rows_per_item + r, start as isize);
            for k in (0..d - 1).rev() {
                at += (rest % shape[k]) as isize * strides[k];
                rest /= shape[k];
            }
            write(row, &storage[at as usize..at as usize + inner]);
        }
    };
    // SAFETY: each run is whole rows of `inner` values, each row written.
    unsafe { filled(n, rows_per_item * inner, fill) }
}

/// Buffers of at least this many values are worth keeping for reuse ([`recycle`]): glibc maps
/// blocks above 32 MB fresh for every allocation, and the kernel zeroes each page on its first
/// touch (29% of SD's QAT step at latent 32 went to `clear_page_erms`, mostly the weight-sized
/// quantized weights and weight gradients, allocated per layer and step).
const POOL_MIN: usize = 8 << 20;

/// Recycled buffers kept at most (the largest SD layer's weight is 118 MB: a few hundred MB).
const POOL_ENTRIES: usize = 4;

/// Large buffers handed back by the ops that used them as scratch.
static POOL: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// A buffer of `n` values from [`POOL`] (the smallest that holds `n`, and not half as large
/// again: a tensor made from it keeps the whole buffer; its values are left from its last use),
/// or `None`.
fn pooled(n: usize) -> Option<Vec<f32>> {
    if n < POOL_MIN {
        return None;
    }
    let mut pool = POOL.lock().ok()?;
    let best = (0..pool.len())
        .filter(|&i| (n..n + n / 2).contains(&pool[i].capacity()))
        .min_by_key(|&i| pool[i].capacity())?;
    let mut v = pool.swap_remove(best);
    // Within capacity: no reallocation; only values beyond the old length are written.
    v.resize(n, 0.0);
    Some(v)
}

/// Hands a scratch buffer back for [`zeros`] and [`scratch`] to reuse (kept only when large;
/// the oldest goes when the pool is full).
pub(crate) fn recycle(v: Vec<f32>) {
    if v.capacity() < POOL_MIN {
        return;
    }
    if let Ok(mut pool) = POOL.lock() {
        if pool.len() == POOL_ENTRIES {
            pool.remove(0);
        }
        pool.push(v);
    }
}

/// `n` values to be overwritten whole: a recycled buffer when one fits, else zeros.
pub(crate) fn scratch(n: usize) -> Vec<f32> {
    pooled(n).unwrap_or_else(|| zeros(n))
}

/// `n` zeros, written in parallel when there are many (a `vec![0.0; n]` of reused heap memory is
/// one `memset` on the calling thread), into a recycled buffer when one fits.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    if n < PARALLEL_MIN {
        return vec![0.0; n];
    }
    if let Some(mut v) = pooled(n) {
        v.par_chunks_mut(CHUNK).for_each(|run| run.fill(0.0));
        return v;
    }
    // SAFETY: each run is filled whole.
    unsafe { filled(n, CHUNK, |_, run| run.fill(MaybeUninit::new(0.0))) }
}

/// `row` repeated `n` times (a bias broadcast over a batch), written in parallel when long.
pub(crate) fn repeat_rows(row: &[f32], n: usize) -> Vec<f32> {
    let total = row.len() * n;
    if total < PARALLEL_MIN || row.is_empty() {
        return row.repeat(n);
    }
    let rows_per_item = (CHUNK / row.len()).max(1);
    // SAFETY: each run is whole rows of `row.len()` values, each row written.
    unsafe {
        filled(total, rows_per_item * row.len(), |_, run| {
            run.chunks_mut(row.len()).for_each(|out| write(out, row))
        })
    }
}

/// A copy of `src`, in parallel when it is long.
fn copied(src: &[f32]) -> Vec<f32> {
    if src.len() < PARALLEL_MIN {
        return src.to_vec();
    }
    // SAFETY: run `k` is as long as `src`'s `k`-th chunk, all of which is written.
    unsafe { filled(src.len(), CHUNK, |k, run| write(run, &src[k * CHUNK..][..run.len()])) }
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
    // A shared or strided tensor (a broadcast gradient) becomes a fresh contiguous one of its own.
    let copy = match t.as_slice::<f32>() {
        Some(v) => copied(v),
        None => gather(&t),
    };
    tensor_like(copy, &t)
}

/// A new tensor of `like`'s shape holding `values`.
pub(crate) fn tensor_like(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    tensor(values, like.layout().shape())
}

/// A new tensor of shape `shape` holding `values`.
pub(crate) fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recycled large buffer comes back from [`zeros`] (zeroed) instead of a fresh mapping; a
    /// small one is not kept, nor is one handed out for a request it is far too small or large for.
    #[test]
    fn recycled_buffers_are_reused_zeroed() {
        let big = vec![1.0f32; POOL_MIN + 5];
        let at = big.as_ptr();
        recycle(big);
        assert!(pooled(4 * POOL_MIN).is_none(), "a buffer a quarter of the request's size");
        let z = zeros(POOL_MIN + 3);
        assert_eq!(z.as_ptr(), at, "the recycled buffer");
        assert_eq!(z.len(), POOL_MIN + 3);
        assert!(z.iter().all(|v| *v == 0.0));
        recycle(vec![1.0f32; 16]);
        assert!(pooled(16).is_none());
    }

    /// `[4, 3, 64, 200]` counting up: large enough for the parallel paths.
    fn counting() -> FlexTensor {
        let n = 4 * 3 * 64 * 200;
        tensor((0..n).map(|i| i as f32).collect(), &[4, 3, 64, 200])
    }

    fn reference(t: &FlexTensor) -> Vec<f32> {
        t.to_contiguous().as_slice::<f32>().unwrap().to_vec()
    }

    /// Views as the backward passes meet them (a `cat`'s gradient is a narrow of the upstream
    /// one, attention permutes) read back in logical order, each in one copy.
    #[test]
    fn strided_views_read_in_logical_order() {
        let t = counting();
        let narrowed = t.narrow(1, 1, 2).narrow(3, 10, 160);
        assert!(narrowed.layout().num_elements() >= PARALLEL_MIN && !narrowed.is_contiguous());
        assert_eq!(values(&narrowed).into_owned(), reference(&narrowed));
        let permuted = t.permute(&[0, 2, 1, 3]);
        assert_eq!(values(&permuted).into_owned(), reference(&permuted));
        let transposed = t.transpose(2, 3);
        assert_eq!(values(&transposed).into_owned(), reference(&transposed));
        let small = tensor((0..24).map(|i| i as f32).collect(), &[2, 3, 4]).narrow(2, 1, 2);
        assert_eq!(values(&small).into_owned(), reference(&small));
    }

    /// A tensor someone else holds is copied, never written through; one nobody holds is kept.
    #[test]
    fn writable_copies_only_what_is_shared() {
        let t = counting();
        let held = t.clone();
        let mut w = writable(t);
        values_mut(&mut w).expect("a fresh copy")[0] = -1.0;
        assert_eq!(held.as_slice::<f32>().unwrap()[0], 0.0, "the held tensor is untouched");
        assert_eq!(&values(&w)[1..], &reference(&held)[1..]);
        let narrowed = writable(held.narrow(3, 1, 50));
        assert_eq!(values(&narrowed).into_owned(), reference(&held.narrow(3, 1, 50)));
        drop(held);
        let mut alone = writable(w);
        assert_eq!(values_mut(&mut alone).unwrap()[0], -1.0, "kept in place");
        assert!(zeros(PARALLEL_MIN * 3 + 5).iter().all(|&v| v == 0.0));
        let row: Vec<f32> = (0..300).map(|i| i as f32).collect();
        assert_eq!(repeat_rows(&row, 700), row.repeat(700));
    }
}
