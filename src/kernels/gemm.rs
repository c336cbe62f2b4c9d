//! Matrix products through the `gemm` crate (the library flex itself multiplies with), called
//! with strides so that transposed operands are read in place, never copied.

/// A matrix in memory: element `(i, j)` at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a view of memory that outlives the parallel calls it is used in, read-only.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// A pointer that may cross threads: the callers write disjoint regions through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `dst (m x n, row stride dst_rs) = [dst +] scale lhs (m x k) rhs (k x n)`.
///
/// # Safety
/// Every element the views address must lie in live memory, and `dst`'s must not be read or
/// written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    threads: usize,
) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Threads one matrix product may use when `items` products run side by side.
pub(crate) fn inner_threads(items: usize) -> usize {
    let threads = rayon::current_num_threads();
    if items >= threads { 1 } else { threads }
}
