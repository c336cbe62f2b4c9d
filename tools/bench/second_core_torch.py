#!/usr/bin/env python3
"""What a second core buys the PyTorch replica of the tiny teachers, measured as
benches/second_core.rs measures msfp: training step and forward timed at 1 and N threads
alternately, a few runs at a time in one process (torch.set_num_threads between blocks, the
first run after a switch untimed), so that the machine's drift falls on both alike.
Speedup = ratio of the two medians; the median of the ratios of runs paired in order beside it.

  python tools/bench/second_core_torch.py [--rounds 8] [--block 4] [--warmup 5] [--threads 2]
      [--json experiments/bench-tiny-step/second-core-torch.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_tiny_replica as replica  # noqa: E402  (this folder's copy of the shared replica)


def alternate(fn, counts, warmup, rounds, block):
    """`block` timed runs per thread count at a time, `rounds` rounds (order flipped every
    round); the first run after each switch is not timed."""
    for _ in range(warmup):
        for n in counts:
            torch.set_num_threads(n)
            fn()
    ms = {n: [] for n in counts}
    for r in range(rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            torch.set_num_threads(n)
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                ms[n].append((time.perf_counter() - t0) * 1e3)
    return ms


def summary(ms, one, many):
    a, b = statistics.median(ms[one]), statistics.median(ms[many])
    pairs = [x / y for x, y in zip(ms[one], ms[many])]
    return dict(ms_1_thread=a, ms_n_threads=b, speedup=a / b, speedup_pairwise_median=statistics.median(pairs),
                runs_1_thread=[round(v, 2) for v in ms[one]], runs_n_threads=[round(v, 2) for v in ms[many]])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="experiments/bench-tiny-step/second-core-torch.json")
    args = ap.parse_args()
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    batch = 32
    data = torch.rand(9000, 1, 32, 32) * 2 - 1
    labels_all = torch.randint(0, 10, (9000,))
    ac = replica.linear_alphas_cumprod()
    counts = [1, args.threads]
    rows = []
    for name in ("tiny_unet", "tiny_dit"):
        model = replica.TinyUnet() if name == "tiny_unet" else replica.TinyDit()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

        step, forward = replica.step_and_forward(model, opt, data, labels_all, ac, batch)
        model.train()
        row = dict(model=name, train_step=summary(alternate(step, counts, args.warmup, args.rounds, args.block), *counts),
                   forward=summary(alternate(forward, counts, args.warmup, args.rounds, args.block), *counts))
        print(f'{name}: step {row["train_step"]["ms_1_thread"]:.1f} / {row["train_step"]["ms_n_threads"]:.1f} ms '
              f'({row["train_step"]["speedup"]:.2f}x), forward {row["forward"]["ms_1_thread"]:.1f} / '
              f'{row["forward"]["ms_n_threads"]:.1f} ms ({row["forward"]["speedup"]:.2f}x)', flush=True)
        rows.append(row)
    with open(args.json, "w") as f:
        json.dump(dict(command="python tools/bench/second_core_torch.py", torch=torch.__version__,
                       threads=counts, results=rows), f, indent=1)


if __name__ == "__main__":
    main()
