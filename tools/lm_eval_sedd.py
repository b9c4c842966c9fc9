#!/usr/bin/env python3
"""lm-evaluation-harness adapter: registers the model `sedd` for lm_eval, then runs lm_eval's CLI.

    python tools/lm_eval_sedd.py --model sedd \
        --model_args checkpoint=runs/tiny,mc_samples=8,ranks=2 --tasks lambada_openai

Requests go to the project's executables:
  loglikelihood          -> sedd-score (exact for autoregressive checkpoints, the conditional bound
                            for diffusion ones; is_greedy as sedd-score defines it)
  loglikelihood_rolling  -> sedd-score on the document's consecutive windows of the model's length,
                            each window's tokens the continuation and the document's earlier tokens its
                            context (a full window of a diffusion model keeps no context): the sum over
                            the windows, as sedd-eval bounds a stream window by window
  generate_until         -> sedd-sample with the context as --prefix (the context's last half-window
                            when it does not fit), cut at the first stop string and at max_gen_toks
                            tokens. Diffusion models sample (seeded); they have no greedy decoding.
Model arguments: checkpoint (run folder, checkpoint folder or model.h5), ranks (MPI ranks, 1),
mc_samples (32), device (cpu | cuda | auto; cpu), batch_size (8), seed (0), steps (sampling steps,
128), bin_dir (the executables; default $SEDD_BIN_DIR or build/bin next to this file).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

REPO = Path(__file__).resolve().parent.parent


def model_file(checkpoint):
    """The model.h5 that the executables load for `checkpoint` (as resolve_model_file does)."""
    p = Path(checkpoint)
    if p.is_file():
        return p
    if (p / "model.h5").exists():
        return p / "model.h5"
    latest = p / "checkpoints" / "latest"
    if latest.exists():
        return p / "checkpoints" / latest.read_text().strip() / "model.h5"
    raise FileNotFoundError(f"{checkpoint}: no model.h5 and no checkpoints/latest inside")


class Tokens:
    """The checkpoint's tokenizer on the Python side (for windows and prefixes): bytes or tokenizer.json."""

    def __init__(self, spec):
        self.byte = spec == "byte"
        if not self.byte:
            from tokenizers import Tokenizer
            self.tok = Tokenizer.from_str(spec)

    def encode(self, text):
        return list(text.encode("utf-8")) if self.byte else self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="ignore") if self.byte else self.tok.decode(ids)


@register_model("sedd")
class SeddLM(LM):
    def __init__(self, checkpoint, ranks=1, mc_samples=32, device="cpu", batch_size=8, seed=0, steps=128,
                 bin_dir=None, **unused):
        super().__init__()
        self.checkpoint = str(checkpoint)
        self.ranks = int(ranks)
        self.mc_samples = int(mc_samples)
        self.device_name = str(device)
        self.batch = int(batch_size) if str(batch_size) != "auto" else 8
        self.seed = int(seed)
        self.steps = int(steps)
        self.bin_dir = Path(bin_dir or os.environ.get("SEDD_BIN_DIR") or REPO / "build" / "bin")
        for tool in ("sedd-score", "sedd-sample"):
            if not (self.bin_dir / tool).exists():
                raise FileNotFoundError(f"{self.bin_dir / tool}: not built (give bin_dir=...)")
        with h5py.File(model_file(self.checkpoint), "r") as f:
            self.window = int(f.attrs["length"])
            self.objective = str(f.attrs["objective"])
            spec = f.attrs.get("tokenizer", "")
            spec = spec.decode() if isinstance(spec, bytes) else str(spec)
        self.tokens = Tokens(spec) if spec else None

    # The harness also passes its own --batch_size and --device: model_args win over them.
    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval import utils
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        merged = {k: v for k, v in (additional_config or {}).items() if v is not None}
        merged.update(arg_dict)
        return cls(**merged)

    # --- running the executables ---------------------------------------------------------
    def _launch(self, tool, args):
        cmd = [str(self.bin_dir / tool)] + [str(a) for a in args]
        env = dict(os.environ)
        if self.ranks > 1 or shutil.which("mpirun"):
            cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(self.ranks)] + cmd
            if os.geteuid() == 0:
                env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        return subprocess.run(cmd, env=env, capture_output=True, text=True)

    def _score(self, requests):
        """requests: dicts with context/continuation (text) or *_ids; returns sedd-score's rows."""
        if not requests:
            return []
        with tempfile.TemporaryDirectory(prefix="sedd-lm-eval-") as tmp:
            req, out = Path(tmp) / "requests.jsonl", Path(tmp) / "scores.jsonl"
            with open(req, "w") as f:
                for i, r in enumerate(requests):
                    f.write(json.dumps(dict(r, id=i)) + "\n")
            proc = self._launch("sedd-score", ["--checkpoint", self.checkpoint, "--requests", req, "--out", out,
                                               "--mc-samples", self.mc_samples, "--batch-size", self.batch,
                                               "--seed", self.seed, "--device", self.device_name])
            rows = [json.loads(line) for line in open(out)] if out.exists() else []
        errors = [r["error"] for r in rows if "error" in r]
        if proc.returncode != 0 or errors or len(rows) != len(requests):
            raise RuntimeError(f"sedd-score failed (exit {proc.returncode}): {'; '.join(errors[:3])}\n{proc.stderr}")
        sys.stderr.write("".join(l + "\n" for l in proc.stderr.splitlines() if l.startswith("[score]")))
        return rows

    # --- lm_eval's interface ---------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm=False):
        rows = self._score([{"context": r.args[0], "continuation": r.args[1]} for r in requests])
        return [(row["logprob"], bool(row["is_greedy"])) for row in rows]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        if self.tokens is None:
            raise RuntimeError(f"{self.checkpoint}: the checkpoint stores no tokenizer")
        pieces, owner = [], []
        for d, r in enumerate(requests):
            ids = self.tokens.encode(r.args[0])
            for start in range(0, len(ids), self.window):
                pieces.append({"context_ids": ids[max(0, start - self.window):start],
                               "continuation_ids": ids[start:start + self.window]})
                owner.append(d)
        totals = [0.0] * len(requests)
        for d, row in zip(owner, self._score(pieces)):
            totals[d] += row["logprob"]
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        if self.tokens is None:
            raise RuntimeError(f"{self.checkpoint}: the checkpoint stores no tokenizer")
        outputs = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kwargs.get("max_gen_toks", self.window // 2))
            ids = self.tokens.encode(context)
            if len(ids) > self.window - 1:
                ids = ids[-(self.window // 2):]
            prefix = self.tokens.decode(ids)
            length = max(self.window, len(ids) + max_gen)
            with tempfile.TemporaryDirectory(prefix="sedd-lm-eval-") as tmp:
                out = Path(tmp) / "sample.jsonl"
                args = ["--checkpoint", self.checkpoint, "--num-samples", 1, "--length", length, "--seed", self.seed,
                        "--device", self.device_name, "--out", out]
                if self.objective != "ar":
                    args += ["--steps", self.steps]
                if prefix:
                    args += ["--prefix", prefix]
                proc = self._launch("sedd-sample", args)
                if proc.returncode != 0 or not out.exists():
                    raise RuntimeError(f"sedd-sample failed (exit {proc.returncode}):\n{proc.stderr}")
                sample = json.loads(open(out).readline())
            text = self.tokens.decode(sample["ids"][len(ids):len(ids) + max_gen])
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            outputs.append(text)
        return outputs


def main():
    import lm_eval.models  # noqa: F401  (the built-in models stay available next to `sedd`)
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
