#!/usr/bin/env python3
"""Writes tests/data/sedd_step_reference.h5: 50 training steps of the authors' SEDD trainer
(louaaron/Score-Entropy-Discrete-Diffusion: model.transformer.SEDD, graph_lib, noise_lib, losses'
get_step_fn / optimization_manager / AdamW, model.ema) given exactly our data, initial weights and
draws, in float64. `sedd-parity compare` replays the same steps with our trainer and compares
(docs/DESIGN.md, "Step parity").

  git --git-dir=<mirror of louaaron/Score-Entropy-Discrete-Diffusion> archive HEAD | tar -x -C /tmp/sedd-ref
  SEDD_REF=/tmp/sedd-ref .venv/bin/python tests/data/make_sedd_step_reference.py [--bin build/bin]

1. Synthetic Markov tokens (9 ids, the last one end-of-text) become one shard.
2. `sedd-parity record` trains our model for --steps steps on it (one rank, float64) and writes the
   data, the initial weights and every step's batch x0, times t and noisy inputs xt.
3. The authors' step function runs the same steps from the same weights: their loss_fn takes t and
   perturbed_batch as arguments, so get_loss_fn is wrapped to pass ours; everything else (loss,
   backward, warm-up, clip_grad_norm_, AdamW, EMA) is their code as it stands. Recorded per step:
   loss, gradient norm, clip factor, learning rate; at the snapshot steps every parameter's
   gradient, clipped gradient, update, weights and EMA.
4. Initialisation laws: the authors' initial weights for seeds 0..3 (the first `cap` values of
   each tensor), compared by the test with ours (equal constants or a two-sample KS test).

Float64: the authors' code computes three things in float32 whatever the model's dtype (chosen for
bf16 autocast training): LayerNorm (`F.layer_norm(x.float(), ...)`), the sinusoidal time features
(`t[:, None].float() * freqs`) and the absorbing graph's per-position score entropy, which it
accumulates into `torch.zeros(*x.shape)` (default dtype float32). For a float64 comparison the
three run in the input's dtype here (the functions below: the same math, float64 arithmetic; the
score entropy is their method, called with torch.zeros defaulting to the score's dtype). Without
these three, the float64 step differs from ours by 2e-9 (loss) and 1e-8 (gradients) relative: the
float32 roundings. In float32 training ours computes all three in float32 too.
"""
import argparse
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
import reference_shims  # noqa: F401,E402  (stand-ins for einops/flash_attn/...; SEDD_REF on sys.path)
import graph_lib, losses, noise_lib  # noqa: E402
from model import transformer  # noqa: E402
from model.ema import ExponentialMovingAverage  # noqa: E402

NS = types.SimpleNamespace

CONFIG = STEP_CONFIG_HEAD + """scale_by_sigma = true
[diffusion]
objective = sedd
graph = absorb
noise = loglinear
[train]
steps = {steps}
batch_size = {B}
lr = 3e-3
warmup = {warmup}
weight_decay = 0.0
grad_clip = {clip}
ema = 0.99
precision = fp64
log_every = 1000
time_sampling = iid
"""


def score_entropy_in_score_dtype(score_entropy):  # authors': entropy = torch.zeros(*x.shape) (float32)
    def wrapped(self, score, sigma, x, x0):
        zeros = torch.zeros
        torch.zeros = lambda *shape, **kw: zeros(*shape, **{'dtype': score.dtype, **kw})
        try:
            return score_entropy(self, score, sigma, x, x0)
        finally:
            torch.zeros = zeros
    return wrapped


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--bin', default=os.path.join(here, '..', '..', 'build', 'bin'))
    ap.add_argument('--out', default=os.path.join(here, 'sedd_step_reference.h5'))
    ap.add_argument('--steps', type=int, default=50)
    ap.add_argument('--seed', type=int, default=3)
    ap.add_argument('--clip', type=float, default=20.0)  # steps 1-16 clip, the later ones do not
    ap.add_argument('--warmup', type=int, default=10)
    ap.add_argument('--snapshots', default='1,2,11,50')  # clipped, unclipped, first after warm-up, last
    a = ap.parse_args()
    torch.set_num_threads(1)
    V, L, B = 9, 16, 8
    ours = record_our_run(a.bin, 'sedd-step-ref.', CONFIG, V, L, 11, a.snapshots, seed=a.seed, steps=a.steps, B=B,
                          warmup=a.warmup, clip=a.clip)

    # The authors' model, graph, noise, optimizer, EMA and step function, float64.
    transformer.LayerNorm.forward = layer_norm_in_input_dtype
    transformer.TimestepEmbedder.timestep_embedding = staticmethod(timestep_embedding_in_input_dtype)
    graph_lib.Absorbing.score_entropy = score_entropy_in_score_dtype(graph_lib.Absorbing.score_entropy)
    cfg = NS(tokens=V, graph=NS(type='absorb'),
             model=NS(hidden_size=24, n_heads=2, n_blocks=2, cond_dim=8, length=L, scale_by_sigma=True, dropout=0.0),
             optim=NS(optimizer='AdamW', lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                      warmup=a.warmup, grad_clip=a.clip))
    rec = h5py.File(ours, 'r')
    order = [n for n in rec['init'].attrs['order'].split('\n') if n]
    model = transformer.SEDD(cfg).double()
    named = dict(model.named_parameters())
    assert sorted(named) == sorted(order), (sorted(set(named) ^ set(order)))
    with torch.no_grad():
        for n in order:
            named[n].copy_(torch.from_numpy(rec['init'][n][()]))
    params = [named[n] for n in order]
    assert [id(p) for p in model.parameters()] == [id(p) for p in params], 'parameter order differs'
    graph = graph_lib.get_graph(cfg, torch.device('cpu'))
    noise = noise_lib.LogLinearNoise()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.99)
    optimizer = losses.get_optimizer(cfg, itertools.chain(model.parameters(), noise.parameters()))
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    state = dict(optimizer=optimizer, scaler=scaler, model=model, noise=noise, ema=ema, step=0)

    draws, seen = {}, {}
    get_loss_fn = losses.get_loss_fn

    def loss_fn_with_our_draws(*args, **kw):
        fn = get_loss_fn(*args, **kw)
        return lambda model, batch, cond=None: fn(model, batch, cond=cond, t=draws['t'], perturbed_batch=draws['xt'])
    losses.get_loss_fn = loss_fn_with_our_draws

    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def clip_and_record(parameters, max_norm, *args, **kw):
        parameters = list(parameters)
        seen['gradient'] = flat(p.grad for p in parameters)
        norm = clip_grad_norm(parameters, max_norm, *args, **kw)
        seen['grad_norm'] = float(norm)
        seen['clipped_gradient'] = flat(p.grad for p in parameters)
        return norm
    torch.nn.utils.clip_grad_norm_ = clip_and_record

    step_fn = losses.get_step_fn(noise, graph, True, losses.optimization_manager(cfg), 1)
    x0_all, t_all, xt_all = (torch.from_numpy(rec['steps'][k][()]) for k in ('x0', 't', 'xt'))
    snapshots = set(int(s) for s in rec['ours']['snapshot_steps'][()])
    out = {k: [] for k in ('loss', 'grad_norm', 'clip_coef', 'lr')}
    snaps = {}
    for s in range(a.steps):
        draws['t'], draws['xt'] = t_all[s], xt_all[s]
        before = flat(params)
        loss = step_fn(state, x0_all[s])
        after = flat(params)
        out['loss'].append(float(loss))
        out['grad_norm'].append(seen['grad_norm'])
        # clip_grad_norm_'s factor, as it computes it: min(1, max_norm / (norm + 1e-6))
        out['clip_coef'].append(min(1.0, a.clip / (seen['grad_norm'] + 1e-6)))
        out['lr'].append(optimizer.param_groups[0]['lr'])
        if s + 1 in snapshots:
            snaps[s + 1] = dict(gradient=seen['gradient'], clipped_gradient=seen['clipped_gradient'],
                                update=after - before, params=after, ema=flat(ema.shadow_params))

    # Initialisation laws: the authors' float32 initialisation for seeds 0..3.
    seeds, cap = 4, 2048
    law = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        m = transformer.SEDD(cfg)
        for n, p in m.named_parameters():
            law.setdefault(n, []).append(p.detach().reshape(-1)[:cap].double())
    rec.close()

    tmp = a.out + '.partial'
    with h5py.File(ours, 'r') as src, h5py.File(tmp, 'w') as dst:
        copy_our_run(src, dst)
        commit = os.environ.get('SEDD_REF_COMMIT', 'unknown')
        dst.attrs['source'] = ('louaaron/Score-Entropy-Discrete-Diffusion (commit %s): SEDD, graph_lib, noise_lib, '
                               'losses.get_step_fn/optimization_manager/get_optimizer, model.ema; float64 with '
                               'LayerNorm and time features in the input dtype' % commit)
        dst.attrs['torch'] = str(torch.__version__)
        dst.attrs['generator'] = 'tests/data/make_sedd_step_reference.py'
        write_authors(dst, out, snaps, law, seeds, cap)
    os.replace(tmp, a.out)
    ours_loss = h5py.File(ours, 'r')['ours']['loss'][()]
    print(json.dumps(dict(out=a.out, steps=a.steps,
                          loss_first=out['loss'][0], loss_last=out['loss'][-1],
                          max_rel_loss_diff_vs_recorded=float(np.max(np.abs(ours_loss - out['loss']) / np.abs(out['loss']))),
                          clipped_steps=int(sum(c < 1 for c in out['clip_coef'])))))


if __name__ == '__main__':
    main()
