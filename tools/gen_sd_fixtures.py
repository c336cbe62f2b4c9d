#!/usr/bin/env python3
"""Stable Diffusion v1.x test fixtures for msfp, made with diffusers/transformers (random weights).

Writes, under tests/fixtures/sd/ (every output is overwritten; fixed seeds, so reruns give the same
tensors):

  tiny/diffusers/            a diffusers pipeline directory at tiny sizes (float32 safetensors):
                             unet/ (+ diffusion_pytorch_model.fp16.safetensors, diffusers' "fp16"
                             variant), vae/, text_encoder/ (keys `text_model.*` as SD1.4 publishes
                             them, plus the int64 `text_model.embeddings.position_ids` buffer),
                             scheduler/scheduler_config.json, model_index.json
  tiny/vae_legacy_attn/      the same tiny VAE saved with the legacy attention names that the
                             published SD1.4/1.5 `vae/` files use (query/key/value/proj_attn)
  tiny/compvis/sd-tiny.ckpt  the same weights as a pytorch-lightning 1.4 checkpoint (CompVis
                             names, model_ema.* EMA copy of the UNet = UNet + 0.001, DDPM schedule
                             buffers, position_ids; callbacks keyed by class), written with
                             torch.save (tools/gen_lightning_fixtures.py writes its other shapes)
  tiny/compvis/sd-tiny.safetensors   its state_dict as a single safetensors file
  tiny/parity.safetensors    inputs and reference outputs of the tiny UNet, VAE and CLIP
  sd14_keys/*.txt            names and shapes of every tensor of the full-size SD1.4 files
  README.md                  what each file is, versions used, sizes

How the diffusers -> CompVis name mapping below is checked: the CompVis state_dict made by
`to_compvis_*` is fed back through diffusers' own CompVis -> diffusers converters
(diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint with and without extract_ema,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), and the script asserts that it gets back
exactly the original diffusers tensors: same key set, bit-identical values (EMA: the EMA values).
The same round trip is run on the full-size SD1.4 models (meta tensors: names and shapes).
A second, end-to-end check loads the written sd-tiny.safetensors and sd-tiny.ckpt with diffusers'
UNet2DConditionModel.from_single_file / AutoencoderKL.from_single_file and compares the result
with the diffusers directory.
The mapping itself is written here from the structure of the two layouts.

Usage (from the repository root; no hub access is needed or used):
    python3.11 -m venv /tmp/sdfix-venv
    /tmp/sdfix-venv/bin/pip install -r tools/requirements-fixtures.txt
    HF_HUB_OFFLINE=1 /tmp/sdfix-venv/bin/python tools/gen_sd_fixtures.py
"""

import collections
import json
import os
import pathlib
import re
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import numpy  # noqa: E402
import safetensors  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "sd"
TINY = OUT / "tiny"
KEYS = OUT / "sd14_keys"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
EMA_OFFSET = 1e-3  # model_ema.* = UNet weights + EMA_OFFSET, so tests can tell EMA from non-EMA
NOISE_STD = 0.02  # added to every tiny parameter (norm weights, zero biases included)

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

# Tiny UNet: SD1.x's block pattern (cross-attention on all but the lowest-resolution level,
# layers_per_block 2, mid block with cross-attention), every other argument at SD1.4's value.
# Channels are smaller than SD's so that the fixtures stay small (all copies together ~1 MB).
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=4,
    norm_eps=1e-5,
    cross_attention_dim=32,
    # SD1.x's config names this `attention_head_dim`, but diffusers uses it as the NUMBER OF
    # HEADS (num_attention_heads is left None): 2 heads, so head dims are 4 (8 ch) and 8 (16 ch).
    attention_head_dim=2,
    use_linear_projection=False,
    upcast_attention=False,
    resnet_time_scale_shift="default",
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)

TINY_CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=32,
    bos_token_id=998,
    eos_token_id=999,
    pad_token_id=999,
)

# Full-size SD1.4 (= SD1.5) components.
SD14_UNET = dict(cross_attention_dim=768)  # diffusers' defaults otherwise = the SD1.x UNet
SD14_UNET_PARAMS = 859_520_964
SD14_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD14_CLIP = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)

SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)

# ---------------------------------------------------------------------------------------------
# diffusers -> CompVis (LDM) names
# ---------------------------------------------------------------------------------------------

# diffusers resnet sub-module -> openaimodel ResBlock sub-module
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _unet_resnet_rest(rest):
    sub, _, leaf = rest.partition(".")
    return f"{_UNET_RESNET[sub]}.{leaf}"


def unet_name_to_compvis(name, config):
    """diffusers UNet2DConditionModel key -> openaimodel UNetModel key (without the prefix)."""
    lpb = config["layers_per_block"]
    up_types = config["up_block_types"]
    for d, c in _UNET_TOP.items():
        if name.startswith(d + "."):
            return c + name[len(d):]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + level * (lpb + 1) + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{_unet_resnet_rest(rest)}"
        return f"input_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name)
    if m:
        idx = 1 + int(m[1]) * (lpb + 1) + lpb
        return f"input_blocks.{idx}.0.op.{m[2]}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnet, attention, resnet
            return f"middle_block.{2 * j}.{_unet_resnet_rest(rest)}"
        return f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = level * (lpb + 1) + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{_unet_resnet_rest(rest)}"
        return f"output_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name)
    if m:
        level = int(m[1])
        idx = level * (lpb + 1) + lpb  # the last output block of this level
        # the upsampler follows the resnet (and the attention, when the level has one)
        slot = 2 if up_types[level].startswith("CrossAttn") else 1
        return f"output_blocks.{idx}.{slot}.conv.{m[2]}"
    raise KeyError(f"no CompVis name for UNet key {name}")


_VAE_ATTN = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_TOP = {
    "conv_norm_out": "norm_out",
}


def _vae_resnet_rest(rest):
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_name_to_compvis(name, config):
    """diffusers AutoencoderKL key -> LDM AutoencoderKL key (without the prefix)."""
    n_up = len(config["up_block_types"])
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    part, _, rest = name.partition(".")  # encoder / decoder
    assert part in ("encoder", "decoder"), name
    for d, c in _VAE_TOP.items():
        if rest.startswith(d + "."):
            return f"{part}.{c}{rest[len(d):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return name
    m = re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{part}.down.{m[1]}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
    m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest)
    if m:
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest)
    if m:  # diffusers' up_blocks run from the lowest resolution; LDM's decoder.up is reversed
        return f"{part}.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet_rest(m[3])}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest)
    if m:
        return f"{part}.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    m = re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest)
    if m:
        return f"{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet_rest(m[2])}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest)
    if m:
        return f"{part}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
    raise KeyError(f"no CompVis name for VAE key {name}")


def vae_tensor_to_compvis(name, t):
    """LDM's VAE attention q/k/v/proj_out are 1x1 convs: [c, c] -> [c, c, 1, 1]."""
    if re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name):
        assert t.dim() == 2, (name, t.shape)
        return t.reshape(*t.shape, 1, 1)
    return t


def ema_name(compvis_unet_name):
    """model.diffusion_model.a.b.c -> model_ema.diffusion_modelabc (LitEma drops the dots)."""
    assert compvis_unet_name.startswith("model.")
    return "model_ema." + compvis_unet_name[len("model."):].replace(".", "")


def ddpm_schedule_buffers():
    """The DDPM schedule buffers that CompVis' LatentDiffusion registers (SD1.x: linear_start
    0.00085, linear_end 0.012, 'linear' in LDM terms = sqrt-linear = diffusers' scaled_linear),
    computed in float64 like LDM, stored as float32."""
    betas = numpy.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=numpy.float64) ** 2
    alphas = 1.0 - betas
    ac = numpy.cumprod(alphas)
    ac_prev = numpy.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": numpy.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": numpy.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": numpy.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": numpy.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": numpy.sqrt(1.0 / ac - 1.0),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": numpy.log(numpy.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * numpy.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * numpy.sqrt(alphas) / (1.0 - ac),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in bufs.items()}


def to_compvis(unet_sd, unet_cfg, vae_sd, vae_cfg, clip_sd, with_ema, ema_offset=EMA_OFFSET):
    """Build a CompVis/LDM state_dict. clip_sd has the `text_model.` prefix and position_ids."""
    out = {}
    dev = next(iter(unet_sd.values())).device
    out.update({k: v.to(dev) for k, v in ddpm_schedule_buffers().items()})
    for k, v in unet_sd.items():
        out[UNET_PREFIX + unet_name_to_compvis(k, unet_cfg)] = v
    for k, v in vae_sd.items():
        out[VAE_PREFIX + vae_name_to_compvis(k, vae_cfg)] = vae_tensor_to_compvis(k, v)
    for k, v in clip_sd.items():
        assert k.startswith("text_model."), k
        out[CLIP_PREFIX + k] = v
    assert len(out) == 12 + len(unet_sd) + len(vae_sd) + len(clip_sd), "name collision"
    if with_ema:
        for k in [k for k in out if k.startswith(UNET_PREFIX)]:
            out[ema_name(k)] = out[k] + ema_offset
        out["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32, device=dev)
        out["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32, device=dev)
    return out


def check_against_diffusers_converters(compvis, unet_sd, unet_cfg, vae_sd, vae_cfg, clip_sd, label):
    """Run diffusers' own CompVis -> diffusers converters on `compvis` and require the original
    diffusers tensors back: same names, identical values (or shapes, for meta tensors)."""

    def same(a, b, what):
        assert set(a) == set(b), (
            f"{label} {what}: key sets differ: only converted {sorted(set(a) - set(b))[:5]}, "
            f"only original {sorted(set(b) - set(a))[:5]}"
        )
        for k in b:
            x, y = a[k], b[k]
            assert x.shape == y.shape and x.dtype == y.dtype, (label, what, k, x.shape, y.shape)
            if x.device.type != "meta":
                assert torch.equal(x, y), (label, what, k)

    same(convert_ldm_unet_checkpoint(compvis, dict(unet_cfg), extract_ema=False), unet_sd, "unet")
    if any(k.startswith("model_ema.") for k in compvis):
        ema = convert_ldm_unet_checkpoint(compvis, dict(unet_cfg), extract_ema=True)
        same(ema, {k: v + EMA_OFFSET for k, v in unet_sd.items()}, "unet-ema")
    same(convert_ldm_vae_checkpoint(compvis, dict(vae_cfg)), vae_sd, "vae")
    same(convert_ldm_clip_checkpoint(compvis), clip_sd, "clip")
    print(f"[ok] {label}: diffusers' converters map the CompVis dict back to the diffusers tensors")


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


def perturb(model, seed):
    """Add N(0, NOISE_STD) noise to every parameter (norm weights/biases, zero-initialised
    biases included), so that no weight is trivially 0 or 1 and parity is meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * NOISE_STD)


def clip_state_dict_sd_layout(clip):
    """transformers 5.x saves CLIPTextModel without the `text_model.` prefix; SD's
    text_encoder/model.safetensors (and the CompVis checkpoint) have it, plus the int64
    `embeddings.position_ids` buffer [1, 77]."""
    sd = {"text_model." + k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    pos = "text_model.embeddings.position_ids"
    if pos not in sd:
        sd[pos] = torch.arange(clip.config.max_position_embeddings, dtype=torch.int64)[None, :]
    return sd


def build_tiny():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET)
    perturb(unet, 100)
    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_VAE)
    perturb(vae, 101)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP))
    perturb(clip, 102)
    for m in (unet, vae, clip):
        m.eval()
        for name, p in m.named_parameters():
            assert (p != 0).all(), f"zero entry left in {name}"
    return unet, vae, clip


def sd_of(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_same_sd(a, b, what):
    assert set(a) == set(b), (what, sorted(set(a) ^ set(b))[:5])
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (what, k)


def write_diffusers_dir(unet, vae, clip):
    d = TINY / "diffusers"
    unet.save_pretrained(d / "unet", safe_serialization=True)
    vae.save_pretrained(d / "vae", safe_serialization=True)

    # fp16 variant, diffusers' naming: <name>.fp16.safetensors
    fp16 = {k: v.to(torch.float16) for k, v in sd_of(unet).items()}
    save_file(fp16, str(d / "unet" / "diffusion_pytorch_model.fp16.safetensors"), metadata={"format": "pt"})

    te = d / "text_encoder"
    te.mkdir(parents=True, exist_ok=True)
    clip.config.architectures = ["CLIPTextModel"]
    clip.config.save_pretrained(te)
    save_file(clip_state_dict_sd_layout(clip), str(te / "model.safetensors"), metadata={"format": "pt"})

    sched = PNDMScheduler(**SCHEDULER)
    sched.save_pretrained(d / "scheduler")
    cfg_path = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["clip_sample"] = False  # SD1.4's scheduler_config.json carries it (read by DDIM)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (d / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    return d


def write_legacy_vae(vae):
    """Same tiny VAE with the attention names of diffusers' old AttentionBlock, as found in the
    published SD1.4/1.5 vae/diffusion_pytorch_model.safetensors (Linear shapes [c, c])."""
    d = TINY / "vae_legacy_attn"
    d.mkdir(parents=True, exist_ok=True)
    vae.save_config(d)
    ren = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    out = {}
    for k, v in sd_of(vae).items():
        m = re.match(r"(.*mid_block\.attentions\.0\.)(to_q\.|to_k\.|to_v\.|to_out\.0\.)(.*)", k)
        out[m[1] + ren[m[2]] + m[3] if m else k] = v
    save_file(out, str(d / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return d


def reload_and_check(d, unet, vae, clip, legacy_vae_dir):
    u2 = UNet2DConditionModel.from_pretrained(d / "unet")
    assert_same_sd(sd_of(u2), sd_of(unet), "unet reload")
    u16 = UNet2DConditionModel.from_pretrained(d / "unet", variant="fp16", torch_dtype=torch.float16)
    assert_same_sd(sd_of(u16), {k: v.half() for k, v in sd_of(unet).items()}, "unet fp16 reload")
    v2 = AutoencoderKL.from_pretrained(d / "vae")
    assert_same_sd(sd_of(v2), sd_of(vae), "vae reload")
    v3 = AutoencoderKL.from_pretrained(legacy_vae_dir)
    assert_same_sd(sd_of(v3), sd_of(vae), "legacy-name vae reload")
    c2 = CLIPTextModel.from_pretrained(d / "text_encoder")
    assert_same_sd(sd_of(c2), sd_of(clip), "text_encoder reload")
    keys = load_file(str(d / "text_encoder" / "model.safetensors")).keys()
    assert all(k.startswith("text_model.") for k in keys)
    print("[ok] diffusers/transformers load the tiny directory back bit-exactly (fp16 variant too)")
    return u2.eval(), v2.eval(), c2.eval()


def write_compvis(compvis_sd):
    d = TINY / "compvis"
    d.mkdir(parents=True, exist_ok=True)
    # an OrderedDict, as nn.Module.state_dict() gives and real Lightning checkpoints hold
    sd = collections.OrderedDict((k, v.detach().clone().contiguous()) for k, v in sorted(compvis_sd.items()))
    # pytorch-lightning 1.4's shape, as sd-v1-4.ckpt has it (callbacks keyed by class); the
    # other Lightning shapes and the hostile files: tools/gen_lightning_fixtures.py
    from gen_lightning_fixtures import lightning_14

    ckpt = lightning_14(sd)
    torch.save(ckpt, d / "sd-tiny.ckpt")
    save_file(sd, str(d / "sd-tiny.safetensors"), metadata={"format": "pt"})

    # read both back (the ckpt without running pickle code beyond torch's safe allow-list)
    # (weights_only=True refuses the class key, as it refuses sd-v1-4.ckpt; the stand-in
    # classes exist in this process, so the plain load runs nothing foreign)
    back = torch.load(d / "sd-tiny.ckpt", map_location="cpu", weights_only=False)
    assert set(back) == {"epoch", "global_step", "pytorch-lightning_version", "state_dict", "callbacks"}
    assert_same_sd(back["state_dict"], sd, "ckpt reload")
    assert_same_sd(load_file(str(d / "sd-tiny.safetensors")), sd, "compvis safetensors reload")
    print(f"[ok] CompVis ckpt/safetensors written and read back ({len(sd)} tensors)")
    return d


def check_from_single_file(compvis_dir, ddir, unet, vae):
    """Second, end-to-end check: diffusers' own single-file loader reads both CompVis files into
    the same UNet (non-EMA) and VAE tensors as the diffusers directory."""
    for f in ("sd-tiny.safetensors", "sd-tiny.ckpt"):
        path = str(compvis_dir / f)
        u = UNet2DConditionModel.from_single_file(path, config=str(ddir), subfolder="unet", local_files_only=True)
        assert_same_sd(sd_of(u), sd_of(unet), f"from_single_file unet {f}")
        v = AutoencoderKL.from_single_file(path, config=str(ddir), subfolder="vae", local_files_only=True)
        assert_same_sd(sd_of(v), sd_of(vae), f"from_single_file vae {f}")
    print("[ok] diffusers' from_single_file reads sd-tiny.{safetensors,ckpt} into the same UNet/VAE")


def parity(unet, vae, clip):
    g = torch.Generator().manual_seed(1234)
    t = {}
    with torch.no_grad():
        t["unet.sample"] = torch.randn(2, 4, 8, 8, generator=g)
        t["unet.timestep"] = torch.tensor([981.0, 1.0], dtype=torch.float32)
        t["unet.encoder_hidden_states"] = torch.randn(2, 77, 32, generator=g)
        t["unet.out"] = unet(t["unet.sample"], t["unet.timestep"], t["unet.encoder_hidden_states"]).sample

        # vae.decoded = vae.decode(latent).sample: the latent is fed as is, NOT divided by
        # scaling_factor (a pipeline would decode latents / 0.18215).
        t["vae.latent"] = torch.randn(1, 4, 8, 8, generator=g)
        t["vae.decoded"] = vae.decode(t["vae.latent"]).sample
        t["vae.image"] = torch.rand(1, 3, 32, 32, generator=g) * 2.0 - 1.0
        dist = vae.encode(t["vae.image"]).latent_dist
        t["vae.posterior_mean"] = dist.mean
        t["vae.posterior_logvar"] = dist.logvar  # clamped to [-30, 20] by diffusers, like LDM

        # token ids: BOS 998, some tokens, EOS 999, padded with EOS 999 (SD pads with EOS)
        ids = torch.full((2, 77), 999, dtype=torch.int64)
        ids[:, 0] = 998
        body = torch.randint(0, 998, (2, 20), generator=g)
        ids[0, 1:6] = body[0, :5]
        ids[1, 1:21] = body[1, :20]
        ids[0, 6] = 999
        ids[1, 21] = 999
        out = clip(input_ids=ids)
        t["clip.input_ids"] = ids.to(torch.float32)
        t["clip.last_hidden_state"] = out.last_hidden_state  # after final_layer_norm
    t = {k: v.detach().to(torch.float32).contiguous() for k, v in t.items()}
    for k, v in t.items():
        assert torch.isfinite(v).all() and v.std() > 1e-3, k
    save_file(t, str(TINY / "parity.safetensors"), metadata={"format": "pt"})
    print("[ok] parity tensors: " + ", ".join(f"{k} {list(v.shape)}" for k, v in t.items()))
    return t


# ---------------------------------------------------------------------------------------------
# Full-size SD1.4 key lists (meta device: names and shapes only)
# ---------------------------------------------------------------------------------------------


def write_keylist(path, sd):
    lines = [f"{k}\t{','.join(str(d) for d in v.shape)}" for k, v in sorted(sd.items())]
    path.write_text("\n".join(lines) + "\n")


def sd14_keys():
    KEYS.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        vae = AutoencoderKL(**SD14_VAE)
        clip = CLIPTextModel(CLIPTextConfig(**SD14_CLIP))
    n = sum(p.numel() for p in unet.parameters())
    assert n == SD14_UNET_PARAMS, n
    unet_sd, vae_sd = dict(unet.state_dict()), dict(vae.state_dict())
    clip_sd = {"text_model." + k: v for k, v in clip.state_dict().items()}
    clip_sd.setdefault("text_model.embeddings.position_ids", torch.empty(1, 77, dtype=torch.int64, device="meta"))
    write_keylist(KEYS / "diffusers_unet.txt", unet_sd)
    write_keylist(KEYS / "diffusers_vae.txt", vae_sd)
    legacy = {}
    ren = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in vae_sd.items():
        m = re.match(r"(.*mid_block\.attentions\.0\.)(to_q|to_k|to_v|to_out\.0)(\..*)", k)
        legacy[m[1] + ren[m[2]] + m[3] if m else k] = v
    write_keylist(KEYS / "diffusers_vae_legacy_attn.txt", legacy)
    write_keylist(KEYS / "diffusers_text_encoder.txt", clip_sd)

    compvis = to_compvis(unet_sd, unet.config, vae_sd, vae.config, clip_sd, with_ema=True, ema_offset=0)
    check_against_diffusers_converters(compvis, unet_sd, unet.config, vae_sd, vae.config, clip_sd, "SD1.4 (meta)")
    write_keylist(KEYS / "compvis.txt", {k: v for k, v in compvis.items() if not k.startswith("model_ema.")})
    write_keylist(KEYS / "compvis_ema.txt", {k: v for k, v in compvis.items() if k.startswith("model_ema.")})
    counts = {
        "diffusers_unet": len(unet_sd),
        "diffusers_vae": len(vae_sd),
        "diffusers_text_encoder": len(clip_sd),
        "compvis": sum(not k.startswith("model_ema.") for k in compvis),
        "compvis_ema": sum(k.startswith("model_ema.") for k in compvis),
    }
    print(f"[ok] SD1.4 key lists: {counts}; UNet parameters {n:,}")
    return counts


# ---------------------------------------------------------------------------------------------


def human(n):
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def write_readme(counts, parity_t):
    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "README.md")
    total = sum(p.stat().st_size for p in files)
    listing = "\n".join(f"| `{p.relative_to(OUT)}` | {human(p.stat().st_size)} |" for p in files)
    ptable = "\n".join(f"| `{k}` | {list(v.shape)} |" for k, v in parity_t.items())
    text = f"""# Stable Diffusion v1.x fixtures

Generated by `tools/gen_sd_fixtures.py` (random weights, fixed seeds; do not edit by hand).
Regenerate from the repository root with

    python3.11 -m venv /tmp/sdfix-venv && /tmp/sdfix-venv/bin/pip install -r tools/requirements-fixtures.txt
    HF_HUB_OFFLINE=1 /tmp/sdfix-venv/bin/python tools/gen_sd_fixtures.py

Versions used: torch {torch.__version__}, diffusers {diffusers.__version__},
transformers {transformers.__version__}, safetensors {safetensors.__version__}, numpy {numpy.__version__},
Python {sys.version.split()[0]}. Total size (without this README): {human(total)}.

## tiny/

One set of random float32 weights (every parameter perturbed with N(0, {NOISE_STD}) noise, so no
weight is exactly 0 or 1), in several layouts. Tiny configs: see `diffusers/*/config.json`.
The UNet follows SD1.x's block pattern (3 levels: CrossAttnDown, CrossAttnDown, Down; up: Up,
CrossAttnUp, CrossAttnUp; layers_per_block 2) at channels (8, 16, 16); its `attention_head_dim`
(2) is, as in SD1.x's config, the number of heads.

- `diffusers/`: diffusers pipeline layout (`save_pretrained`, safetensors). `unet/` also has the
  fp16 variant `diffusion_pytorch_model.fp16.safetensors` (the float32 weights cast to f16).
  `text_encoder/model.safetensors` has keys `text_model.*` as SD1.4's own file (transformers 5.x
  would save them without the prefix) plus `text_model.embeddings.position_ids` (int64 [1, 77]).
  Token ids: BOS 998, EOS 999 (= pad). No tokenizer is included.
- `vae_legacy_attn/`: the same VAE with the mid-block attention under the legacy names that the
  published SD1.4/1.5 `vae/` files use: `query`, `key`, `value`, `proj_attn` (Linear, [c, c]),
  instead of `to_q`, `to_k`, `to_v`, `to_out.0`; `group_norm` is the same in both.
- `compvis/sd-tiny.ckpt`: `torch.save` of a Lightning-style dict: `epoch`, `global_step`,
  `pytorch-lightning_version` ("1.4.2"), `callbacks` (nested dicts of str/float/None) and
  `state_dict` with `model.diffusion_model.*` (UNet, openaimodel names), `first_stage_model.*`
  (VAE, LDM names; attention q/k/v/proj_out as 1x1 convs [c, c, 1, 1]),
  `cond_stage_model.transformer.text_model.*` (CLIP, incl. int64 `embeddings.position_ids`),
  the 12 DDPM schedule buffers of LatentDiffusion (`betas`, `alphas_cumprod`, ... [1000] f32),
  and the EMA copy `model_ema.<UNet name without "model." and without dots>` holding the UNet
  weights **+ {EMA_OFFSET}**, plus `model_ema.decay` (f32 scalar) and `model_ema.num_updates`
  (int32 scalar).
- `compvis/sd-tiny.safetensors`: the same `state_dict` as one safetensors file.
- `parity.safetensors`: float32 inputs and outputs of the models above (eval, no_grad):

| tensor | shape |
| --- | --- |
{ptable}

  `unet.out = unet(sample, timestep, encoder_hidden_states).sample`;
  `vae.decoded = vae.decode(vae.latent).sample` (latent NOT divided by the scaling factor);
  `vae.posterior_mean/logvar = vae.encode(vae.image).latent_dist.mean/.logvar`;
  `clip.input_ids` are integer token ids stored as f32 (BOS, tokens, EOS, EOS padding);
  `clip.last_hidden_state` is transformers' `last_hidden_state` (after `final_layer_norm`).

The CompVis names are produced by the script's diffusers -> CompVis mapping and checked by
feeding the CompVis dict through diffusers' own converters (`convert_ldm_unet_checkpoint`, also
with `extract_ema=True`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), which must
return the original diffusers tensors bit-exactly; diffusers' `from_single_file` also loads both
CompVis files into the same UNet and VAE. The diffusers directory is loaded back with
`from_pretrained` (fp16 variant and legacy VAE names too) and compared bit-exactly.

## sd14_keys/

Names and shapes (no weights) of the full-size SD1.4 tensors, one per line, `name<TAB>d0,d1,...`
(a scalar has nothing after the tab), sorted by name. Built from diffusers' SD1.4 configs on the
meta device (UNet: {SD14_UNET_PARAMS:,} parameters) and mapped with the same verified mapping.

- `diffusers_unet.txt` ({counts['diffusers_unet']}), `diffusers_vae.txt` ({counts['diffusers_vae']}, current names `to_q`...),
  `diffusers_vae_legacy_attn.txt` (same, with the legacy `query/key/value/proj_attn` names of the
  published SD1.4 vae file), `diffusers_text_encoder.txt` ({counts['diffusers_text_encoder']}, with the
  `text_model.` prefix and `text_model.embeddings.position_ids`, int64).
- `compvis.txt` ({counts['compvis']}): the state_dict of `sd-v1-4.ckpt` without EMA: UNet, VAE, CLIP
  (incl. `cond_stage_model.transformer.text_model.embeddings.position_ids`, int64) and the 12 schedule
  buffers. `compvis_ema.txt` ({counts['compvis_ema']}): the `model_ema.*` keys (UNet only, plus `decay`
  f32 and `num_updates` int32 scalars) found in the full-EMA checkpoints (`sd-v1-4-full-ema.ckpt`);
  the 4 GB `sd-v1-4.ckpt` is believed to ship without them.

## Files

| file | size |
| --- | --- |
{listing}
"""
    (OUT / "README.md").write_text(text)
    return total


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for d in (TINY, KEYS):
        if d.exists():
            shutil.rmtree(d)
    TINY.mkdir(parents=True)

    unet, vae, clip = build_tiny()
    ddir = write_diffusers_dir(unet, vae, clip)
    legacy_dir = write_legacy_vae(vae)
    unet, vae, clip = reload_and_check(ddir, unet, vae, clip, legacy_dir)

    unet_sd, vae_sd = sd_of(unet), sd_of(vae)
    clip_sd = load_file(str(ddir / "text_encoder" / "model.safetensors"))
    compvis = to_compvis(unet_sd, unet.config, vae_sd, vae.config, clip_sd, with_ema=True)
    check_against_diffusers_converters(compvis, unet_sd, unet.config, vae_sd, vae.config, clip_sd, "tiny")
    cdir = write_compvis(compvis)
    check_from_single_file(cdir, ddir, unet, vae)

    parity_t = parity(unet, vae, clip)
    counts = sd14_keys()
    total = write_readme(counts, parity_t)
    print(f"[ok] wrote {OUT} ({human(total)} + README)")


if __name__ == "__main__":
    main()
