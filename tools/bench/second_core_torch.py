#!/usr/bin/env python3
"""What a second core buys the PyTorch replica of the tiny teachers, measured as
benches/second_core.rs measures msfp: training step and forward at 1 and N threads, timed by
short child processes that alternate, one thread count after the other for a number of rounds
(the order flipped every round), so that the machine's drift falls on both alike. Each child
builds the model, warms up and times a few runs. Speedup = ratio of the two medians over all
timed runs; the median of the rounds' ratios beside it.

  python tools/bench/second_core_torch.py [--rounds 8] [--runs 6] [--warmup 3] [--threads 2]
      [--json experiments/bench-tiny-step/second-core-torch.json]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_tiny_replica as replica  # noqa: E402  (this folder's copy of the shared replica)

MODELS = ("tiny_unet", "tiny_dit")


def child(name, threads, warmup, runs):
    """Times `runs` training steps and forwards after `warmup` of each; prints one JSON line."""
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    _, step, forward = replica.step_and_forward(name, *replica.bench_data(), 32)
    out = {key: replica.time_runs(fn, warmup, runs) for key, fn in (("train_step", step), ("forward", forward))}
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default="")
    ap.add_argument("--child-threads", type=int, default=1)
    ap.add_argument("--json", default="experiments/bench-tiny-step/second-core-torch.json")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.child_threads, args.warmup, args.runs)
    counts = [1, args.threads]
    started = time.perf_counter()
    rows = []
    for name in MODELS:
        ms = {key: {n: [] for n in counts} for key in ("train_step", "forward")}
        ratios = {key: [] for key in ms}
        for r in range(args.rounds):
            medians = {key: {} for key in ms}
            for n in counts if r % 2 == 0 else counts[::-1]:
                line = subprocess.run([sys.executable, __file__, "--child", name, "--child-threads", str(n),
                                       "--warmup", str(args.warmup), "--runs", str(args.runs)],
                                      check=True, capture_output=True, text=True).stdout
                v = json.loads(line)
                for key in ms:
                    ms[key][n].extend(v[key])
                    medians[key][n] = statistics.median(v[key])
            for key in ms:
                ratios[key].append(medians[key][counts[0]] / medians[key][counts[1]])
        row = dict(model=name)
        for key in ms:
            one, many = statistics.median(ms[key][counts[0]]), statistics.median(ms[key][counts[1]])
            row[key] = dict(ms_1_thread=one, ms_n_threads=many, speedup=one / many,
                            speedup_median_of_rounds=statistics.median(ratios[key]), round_speedups=ratios[key],
                            runs_1_thread=[round(v, 2) for v in ms[key][counts[0]]],
                            runs_n_threads=[round(v, 2) for v in ms[key][counts[1]]])
        print(f'{name}: train_step {row["train_step"]["ms_1_thread"]:.1f} / {row["train_step"]["ms_n_threads"]:.1f} ms '
              f'({row["train_step"]["speedup"]:.2f}x), forward {row["forward"]["ms_1_thread"]:.1f} / '
              f'{row["forward"]["ms_n_threads"]:.1f} ms ({row["forward"]["speedup"]:.2f}x)', flush=True)
        rows.append(row)
    with open(args.json, "w") as f:
        json.dump(dict(command=f"python tools/bench/second_core_torch.py --rounds {args.rounds} --runs {args.runs} "
                               f"--warmup {args.warmup} --threads {args.threads}",
                       torch=torch.__version__, threads=counts, seconds=time.perf_counter() - started, results=rows),
                  f, indent=1)


if __name__ == "__main__":
    main()
