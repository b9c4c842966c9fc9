#!/usr/bin/env python3
"""Convert SEDD and MDLM weights between PyTorch and sedd's model.h5.

  to-h5     IN.{pth,pt,bin,safetensors,ckpt} OUT.h5 [--config config.json|config.yaml] [--n-heads H] ...
            [--tokenizer tokenizer.json] [--no-ema]
            Accepts a bare state dict, the official SEDD training checkpoint ({'model', 'ema', ...}
            with DDP 'module.' prefixes) or a Hugging Face export. The model config comes from
            --config, else (for a bare state dict, as Hugging Face exports are) from the
            config.json beside the input: ours (written by to-torch) or the official SEDD export's;
            a .yaml --config is the official training run's Hydra config (.hydra/config.yaml).
            Flags given on the command line override it. The shapes (and the head count, through
            the rotary buffer) are read off the tensors, and a config or flag that disagrees with
            them is refused; without a config the other settings come from the flags' defaults.
            The MDLM authors' checkpoints become objective "mdlm" models: their PyTorch Lightning
            .ckpt (backbone.* weights, the EMA's shadow_params, the Hydra config and tokenizer in
            hyper_parameters; omegaconf, Lightning and transformers need not be installed) and their
            Hugging Face export (model.safetensors + config.json with model_type "mdlm", as
            kuleshov-group/mdlm-owt). The mask must be the last id (GPT-2's tokenizer: 50257 of
            50258); models of tokenizers with a mask token of their own are refused.
            The EMA weights are written beside the raw ones (/ema; the tools use them unless told
            --no-ema); --no-ema here writes the raw weights only. The tokenizer embedded as the
            `tokenizer` attribute: --tokenizer, else a tokenizer.json beside the input, else the one
            pickled in an MDLM .ckpt.
  to-torch  IN.h5 OUT.{safetensors,bin,pth} [--ema] [--force]
            Writes the state dict under PyTorch names (the same names SEDD's model uses), and beside
            it config.json (every model.h5 config field, model_type "sedd", vocab_size, step,
            tokens_seen) and, when the model carries one, tokenizer.json. --ema writes the EMA
            weights and is refused for a file without them. A config.json or tokenizer.json already
            beside the output is refused unless --force (which replaces them, and removes a
            tokenizer.json that this model does not have: to-h5 would embed it).
"""
import argparse
import json
import os
import sys
import tempfile

import h5py
import numpy as np
import torch

# model.h5 root attributes of the model config, with their types (bool fields are int64 0/1 there).
CONFIG_FIELDS = {
    "tokens": int, "graph": str, "hidden_size": int, "n_heads": int, "n_blocks": int, "cond_dim": int,
    "length": int, "dropout": float, "scale_by_sigma": bool, "time_conditioning": bool, "noise": str,
    "eps": float, "sigma_min": float, "sigma_max": float,
    "objective": str, "timesteps": int, "bos": int,
}
# Fields that older model files lack; they take these values there (SEDD weights).
OPTIONAL_DEFAULTS = {"objective": "sedd", "timesteps": 1000, "bos": -1}
# Read off the tensors; a config must agree with them (n_heads through the rotary buffer, when the
# state dict has it: head dim = 2 * len(inv_freq)).
SHAPE_FIELDS = ("tokens", "hidden_size", "n_blocks", "cond_dim", "n_heads")
# Where the official SEDD Hydra config (and its Hugging Face config.json) keeps our fields.
HYDRA_KEYS = {
    "tokens": ("tokens",), "graph": ("graph", "type"), "hidden_size": ("model", "hidden_size"),
    "n_heads": ("model", "n_heads"), "n_blocks": ("model", "n_blocks"), "cond_dim": ("model", "cond_dim"),
    "length": ("model", "length"), "dropout": ("model", "dropout"), "scale_by_sigma": ("model", "scale_by_sigma"),
    "noise": ("noise", "type"), "eps": ("noise", "eps"), "sigma_min": ("noise", "sigma_min"),
    "sigma_max": ("noise", "sigma_max"),
}
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt")


def fail(msg):
    print(f"sedd_convert: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------- reading

# Modules whose classes a checkpoint may unpickle for real; any other class (omegaconf's DictConfig,
# a transformers tokenizer and its `tokenizers` backend, Lightning's objects, ...) becomes an inert
# stand-in that keeps its pickled state, so a checkpoint converts without those packages (or with
# other versions of them) and no foreign code runs.
TRUSTED_PICKLE_MODULES = ("torch", "collections", "numpy", "_codecs", "copyreg", "datetime",
                          "pathlib", "enum", "functools", "typing", "argparse", "builtins")
UNTRUSTED_BUILTINS = {"eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__", "input",
                      "breakpoint", "globals", "locals", "vars"}


class Pickled:
    """An object of a class not unpickled for real: `state` is what its __setstate__ would have received,
    `args` the arguments it was called (reduced) with, `items`/`elements` what was set or appended."""
    module = name = None

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.state, self.items, self.elements = args, None, {}, []
        return self

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self):
        return f"<{self.module}.{self.name}>"


_PICKLED_CLASSES = {}


class TolerantUnpickler(__import__("pickle").Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] in TRUSTED_PICKLE_MODULES and not (module == "builtins" and name in UNTRUSTED_BUILTINS):
            return super().find_class(module, name)
        key = (module, name)
        if key not in _PICKLED_CLASSES:
            _PICKLED_CLASSES[key] = type(name, (Pickled,), {"module": module, "name": name})
        return _PICKLED_CLASSES[key]


def _tolerant_pickle_module():
    import pickle
    import types
    mod = types.ModuleType("sedd_convert_pickle")
    mod.Unpickler = TolerantUnpickler
    mod.load = lambda f, **kw: TolerantUnpickler(f, **kw).load()
    mod.__dict__.update({k: getattr(pickle, k) for k in ("UnpicklingError", "HIGHEST_PROTOCOL", "dumps", "loads")})
    return mod


def load_torch_file(path):
    """{'model': state dict, ...}; 'bare' is set for a file holding only a state dict, 'lightning' for
    a PyTorch Lightning checkpoint (the MDLM authors' training checkpoints)."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"model": load_file(path), "bare": True}
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            fail(f"{path}: cannot read as a safetensors file ({e})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tolerant_pickle_module())
    except Exception as e:  # noqa: BLE001
        fail(f"{path}: cannot read as a PyTorch file ({e})")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) and (
            "pytorch-lightning_version" in obj or "hyper_parameters" in obj):
        return {"model": obj["state_dict"], "lightning": obj}
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return {"model": obj, "bare": True}
    fail(f"{path}: expected a state dict, a checkpoint with a 'model' entry or a Lightning checkpoint")


def clean(sd):
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "model.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.detach().float().cpu()
    return out


def ema_state(obj, model_sd):
    ema = obj.get("ema")
    if not ema:
        return None
    if isinstance(ema, dict) and "shadow_params" in ema:  # SEDD's ExponentialMovingAverage
        names = [k for k in model_sd if not k.endswith("inv_freq")]  # parameters, in order
        shadow = ema["shadow_params"]
        if len(shadow) != len(names):
            fail(f"EMA has {len(shadow)} tensors, the model {len(names)} parameters")
        sd = dict(zip(names, shadow))
        sd.update({k: v for k, v in model_sd.items() if k.endswith("inv_freq")})
        return clean(sd)
    return clean(ema)


# ----------------------------------------------------------------------------------- MDLM

def plain(obj):
    """A pickled omegaconf container (the MDLM authors' Hydra config) as dicts, lists and values."""
    if isinstance(obj, Pickled):
        state = obj.state if isinstance(obj.state, dict) else {}
        if obj.module.startswith("omegaconf"):
            for key in ("_content", "_val"):
                if key in state:
                    return plain(state[key])
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def nested(cfg, *keys):
    node = cfg
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def mdlm_settings_from_hydra(cfg, args, path):
    """Our config fields from the MDLM authors' Hydra config (a Lightning checkpoint's
    hyper_parameters['config']); what has no counterpart here is refused."""
    where = f"{path} (hyper_parameters.config)"
    backbone = cfg.get("backbone", "dit")
    if backbone != "dit":
        fail(f"{where}: backbone '{backbone}': only the DiT backbone converts")
    parameterization = cfg.get("parameterization", "subs")
    if parameterization != "subs":
        fail(f"{where}: parameterization '{parameterization}': only SUBS (MDLM) checkpoints convert")
    if cfg.get("T") not in (None, 0, "0"):
        fail(f"{where}: T = {cfg['T']} (discrete time): only continuous-time (T = 0) MDLM checkpoints convert")
    out = {"objective": "mdlm", "graph": "absorb", "scale_by_sigma": False,  # SUBS never applies the shift
           "time_conditioning": typed(cfg.get("time_conditioning", False), bool, "time_conditioning", where)}
    for field in ("hidden_size", "n_heads", "n_blocks", "cond_dim", "length", "dropout"):
        value = nested(cfg, "model", field)
        if value is not None:
            out[field] = typed(value, CONFIG_FIELDS[field], "model." + field, where)
    noise = nested(cfg, "noise", "type") or "loglinear"
    if noise in ("loglinear", "cosine"):  # the authors' eps is fixed at 1e-3 for both
        out.update(noise=noise, eps=1e-3)
    elif noise == "geometric":
        out["noise"] = noise
        for field in ("sigma_min", "sigma_max"):
            if nested(cfg, "noise", field) is not None:
                out[field] = typed(nested(cfg, "noise", field), float, "noise." + field, where)
    elif args.noise is None:
        fail(f"{where}: noise '{noise}' has no counterpart here (loglinear, geometric, cosine); pass --noise to choose one")
    return out


def mdlm_settings_from_hf(cfg, path):
    """Our config fields from the config.json of the authors' Hugging Face export (model_type mdlm)."""
    out = {"objective": "mdlm", "graph": "absorb", "scale_by_sigma": False,
           "time_conditioning": typed(cfg.get("time_conditioning", False), bool, "time_conditioning", path)}
    for ours, theirs in (("hidden_size", "hidden_dim"), ("n_heads", "n_heads"), ("n_blocks", "n_blocks"),
                         ("cond_dim", "cond_dim"), ("length", "model_length"), ("dropout", "dropout")):
        if cfg.get(theirs) is not None:
            out[ours] = typed(cfg[theirs], CONFIG_FIELDS[ours], theirs, path)
    if cfg.get("vocab_size") is not None:
        out["vocab_size"] = typed(cfg["vocab_size"], int, "vocab_size", path)
    return out


def mdlm_ema(lightning, model_sd, path):
    """The EMA of a Lightning checkpoint: models.ema.ExponentialMovingAverage.state_dict(), whose
    shadow_params follow itertools.chain(backbone.parameters(), noise.parameters()); the backbone's
    parameters are its state dict less the rotary buffer, in order."""
    ema = lightning.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), (list, tuple)):
        return None
    names = [k for k in model_sd if not k.endswith("inv_freq")]
    shadow = ema["shadow_params"]
    if len(shadow) < len(names):
        fail(f"{path}: ema.shadow_params has {len(shadow)} tensors, the backbone {len(names)} parameters")
    out = {}
    for i, name in enumerate(names):
        if not torch.is_tensor(shadow[i]) or tuple(shadow[i].shape) != tuple(model_sd[name].shape):
            got = tuple(shadow[i].shape) if torch.is_tensor(shadow[i]) else type(shadow[i]).__name__
            fail(f"{path}: ema.shadow_params[{i}] is {got} but backbone parameter {name} is "
                 f"{tuple(model_sd[name].shape)} (not this model's EMA?)")
        out[name] = shadow[i].detach().float().cpu()
    return out


def pickled_tokenizer(obj, depth=0):
    """(tokenizer.json text, mask token or None) of a pickled Hugging Face tokenizer (a Lightning
    checkpoint's hyper_parameters['tokenizer']): its `tokenizers` backend, which pickles as its
    tokenizer.json text, and its mask token."""
    if isinstance(obj, Pickled) and obj.module == "tokenizers" and obj.name == "Tokenizer":
        state = obj.state.decode("utf-8", "replace") if isinstance(obj.state, bytes) else obj.state
        return (state, None) if isinstance(state, str) else (None, None)
    if depth > 3:
        return None, None
    state = obj.state if isinstance(obj, Pickled) and isinstance(obj.state, dict) else obj if isinstance(obj, dict) else {}
    text = None
    for value in state.values():
        if isinstance(value, (Pickled, dict)):
            text, _ = pickled_tokenizer(value, depth + 1)
            if text:
                break
    if not text:
        return None, None
    # transformers 4.x keeps the mask token as _mask_token, 5.x in _special_tokens_map.
    candidates = [state.get("_mask_token"), nested(state, "_special_tokens_map", "mask_token"),
                  nested(state, "init_kwargs", "mask_token")]
    for c in candidates:
        if isinstance(c, Pickled) and isinstance(c.state, dict):
            c = c.state.get("content")
        c = getattr(c, "content", c)
        if isinstance(c, str) and c:
            return text, c
    return text, None


def check_mask_last(rows, tokenizer_json, mask_token, where, input_path):
    """MDLM's mask is the tokenizer's own mask token when it has one (bert-base-uncased: [MASK] = 103
    of 30522), else one id past its vocabulary (GPT-2: 50257 of 50258); sedd's absorbing state is the
    last id. Without a mask token known, a special [MASK]/<mask> token of the tokenizer.json counts."""
    from tokenizers import Tokenizer
    try:
        backend = Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # noqa: BLE001
        fail(f"{where}: not a tokenizer.json the tokenizers library reads ({e}); pass --tokenizer")
    size = backend.get_vocab_size(with_added_tokens=False)
    if mask_token is None:
        specials = [t.get("content") for t in json.loads(tokenizer_json).get("added_tokens") or [] if t.get("special")]
        mask_token = next((t for t in specials if t in ("[MASK]", "<mask>")), None)
    if mask_token is not None:
        mask_id = backend.token_to_id(mask_token)
        if mask_id is not None and mask_id != rows - 1:
            fail(f"{input_path}: the mask is the tokenizer's own {mask_token!r} = id {mask_id} of the model's {rows}, "
                 f"not the last id (tokenizer: {where}); sedd keeps the absorbing mask last, so MDLM models of "
                 f"tokenizers with a mask token of their own (as bert-base-uncased) do not convert")
        if mask_id is not None:
            return
    if rows != size + 1:
        fail(f"{input_path}: the model has {rows} ids, but the tokenizer ({where}) has {size} and no mask "
             f"token, so MDLM's mask would be id {size}: another tokenizer?")


def rotary_inv_freq(hidden_size, n_heads):
    """The rotary buffer both DiTs register (models/dit.py Rotary); absent from some exports."""
    dim = hidden_size // n_heads
    return 1.0 / (10_000 ** (torch.arange(0, dim, 2).float() / dim))


def tensor_shapes(sd, path):
    """The fields the state dict fixes: vocabulary rows, hidden size, cond dim, blocks, heads."""
    try:
        vocab_dim, hidden = sd["vocab_embed.embedding"].shape
        cond_dim = sd["sigma_map.mlp.0.weight"].shape[0]
    except KeyError as e:
        fail(f"{path}: not a SEDD state dict: missing {e}")
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    shapes = dict(vocab_dim=int(vocab_dim), hidden_size=int(hidden), cond_dim=int(cond_dim), n_blocks=n_blocks)
    rotary = sd.get("rotary_emb.inv_freq")
    if rotary is not None and rotary.numel() > 0 and hidden % (2 * rotary.numel()) == 0:
        shapes["n_heads"] = int(hidden // (2 * rotary.numel()))
    return shapes


def read_config_file(path):
    """A config file as a dict: JSON, or YAML for .yaml/.yml (the Hydra config of a training run)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith((".yaml", ".yml")):
                try:
                    import yaml
                except ImportError:
                    fail(f"{path}: reading a YAML config needs PyYAML (pip install pyyaml)")
                cfg = yaml.safe_load(f)
            else:
                cfg = json.load(f)
    except OSError as e:
        fail(f"{path}: cannot read the config ({e.strerror})")
    except Exception as e:  # noqa: BLE001 - JSON and YAML syntax errors alike
        fail(f"{path}: not a valid config file ({e})")
    if not isinstance(cfg, dict):
        fail(f"{path}: expected a mapping of config fields at the top level")
    return cfg


def typed(value, kind, field, path):
    """`value` as `kind`; YAML 1.1 reads 1e-4 as a string, so numbers may arrive as text."""
    try:
        if kind is bool:
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, str):
            raise ValueError
        return value
    except (TypeError, ValueError):
        fail(f"{path}: field '{field}' must be {kind.__name__}, got {value!r}")


def settings_from_config(cfg, path):
    """Our config fields from a config dict: ours (flat) or the official SEDD nested/Hydra form."""
    out = {}
    if isinstance(cfg.get("model"), dict):
        for field, keys in HYDRA_KEYS.items():
            node = cfg
            for k in keys:
                node = node.get(k) if isinstance(node, dict) else None
            if node is not None:
                out[field] = typed(node, CONFIG_FIELDS[field], ".".join(keys), path)
    else:
        for field, kind in CONFIG_FIELDS.items():
            if cfg.get(field) is not None:
                out[field] = typed(cfg[field], kind, field, path)
        if cfg.get("vocab_size") is not None:
            out["vocab_size"] = typed(cfg["vocab_size"], int, "vocab_size", path)
    for field in ("step", "tokens_seen"):
        if cfg.get(field) is not None:
            out[field] = typed(cfg[field], int, field, path)
    if isinstance(cfg.get("tokenizer"), str):
        out["tokenizer"] = cfg["tokenizer"]
    return out


def config_beside(input_path):
    beside = os.path.join(os.path.dirname(os.path.abspath(input_path)), "config.json")
    return beside if os.path.exists(beside) else None


def resolve_config(shapes, args, input_path, bare, preset=None):
    """Defaults < config file < flags; the tensor shapes are checked against the config. Without
    --config, a bare state dict (as Hugging Face exports are) takes the config.json beside it;
    a training checkpoint's settings live in its run's Hydra config, which --config names.
    `preset` = (settings, where they came from) replaces the config file (MDLM inputs)."""
    if preset:
        given, config_path = preset
    else:
        config_path = args.config or (config_beside(input_path) if bare else None)
        given = settings_from_config(read_config_file(config_path), config_path) if config_path else {}

    # Each value's source, for messages: the config file, or the flag that overrode it.
    source = {k: config_path for k in given}
    flags = {k: v for k, v in dict(
        n_heads=args.n_heads, graph=args.graph, noise=args.noise, eps=args.eps, sigma_min=args.sigma_min,
        sigma_max=args.sigma_max, length=args.length, dropout=args.dropout,
        scale_by_sigma=None if args.scale_by_sigma is None else bool(args.scale_by_sigma),
        time_conditioning=None if args.time_conditioning is None else bool(args.time_conditioning),
    ).items() if v is not None}
    source.update({k: "--" + k.replace("_", "-") for k in flags})
    cfg = {k: v for k, v in given.items() if k in CONFIG_FIELDS}
    cfg.update(flags)
    cfg.setdefault("graph", "absorb")
    absorb = cfg["graph"] == "absorb" and cfg.get("objective", "sedd") != "ar"  # a mask column in the output
    inferred = dict(tokens=shapes["vocab_dim"] - (1 if absorb else 0),
                    **{k: shapes[k] for k in SHAPE_FIELDS if k in shapes})
    for field in SHAPE_FIELDS:
        if field in cfg and field in inferred and cfg[field] != inferred[field]:
            fail(f"{source[field]}: {field} is {cfg[field]} but the weights in {input_path} have {inferred[field]} "
                 f"(vocab_embed.embedding is [{shapes['vocab_dim']}, {shapes['hidden_size']}], "
                 f"{shapes['n_blocks']} blocks, cond_dim {shapes['cond_dim']}"
                 f"{', head dim 2 x len(rotary_emb.inv_freq)' if 'n_heads' in shapes else ''})")
    if "vocab_size" in given and given["vocab_size"] != shapes["vocab_dim"]:
        fail(f"{config_path}: vocab_size is {given['vocab_size']} but the weights in {input_path} have "
             f"{shapes['vocab_dim']} embedding rows")
    defaults = dict(n_heads=max(1, shapes["hidden_size"] // 64), length=1024, dropout=0.0, scale_by_sigma=absorb,
                    time_conditioning=True, noise="loglinear", eps=1e-3, sigma_min=1e-4, sigma_max=20.0,
                    **OPTIONAL_DEFAULTS)
    cfg = {**defaults, **inferred, **cfg}
    if cfg["graph"] not in ("absorb", "uniform"):
        fail(f"{source.get('graph', '--graph')}: graph must be absorb or uniform, got '{cfg['graph']}'")
    if cfg["noise"] not in ("loglinear", "geometric", "cosine"):
        fail(f"{source.get('noise', '--noise')}: noise must be loglinear, geometric or cosine, got '{cfg['noise']}'")
    if cfg["hidden_size"] % cfg["n_heads"] != 0:
        fail(f"{source.get('n_heads', '--n-heads')}: n_heads {cfg['n_heads']} does not divide hidden_size {cfg['hidden_size']}")
    return cfg, given, config_path


# ----------------------------------------------------------------------------------- writing

def write_atomically(outputs):
    """outputs: [(path, write(tmp_path))]. Every file is written under a temporary name first and
    renamed only when all were written, so a failure leaves nothing half-written."""
    for path, _ in outputs:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            fail(f"{path}: the folder {folder} does not exist")
    umask = os.umask(0)
    os.umask(umask)
    done = []
    try:
        for path, write in outputs:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                       prefix="." + os.path.basename(path) + ".")
            os.close(fd)
            done.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private
    except BaseException:
        for tmp, _ in done:
            os.unlink(tmp)
        raise
    for tmp, path in done:
        os.replace(tmp, path)


def text_writer(text):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def h5_attr(value):
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return np.float64(value)
    return np.int64(value)


def read_text_file(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        json.loads(text)
    except OSError as e:
        fail(f"{path}: cannot read the {what} ({e.strerror})")
    except ValueError as e:
        fail(f"{path}: not valid JSON ({e})")
    return text


def mdlm_input(obj, args):
    """For the MDLM authors' checkpoints: (state dict, EMA or None, preset config, step, tokens seen,
    pickled tokenizer (json, mask token) or None); None for any other input. A Lightning .ckpt
    (state_dict with backbone.*, ema, hyper_parameters) or their Hugging Face export (model_type mdlm
    in the config.json beside it, tensors under backbone.*)."""
    path = args.input
    lightning = obj.get("lightning")
    if lightning is not None:
        raw = obj["model"]
        if not any(k.startswith("backbone.") for k in raw):
            fail(f"{path}: a Lightning checkpoint without backbone.* weights (not an MDLM checkpoint)")
        sd = clean({k: v for k, v in raw.items() if k.startswith("backbone.")})
        hparams = plain(lightning.get("hyper_parameters"))
        cfg = hparams.get("config") if isinstance(hparams, dict) else None
        if cfg is None and isinstance(hparams, dict) and isinstance(hparams.get("model"), dict):
            cfg = hparams  # hyper-parameters saved as the config itself
        if not isinstance(cfg, dict):
            fail(f"{path}: no hyper_parameters['config'] (the MDLM run's Hydra config); cannot tell the model's settings")
        given = mdlm_settings_from_hydra(cfg, args, path)
        step = lightning.get("global_step") if isinstance(lightning.get("global_step"), int) else 0
        batch, length = nested(cfg, "loader", "global_batch_size"), given.get("length")
        tokens_seen = step * batch * length if isinstance(batch, int) and isinstance(length, int) else 0
        ema = mdlm_ema(lightning, sd, path)
        if ema is None and not args.no_ema:
            fail(f"{path}: the checkpoint holds no EMA weights (no 'ema' entry: trained with training.ema = 0?); "
                 f"pass --no-ema to convert the raw weights")
        tokenizer = pickled_tokenizer(hparams.get("tokenizer")) if isinstance(hparams, dict) else (None, None)
        return sd, ema, (given, f"{path} (hyper_parameters)"), step, tokens_seen, tokenizer
    keys = obj["model"].keys()
    config_path = args.config or (config_beside(path) if obj.get("bare") else None)
    if not any(k.startswith("backbone.") for k in keys):
        if not config_path or config_path.endswith((".yaml", ".yml")):
            return None
        if read_config_file(config_path).get("model_type") != "mdlm":
            return None
    if not config_path:
        fail(f"{path}: MDLM weights (backbone.*) without their config.json: none beside it in "
             f"{os.path.dirname(os.path.abspath(path))}; put the export's config.json there or pass --config")
    cfg = read_config_file(config_path)
    if cfg.get("model_type", "mdlm") != "mdlm":
        fail(f"{config_path}: model_type is '{cfg.get('model_type')}' but {path} holds MDLM weights (backbone.*)")
    return clean(obj["model"]), None, (mdlm_settings_from_hf(cfg, config_path), config_path), 0, 0, (None, None)


def to_h5(args):
    obj = load_torch_file(args.input)
    mdlm = mdlm_input(obj, args)
    if mdlm:
        sd, ema, preset, step, tokens_seen, (pickled_json, mask_token) = mdlm
    else:
        sd = clean(obj["model"])
        ema = ema_state(obj, sd)
        preset, tokens_seen, pickled_json, mask_token = None, None, None, None
        step = obj.get("step") if isinstance(obj.get("step"), int) else None
    if args.no_ema:
        ema = None
    cfg, given, config_path = resolve_config(tensor_shapes(sd, args.input), args, args.input, obj.get("bare", False),
                                             preset)
    if step is None:
        step = given.get("step", 0)
    if tokens_seen is None:
        tokens_seen = given.get("tokens_seen", 0)
    # The rotary buffer: some exports leave it out; the loader wants every tensor of the model.
    for state in (sd, ema):
        if state is not None and "rotary_emb.inv_freq" not in state:
            state["rotary_emb.inv_freq"] = rotary_inv_freq(cfg["hidden_size"], cfg["n_heads"])
    tokenizer, tokenizer_from = given.get("tokenizer"), config_path
    beside = os.path.join(os.path.dirname(os.path.abspath(args.input)), "tokenizer.json")
    if args.tokenizer:
        tokenizer, tokenizer_from = read_text_file(args.tokenizer, "tokenizer"), args.tokenizer
    elif os.path.exists(beside):
        tokenizer, tokenizer_from = read_text_file(beside, "tokenizer"), beside
    elif pickled_json:
        tokenizer, tokenizer_from = pickled_json, f"{args.input} (hyper_parameters['tokenizer'])"
    if mdlm and tokenizer and tokenizer != "byte":
        # A tokenizer given beside the checkpoint says nothing of the pickled one's mask token.
        check_mask_last(sd["vocab_embed.embedding"].shape[0], tokenizer,
                        mask_token if tokenizer == pickled_json else None, tokenizer_from, args.input)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "sedd-model"
            f.attrs["format_version"] = np.int64(1)
            for k, kind in CONFIG_FIELDS.items():
                f.attrs[k] = h5_attr(int(cfg[k]) if kind is bool else kind(cfg[k]))
            f.attrs["step"] = np.int64(step)
            f.attrs["tokens_seen"] = np.int64(tokens_seen)
            if tokenizer:
                f.attrs["tokenizer"] = tokenizer
            for group, state in (("model", sd), ("ema", ema)):
                if state is None:
                    continue
                g = f.create_group(group)
                for k, v in state.items():
                    g.create_dataset(k, data=v.numpy().astype(np.float32))
    write_atomically([(args.output, write)])
    print(f"wrote {args.output}: {len(sd)} tensors{' + EMA' if ema else ''}; "
          f"{cfg['n_blocks']}x{cfg['hidden_size']} ({cfg['n_heads']} heads), graph {cfg['graph']}, "
          f"{cfg['tokens']} tokens, objective {cfg['objective']}; config from "
          f"{config_path or 'the tensor shapes and flags'}; tokenizer: {tokenizer_from if tokenizer else 'none'}")


def to_torch(args):
    if not args.output.endswith(WEIGHT_EXTENSIONS):
        fail(f"{args.output}: the output must end in one of {', '.join(WEIGHT_EXTENSIONS)}")
    try:
        f = h5py.File(args.input, "r")
    except OSError as e:
        fail(f"{args.input}: cannot read as HDF5 ({e})")
    with f:
        if "model" not in f:
            fail(f"{args.input}: not a sedd model file (no /model group)")
        # Raw weights in place of the EMA asked for would be a silently different model.
        if args.ema and "ema" not in f:
            fail(f"{args.input}: --ema, but the file holds no EMA weights (no /ema group); "
                 f"drop --ema to write the raw weights")
        group = "ema" if args.ema else "model"
        sd = {k: torch.from_numpy(f[group][k][()]) for k in f[group]}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    attrs = {**OPTIONAL_DEFAULTS, **attrs}
    missing = [k for k in CONFIG_FIELDS if k not in attrs]
    if missing:
        fail(f"{args.input}: model config attributes missing: {', '.join(missing)}")
    config = {"model_type": "sedd"}
    for k, kind in CONFIG_FIELDS.items():
        config[k] = kind(attrs[k].item() if hasattr(attrs[k], "item") else attrs[k])
    config["vocab_size"] = config["tokens"] + (1 if config["graph"] == "absorb" and config["objective"] != "ar" else 0)
    for k in ("step", "tokens_seen"):
        config[k] = int(attrs.get(k, 0))
    tokenizer_json = None
    tokenizer = attrs.get("tokenizer")
    if isinstance(tokenizer, str):
        try:
            json.loads(tokenizer)
            tokenizer_json = tokenizer
        except ValueError:
            config["tokenizer"] = tokenizer  # "byte": no file of its own

    folder = os.path.dirname(os.path.abspath(args.output))
    config_path, tokenizer_path = os.path.join(folder, "config.json"), os.path.join(folder, "tokenizer.json")
    # Files beside the output belong to whatever was converted there before: replace them only when told.
    if not args.force:
        for path in (config_path, tokenizer_path):
            if os.path.lexists(path):
                fail(f"{path} already exists beside the output "
                     f"(from another conversion?); pass --force to replace it, or write into another folder")
    if args.output.endswith(".safetensors"):
        from safetensors.torch import save_file
        outputs = [(args.output, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))]
    else:
        outputs = [(args.output, lambda tmp: torch.save(sd, tmp))]
    outputs.append((config_path, text_writer(json.dumps(config, indent=2) + "\n")))
    if tokenizer_json:
        outputs.append((tokenizer_path, text_writer(tokenizer_json)))
    write_atomically(outputs)
    if not tokenizer_json and os.path.lexists(tokenizer_path):  # --force: another model's tokenizer
        os.unlink(tokenizer_path)
    print(f"wrote {args.output}: {len(sd)} tensors from /{group}; config.json"
          f"{' and tokenizer.json' if tokenizer_json else ''} beside it")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-h5", help="PyTorch weights -> model.h5")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--config", help="config.json (ours or the official export's) or a Hydra config.yaml; "
                                    "default: config.json beside a bare state dict")
    a.add_argument("--n-heads", type=int, help="default: from the rotary buffer, else hidden_size / 64")
    a.add_argument("--graph", choices=["absorb", "uniform"], help="default: absorb")
    a.add_argument("--noise", choices=["loglinear", "geometric", "cosine"], help="default: loglinear")
    a.add_argument("--eps", type=float, help="default: 1e-3")
    a.add_argument("--sigma-min", type=float, help="default: 1e-4")
    a.add_argument("--sigma-max", type=float, help="default: 20")
    a.add_argument("--length", type=int, help="default: 1024")
    a.add_argument("--dropout", type=float, help="default: 0")
    a.add_argument("--scale-by-sigma", type=int, choices=[0, 1], help="default: 1 for absorb, else 0")
    a.add_argument("--time-conditioning", type=int, choices=[0, 1],
                   help="default: 1 (MDLM inputs: their config's, else 0)")
    a.add_argument("--tokenizer", help="tokenizer.json to embed (default: the one beside the input, else the one "
                                       "pickled in an MDLM Lightning checkpoint)")
    a.add_argument("--no-ema", action="store_true",
                   help="write the raw weights only (default: the EMA too, which the tools use by default; "
                        "an MDLM Lightning checkpoint without one is refused unless --no-ema)")
    b = sub.add_parser("to-torch", help="model.h5 -> PyTorch weights + config.json")
    b.add_argument("input")
    b.add_argument("output")
    b.add_argument("--ema", action="store_true", help="write the EMA weights (refused when the file has none)")
    b.add_argument("--force", action="store_true",
                   help="replace a config.json / tokenizer.json already beside the output")
    args = p.parse_args()
    to_h5(args) if args.cmd == "to-h5" else to_torch(args)


if __name__ == "__main__":
    main()
