#!/usr/bin/env python3
"""Reference rounding vectors for the signed FP formats, produced by ml_dtypes.

For each of e2m1, e2m3, e3m2, e4m3 (fn) and e5m2 this writes
`tests/fixtures/fp_rounding/<fmt>.bin`: raw little-endian float32 pairs (input, expected),
where `expected` is ml_dtypes' round-to-nearest-even cast float32 -> format -> float32.
It also writes `grids.json`: every finite value of each format (ascending, -0 merged into 0).

Inputs cover every binade of the format (and the subnormal range), every representable value,
every exact tie (midpoint of two neighbours) and its two f32 neighbours, values beyond the
format's max, negatives, f32 subnormals and random f32 bit patterns over the whole finite range.

Saturation: ml_dtypes saturates for the 4- and 6-bit formats, but float8_e4m3fn overflows to
NaN and float8_e5m2 to inf. Our quantizer saturates, so for those two formats an input whose
ml_dtypes result is not finite is written with expected = copysign(max, input). Every other
expected value is ml_dtypes' own result.

Usage (from the repository root):
    python3 -m venv /tmp/mlvenv && /tmp/mlvenv/bin/pip install ml_dtypes==0.6.0 numpy==2.4.6
    /tmp/mlvenv/bin/python tools/gen_fp_vectors.py [--out tests/fixtures/fp_rounding]
"""

import argparse
import json
import pathlib

import ml_dtypes
import numpy as np

# name -> (ml_dtypes type, total bits)
FORMATS = {
    "e2m1": (ml_dtypes.float4_e2m1fn, 4),
    "e2m3": (ml_dtypes.float6_e2m3fn, 6),
    "e3m2": (ml_dtypes.float6_e3m2fn, 6),
    "e4m3": (ml_dtypes.float8_e4m3fn, 8),
    "e5m2": (ml_dtypes.float8_e5m2, 8),
}

# Inputs per format. 5 formats x 100k pairs x 8 bytes = 4 MB of fixtures.
COUNT = 100_000
SEED = 20_241_121


def finite_grid(dtype, bits):
    """Every finite value of the format, ascending, with -0 and +0 merged."""
    codes = np.arange(2**bits, dtype=np.uint8)
    vals = codes.view(dtype).astype(np.float32)
    vals = vals[np.isfinite(vals)]
    vals = vals + np.float32(0.0)  # -0 + 0 = +0
    return np.unique(vals)


def inputs_for(grid, rng):
    f32 = np.float32
    pos = grid[grid > 0]
    vmax = pos.max()
    vmin = pos.min()  # smallest subnormal
    parts = []

    # Every representable value and its two f32 neighbours.
    parts += [grid, np.nextafter(grid, f32(np.inf)), np.nextafter(grid, f32(-np.inf))]

    # Exact ties between neighbours (all exactly representable in f32) and their neighbours.
    # The last one is the tie between max and the next value a wider exponent would give.
    ext = np.concatenate([grid, [vmax + (vmax - pos[-2])], [-(vmax + (vmax - pos[-2]))]])
    ext = np.unique(ext.astype(f32))
    mids = ((ext[:-1].astype(np.float64) + ext[1:].astype(np.float64)) / 2).astype(f32)
    parts += [mids, np.nextafter(mids, f32(np.inf)), np.nextafter(mids, f32(-np.inf))]

    # Special values and far beyond max.
    parts.append(
        np.array(
            [0.0, -0.0, np.finfo(f32).max, -np.finfo(f32).max, np.finfo(f32).tiny,
             np.finfo(f32).smallest_subnormal, -np.finfo(f32).smallest_subnormal],
            dtype=f32,
        )
    )

    # Random f32 bit patterns over the whole finite range (huge, tiny, subnormal).
    bits = rng.integers(0, 2**32, size=4_000, dtype=np.uint64).astype(np.uint32)
    rand = bits.view(f32)
    parts.append(rand[np.isfinite(rand)])

    fixed = np.concatenate(parts).astype(f32)

    # Fill up with uniform samples in every binade from well below the smallest subnormal
    # (which rounds to 0) to a few binades beyond max, both signs.
    lo_exp = int(np.floor(np.log2(vmin))) - 4
    hi_exp = int(np.floor(np.log2(vmax))) + 4
    exps = np.arange(lo_exp, hi_exp + 1)
    need = COUNT - fixed.size
    per = -(-need // exps.size)
    samples = []
    for e in exps:
        lo, hi = 2.0**e, 2.0 ** (e + 1)
        s = rng.uniform(lo, hi, size=per)
        sign = np.where(rng.random(per) < 0.5, -1.0, 1.0)
        samples.append((s * sign).astype(f32))
    x = np.concatenate([fixed, np.concatenate(samples)[:need]]).astype(f32)
    assert np.all(np.isfinite(x))
    return x


def reference(x, dtype, vmax):
    y = x.astype(dtype).astype(np.float32)
    bad = ~np.isfinite(y)
    y[bad] = np.copysign(np.float32(vmax), x[bad])
    return y, int(bad.sum())


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=root / "tests/fixtures/fp_rounding")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(SEED)
    grids = {}
    for name, (dtype, bits) in FORMATS.items():
        grid = finite_grid(dtype, bits)
        vmax = float(grid.max())
        assert vmax == float(ml_dtypes.finfo(dtype).max)
        grids[name] = [float(v) for v in grid]
        x = inputs_for(grid, rng)
        y, mapped = reference(x, dtype, vmax)
        pairs = np.stack([x, y], axis=1).astype("<f4")
        (args.out / f"{name}.bin").write_bytes(pairs.tobytes())
        print(f"{name}: {x.size} vectors, {mapped} overflows mapped to +-max, max {vmax}")
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in grids.items()]
    (args.out / "grids.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"ml_dtypes {ml_dtypes.__version__}, numpy {np.__version__}")


if __name__ == "__main__":
    main()
