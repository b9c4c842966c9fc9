"""Stand-ins for the third-party modules that the authors' SEDD code imports at module level but that
a CPU machine without network does not have (einops, flash_attn, huggingface_hub, omegaconf), and a
no-op CUDA autocast where there is no GPU. Import this module first, then the authors' own modules
(from $SEDD_REF), unchanged. Used by the reference generators in this folder and by
tools/fidelity/sedd_ref_train.py; the tests never import it."""
import contextlib
import importlib.machinery
import importlib.util
import math
import os
import sys
import types

import torch


def _rearrange(x, pattern, **kw):
    if pattern == 'b s (three h d) -> b s three h d':
        b, s, _ = x.shape
        return x.view(b, s, kw['three'], kw['h'], -1)
    if pattern == 'b s ... -> (b s) ...':
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    if pattern == '(b s) h d -> b s (h d)':
        b = kw['b']
        return x.reshape(b, x.shape[0] // b, x.shape[1] * x.shape[2])
    raise NotImplementedError(pattern)


def _flash_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p, causal=False):
    # qkv: [(b s), 3, h, d], every sequence of length max_seqlen: plain softmax attention (what the
    # flash kernel computes), in the input's dtype.
    n, _, h, d = qkv.shape
    b = n // max_seqlen
    q, k, v = (t.transpose(1, 2) for t in qkv.view(b, max_seqlen, 3, h, d).unbind(2))  # [b, h, s, d]
    att = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    out = att.softmax(-1) @ v
    return out.transpose(1, 2).reshape(n, h, d)


def _installed(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a stand-in put there above
        return False


einops = types.ModuleType('einops')
einops.rearrange = _rearrange
flash_attn = types.ModuleType('flash_attn')
flash_attn_interface = types.ModuleType('flash_attn.flash_attn_interface')
flash_attn_interface.flash_attn_varlen_qkvpacked_func = _flash_varlen_qkvpacked
flash_attn.flash_attn_interface = flash_attn_interface
hub = types.ModuleType('huggingface_hub')
hub.PyTorchModelHubMixin = type('PyTorchModelHubMixin', (), {})
omegaconf = types.ModuleType('omegaconf')
omegaconf.OmegaConf = types.SimpleNamespace(create=lambda d: d)
omegaconf.open_dict = None
def install(stand_ins):
    """Puts each (name, module) stand-in into sys.modules unless its top-level package is really
    installed (transformers and datasets need the real huggingface_hub, fsspec, ...)."""
    def stand_in(top):
        return getattr(sys.modules[top], 'is_stand_in', False) if top in sys.modules else not _installed(top)
    missing = {n.split('.')[0] for n, _ in stand_ins if stand_in(n.split('.')[0])}
    for name, mod in stand_ins:
        if name.split('.')[0] in missing and name not in sys.modules:
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # probes (find_spec) see no package files
            mod.is_stand_in = True
            sys.modules[name] = mod


install([('einops', einops), ('flash_attn', flash_attn), ('flash_attn.flash_attn_interface', flash_attn_interface),
         ('huggingface_hub', hub), ('omegaconf', omegaconf)])

if not torch.cuda.is_available():  # the authors wrap the network in CUDA bf16 autocast
    torch.cuda.amp.autocast = lambda *a, **k: contextlib.nullcontext()

if 'SEDD_REF' in os.environ:  # the SEDD generators; mdlm_shims.py imports this module without it
    sys.path.insert(0, os.environ['SEDD_REF'])
