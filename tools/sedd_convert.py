#!/usr/bin/env python3
"""Convert SEDD weights between PyTorch and sedd's model.h5.

  to-h5     IN.{pth,pt,bin,safetensors} OUT.h5 [--n-heads H] [--graph absorb|uniform] [--noise ...]
            Accepts a bare state dict, the official training checkpoint ({'model', 'ema', ...}
            with DDP 'module.' prefixes) or a Hugging Face export. The architecture is read off
            the tensor shapes; only the head count (default hidden/64) and the diffusion settings
            cannot be, so they are options.
  to-torch  IN.h5 OUT.{pth,safetensors} [--ema]
            Writes the state dict under PyTorch names (the same names SEDD's model uses).
"""
import argparse
import sys

import h5py
import numpy as np
import torch


def fail(msg):
    print(f"sedd_convert: error: {msg}", file=sys.stderr)
    sys.exit(2)


def load_torch_file(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return {"model": load_file(path)}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
        fail(f"{path}: cannot read as a PyTorch file ({e})")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        return {"model": obj}
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


def infer_config(sd, args):
    try:
        vocab_dim, hidden = sd["vocab_embed.embedding"].shape
        cond_dim = sd["sigma_map.mlp.0.weight"].shape[0]
    except KeyError as e:
        fail(f"not a SEDD state dict: missing {e}")
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    graph = args.graph
    tokens = vocab_dim - 1 if graph == "absorb" else vocab_dim
    heads = args.n_heads or max(1, hidden // 64)
    cfg = dict(tokens=tokens, graph=graph, hidden_size=hidden, n_heads=heads, n_blocks=n_blocks,
               cond_dim=cond_dim, length=args.length, dropout=0.0,
               scale_by_sigma=int(graph == "absorb" if args.scale_by_sigma is None else args.scale_by_sigma),
               time_conditioning=1, noise=args.noise, eps=args.eps, sigma_min=args.sigma_min,
               sigma_max=args.sigma_max)
    return cfg


def to_h5(args):
    obj = load_torch_file(args.input)
    sd = clean(obj["model"])
    ema = ema_state(obj, sd)
    cfg = infer_config(sd, args)
    with h5py.File(args.output, "w") as f:
        f.attrs["format"] = "sedd-model"
        f.attrs["format_version"] = np.int64(1)
        for k, v in cfg.items():
            f.attrs[k] = v if isinstance(v, str) else (np.float64(v) if isinstance(v, float) else np.int64(v))
        f.attrs["step"] = np.int64(obj.get("step", 0) if isinstance(obj.get("step", 0), int) else 0)
        f.attrs["tokens_seen"] = np.int64(0)
        for group, state in (("model", sd), ("ema", ema)):
            if state is None:
                continue
            g = f.create_group(group)
            for k, v in state.items():
                g.create_dataset(k, data=v.numpy().astype(np.float32))
    print(f"wrote {args.output}: {len(sd)} tensors{' + EMA' if ema else ''}; "
          f"{cfg['n_blocks']}x{cfg['hidden_size']} ({cfg['n_heads']} heads), graph {cfg['graph']}, "
          f"{cfg['tokens']} tokens")


def to_torch(args):
    with h5py.File(args.input, "r") as f:
        group = "ema" if args.ema and "ema" in f else "model"
        if group not in f:
            fail(f"{args.input}: not a sedd model file (no /model group)")
        sd = {k: torch.from_numpy(f[group][k][()]) for k in f[group]}
    if args.output.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, args.output)
    else:
        torch.save(sd, args.output)
    print(f"wrote {args.output}: {len(sd)} tensors from /{group}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-h5")
    a.add_argument("input")
    a.add_argument("output")
    a.add_argument("--n-heads", type=int, default=0)
    a.add_argument("--graph", choices=["absorb", "uniform"], default="absorb")
    a.add_argument("--noise", choices=["loglinear", "geometric"], default="loglinear")
    a.add_argument("--eps", type=float, default=1e-3)
    a.add_argument("--sigma-min", type=float, default=1e-4)
    a.add_argument("--sigma-max", type=float, default=20.0)
    a.add_argument("--length", type=int, default=1024)
    a.add_argument("--scale-by-sigma", type=int, choices=[0, 1], default=None)
    b = sub.add_parser("to-torch")
    b.add_argument("input")
    b.add_argument("output")
    b.add_argument("--ema", action="store_true")
    args = p.parse_args()
    to_h5(args) if args.cmd == "to-h5" else to_torch(args)


if __name__ == "__main__":
    main()
