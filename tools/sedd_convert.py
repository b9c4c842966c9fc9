#!/usr/bin/env python3
"""Convert SEDD weights between PyTorch and sedd's model.h5.

  to-h5     IN.{pth,pt,bin,safetensors} OUT.h5 [--config config.json|config.yaml] [--n-heads H] ...
            Accepts a bare state dict, the official training checkpoint ({'model', 'ema', ...}
            with DDP 'module.' prefixes) or a Hugging Face export. The model config comes from
            --config, else (for a bare state dict, as Hugging Face exports are) from the
            config.json beside the input: ours (written by to-torch) or the official SEDD export's;
            a .yaml --config is the official training run's Hydra config (.hydra/config.yaml).
            Flags given on the command line override it. The shapes (and the head count, through
            the rotary buffer) are read off the tensors, and a config or flag that disagrees with
            them is refused; without a config the other settings come from the flags' defaults.
            A tokenizer.json beside the input is embedded as the `tokenizer` attribute.
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

def load_torch_file(path):
    """{'model': state dict, ...}; 'bare' is set for a file holding only a state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return {"model": load_file(path), "bare": True}
        except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
            fail(f"{path}: cannot read as a safetensors file ({e})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        fail(f"{path}: cannot read as a PyTorch file ({e})")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return {"model": obj, "bare": True}
    fail(f"{path}: expected a state dict or a checkpoint with a 'model' entry")


def clean(sd):
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "model."):
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


def resolve_config(shapes, args, input_path, bare):
    """Defaults < config file < flags; the tensor shapes are checked against the config. Without
    --config, a bare state dict (as Hugging Face exports are) takes the config.json beside it;
    a training checkpoint's settings live in its run's Hydra config, which --config names."""
    config_path = args.config
    if not config_path and bare:
        beside = os.path.join(os.path.dirname(os.path.abspath(input_path)), "config.json")
        config_path = beside if os.path.exists(beside) else None
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


def to_h5(args):
    obj = load_torch_file(args.input)
    sd = clean(obj["model"])
    ema = ema_state(obj, sd)
    cfg, given, config_path = resolve_config(tensor_shapes(sd, args.input), args, args.input, obj.get("bare", False))
    step = obj.get("step") if isinstance(obj.get("step"), int) else given.get("step", 0)
    tokenizer = given.get("tokenizer")
    beside = os.path.join(os.path.dirname(os.path.abspath(args.input)), "tokenizer.json")
    if os.path.exists(beside):
        with open(beside, encoding="utf-8") as f:
            tokenizer = f.read()
        try:
            json.loads(tokenizer)
        except ValueError as e:
            fail(f"{beside}: not valid JSON ({e})")

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "sedd-model"
            f.attrs["format_version"] = np.int64(1)
            for k, kind in CONFIG_FIELDS.items():
                f.attrs[k] = h5_attr(int(cfg[k]) if kind is bool else kind(cfg[k]))
            f.attrs["step"] = np.int64(step)
            f.attrs["tokens_seen"] = np.int64(given.get("tokens_seen", 0))
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
          f"{cfg['tokens']} tokens; config from {config_path or 'the tensor shapes and flags'}")


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
    a.add_argument("--time-conditioning", type=int, choices=[0, 1], help="default: 1")
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
