//! Fused CPU kernels for the flex backend, each with a hand-written backward: convolution
//! ([`conv`]), SiLU/GELU ([`activation`]), GroupNorm(+SiLU) and LayerNorm ([`norm`]),
//! softmax over the last dimension ([`softmax`]), attention with its probabilities' quantizer
//! inside and the scores recomputed in the backward ([`attention`]), nearest 2x upsampling
//! ([`resample`]) and the UNets' residual and timestep-shift additions ([`add`]), the packed
//! q/k/v projection split into heads ([`heads`]), and convolutions and linear layers with their
//! weight quantizer inside the operation ([`qweight`]).
//!
//! Burn composes these from generic tensor ops on flex: one tensor-sized temporary per op and
//! per backward step, scalar `expf`/`erff`, and a convolution whose weight gradient is itself a
//! convolution with the gradient map as kernel. Here each is one pass over the tensors' own
//! memory on the rayon pool, with vectorised math. The layers in `crate::nn` call them on flex
//! (with or without autodiff). On the GPU backends (wgpu, cuda) GroupNorm(+SiLU), LayerNorm and
//! softmax run as CubeCL kernels with their own backward (`norm_cube`, `softmax_cube`), the rest
//! as burn's tensor ops.
//!
//! Determinism: every kernel splits its work into pieces whose boundaries depend on the shapes
//! only, never on the thread count, and adds partial sums in a fixed order; results are
//! bit-identical across runs and thread counts on one processor (tested). Across processors
//! the matrix products' last bits may differ: gemm sizes its blocks from the caches and picks
//! its micro-kernel by vector width (AVX-512, AVX2).

pub mod activation;
pub mod add;
pub mod attention;
pub mod conv;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
pub(crate) mod cube;
pub(crate) mod gemm;
pub mod heads;
pub(crate) mod host;
pub mod linear;
pub mod math;
pub mod matmul;
pub mod norm;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod norm_cube;
pub mod qweight;
pub mod resample;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod slot_cube;
pub mod softmax;
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
mod softmax_cube;

use burn::backend::DispatchDevice;
use burn::tensor::Device;

/// Keeps freed memory in the process instead of handing it back to the OS.
///
/// glibc serves large allocations with fresh `mmap`s and trims the heap top when it is freed, so
/// a training step re-faults and re-zeroes every tensor-sized temporary it allocates: 10-30% of a
/// tiny teacher's step went to page faults (measured with `GLIBC_TUNABLES`: UNet step 682 -> 610
/// ms, DiT 637 -> 457 ms at one thread). Three settings:
/// - blocks up to 32 MB come from the heap (the largest threshold glibc accepts: half its 64 MB
///   per-thread heap; a larger value is refused and leaves glibc's own, rising threshold);
/// - the main heap's top is not trimmed below 1 GB;
/// - a thread's arena keeps an emptied 64 MB heap unless more than 64 MB are free below it.
///   Without this pad glibc unmaps such a heap whatever the trim threshold, and a step whose
///   high-water mark crosses a heap boundary maps, faults and unmaps it again every time: runs
///   of the tiny UNet's step fell into that mode or not from one process to the next (232k
///   against 36k page faults for 26 steps at two threads, 0.7 against 0.2 s of system time).
///
/// The process keeps its peak heap instead. Called first thing by `msfp` and the benchmarks; a
/// no-op on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Runs `f` on a worker of a new rayon pool of the default size (`RAYON_NUM_THREADS`, else one
/// thread per core), so that every kernel's parallel loop starts inside the pool. Started from
/// any other thread, each loop hands its work to the pool and the caller sleeps until it is
/// done: two thread switches per op, about 8% of a one-thread tiny-UNet forward (perf). The
/// split of work, and so every result, is the same either way. Called by `msfp` and the
/// benchmarks around everything they run; runs `f` on the calling thread if no pool starts.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Workers get the main thread's usual stack: model construction and autodiff recurse.
    match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Whether `device` (with or without autodiff) is a CubeCL GPU device (wgpu, cuda), where the
/// `*_cube` kernels run.
#[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
pub fn on_cube(device: &Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Cube(_))
}

/// `x[j..j + 1]` along the first dimension: one slot of a stacked parameter (TALoRA's routed
/// adapter). On the GPU backends its backward is one kernel (`slot_cube`), elsewhere burn's.
pub fn slot<const D: usize>(x: burn::tensor::Tensor<D>, j: usize) -> burn::tensor::Tensor<D> {
    #[cfg(any(feature = "wgpu", feature = "cuda-runtime"))]
    if on_cube(&x.device()) {
        return slot_cube::slot(x, j);
    }
    x.slice([j..j + 1])
}

/// Whether `device` (with or without autodiff) is flex, where these kernels run.
pub fn on_flex(device: &Device) -> bool {
    matches!(device.clone().inner().as_dispatch(), DispatchDevice::Flex(_))
}

/// Defines `pub(crate) fn $name(args) -> ret` that runs `$body` compiled for the widest vector
/// unit the CPU has, picked at run time: AVX-512 (16 lanes), AVX2 (8), else the x86-64 baseline
/// (4), so that one binary runs everywhere. The same bits on each: the kernels never call
/// `mul_add`, Rust never fuses `a * b + c` itself, and their reductions keep a fixed number of
/// partial sums whatever the vector width.
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $body:path;) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn widest($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (checked just above).
                    return unsafe { widest($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// Records the backward `$op` over the parents `$nodes` in an `Autodiff<Flex, C>` graph for the
/// output `$out` computed already, keeping `$state` only when a parent needs a gradient.
macro_rules! record {
    ($op:expr, $nodes:expr, $state:expr, $out:expr) => {
        match $op.prepare::<C>($nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish($state, $out),
            OpsKind::UnTracked(prep) => prep.finish($out),
        }
    };
}
pub(crate) use record;
