#!/usr/bin/env python3
"""PyTorch replica (copy of shared/tools/torch_tiny_replica.py, device-aware) of msfp's TinyUnet and TinyDit (configs/tiny_unet_mnist.toml,
configs/tiny_dit_mnist.toml), timed the way benches/tiny_step.rs times msfp:

  forward   : no-grad forward of a [32,1,32,32] batch, t=500, y=0, then .sum()
  train step: diffusion_loss (random batch, random t, noise, label dropout 0.1, add_noise,
              forward, MSE) + backward + global-norm clip 1.0 + AdamW(lr 1e-4, wd 0) step

Usage: python torch_tiny.py [--threads 1] [--runs 9] [--warmup 3] [--native-norm 0|1]
  --native-norm 1 (default): F.group_norm / F.layer_norm (what a PyTorch user writes);
  --native-norm 0: GroupNorm/LayerNorm composed of mean/sub/square/mean/sqrt/div exactly as
                   msfp's src/nn/norm.rs writes them.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NATIVE_NORM = True


# ----------------------------------------------------------------------------- layers (src/nn)
def timestep_embedding(t, dim):
    """[B] -> [B, dim], [cos | sin], freqs 10000^(-i/half) (src/nn/embedding.rs)."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * i / half)
    args = t[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class GroupNorm(nn.Module):
    """GroupNorm with per-channel affine, eps 1e-5 (src/nn/norm.rs)."""

    def __init__(self, groups, channels):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        if NATIVE_NORM:
            return F.group_norm(x, self.groups, self.weight, self.bias, 1e-5)
        b, c, h, w = x.shape
        xg = x.reshape(b, self.groups, -1)
        mean = xg.mean(2, keepdim=True)
        centered = xg - mean
        var = centered.square().mean(2, keepdim=True)
        normed = (centered / (var + 1e-5).sqrt()).reshape(b, c, h, w)
        return normed * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


def layer_norm(x, eps):
    """LayerNorm over the last dim, no affine (src/nn/norm.rs::layer_norm)."""
    if NATIVE_NORM:
        return F.layer_norm(x, (x.shape[-1],), None, None, eps)
    mean = x.mean(-1, keepdim=True)
    centered = x - mean
    var = centered.square().mean(-1, keepdim=True)
    return centered / (var + eps).sqrt()


class SelfAttention(nn.Module):
    """Multi-head self-attention over [B, N, C], the two matmuls written out
    (src/nn/attention.rs)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        b, n, c = x.shape
        h = self.heads
        d = c // h
        qkv = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        probs = torch.softmax(scores, dim=3)
        out = (probs @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


# ----------------------------------------------------------------------------- TinyUnet
class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, groups):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1, 1, 0) if c_in != c_out else None

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        b, c = h.shape[:2]
        h = h + self.emb_proj(F.silu(emb)).reshape(b, c, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.skip(x) if self.skip is not None else x
        return skip + h


class AttnBlock(nn.Module):
    def __init__(self, channels, heads, groups):
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.attn = SelfAttention(channels, heads)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Stage(nn.Module):
    def __init__(self, res, attn):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x, emb):
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


def upsample_nearest2(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h, 1, w, 1).expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class TinyUnet(nn.Module):
    def __init__(self, base_channels=16, channel_mult=(1, 2, 2), res_blocks=1, attention_heads=4, groups=8):
        super().__init__()
        c0 = base_channels
        emb = 4 * c0
        g = groups
        levels = len(channel_mult)
        chans = [m * c0 for m in channel_mult]
        attn_at = lambda level: level == levels - 1  # noqa: E731
        self.c0, self.res_blocks, self.levels = c0, res_blocks, levels

        self.time_embed_1 = nn.Linear(c0, emb)
        self.time_embed_2 = nn.Linear(emb, emb)
        self.class_embed = nn.Embedding(11, emb)  # 10 classes + null label, N(0,1) init
        self.conv_in = nn.Conv2d(1, c0, 3, 1, 1)

        skip_chans = [c0]
        down, downsample = [], []
        ch = c0
        for level, c in enumerate(chans):
            for _ in range(res_blocks):
                res = ResBlock(ch, c, emb, g)
                attn = AttnBlock(c, attention_heads, g) if attn_at(level) else None
                down.append(Stage(res, attn))
                ch = c
                skip_chans.append(ch)
            if level + 1 < levels:
                downsample.append(nn.Conv2d(ch, ch, 3, 2, 1))
                skip_chans.append(ch)
        self.down = nn.ModuleList(down)
        self.downsample = nn.ModuleList(downsample)

        self.mid_1 = ResBlock(ch, ch, emb, g)
        self.mid_attn = AttnBlock(ch, attention_heads, g)
        self.mid_2 = ResBlock(ch, ch, emb, g)

        up, upsample = [], []
        for level in reversed(range(levels)):
            c = chans[level]
            for _ in range(res_blocks + 1):
                skip = skip_chans.pop()
                res = ResBlock(ch + skip, c, emb, g)
                attn = AttnBlock(c, attention_heads, g) if attn_at(level) else None
                up.append(Stage(res, attn))
                ch = c
            if level > 0:
                upsample.append(nn.Conv2d(ch, ch, 3, 1, 1))
        self.up = nn.ModuleList(up)
        self.upsample = nn.ModuleList(upsample)
        self.norm_out = GroupNorm(g, ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, 1, 1)

    def forward(self, x, t, y):
        temb = timestep_embedding(t, self.c0)
        emb = self.time_embed_2(F.silu(self.time_embed_1(temb))) + self.class_embed(y)
        h = self.conv_in(x)
        skips = [h]
        blocks = iter(self.down)
        for level in range(self.levels):
            for _ in range(self.res_blocks):
                h = next(blocks)(h, emb)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        h = self.mid_1(h, emb)
        h = self.mid_attn(h)
        h = self.mid_2(h, emb)
        blocks = iter(self.up)
        for level in range(self.levels):
            for _ in range(self.res_blocks + 1):
                skip = skips.pop()
                h = next(blocks)(torch.cat([h, skip], 1), emb)
            if level < len(self.upsample):
                h = self.upsample[level](upsample_nearest2(h))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- TinyDit
IMAGE = 32
FREQ_DIM = 256


def modulate(x, shift, scale):
    return x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)


def pos_embed_2d(dim, grid):
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows = []
    for row in range(grid):
        for col in range(grid):
            parts = []
            for pos in (float(col), float(row)):
                parts += [torch.sin(pos * omega), torch.cos(pos * omega)]
            rows.append(torch.cat(parts))
    return torch.stack(rows)  # [grid*grid, dim]


class Mlp(nn.Module):
    def __init__(self, h, ratio):
        super().__init__()
        self.fc1 = nn.Linear(h, ratio * h)
        self.fc2 = nn.Linear(ratio * h, h)


def zero_linear(d_in, d_out):
    lin = nn.Linear(d_in, d_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class DitBlock(nn.Module):
    def __init__(self, h, heads, mlp_ratio):
        super().__init__()
        self.attn = SelfAttention(h, heads)
        self.mlp = Mlp(h, mlp_ratio)
        self.ada_ln = zero_linear(h, 6 * h)

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.ada_ln(F.silu(c)).chunk(6, 1)
        h = self.attn(modulate(layer_norm(x, 1e-6), shift_msa, scale_msa))
        x = x + gate_msa.unsqueeze(1) * h
        h = modulate(layer_norm(x, 1e-6), shift_mlp, scale_mlp)
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(h)))  # exact (erf) GELU, as burn's gelu
        return x + gate_mlp.unsqueeze(1) * h


class TinyDit(nn.Module):
    def __init__(self, patch_size=4, hidden=128, depth=6, heads=4, mlp_ratio=4):
        super().__init__()
        h, p = hidden, patch_size
        self.patch_size, self.hidden = p, h
        self.patch_embed = nn.Conv2d(1, h, p, p, 0)
        self.t_embed_1 = nn.Linear(FREQ_DIM, h)
        self.t_embed_2 = nn.Linear(h, h)
        self.class_embed = nn.Embedding(11, h)
        self.blocks = nn.ModuleList([DitBlock(h, heads, mlp_ratio) for _ in range(depth)])
        self.final_ada_ln = zero_linear(h, 2 * h)
        self.final_linear = zero_linear(h, p * p)
        # msfp rebuilds this host-side every forward; a fixed buffer here (not a parameter).
        self.register_buffer("pos", pos_embed_2d(h, IMAGE // p), persistent=False)

    def forward(self, x, t, y):
        b = x.shape[0]
        p = self.patch_size
        g = IMAGE // p
        n = g * g
        tokens = self.patch_embed(x).reshape(b, self.hidden, n).transpose(1, 2)
        x = tokens + self.pos.unsqueeze(0)
        temb = timestep_embedding(t, FREQ_DIM)
        c = self.t_embed_2(F.silu(self.t_embed_1(temb))) + self.class_embed(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada_ln(F.silu(c)).chunk(2, 1)
        x = self.final_linear(modulate(layer_norm(x, 1e-6), shift, scale))
        return x.reshape(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, IMAGE, IMAGE)


# ----------------------------------------------------------------------------- bench
def linear_alphas_cumprod(timesteps=1000, beta_start=1e-4, beta_end=0.02):
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0)


def bench_data():
    """Stand-ins for MNIST (values don't affect timing) and the linear schedule's alpha-bars."""
    data = torch.rand(9000, 1, 32, 32) * 2 - 1
    labels_all = torch.randint(0, 10, (9000,))
    return data, labels_all, linear_alphas_cumprod()


def time_runs(fn, warmup, runs):
    """Every run's wall time (ms) of `fn` over `runs` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def step_and_forward(name, data, labels_all, ac, batch):
    """The model `name` with its AdamW optimizer, and the timed functions: one training step on a
    random batch (diffusion loss, backward, clipping, AdamW) and one no-grad forward at t = 500,
    as benches/tiny_step.rs times msfp."""
    model = TinyUnet() if name == "tiny_unet" else TinyDit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    model.train()

    def step():
        idx = torch.randint(0, data.shape[0], (batch,))
        x0, y = data[idx], labels_all[idx]
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn(batch, 1, 32, 32)
        keep = (torch.rand(batch) >= 0.1).long()
        y = y * keep + (1 - keep) * 10
        a = ac[t].float().reshape(batch, 1, 1, 1)
        xt = x0 * a.sqrt() + noise * (1 - a).sqrt()
        pred = model(xt, t.float(), y)
        loss = (pred - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    def forward():
        with torch.no_grad():
            x = torch.randn(batch, 1, 32, 32)
            t = torch.full((batch,), 500.0)
            y = torch.zeros(batch, dtype=torch.long)
            return model(x, t, y).sum().item()

    return model, step, forward


def main():
    global NATIVE_NORM
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--native-norm", type=int, default=1)
    ap.add_argument("--models", default="tiny_unet,tiny_dit")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    NATIVE_NORM = bool(args.native_norm)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    batch = 32
    data, labels_all, ac = bench_data()

    rows = []
    for name in args.models.split(","):
        model, step, forward = step_and_forward(name, data, labels_all, ac, batch)
        n_params = sum(p.numel() for p in model.parameters())

        def timeit(fn):
            ts = time_runs(fn, args.warmup, args.runs)
            return statistics.median(ts), min(ts), ts

        st_med, st_min, st_all = timeit(step)
        fw_med, fw_min, fw_all = timeit(forward)
        row = dict(model=name, threads=args.threads, native_norm=NATIVE_NORM, parameters=n_params,
                   train_step_ms_median=round(st_med, 2), train_step_ms_min=round(st_min, 2),
                   forward_ms_median=round(fw_med, 2), forward_ms_min=round(fw_min, 2),
                   train_step_all=[round(v, 2) for v in st_all], forward_all=[round(v, 2) for v in fw_all])
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
