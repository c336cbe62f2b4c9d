#!/usr/bin/env python3
"""Writes tests/fixtures/dit/tiny: a random-weight DiT at a tiny config in both published layouts,
with inputs and reference outputs, for msfp's DiT loader and parity tests. Offline; needs torch
(CPU), diffusers and safetensors from PyPI.

  diffusers/transformer/  DiTTransformer2DModel.save_pretrained (config.json + safetensors)
  DiT-tiny.pt             the same weights as facebookresearch/DiT's plain torch.save state dict
                          (x_embedder, t_embedder, y_embedder, fused attn.qkv, pos_embed, ...)
  io.safetensors          x [2,4,8,8], t [2], y [2] (as f32; one null label), and the outputs [2,8,8,8]:
                          out_diffusers (diffusers' timestep frequencies: exp(-ln(1e4) i / (half-1)))
                          and out_facebook (DiT's own: exp(-ln(1e4) i / half)).

Every block's copy of the timestep/class embedders is block 0's, as in a converted checkpoint.

With --keys it writes instead tests/fixtures/dit/xl2_keys/{diffusers,facebook}.txt: the names and
shapes (`name<TAB>d0,d1,...`, sorted) of every tensor of DiT-XL/2 at 256 px in both layouts,
built on the meta device (no weights), the facebookresearch names by the same mapping.

Usage: python tools/gen_dit_fixtures.py [--out tests/fixtures/dit/tiny] [--keys]
"""
import argparse
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from safetensors.torch import save_file

CONFIG = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
              sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def facebook_state_dict(sd, depth, hidden, grid):
    emb = "transformer_blocks.0.norm1.emb."
    fb = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "pos_embed": torch.as_tensor(get_2d_sincos_pos_embed(hidden, grid, output_type="pt")).float()[None],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            fb[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[b + f"attn1.to_{n}.{p}"] for n in "qkv"], 0)
            fb[f"blocks.{i}.attn.proj.{p}"] = sd[b + f"attn1.to_out.0.{p}"]
            fb[f"blocks.{i}.mlp.fc1.{p}"] = sd[b + f"ff.net.0.proj.{p}"]
            fb[f"blocks.{i}.mlp.fc2.{p}"] = sd[b + f"ff.net.2.{p}"]
            fb[f"blocks.{i}.adaLN_modulation.1.{p}"] = sd[b + f"norm1.linear.{p}"]
    return {k: v.contiguous().clone() for k, v in fb.items()}


def write_keys(out):
    """DiT-XL/2 (256 px) tensor names and shapes in both layouts, from the meta device."""
    cfg = dict(CONFIG, num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32)
    with torch.device("meta"):
        model = DiTTransformer2DModel(**cfg)
    sd = model.state_dict()
    hidden, grid = 16 * 72, 32 // 2
    meta = {k: torch.empty(v.shape) for k, v in sd.items()}
    fb = facebook_state_dict(meta, 28, hidden, grid)
    out.mkdir(parents=True, exist_ok=True)
    for name, d in (("diffusers.txt", sd), ("facebook.txt", fb)):
        lines = [f"{k}\t{','.join(str(x) for x in v.shape)}" for k, v in sorted(d.items())]
        (out / name).write_text("\n".join(lines) + "\n")
        print(name, len(lines), "tensors,", sum(v.numel() for v in d.values()), "values")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/dit/tiny")
    ap.add_argument("--keys", action="store_true")
    args = ap.parse_args()
    if args.keys:
        write_keys(Path("tests/fixtures/dit/xl2_keys"))
        return
    out = Path(args.out)
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**CONFIG).eval()
    sd = model.state_dict()
    for k in list(sd):
        if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
            sd[k] = sd["transformer_blocks.0." + k.split(".", 2)[2]].clone()
    model.load_state_dict(sd)
    model.save_pretrained(out / "diffusers" / "transformer", safe_serialization=True)
    hidden = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    grid = CONFIG["sample_size"] // CONFIG["patch_size"]
    torch.save(facebook_state_dict(sd, CONFIG["num_layers"], hidden, grid), out / "DiT-tiny.pt")

    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10.0, 900.0])
    y = torch.tensor([3, 1000])
    with torch.no_grad():
        out_diffusers = model(x, timestep=t, class_labels=y).sample
        for block in model.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        out_facebook = model(x, timestep=t, class_labels=y).sample
    save_file({"x": x, "t": t, "y": y.float(), "out_diffusers": out_diffusers.contiguous(),
               "out_facebook": out_facebook.contiguous()}, str(out / "io.safetensors"))
    print("max |diffusers - facebook| =", (out_diffusers - out_facebook).abs().max().item())


if __name__ == "__main__":
    main()
