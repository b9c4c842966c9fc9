#!/usr/bin/env python3
"""Writes tests/data/mdlm_step_reference.h5: 10 training steps of the MDLM authors' trainer
(kuleshov-group/mdlm: diffusion.Diffusion with the SUBS parameterisation in continuous time,
models.dit.DIT, noise_schedule.LogLinearNoise, configure_optimizers with the constant_warmup
schedule, models.ema.ExponentialMovingAverage, and the step Lightning runs around them) given
exactly our data, initial weights and draws, in float64. `sedd-parity compare` replays the same
steps with our trainer and compares (docs/DESIGN.md, "Step parity").

  git --git-dir=<mirror of kuleshov-group/mdlm> archive c112c52 | tar -x -C /tmp/mdlm-ref
  MDLM_REF=/tmp/mdlm-ref .venv/bin/python tests/data/make_mdlm_step_reference.py [--bin build/bin]

(needs `transformers`, which the authors' diffusion.py imports and whose
get_constant_schedule_with_warmup is their learning-rate schedule; launch/setup.sh does not
install it: use a virtual environment that has it.)

1. Synthetic Markov tokens (9 ids, the last one end-of-text) become one shard.
2. `sedd-parity record` trains our model for --steps steps on it with `diffusion.objective = mdlm`
   and nothing else of the recipe given: time conditioning, scale_by_sigma, the time sampling and
   the warmup's start come from the objective's defaults (docs/training.md, "Objectives"). It writes the data,
   the initial weights and every step's batch x0, times t and noisy inputs xt.
3. The authors' Diffusion object is built with Diffusion.__new__ (its __init__ downloads an
   evaluation tokenizer) and the attributes its methods read, with models.dit.DIT as backbone;
   _sample_t and q_xt are replaced on the instance so that they return our t and xt. Each step is
   what Lightning runs for `gradient_clip_val = 1.0`: zero_grad, training_step (their
   _compute_loss: _loss, token_nll = sum / count), backward, torch's clip_grad_norm_, their
   optimizer_step (AdamW's step, then the EMA update), then the scheduler's step. Recorded per
   step: loss (per token, as theirs), gradient norm, clip factor, learning rate; at the snapshot
   steps every parameter's gradient, clipped gradient, update, weights and EMA.
4. Initialisation laws: the authors' DIT initial weights for seeds 0..3 (the first `cap` values of
   each tensor).

Float64: like the SEDD code, the DIT computes LayerNorm (`x.float()`) and the sinusoidal time
features (`t.float() * freqs`) in float32 whatever the model's dtype; both run in the input's dtype
here (the same math). With time conditioning off the time input is zero, whose features are exact
in either dtype.
"""
import argparse
import importlib
import itertools
import json
import os
import sys
import types

import h5py
import numpy as np
import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from reference_common import record_our_run, flat, layer_norm_in_input_dtype, timestep_embedding_in_input_dtype, STEP_CONFIG_HEAD, write_authors, copy_our_run  # noqa: E402
import mdlm_shims  # noqa: F401,E402  (stand-ins for flash_attn/lightning/hydra/...; MDLM_REF on sys.path)
import diffusion  # noqa: E402
import models  # noqa: E402
import models.dit  # noqa: E402
import models.ema  # noqa: E402
import noise_schedule  # noqa: E402

NS = types.SimpleNamespace

CONFIG = STEP_CONFIG_HEAD + """[diffusion]
objective = mdlm
graph = absorb
noise = loglinear
[train]
steps = {steps}
batch_size = {B}
lr = {lr}
warmup = {warmup}
weight_decay = 0.0
grad_clip = {clip}
ema = 0.9999
precision = fp64
log_every = 1000
"""


def instantiate(cfg, **kw):
    """hydra.utils.instantiate for their lr_scheduler config: _target_ called with the other keys."""
    module, name = cfg['_target_'].rsplit('.', 1)
    args = {k: v for k, v in cfg.items() if k != '_target_'}
    return getattr(importlib.import_module(module), name)(**args, **kw)


def lightning_optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
    """LightningModule.optimizer_step's default, which Diffusion.optimizer_step calls first."""
    optimizer.step(closure=optimizer_closure)


def read_yaml_scheduler(path):
    """configs/lr_scheduler/constant_warmup.yaml: `key: value` lines."""
    out = {}
    for line in open(path):
        if ':' in line and not line.lstrip().startswith('#'):
            k, v = line.split(':', 1)
            v = v.strip()
            out[k.strip()] = int(v.replace('_', '')) if v.replace('_', '').isdigit() else v
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--bin', default=os.path.join(here, '..', '..', 'build', 'bin'))
    ap.add_argument('--out', default=os.path.join(here, 'mdlm_step_reference.h5'))
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--seed', type=int, default=5)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--clip', type=float, default=1.0)  # Lightning's gradient_clip_val in their config
    ap.add_argument('--warmup', type=int, default=4)
    ap.add_argument('--snapshots', default='1,2,6,10')  # lr 0, first move, first after warm-up, last
    a = ap.parse_args()
    torch.set_num_threads(1)
    V, L, B = 9, 16, 8
    ours = record_our_run(a.bin, 'mdlm-step-ref.', CONFIG, V, L, 13, a.snapshots, seed=a.seed, steps=a.steps, B=B, lr=a.lr,
                          warmup=a.warmup, clip=a.clip)

    # Their model, float64, with our initial weights.
    models.dit.LayerNorm.forward = layer_norm_in_input_dtype
    models.dit.TimestepEmbedder.timestep_embedding = staticmethod(timestep_embedding_in_input_dtype)
    mdlm_shims._LightningModule.optimizer_step = lightning_optimizer_step
    diffusion.hydra.utils.instantiate = instantiate
    scheduler_cfg = read_yaml_scheduler(os.path.join(os.environ['MDLM_REF'], 'configs', 'lr_scheduler',
                                                     'constant_warmup.yaml'))
    scheduler_cfg['num_warmup_steps'] = a.warmup  # theirs: 2500
    cfg = NS(model=NS(hidden_size=24, n_heads=2, n_blocks=2, cond_dim=8, length=L, scale_by_sigma=True, dropout=0.0),
             training=NS(ema=0.9999, antithetic_sampling=True, importance_sampling=False, sampling_eps=1e-3,
                         change_of_variables=False),
             optim=NS(lr=a.lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0),
             lr_scheduler=scheduler_cfg, parameterization='subs', T=0, subs_masking=False, time_conditioning=False,
             backbone='dit')

    def build(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return models.dit.DIT(cfg, vocab_size=V + 1)  # mask_index = V (the tokenizer has no mask token)

    rec = h5py.File(ours, 'r')
    order = [n for n in rec['init'].attrs['order'].split('\n') if n]
    m = diffusion.Diffusion.__new__(diffusion.Diffusion)
    torch.nn.Module.__init__(m)
    m.config = cfg
    m.vocab_size, m.mask_index = V + 1, V
    m.antithetic_sampling = cfg.training.antithetic_sampling
    m.importance_sampling = cfg.training.importance_sampling
    m.change_of_variables = cfg.training.change_of_variables
    m.parameterization, m.T, m.subs_masking = cfg.parameterization, cfg.T, cfg.subs_masking
    m.backbone = build().double()
    m.noise = noise_schedule.LogLinearNoise()
    m.lr, m.sampling_eps, m.time_conditioning = cfg.optim.lr, cfg.training.sampling_eps, cfg.time_conditioning
    m.neg_infinity = -1000000.0
    m.train_metrics = NS(update=lambda *args, **kw: None)  # torchmetrics: logging only
    m._validate_configuration()
    named = dict(m.backbone.named_parameters())
    assert sorted(named) == sorted(order), (sorted(set(named) ^ set(order)))
    with torch.no_grad():
        for n in order:
            named[n].copy_(torch.from_numpy(rec['init'][n][()]))
    params = [named[n] for n in order]
    assert [id(p) for p in m.backbone.parameters()] == [id(p) for p in params], 'parameter order differs'
    m.ema = models.ema.ExponentialMovingAverage(itertools.chain(m.backbone.parameters(), m.noise.parameters()),
                                                decay=cfg.training.ema)
    [optimizer], [scheduler] = m.configure_optimizers()
    scheduler = scheduler['scheduler']

    x0_all, t_all, xt_all = (torch.from_numpy(rec['steps'][k][()]) for k in ('x0', 't', 'xt'))
    draws, seen = {}, {}
    m._sample_t = lambda n, device: draws['t']
    m.q_xt = lambda x, move_chance: draws['xt']
    snapshots = set(int(s) for s in rec['ours']['snapshot_steps'][()])
    out = {k: [] for k in ('loss', 'grad_norm', 'clip_coef', 'lr')}
    snaps = {}
    for s in range(a.steps):
        draws['t'], draws['xt'] = t_all[s], xt_all[s]
        batch = {'input_ids': x0_all[s], 'attention_mask': torch.ones_like(x0_all[s])}
        before = flat(params)
        out['lr'].append(optimizer.param_groups[0]['lr'])

        def closure():  # Lightning's automatic optimisation: training step, backward, gradient clipping
            optimizer.zero_grad()
            m.backbone.train()
            m.noise.train()
            loss = m.training_step(batch, s)
            loss.backward()
            seen['loss'] = float(loss.detach())
            seen['gradient'] = flat(p.grad for p in params)
            norm = torch.nn.utils.clip_grad_norm_(params, a.clip)
            seen['grad_norm'] = float(norm)
            seen['clipped_gradient'] = flat(p.grad for p in params)
            return loss
        m.optimizer_step(0, s, optimizer, closure)
        scheduler.step()
        after = flat(params)
        out['loss'].append(seen['loss'])
        out['grad_norm'].append(seen['grad_norm'])
        out['clip_coef'].append(min(1.0, a.clip / (seen['grad_norm'] + 1e-6)))  # clip_grad_norm_'s factor
        if s + 1 in snapshots:
            snaps[s + 1] = dict(gradient=seen['gradient'], clipped_gradient=seen['clipped_gradient'],
                                update=after - before, params=after, ema=flat(m.ema.shadow_params))

    seeds, cap = 4, 2048
    law = {}
    for seed in range(seeds):
        for n, p in build(seed).named_parameters():
            law.setdefault(n, []).append(p.detach().reshape(-1)[:cap].double())
    rec.close()

    tmp = a.out + '.partial'
    with h5py.File(ours, 'r') as src, h5py.File(tmp, 'w') as dst:
        copy_our_run(src, dst)
        commit = os.environ.get('MDLM_REF_COMMIT', 'c112c52')
        dst.attrs['source'] = ('kuleshov-group/mdlm (commit %s): diffusion.Diffusion (subs, T = 0), models.dit.DIT, '
                               'noise_schedule.LogLinearNoise, configure_optimizers with constant_warmup '
                               '(transformers %s), models.ema, the Lightning step (clip_grad_norm_); float64 with '
                               'LayerNorm and time features in the input dtype'
                               % (commit, importlib.import_module('transformers').__version__))
        dst.attrs['torch'] = str(torch.__version__)
        dst.attrs['generator'] = 'tests/data/make_mdlm_step_reference.py'
        # loss per token: their token_nll: the batch's summed loss / its B L tokens
        write_authors(dst, out, snaps, law, seeds, cap, loss_per='token')
    os.replace(tmp, a.out)
    ours_loss = h5py.File(ours, 'r')['ours']['loss'][:a.steps] / L
    print(json.dumps(dict(out=a.out, steps=a.steps, loss=out['loss'], grad_norm=out['grad_norm'], lr=out['lr'],
                          max_rel_loss_diff_vs_recorded=float(np.max(np.abs(ours_loss - out['loss']) /
                                                                     np.abs(out['loss']))),
                          clipped_steps=int(sum(c < 1 for c in out['clip_coef'])))))


if __name__ == '__main__':
    main()
