#!/usr/bin/env python3
"""PyTorch CPU reference for benches/quantizer.rs: e2m1 fake quantization with a per-output-channel
scale, forward + backward (gradients for x and the scale) through plain autograd.

Same math as msfp::quant::fake_quantize for e2m1 with no zero point:

    v = clamp(x / s, -6, 6)
    r = sign(v) * step * round_half_even(|v| / step),  step = 2^(clamp(floor(log2|v|), 0, 2) - 1)
    q = s * (v + detach(r - v))           # STE for x, LSQ gradient for s

Times forward+backward over --repeats runs after --warmup runs, with torch's intra-op thread
count set to --threads, and prints one JSON object on stdout: {median_s, ...}.

It also checks the grid on a few hand-picked values, and reports checksums of q, dq/dx and dq/ds
on a deterministic input that benches/quantizer.rs rebuilds bit for bit, so the two sides can be
compared.

    python3 tools/bench/quantizer_torch.py --elements 16777216 --threads 1
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

# e2m1 (OCP MX FP4): 1 mantissa bit, exponent bias 1 -> binades 2^0..2^2, max 6.
MAN_BITS = 1
E_MIN = 0
E_MAX = 2
QMAX = 6.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--elements", type=int, default=4096 * 4096)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--rows", type=int, help="output channels (default: sqrt(elements))")
    p.add_argument("--cols", type=int, help="elements per channel (default: elements / rows)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


ARGS = parse_args()
# Before importing torch, so the OpenMP/MKL pools start at the requested size too.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402


def fake_quant_e2m1(x, s):
    v = (x / s).clamp(-QMAX, QMAX)
    a = v.abs()
    e = torch.floor(torch.log2(a)).clamp(E_MIN, E_MAX)  # log2(0) = -inf clamps to E_MIN
    step = torch.exp2(e - MAN_BITS)
    r = torch.copysign(torch.round(a / step) * step, v)  # torch.round: half to even
    return (v + (r - v).detach()) * s


def shape(args):
    n = args.elements
    rows = args.rows or math.isqrt(n)
    cols = args.cols or n // rows
    if rows * cols != n:
        sys.exit(f"--elements {n} is not rows x cols ({rows} x {cols}); pass --rows/--cols")
    return rows, cols


def inputs(rows, cols):
    """x[i] = (h(i)/2^32 - 0.5) * 16 * s[row], h(i) = i * 2654435761 mod 2^32, computed in f64
    and rounded once to f32; s[row] = 0.25 + 0.125 * (row % 8). |x/s| < 8, so about a quarter of
    the elements are clipped. Elements with x/s == +-6 exactly (in f32) are halved."""
    i = torch.arange(rows * cols, dtype=torch.int64)
    u = ((i * 2654435761) % (1 << 32)).to(torch.float64) / float(1 << 32)
    s64 = 0.25 + 0.125 * (torch.arange(rows, dtype=torch.int64) % 8).to(torch.float64)
    x = ((u.view(rows, cols) - 0.5) * 16.0 * s64.view(rows, 1)).to(torch.float32)
    s = s64.to(torch.float32).view(rows, 1)
    # Elements exactly at the clip level get halved: there torch's clamp passes no gradient
    # (strict, as in the LSQ paper) while burn's clamp passes it (mask_fill beyond the bound).
    x = torch.where((x / s).abs() == QMAX, x * 0.5, x)
    return x, s


def self_check():
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    cases = {
        0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 7.0: 6.0,
        -0.3: -0.5, -2.6: -3.0, 100.0: 6.0,
    }
    xs = torch.tensor(list(cases) + grid + [-g for g in grid])
    want = torch.tensor(list(cases.values()) + grid + [-g for g in grid])
    got = fake_quant_e2m1(xs, torch.ones(1))
    if not torch.equal(got, want):
        sys.exit(f"e2m1 self-check failed: {list(zip(xs.tolist(), want.tolist(), got.tolist()))}")
    # LSQ: x=[-3,-0.4,0.26,0.9,2.5]/... with s=0.5 on a +-6 grid: clipped -> (0, +-6).
    x = torch.tensor([-3.5, -0.4, 0.26, 0.9, 2.5]).requires_grad_()
    s = torch.tensor([0.5]).requires_grad_()
    fake_quant_e2m1(x, s).sum().backward()
    # v = [-6(clip), -0.8, 0.52, 1.8, 5]; r = [-6, -1, 0.5, 2, 4]; ds = sum(r - v inside) - 6.
    want_ds = (-1 + 0.8) + (0.5 - 0.52) + (2 - 1.8) + (4 - 5) - 6
    if x.grad.tolist() != [0.0, 1.0, 1.0, 1.0, 1.0] or abs(s.grad.item() - want_ds) > 1e-5:
        sys.exit(f"LSQ self-check failed: dx={x.grad.tolist()} ds={s.grad.item()} want {want_ds}")


def checksums_of(q, dx, ds):
    """f64 sums; those of q and dx are exact (few-bit values), so they must match bit for bit.
    ds holds per-channel f32 reductions, whose order differs between frameworks."""
    q = q.double().flatten()
    weights = (torch.arange(q.numel(), dtype=torch.int64) % 13 + 1).to(torch.float64)
    ds = ds.double()
    return {
        "q": q.sum().item(),
        "q_weighted": (q * weights).sum().item(),
        "q_abs": q.abs().sum().item(),
        "dx": dx.double().sum().item(),
        "ds": ds.sum().item(),
        "ds_abs": ds.abs().sum().item(),
    }


def step(x, s):
    xr = x.detach().requires_grad_()
    sr = s.detach().requires_grad_()
    fake_quant_e2m1(xr, sr).sum().backward()
    return xr.grad, sr.grad


def forward_only(x, s):
    return fake_quant_e2m1(x.detach().requires_grad_(), s.detach().requires_grad_())


def timed(fn, x, s, warmup, repeats):
    for _ in range(warmup):
        fn(x, s)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(x, s)
        del out
        times.append(time.perf_counter() - t0)
    return times


def main():
    torch.set_num_threads(ARGS.threads)
    self_check()
    rows, cols = shape(ARGS)
    x, s = inputs(rows, cols)

    xr = x.clone().requires_grad_()
    sr = s.clone().requires_grad_()
    q = fake_quant_e2m1(xr, sr)
    q.sum().backward()
    checksums = checksums_of(q.detach(), xr.grad, sr.grad)
    del q, xr, sr

    times = timed(step, x, s, ARGS.warmup, ARGS.repeats)
    fwd = timed(forward_only, x, s, 1, max(3, ARGS.repeats // 2))
    copy = timed(lambda x, s: x.clone(), x, s, 1, ARGS.repeats)
    print(json.dumps({
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "times_s": times,
        "forward_median_s": statistics.median(fwd),
        "copy_median_s": statistics.median(copy),
        "repeats": ARGS.repeats,
        "warmup": ARGS.warmup,
        "elements": rows * cols,
        "shape": [rows, cols],
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "checksums": checksums,
    }))


if __name__ == "__main__":
    main()
