#!/usr/bin/env python3
"""CompVis checkpoints in the shapes pytorch-lightning really writes, for msfp's loader tests.

`sd-v1-4.ckpt` and the CompVis LDM checkpoints were written by pytorch-lightning 1.4, which keys
the `callbacks` dict by the callback's *class*: the pickle holds a GLOBAL
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` as a dict key (this is why torch's
`weights_only=True` refuses those files). Lightning >= 1.5 keys callbacks by a state-key string and
adds `loops`, `optimizer_states`, `lr_schedulers`, `hparams_name` and `hyper_parameters` (an
`AttributeDict`, a dict subclass, pickled as NEWOBJ + SETITEMS + BUILD). The Lightning classes are
stood in for by classes of the same module and name, so the pickles are byte for byte what
pytorch-lightning would have written around the same objects; Lightning itself is not needed.

Reads the tiny SD state_dict from tests/fixtures/sd/tiny/compvis/sd-tiny.safetensors (written by
tools/gen_sd_fixtures.py) and writes, beside it (every output overwritten):

  sd-tiny.ckpt            pytorch-lightning 1.4 shape (what sd-v1-4.ckpt holds): epoch,
                          global_step, pytorch-lightning_version, state_dict, callbacks keyed by
                          the ModelCheckpoint class (its state holds a tensor)
  sd-tiny-pl19.ckpt       pytorch-lightning 1.9 shape: the above with string-keyed callbacks,
                          loops, optimizer_states (Adam state tensors), lr_schedulers,
                          hparams_name and an AttributeDict of hyper-parameters holding an
                          omegaconf-style config object
  sd-tiny-legacy.ckpt     the 1.4 dict in torch.save's legacy container
                          (_use_new_zipfile_serialization=False)
  hostile-outside.ckpt    the 1.4 dict plus objects whose __reduce__ runs a command
                          (os.system, builtins.eval) at the top level and inside `callbacks`
  hostile-inside.ckpt     a state_dict in which the UNet's `out.2.weight` is such an object

The command, were it ever run, creates /tmp/msfp-pickle-was-executed; the Rust tests check that
it never appears. This script never loads the hostile files except with weights_only=True, which
refuses them.

Usage (from the repository root; only torch and safetensors are needed):
    /tmp/sdfix-venv/bin/python tools/gen_lightning_fixtures.py
"""

import collections
import os
import pathlib
import sys
import types

import torch
from safetensors.torch import load_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/sd/tiny/compvis"
MARKER = "/tmp/msfp-pickle-was-executed"


def stand_in(module, name, base=object):
    """A class that pickles as `module.name`, registered with its parent packages."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (base,), {"__module__": module})
    setattr(sys.modules[module], name, cls)
    return cls


ModelCheckpoint = stand_in("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
LearningRateMonitor = stand_in("pytorch_lightning.callbacks.lr_monitor", "LearningRateMonitor")
AttributeDict = stand_in("pytorch_lightning.utilities.parsing", "AttributeDict", dict)
DictConfig = stand_in("omegaconf.dictconfig", "DictConfig")


class RunsCommand:
    """Unpickling this runs `command` (a real pickle would call os.system)."""

    def __init__(self, how):
        self.how = how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {MARKER}",))
        return (eval, (f"__import__('os').system('touch {MARKER}')",))


def checkpoint_state(tensor_score):
    return {
        "monitor": None,
        "best_model_score": tensor_score,
        "best_model_path": "/logs/checkpoints/last.ckpt",
        "current_score": tensor_score,
        "dirpath": "/logs/checkpoints",
    }


def lightning_14(sd):
    """The dict pytorch-lightning 1.4's dump_checkpoint returns, pruned as sd-v1-4.ckpt is."""
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {
            ModelCheckpoint: checkpoint_state(torch.tensor(0.1234)),
            LearningRateMonitor: {"logging_interval": "step"},
        },
    }


def lightning_19(sd):
    """The dict pytorch-lightning 1.9's dump_checkpoint returns (one Adam optimizer, one scheduler)."""
    first = next(iter(sd.values()))
    config = DictConfig()
    config.__dict__.update({"_content": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion"}})
    hparams = AttributeDict(linear_start=0.00085, linear_end=0.012, config=config)
    key = "ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 10000, 'every_n_epochs': None, 'train_time_interval': None}"
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.9.5",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 470000}}},
        "callbacks": {key: checkpoint_state(torch.tensor(0.1234))},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(470000.0), "exp_avg": torch.zeros_like(first), "exp_avg_sq": torch.zeros_like(first)}},
                "param_groups": [{"lr": 1.0e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}],
            }
        ],
        "lr_schedulers": [{"base_lrs": [1.0e-4], "last_epoch": 470000}],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }


def same_state_dict(a, b, what):
    assert list(a) == list(b), f"{what}: keys differ"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def main():
    sd = collections.OrderedDict(sorted(load_file(str(OUT / "sd-tiny.safetensors")).items()))
    if os.path.exists(MARKER):
        os.remove(MARKER)

    torch.save(lightning_14(sd), OUT / "sd-tiny.ckpt")
    torch.save(lightning_19(sd), OUT / "sd-tiny-pl19.ckpt")
    torch.save(lightning_14(sd), OUT / "sd-tiny-legacy.ckpt", _use_new_zipfile_serialization=False)
    for name in ["sd-tiny.ckpt", "sd-tiny-pl19.ckpt", "sd-tiny-legacy.ckpt"]:
        back = torch.load(OUT / name, map_location="cpu", weights_only=False)  # stand-ins exist here
        same_state_dict(back["state_dict"], sd, name)
    try:
        torch.load(OUT / "sd-tiny.ckpt", weights_only=True)
        raise AssertionError("weights_only=True accepted a class as a dict key")
    except Exception as e:  # the refusal real sd-v1-4.ckpt gets
        assert "ModelCheckpoint" in str(e), e

    outside = lightning_14(sd)
    outside["evil"] = RunsCommand("system")
    outside["callbacks"]["on_load"] = RunsCommand("eval")
    torch.save(outside, OUT / "hostile-outside.ckpt")
    inside = collections.OrderedDict(sd)
    inside["model.diffusion_model.out.2.weight"] = RunsCommand("system")
    torch.save(lightning_14(inside), OUT / "hostile-inside.ckpt")
    for name in ["hostile-outside.ckpt", "hostile-inside.ckpt"]:
        try:
            torch.load(OUT / name, weights_only=True)
            raise AssertionError(f"{name} was accepted by weights_only=True")
        except Exception as e:
            assert "system" in str(e) or "eval" in str(e) or "ModelCheckpoint" in str(e), e
    assert not os.path.exists(MARKER), "writing the fixtures ran the command"
    for name in ["sd-tiny.ckpt", "sd-tiny-pl19.ckpt", "sd-tiny-legacy.ckpt", "hostile-outside.ckpt", "hostile-inside.ckpt"]:
        print(f"[ok] {name}: {(OUT / name).stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
