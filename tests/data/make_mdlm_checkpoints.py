"""Writes tests/data/mdlm_checkpoints/: small checkpoints in the two layouts the MDLM authors publish,
made by their own classes, and what their code computes from them, for the tests of
`tools/sedd_convert.py to-h5` on MDLM inputs (tests/mdlm_convert_test.cpp).

  lightning.ckpt      the layout of their PyTorch Lightning training checkpoints (diffusion.py:
                      on_save_checkpoint): `state_dict` = their models.dit.DIT's state dict under
                      `backbone.` (+ `noise.`, empty for log-linear), `ema` = their
                      models.ema.ExponentialMovingAverage.state_dict() after 3 update() calls on
                      perturbed weights (so EMA != raw), `hyper_parameters` = {'config': the run's
                      omegaconf DictConfig (their configs/config.yaml with model, noise and data
                      composed in; the model shrunk; time_conditioning True), 'tokenizer': a
                      transformers PreTrainedTokenizerFast (byte-level BPE, 49 ids, no mask token, so
                      MDLM's mask is id 49 of 50, as GPT-2's 50257 of 50258)}, and Lightning's
                      bookkeeping keys. No Lightning Trainer runs here: the dict is the one
                      Trainer.save_checkpoint would write, with an empty optimizer state (the Adam
                      moments would only make the file larger).
  no_ema.ckpt         the same layout without `ema` (training.ema = 0), a smaller model.
  mask_inside.ckpt    the same layout with a WordPiece tokenizer whose [MASK] is id 3 of 50 (as
                      bert-base-uncased's [MASK] = 103 of 30522): MDLM's mask is then not the last id.
  hf/model.safetensors, hf/config.json
                      their Hugging Face export (as kuleshov-group/mdlm-owt): MDLM(MDLMConfig) from the
                      hub's modeling_mdlm.py / configuration_mdlm.py holding the EMA weights, written by
                      save_pretrained (time_conditioning False).
  expected.h5         /input/indices [2, 16] (some positions = the mask 49), /input/sigma [2];
                      /lightning/{ema,raw}/{logits,subs} = their DIT's output and
                      Diffusion._subs_parameterization's log-probabilities (float32) for the EMA
                      weights (ema.copy_to) and the raw ones; /hf/{logits,subs} = their HF MDLM's;
                      root attributes mask_index, tokenizer_json (the pickled tokenizer's backend).

The hub's modeling_mdlm.py / configuration_mdlm.py are not in the GitHub repository. The copies used
(under $MDLM_HF, outside this repository) were found through a public code-search index:
configuration_mdlm.py in the authors' style, and a "CPU-compatible fork" of modeling_mdlm.py whose
docstring names its patches (flash-attention's varlen kernel -> torch's scaled_dot_product_attention,
flash-attention's rotary kernel -> the same rotation in plain torch, no CUDA bf16 autocast), which
change no value on a CPU in float32. The real files are the hub's (huggingface.co/kuleshov-group/mdlm-owt).

Run (authors' commit c112c52 at /tmp/mdlm-ref; omegaconf 2.3.0, their pin, and transformers importable):
  pip install --target /tmp/gen-pkgs omegaconf==2.3.0
  PYTHONPATH=/tmp/gen-pkgs MDLM_REF=/tmp/mdlm-ref MDLM_HF=/tmp/mdlm-hf .venv/bin/python \
      tests/data/make_mdlm_checkpoints.py tests/data/mdlm_checkpoints
"""
import importlib.util
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mdlm_shims  # noqa: E402,F401  (first: stand-ins for flash_attn, lightning, ...)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import omegaconf  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models as tok_models, normalizers, pre_tokenizers  # noqa: E402

import diffusion  # noqa: E402
import models.dit  # noqa: E402
import models.ema  # noqa: E402
import noise_schedule  # noqa: E402

assert not getattr(omegaconf, "is_stand_in", False), "the real omegaconf is needed (see the docstring)"

MASK = 49  # GPT-2-like tokenizer: 49 ids, no mask token -> MDLM's mask = tokenizer.vocab_size
MODEL = dict(hidden_size=24, n_heads=4, n_blocks=2, cond_dim=16, length=16, dropout=0.1)
TINY = dict(hidden_size=4, n_heads=2, n_blocks=1, cond_dim=4, length=16, dropout=0.1)


def import_hub_code():
    folder = os.environ["MDLM_HF"]
    spec = importlib.util.spec_from_file_location("mdlm_hf", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules["mdlm_hf"] = package
    spec.loader.exec_module(package)
    import mdlm_hf.modeling_mdlm as modeling  # noqa: E402
    return modeling


def hydra_config(model, time_conditioning, data, ema):
    """Their configs/config.yaml with the model, noise and data groups composed in (as Hydra does),
    interpolations left unresolved, as the Diffusion module receives and pickles it."""
    ref = os.environ["MDLM_REF"]
    cfg = omegaconf.OmegaConf.load(os.path.join(ref, "configs/config.yaml"))
    for key in ("defaults", "hydra"):
        cfg.pop(key)
    cfg.model = omegaconf.OmegaConf.load(os.path.join(ref, "configs/model/small.yaml"))
    cfg.noise = omegaconf.OmegaConf.load(os.path.join(ref, "configs/noise/loglinear.yaml"))
    cfg.data = omegaconf.OmegaConf.load(os.path.join(ref, f"configs/data/{data}.yaml"))
    for k, v in model.items():
        cfg.model[k] = v
    cfg.time_conditioning = time_conditioning
    cfg.training.ema = ema
    return cfg


def gpt2_like_tokenizer():
    """Byte-level BPE as GPT-2's: 48 byte symbols + <|endoftext|>, no mask token."""
    chars = "abcdefghijklmnopqrstuvwxyz .,'\nABCDEFGHIJKLMNOPQ"
    byte_to_unicode = bytes_to_unicode()
    vocab = {byte_to_unicode[ord(ch)]: i for i, ch in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == 49
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def bert_like_tokenizer():
    """WordPiece with its own [MASK] (id 3 of 50), as bert-base-uncased's."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]"])}
    for w in "the a of and to in is was for on with as by at from it that this be are an or".split():
        vocab[w] = len(vocab)
    while len(vocab) < 50:
        vocab[f"##{len(vocab)}"] = len(vocab)
    tok = Tokenizer(tok_models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def random_dit(cfg, vocab_size, seed):
    torch.manual_seed(seed)
    dit = models.dit.DIT(cfg, vocab_size=vocab_size)
    with torch.no_grad():  # their init zeroes adaLN and the output layer: redraw everything
        for name, p in dit.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return dit.eval()


def lightning_checkpoint(dit, noise, cfg, tokenizer, ema, step):
    """The dict Lightning's Trainer.save_checkpoint writes for their Diffusion module."""
    state = {"backbone." + k: v for k, v in dit.state_dict().items()}
    state.update({"noise." + k: v for k, v in noise.state_dict().items()})
    n_params = len(list(dit.parameters()))
    ckpt = {
        "epoch": 0, "global_step": step, "pytorch-lightning_version": "2.2.1", "state_dict": state,
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 0}},
                               "epoch_loop.batch_progress": {"current": {"completed": step},
                                                             "total": {"completed": step}}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": [
            {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "params": list(range(n_params))}]}],
        "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": step, "_step_count": step + 1}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": cfg, "tokenizer": tokenizer},
        "sampler": {"random_state": None},
    }
    if ema is not None:  # diffusion.py on_save_checkpoint
        ckpt["ema"] = ema.state_dict()
    return ckpt


def subs_model(mask_index, time_conditioning, backbone):
    """Their Diffusion module with only what forward() reads (its __init__ downloads an evaluation
    model); mask_index as __init__ sets it for a tokenizer without a mask token."""
    d = diffusion.Diffusion.__new__(diffusion.Diffusion)
    torch.nn.Module.__init__(d)
    d.backbone = backbone
    d.mask_index = mask_index
    d.neg_infinity = -1000000.0
    d.parameterization = "subs"
    d.time_conditioning = time_conditioning
    return d.eval()


def main(out):
    os.makedirs(os.path.join(out, "hf"), exist_ok=True)
    tokenizer = gpt2_like_tokenizer()
    assert tokenizer.mask_token is None and tokenizer.vocab_size == MASK
    vocab_size = tokenizer.vocab_size + 1  # diffusion.py __init__: no mask token -> mask = vocab_size

    cfg = hydra_config(MODEL, True, "openwebtext", 0.9999)
    dit = random_dit(cfg, vocab_size, 0)
    noise = noise_schedule.get_noise(cfg)
    ema = models.ema.ExponentialMovingAverage(itertools.chain(dit.parameters(), noise.parameters()), decay=0.9)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):  # training steps: the raw weights move, the EMA follows at a distance
            for p in dit.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            ema.update(itertools.chain(dit.parameters(), noise.parameters()))
    torch.save(lightning_checkpoint(dit, noise, cfg, tokenizer, ema, 3), os.path.join(out, "lightning.ckpt"))

    indices = torch.randint(0, MASK, (2, 16), generator=gen)
    indices[torch.rand(2, 16, generator=gen) < 0.5] = MASK
    indices[0, 0], indices[1, 5] = MASK, 7  # both kinds in each row
    sigma = torch.tensor([0.4, 2.1])
    results = {}
    with torch.no_grad():
        raw_logits = dit(indices, sigma)
        raw_subs = subs_model(MASK, True, dit)(indices.clone(), sigma)
        dit_ema = random_dit(cfg, vocab_size, 0)
        ema.copy_to(itertools.chain(dit_ema.parameters(), noise.parameters()))
        results["lightning/ema/logits"] = dit_ema(indices, sigma)
        results["lightning/ema/subs"] = subs_model(MASK, True, dit_ema)(indices.clone(), sigma)
        results["lightning/raw/logits"], results["lightning/raw/subs"] = raw_logits, raw_subs
    assert (results["lightning/ema/logits"] - raw_logits).abs().max() > 0.1, "EMA too close to the raw weights"

    # The Hugging Face export of the EMA weights, by the hub's classes.
    hub = import_hub_code()
    hf_cfg = hub.MDLMConfig(vocab_size=vocab_size, model_length=MODEL["length"], hidden_dim=MODEL["hidden_size"],
                            cond_dim=MODEL["cond_dim"], n_blocks=MODEL["n_blocks"], n_heads=MODEL["n_heads"],
                            dropout=MODEL["dropout"], time_conditioning=False)
    hf = hub.MDLM(hf_cfg)
    hf.backbone.load_state_dict(dit_ema.state_dict())
    hf.eval()
    hf.save_pretrained(os.path.join(out, "hf"), safe_serialization=True)
    with torch.no_grad():
        hf_logits = hf(input_ids=indices, timesteps=sigma, return_dict=False)
        results["hf/logits"] = hf_logits
        results["hf/subs"] = subs_model(MASK, False, None)._subs_parameterization(hf_logits.clone(), indices)

    # Small checkpoints for the refusals.
    tiny_cfg = hydra_config(TINY, False, "openwebtext", 0)
    tiny = random_dit(tiny_cfg, vocab_size, 2)
    torch.save(lightning_checkpoint(tiny, noise, tiny_cfg, tokenizer, None, 5), os.path.join(out, "no_ema.ckpt"))
    bert = bert_like_tokenizer()
    assert bert.vocab_size == 50 and bert.mask_token_id == 3
    bert_cfg = hydra_config(TINY, False, "lm1b", 0.9999)
    tiny = random_dit(bert_cfg, bert.vocab_size, 3)  # diffusion.py: a mask token -> vocab_size unchanged
    tiny_ema = models.ema.ExponentialMovingAverage(tiny.parameters(), decay=0.9999)
    torch.save(lightning_checkpoint(tiny, noise, bert_cfg, bert, tiny_ema, 5), os.path.join(out, "mask_inside.ckpt"))

    with h5py.File(os.path.join(out, "expected.h5"), "w") as f:
        f.attrs["mask_index"] = np.int64(MASK)
        f.attrs["tokenizer_json"] = tokenizer.backend_tokenizer.to_str()
        f["input/indices"] = indices.numpy().astype(np.int64)
        f["input/sigma"] = sigma.numpy().astype(np.float32)
        for name, value in results.items():
            f[name] = value.float().numpy()
    for root, _, files in os.walk(out):
        for name in sorted(files):
            print(f"{os.path.join(root, name)}: {os.path.getsize(os.path.join(root, name))} bytes")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "mdlm_checkpoints"))
