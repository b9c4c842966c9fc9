"""Stand-ins for the modules that the MDLM authors' code (kuleshov-group/mdlm: diffusion.py,
dataloader.py, noise_schedule.py, models/) imports at module level but that a CPU machine without
network does not have or does not need: flash_attn (varlen attention and the rotary kernel),
einops, huggingface_hub, omegaconf, lightning, torchmetrics, hydra, timm, fsspec, and the Mamba
kernels that models/__init__.py pulls in through models.dimamba. Import this module first, then the
authors' modules (from $MDLM_REF) unchanged. Used by the reference generators in this folder only;
the tests never import it.

Lightning's LightningModule becomes a plain torch.nn.Module with the few members Diffusion's methods
read (dtype, device, log, log_dict, save_hyperparameters); Diffusion.__init__ itself downloads an
evaluation tokenizer, so generators build the object with Diffusion.__new__ and set its fields."""
import os
import sys
import types

import torch

import reference_shims  # noqa: F401  (einops, flash_attn varlen attention, huggingface_hub, omegaconf, autocast)


class _Anything(types.ModuleType):
    """A module whose every attribute is a dummy callable class: `from X import name` succeeds; using
    the name for anything fails loudly."""

    def __getattr__(self, name):
        if name.startswith('__'):
            raise AttributeError(name)

        def unavailable(*a, **k):
            raise RuntimeError(f'{self.__name__}.{name} is a stand-in (mdlm_shims.py)')
        return type(name, (), {'__init__': unavailable, '__call__': unavailable})


def _apply_rotary_emb_qkv_(qkv, cos, sin):
    """flash_attn.layers.rotary.apply_rotary_emb_qkv_, non-interleaved (GPT-NeoX halves): qkv
    [b, s, 3, h, d] rotated in place on q and k; cos, sin [s, d/2]."""
    half = cos.shape[-1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    for i in (0, 1):
        x = qkv[:, :, i]
        x1, x2 = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half] = x1 * c - x2 * s
        x[..., half:2 * half] = x1 * s + x2 * c
    return qkv


class _LightningModule(torch.nn.Module):
    def save_hyperparameters(self, *a, **k):
        pass

    @property
    def dtype(self):
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self):
        for p in self.parameters():
            return p.device
        return torch.device('cpu')

    def log(self, *a, **k):
        pass

    def log_dict(self, *a, **k):
        pass


class _MeanMetric:
    def __init__(self, *a, **k):
        self.mean_value = torch.tensor(0.0)
        self.weight = torch.tensor(0.0)


flash_layers = types.ModuleType('flash_attn.layers')
flash_rotary = types.ModuleType('flash_attn.layers.rotary')
flash_rotary.apply_rotary_emb_qkv_ = _apply_rotary_emb_qkv_
flash_layers.rotary = flash_rotary

lightning = types.ModuleType('lightning')
lightning.LightningModule = _LightningModule
lightning.pytorch = types.SimpleNamespace(utilities=types.SimpleNamespace(rank_zero_only=lambda fn: fn))  # utils.get_logger
torchmetrics = types.ModuleType('torchmetrics')
torchmetrics.aggregation = types.SimpleNamespace(MeanMetric=_MeanMetric)
torchmetrics.MetricCollection = _Anything('torchmetrics').MetricCollection
torchmetrics.text = types.SimpleNamespace(Perplexity=_MeanMetric)
hydra = types.ModuleType('hydra')
hydra.utils = _Anything('hydra.utils')

if 'layers' not in vars(sys.modules['flash_attn']):  # the stand-in flash_attn (no real one on a CPU machine)
    sys.modules['flash_attn'].layers = flash_layers
if not hasattr(sys.modules['einops'], 'repeat'):
    sys.modules['einops'].repeat = None  # models.dimamba imports it (never called)
reference_shims.install([('flash_attn.layers', flash_layers), ('flash_attn.layers.rotary', flash_rotary),
                  ('lightning', lightning), ('torchmetrics', torchmetrics), ('hydra', hydra),
                  ('hydra.utils', hydra.utils), ('timm', _Anything('timm')), ('timm.scheduler', _Anything('timm.scheduler')),
                  ('fsspec', _Anything('fsspec')), ('causal_conv1d', _Anything('causal_conv1d')),
                  ('mamba_ssm', _Anything('mamba_ssm')), ('mamba_ssm.ops', _Anything('mamba_ssm.ops')),
                  ('mamba_ssm.ops.selective_scan_interface', _Anything('mamba_ssm.ops.selective_scan_interface')),
                  ('mamba_ssm.ops.triton', _Anything('mamba_ssm.ops.triton')),
                  ('mamba_ssm.ops.triton.selective_state_update', _Anything('mamba_ssm.ops.triton.selective_state_update')),
                  ('mamba_ssm.ops.triton.layernorm', _Anything('mamba_ssm.ops.triton.layernorm'))])

sys.path.insert(0, os.environ['MDLM_REF'])
