#!/usr/bin/env python3
"""Stable Diffusion v1.4's UNet at full size in PyTorch + diffusers (random weights), the baseline
of the SD part of the GPU check (benches/gpu.rs --sd-latent N), built as msfp's W4A4 student is
(configs/msfp_sd14.toml; benches/common/sd14.rs):

  every Conv2d and Linear of UNet2DConditionModel (SD1.4 config: 859,520,964 parameters)
  fake-quantized: weights signed E2M1 with one LSQ scale per output channel; inputs one scale per
  tensor, unsigned UE2M2 with a zero point after SiLU/GELU (ResNet conv1/conv2/time_emb_proj,
  the GEGLU output, time_embedding.linear_2) and signed E2M1 elsewhere; conv_in and conv_out at
  E4M3 for both. TALoRA with 2 adapters of rank 16, the router's pick at t = 500, branch
  placement: y = layer(Q(x), Q(W0)) + layer(x, B_k A_k). Straight-through rounding; the base
  weights frozen, adapters and scales trained by AdamW.

Timed, batch B (default 2: conditional + unconditional, as in distillation), latent 4 x L x L,
77 x 768 text context, t = 500: the fp32 teacher's forward, the student's forward and one QAT step
(forward, MSE backward, AdamW), each the median of `--runs` after `--warmup`, synchronised.

Usage: python tools/bench/torch_sd14_qat.py [--device cuda] [--latent 64] [--batch 2] [--json out.json]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def round_fp(v, mantissa_bits, min_exp, max_val):
    """Round |v| to the nearest value of a minifloat (subnormals below 2^min_exp), clamped."""
    a = v.abs().clamp(max=max_val)
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** min_exp)))
    step = torch.exp2(e - mantissa_bits)
    return torch.sign(v) * torch.round(a / step) * step


FORMATS = {
    # name: (mantissa bits, smallest normal exponent, largest value)
    "e2m1": (1, 0, 6.0),
    "ue2m2": (2, 0, 7.0),
    "e4m3": (3, -6, 448.0),
}


def fake_quant(x, s, fmt, zero=None):
    """LSQ fake quantization s * round(x / s) (+ zero point), straight-through rounding."""
    m, e, hi = FORMATS[fmt]
    if zero is not None:
        x = x - zero
    y = x / s
    y = y.clamp(0.0, hi) if fmt.startswith("u") else y.clamp(-hi, hi)
    y = y + (round_fp(y, m, e, hi) - y).detach()
    y = y * s
    return y + zero if zero is not None else y


class QLayer(nn.Module):
    """A quantized Conv2d or Linear with a TALoRA bank in branch placement."""

    def __init__(self, layer, w_fmt, a_fmt, unsigned, rank=16, adapters=2):
        super().__init__()
        self.layer = layer
        for p in layer.parameters():
            p.requires_grad_(False)
        w = layer.weight
        out_f, fan_in = w.shape[0], w[0].numel()
        self.w_fmt, self.a_fmt = w_fmt, a_fmt
        self.a = nn.Parameter(torch.randn(adapters, rank, fan_in) / fan_in ** 0.5)
        self.b = nn.Parameter(torch.zeros(adapters, out_f, rank))
        shape = (out_f,) + (1,) * (w.dim() - 1)
        self.ws = nn.Parameter(0.01 + 0.01 * torch.rand(shape))
        self.xs = nn.Parameter(torch.tensor(0.75))
        self.zp = nn.Parameter(torch.tensor(-0.28)) if unsigned else None
        self.k = 1  # the router's pick at t = 500 of [0, 1000) split in two

    def call(self, x, w, bias):
        lay = self.layer
        if isinstance(lay, nn.Conv2d):
            return F.conv2d(x, w, bias, lay.stride, lay.padding)
        return F.linear(x, w, bias)

    def forward(self, x):
        w0 = self.layer.weight
        delta = (self.b[self.k] @ self.a[self.k]).reshape(w0.shape)
        wq = fake_quant(w0, self.ws, self.w_fmt)
        xq = fake_quant(x, self.xs, self.a_fmt, self.zp)
        return self.call(xq, wq, self.layer.bias) + self.call(x, delta, None)


def after_activation(path):
    leaf = path.rsplit(".", 1)[-1]
    return (
        (".resnets." in path and leaf in ("conv1", "conv2", "time_emb_proj"))
        or path.endswith("ff.net.2")
        or path in ("time_embedding.linear_2", "conv_out")
    )


def quantize(model):
    count = 0
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, (nn.Conv2d, nn.Linear)):
                continue
            full = f"{path}.{name}" if path else name
            eight = full in ("conv_in", "conv_out")
            fmt_w = "e4m3" if eight else "e2m1"
            unsigned = after_activation(full) and not eight
            fmt_a = "e4m3" if eight else ("ue2m2" if unsigned else "e2m1")
            setattr(module, name, QLayer(child, fmt_w, fmt_a, unsigned))
            count += 1
    return count


def sd14_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def timed(runs, warmup, f, dev):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(runs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), [round(v, 2) for v in ts]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    with dev:  # initialise on the device: 860M random parameters
        model = sd14_unet().eval()
    params = sum(p.numel() for p in model.parameters())
    b, l = args.batch, args.latent
    x = torch.randn(b, 4, l, l, device=dev)
    ctx = torch.randn(b, 77, 768, device=dev)
    t = torch.full((b,), 500.0, device=dev)
    target = torch.randn(b, 4, l, l, device=dev)
    fwd = lambda: model(x, t, encoder_hidden_states=ctx).sample  # noqa: E731

    def peak_mib():
        return torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None

    with torch.no_grad():
        teacher_ms, teacher_all = timed(args.runs, args.warmup, fwd, dev)
    peak_teacher = peak_mib()
    sites = quantize(model)
    model.to(dev)
    with torch.no_grad():
        student_ms, student_all = timed(args.runs, args.warmup, fwd, dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    model.train()

    def step():
        loss = (fwd() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    qat_ms, qat_all = timed(args.runs, args.warmup, step, dev)
    row = dict(
        torch=torch.__version__,
        diffusers=__import__("diffusers").__version__,
        device=str(dev),
        gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else "",
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        latent=[4, l, l], batch=b, unet_parameters=params, quant_sites=sites,
        trainable_parameters=sum(p.numel() for p in trainable),
        teacher_forward_ms=teacher_ms, student_forward_ms=student_ms, qat_step_ms=qat_ms,
        all_ms=dict(teacher_forward=teacher_all, student_forward=student_all, qat_step=qat_all),
        peak_gpu_mib=dict(after_teacher_forward=peak_teacher, after_qat_step=peak_mib()),
    )
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
