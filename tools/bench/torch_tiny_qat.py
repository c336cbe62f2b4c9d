#!/usr/bin/env python3
"""One QAT step of the quickstart's W4A4 student in PyTorch, for the GPU check
(tools/gpu-check.sh), timed the way benches/gpu.rs times msfp's:

  the tiny UNet replica (torch_tiny_replica.py, same parameter count as msfp's), every Conv2d
  and Linear fake-quantized W4A4 E2M1 with LSQ scales (per output channel for weights, one per
  tensor for inputs, straight-through rounding) and a rank-4 LoRA merged into the weight before
  quantization (TALoRA's merged placement with one adapter active); the base weights frozen,
  adapters and scales trained by AdamW; batch 2 x 4 (conditional + unconditional), t = 500,
  MSE against a fixed target.

Usage: python tools/bench/torch_tiny_qat.py [--device cuda] [--runs 15] [--json out.json]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_tiny_replica as replica  # noqa: E402

E2M1_MAX = 6.0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_e2m1(v):
    """Round |v| <= 6 to the nearest E2M1 value (ties to even code) with the sign kept."""
    a = v.abs().clamp(max=E2M1_MAX)
    # E2M1 spacing: 0.5 below 2, 1 in [2, 4), 2 in [4, 6].
    step = torch.where(a < 2.0, torch.full_like(a, 0.5), torch.where(a < 4.0, torch.ones_like(a), torch.full_like(a, 2.0)))
    r = torch.round(a / step) * step
    return torch.sign(v) * r


def fake_quant(x, s):
    """LSQ fake quantization: s * round(clamp(x / s)), straight-through round."""
    y = (x / s).clamp(-E2M1_MAX, E2M1_MAX)
    y = y + (round_e2m1(y) - y).detach()
    return y * s


class QLinear(nn.Module):
    def __init__(self, lin, rank=4):
        super().__init__()
        self.lin = lin
        for p in lin.parameters():
            p.requires_grad_(False)
        out_f, in_f = lin.weight.shape
        self.a = nn.Parameter(torch.randn(rank, in_f) / in_f ** 0.5)
        self.b = nn.Parameter(torch.zeros(out_f, rank))
        self.ws = nn.Parameter(lin.weight.detach().abs().amax(1, keepdim=True) / E2M1_MAX + 1e-8)
        self.xs = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        w = fake_quant(self.lin.weight + self.b @ self.a, self.ws)
        return F.linear(fake_quant(x, self.xs), w, self.lin.bias)


class QConv2d(nn.Module):
    def __init__(self, conv, rank=4):
        super().__init__()
        self.conv = conv
        for p in conv.parameters():
            p.requires_grad_(False)
        c_out = conv.weight.shape[0]
        fan_in = conv.weight[0].numel()
        self.a = nn.Parameter(torch.randn(rank, fan_in) / fan_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(c_out, rank))
        self.ws = nn.Parameter(conv.weight.detach().reshape(c_out, -1).abs().amax(1) .reshape(c_out, 1, 1, 1) / E2M1_MAX + 1e-8)
        self.xs = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        w = self.conv.weight + (self.b @ self.a).reshape(self.conv.weight.shape)
        w = fake_quant(w, self.ws)
        c = self.conv
        return F.conv2d(fake_quant(x, self.xs), w, c.bias, c.stride, c.padding)


def quantize(module):
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QLinear(child))
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, QConv2d(child))
        else:
            quantize(child)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = quantize(replica.TinyUnet()).to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
    b = 8
    x = torch.randn(b, 1, 32, 32, device=dev)
    target = torch.randn(b, 1, 32, 32, device=dev)
    y = torch.arange(b, device=dev) % 11
    t = torch.full((b,), 500.0, device=dev)

    def step():
        loss = (model(x, t, y) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    ts = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    row = dict(torch=torch.__version__, device=str(dev),
               gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "",
               batch=b, trainable_parameters=sum(p.numel() for p in trainable),
               qat_step_ms=statistics.median(ts), all_ms=[round(v, 3) for v in ts])
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
