#!/usr/bin/env python3
"""Writes tests/data/dfm_step_reference.h5: 10 training steps of Meta's discrete flow matching trainer
(facebookresearch/flow_matching at commit 11568d37, its text example examples/text: model.Transformer,
logic.flow's path and loss, logic.training.step with its optimization_step, AdamW and GradScaler as
train.py builds them; the library flow_matching 1.0.10: MixtureDiscreteProbPath,
PolynomialConvexScheduler, MixturePathGeneralizedKL) given exactly our data, initial weights and
draws, in float64. `sedd-parity compare` replays the same steps with our trainer and compares
(docs/DESIGN.md, "Step parity").

  git --git-dir=<mirror of facebookresearch/flow_matching> archive 11568d37 | tar -x -C /tmp/fm
  .venv/bin/pip install --no-deps --target /tmp/fm-pkg flow-matching==1.0.10 einops omegaconf \
      antlr4-python3-runtime==4.9.3 PyYAML
  FM_REF=/tmp/fm PYTHONPATH=/tmp/fm-pkg .venv/bin/python tests/data/make_dfm_step_reference.py [--bin build/bin]

(run from the project root after the build; a few seconds.) Their text example imports einops and
omegaconf (the network), wandb (utils/logging.py), datasets and transformers (data/, logic/state.py
through `from data import DataState`): the first two are the real packages; the others only feed
logging and data loading, which this script does not run, and get stand-ins in sys.modules
(utils.logging.TrainLogger, data.DataState). flow_matching/solver imports torchdiffeq, which only
their ODE solver uses: a stand-in when it is missing, as in make_dfm_reference.py.

1. Synthetic Markov tokens (9 ids, the last one end-of-text) become one shard.
2. `sedd-parity record` trains our model for --steps steps on it with `diffusion.objective = dfm` and
   nothing else of the objective given: the mask source, the generalized KL, kappa_power 1, time
   conditioning, iid times, the warm-up from lr/W and the token mean of the loss come from the
   objective's defaults (docs/training.md). It writes the data, the initial weights and every step's
   batch x_1 (stored as x0), times t and path samples x_t.
3. Their Transformer(vocab_size = 9, masked = True, config) (examples/text/train.py:47-49: masked
   for the mask source, so vocab_size + 1 embeddings and output columns, the mask id 9 last as
   MaskedSourceDistribution(mask_token = vocab_size), logic/flow.py:74) in float64 gets our initial
   weights. Each step is their logic.training.step (training.py:75-128) run as their train.py loop
   runs it (train.py:95-108, 192: state.step from 1, incremented after each step): x_1 from the
   iterator, x_0 = the mask source, t = torch.rand(B) (1 - time_epsilon) with time_epsilon = 1e-3 for
   the generalized KL (train.py:88), path.sample, the network, MixturePathGeneralizedKL(path)(logits,
   x_1, x_t, t).mean() (training.py:111-114; reduction 'mean' over the B L positions), then
   optimization_step (training.py:39-72): backward through the GradScaler, unscale, the learning
   rate _get_lr(step) set on the optimizer, clip_grad_norm_(model.parameters(), grad_clip), the
   scaler's optimizer step, zero_grad. The path object's `sample` is replaced on the instance so that
   it returns our t and x_t (it checks that x_t is x_0 or x_1 at every position, the two values
   their path chooses between); their own t draw is thereby unused. torch.nn.utils.clip_grad_norm_ is
   wrapped to record the gradient before and after clipping and the norm it returns. Recorded per
   step: loss (per token, as theirs), gradient norm, clip factor, learning rate; at the snapshot steps
   every parameter's gradient, clipped gradient, update, weights and "EMA" (their weights: below).
4. Initialisation laws: their Transformer's initial weights for seeds 0..3 (the first `cap` values of
   each tensor, under our names).

Their network against our DDiT, parameter for parameter: the same modules (SEDD's DDiT, which their
file says it adapts) except that each block has three Linear layers qw, kw, vw [D, D] (no bias)
where ours has one attn_qkv [3D, D]; q, k, v are the rows [0, D), [D, 2D), [2D, 3D) of ours (ours
views the output as [B, L, 3, H, D/H], theirs each as [B, L, H, D/H]), so attn_qkv = cat(qw, kw, vw)
and the gradients, updates and weights are compared that way (AdamW and the clip are elementwise or
global: the split changes nothing). Their time_embedding is our sigma_map (256 sinusoidal features,
Linear, SiLU, Linear, then SiLU); vocab_embed.weight is our vocab_embed.embedding. Every other name is
the same. One difference in the initial weights: their vocab_embed is a torch.nn.Embedding
(transformer.py:222), drawn N(0, 1); ours is SEDD's and MDLM's EmbeddingLayer, kaiming_uniform_(a =
sqrt 5), i.e. U(-1/sqrt D, 1/sqrt D). /init_law records their law, so `sedd-parity compare` reports
vocab_embed.embedding's law as different (the steps do not depend on it: both trainers start from
our recorded weights).

Float64: their network casts to float32 in three spots whatever its dtype (for bf16 autocast):
LayerNorm.forward's `x.float()` (transformer.py:46), TimestepEmbedder.timestep_embedding's float32
`arange` and `time[:, None].float()` (transformer.py:78, 81), and DDiTBlock.forward's `q.float()`,
`k.float()`, `cos.float()`, `sin.float()` around the rotary embedding (transformer.py:157-167, cast
back to q's dtype after). This script recompiles those three functions from their own source with
the casts removed (`.float()` dropped, `dtype=torch.float32` -> the time's dtype; each replacement
asserted to occur exactly as expected), so the same math runs in the input's dtype. Their
`torch.amp.autocast("cuda", ...)` blocks do nothing to CPU tensors. F.scaled_dot_product_attention
replaces no flash kernel here (their text model calls it directly). Their Rotary's inv_freq is made
in float32 and becomes float64 with the model (as ours).

Where their trainer differs from ours, our run is given the options that make both do the same
(the sedd-train keys in CONFIG below; their values from examples/text/configs/config.yaml):
- Learning rate (training.py:25-36, set before each optimizer step at :49-59 with state.step starting
  at 1, train.py:73): step k at lr k / warmup while k < warmup, then cosine from lr down to
  eta_min_ratio lr at n_iters (= steps), eta_min_ratio 0.1 (config.yaml:46). Ours:
  `train.schedule = cosine`, `train.min_lr_ratio = 0.1`, `train.warmup_from_zero = false` (the dfm
  default); ours runs step k <= warmup at k / warmup lr, theirs step = warmup at the cosine's start
  eta_min + (lr - eta_min) 1, the same value to rounding; after the warm-up both take
  (k - warmup) / (steps - warmup) of the half cosine.
- EMA: their text trainer keeps none (logic/state.py holds model, optimizer, step, data state only;
  training.py steps the optimizer alone). Ours: `train.ema = 0` (the EMA is then the weights), and the
  reference's `ema` is their weights after the step.
- Weight decay: their AdamW(model.parameters(), weight_decay = 0.03) (train.py:58-65, config.yaml:38)
  decays every parameter (biases, norms, embeddings included); ours decays matrices only. Both run
  with weight decay 0 (`train.weight_decay = 0`; optim.weight_decay = 0 given to theirs).
- Adam: betas (0.9, 0.95), eps 1e-8 (config.yaml:41-43): ours `train.beta2 = 0.95`.
- Clipping: clip_grad_norm_ at grad_clip = 1 (config.yaml:45, training.py:64-67), ours
  `train.grad_clip = 1`, torch's rule.
- Loss: the mean over the batch's B L positions (training.py:111-114): ours `train.loss_mean = token`
  (the dfm default); /authors has loss_per = token.
- GradScaler (train.py:67): torch.amp.GradScaler("cuda") disables itself without CUDA; on a GPU it
  multiplies the loss by a power of 2 and divides the gradients back before the clip (exact unless
  they overflow, when the step is skipped). Not used in float64 on a CPU here.
- Dropout: 0.1 in their config (config.yaml:64), 0 in both here (`model.dropout = 0.0`), so both
  steps are deterministic.
- DDP, torch.compile, TF32 matmuls (train.py:54, 78-80): not used here (one process, float64).
- Data: their data.py:84-100 group_texts concatenates the documents and cuts blocks of L (the same
  windows as our shard's, docs/DESIGN.md "Step parity"); their batches come from their shuffled
  sampler, here from our recorded batches.
"""
import argparse
import inspect
import json
import os
import sys
import textwrap
import types

import h5py
import numpy as np
import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from reference_common import record_our_run, flat, stub_torchdiffeq, STEP_CONFIG_HEAD, write_authors, copy_our_run  # noqa: E402

stub_torchdiffeq()


def _stand_in(name, **members):
    mod = types.ModuleType(name)
    mod.__dict__.update(members)
    mod.is_stand_in = True
    sys.modules[name] = mod
    return mod


class _TrainLogger:  # utils/logging.py's TrainLogger (wandb): the step calls log_lr only
    def log_lr(self, value, step):
        pass


# Their example's own packages `data` and `utils` import datasets, transformers and wandb for data
# loading and logging, neither of which runs here; logic.training and logic.state import one name each.
_stand_in('utils', __path__=[])
_stand_in('utils.logging', TrainLogger=_TrainLogger)
_stand_in('data', DataState=object, __path__=[])

FM_REF = os.environ.get('FM_REF', '/tmp/fm')
sys.path.insert(0, os.path.join(FM_REF, 'examples', 'text'))
import flow_matching  # noqa: E402,F401
from flow_matching.loss import MixturePathGeneralizedKL  # noqa: E402
from flow_matching.path.path_sample import DiscretePathSample  # noqa: E402
from logic import flow as their_flow  # noqa: E402
from logic import training as their_training  # noqa: E402
from logic.state import TrainState  # noqa: E402
import model.transformer as their_model  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

CONFIG = STEP_CONFIG_HEAD + """[diffusion]
objective = dfm
[train]
steps = {steps}
batch_size = {B}
lr = {lr}
warmup = {warmup}
schedule = cosine
min_lr_ratio = {eta_min_ratio}
weight_decay = 0.0
beta2 = 0.95
grad_clip = {clip}
ema = 0
precision = fp64
log_every = 1000
"""

TIME_EPSILON = 1e-3  # examples/text/train.py:88 for MixturePathGeneralizedKL


def without_float32_casts(owner, name, replacements):
    """owner.name recompiled from its own source with each (old, new, count) replacement applied."""
    fn = getattr(owner, name)
    fn = getattr(fn, '__func__', fn)
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new, count in replacements:
        assert src.count(old) == count, (name, old, src.count(old))
        src = src.replace(old, new)
    if src.lstrip().startswith('@staticmethod'):
        src = src.lstrip()[len('@staticmethod'):]
    scope = {}
    exec(compile(src, inspect.getsourcefile(fn) + ' (float32 casts removed)', 'exec'), fn.__globals__, scope)
    new = scope[name]
    setattr(owner, name, staticmethod(new) if isinstance(inspect.getattr_static(owner, name), staticmethod) else new)


def lift_float32_casts():
    without_float32_casts(their_model.LayerNorm, 'forward', [('x.float()', 'x', 1)])
    without_float32_casts(their_model.TimestepEmbedder, 'timestep_embedding',
                          [('dtype=torch.float32', 'dtype=time.dtype', 1), ('time[:, None].float()', 'time[:, None]', 1)])
    without_float32_casts(their_model.DDiTBlock, 'forward',
                          [('x=q.float()', 'x=q', 1), ('x=k.float()', 'x=k', 1), ('cos=cos.float()', 'cos=cos', 2),
                           ('sin=sin.float()', 'sin=sin', 2)])


def ours_from_theirs(named, n_blocks):
    """Their parameters (name -> tensor) under our names, qw/kw/vw joined into attn_qkv."""
    out = {}
    for n, p in named.items():
        if n == 'vocab_embed.weight':
            out['vocab_embed.embedding'] = p
        elif n.startswith('time_embedding.'):
            out['sigma_map.' + n[len('time_embedding.'):]] = p
        elif n.split('.')[-2] in ('qw', 'kw', 'vw'):
            continue
        else:
            out[n] = p
    for i in range(n_blocks):
        out['blocks.%d.attn_qkv.weight' % i] = torch.cat([named['blocks.%d.%s.weight' % (i, w)] for w in ('qw', 'kw', 'vw')])
    assert len(out) == len(named) - 2 * n_blocks, sorted(out)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--bin', default=os.path.join(here, '..', '..', 'build', 'bin'))
    ap.add_argument('--out', default=os.path.join(here, 'dfm_step_reference.h5'))
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--seed', type=int, default=5)
    ap.add_argument('--lr', type=float, default=3e-3)
    ap.add_argument('--clip', type=float, default=1.0)  # their optim.grad_clip
    ap.add_argument('--warmup', type=int, default=4)
    ap.add_argument('--eta-min-ratio', type=float, default=0.1)  # their optim.eta_min_ratio
    ap.add_argument('--snapshots', default='1,4,5,10')  # first, warm-up's last, cosine's first, last (the floor)
    a = ap.parse_args()
    torch.set_num_threads(1)
    V, L, B, n_blocks = 9, 16, 8, 2
    ours = record_our_run(a.bin, 'dfm-step-ref.', CONFIG, V, L, 13, a.snapshots, seed=a.seed, steps=a.steps, B=B,
                          lr=a.lr, warmup=a.warmup, clip=a.clip, eta_min_ratio=a.eta_min_ratio)

    lift_float32_casts()
    model_cfg = dict(hidden_size=24, cond_dim=8, length=L, n_blocks=n_blocks, n_heads=2, dropout=0.0)
    optim = OmegaConf.create(dict(weight_decay=0.0, optimizer='AdamW', lr=a.lr, beta1=0.9, beta2=0.95, eps=1e-8,
                                  warmup=a.warmup, grad_clip=a.clip, eta_min_ratio=a.eta_min_ratio, fused=False,
                                  n_iters=a.steps, log_lr_every=10 ** 9))
    source = their_flow.get_source_distribution(source_distribution='mask', vocab_size=V)
    assert source.masked and source.mask_token == V

    def build(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        return their_model.Transformer(vocab_size=V, masked=source.masked, config=OmegaConf.create(model_cfg))

    rec = h5py.File(ours, 'r')
    order = [n for n in rec['init'].attrs['order'].split('\n') if n]
    net = build().double()
    named = dict(net.named_parameters())
    mapped = ours_from_theirs(named, n_blocks)
    assert sorted(mapped) == sorted(order), sorted(set(mapped) ^ set(order))
    with torch.no_grad():
        for n in order:
            init = torch.from_numpy(rec['init'][n][()])
            if n.endswith('attn_qkv.weight'):
                for w, part in zip(('qw', 'kw', 'vw'), init.chunk(3)):
                    named[n.replace('attn_qkv', w)].copy_(part)
            else:
                mapped[n].copy_(init)
        for n in order:
            assert torch.equal(ours_from_theirs(named, n_blocks)[n], torch.from_numpy(rec['init'][n][()])), n

    def in_our_order(tensors_by_their_name):
        m = ours_from_theirs(tensors_by_their_name, n_blocks)
        return flat(m[n] for n in order)

    # train.py:58-67, their optimizer and scaler (fused=False; weight decay: see the docstring).
    optimizer = torch.optim.AdamW(net.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=optim.fused)
    scaler = torch.amp.GradScaler('cuda')
    state = TrainState(model=net, optimizer=optimizer, step=1, data_state=None)
    path = their_flow.get_path(scheduler_type='polynomial', exponent=1.0)
    loss_fn = their_flow.get_loss_function(loss_function='generalized_kl', path=path)
    assert isinstance(loss_fn, MixturePathGeneralizedKL) and loss_fn.reduction == 'mean'

    x0_all, t_all, xt_all = (torch.from_numpy(rec['steps'][k][()]) for k in ('x0', 't', 'xt'))
    draws, seen = {}, {}

    def our_path_sample(x_0, x_1, t):  # MixtureDiscreteProbPath.sample with our draws
        path.assert_sample_shape(x_0=x_0, x_1=x_1, t=t)
        xt = draws['xt']
        assert bool(((xt == x_0) | (xt == x_1)).all()), 'x_t must be x_0 or x_1 at every position'
        assert bool((t <= 1 - TIME_EPSILON).all()) and bool((draws['t'] < 1 - TIME_EPSILON).all())
        return DiscretePathSample(x_t=xt, x_1=x_1, x_0=x_0, t=draws['t'])
    path.sample = our_path_sample

    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kw):  # what training.py:65 calls
        parameters = list(parameters)
        seen['gradient'] = in_our_order({n: p.grad for n, p in net.named_parameters()})
        norm = clip_grad_norm(parameters, max_norm, *args, **kw)
        seen['grad_norm'] = float(norm)
        seen['clipped_gradient'] = in_our_order({n: p.grad for n, p in net.named_parameters()})
        return norm
    torch.nn.utils.clip_grad_norm_ = recording_clip

    snapshots = set(int(s) for s in rec['ours']['snapshot_steps'][()])
    out = {k: [] for k in ('loss', 'grad_norm', 'clip_coef', 'lr')}
    snaps = {}
    for s in range(a.steps):
        draws['t'], draws['xt'] = t_all[s], xt_all[s]
        before = in_our_order(dict(net.named_parameters()))
        loss = their_training.step(state=state, loss_fn=loss_fn, path=path, scaler=scaler,
                                   iterator=iter([{'input_ids': x0_all[s]}]), device=torch.device('cpu'),
                                   source_distribution=source, logger=_TrainLogger(), training=True,
                                   optim_params=optim, time_epsilon=TIME_EPSILON)
        assert state.step == s + 1
        state.step = state.step + 1  # train.py:192
        after = in_our_order(dict(net.named_parameters()))
        out['loss'].append(float(loss))
        out['grad_norm'].append(seen['grad_norm'])
        out['clip_coef'].append(min(1.0, a.clip / (seen['grad_norm'] + 1e-6)))  # clip_grad_norm_'s factor
        out['lr'].append(optimizer.param_groups[0]['lr'])
        if s + 1 in snapshots:
            snaps[s + 1] = dict(gradient=seen['gradient'], clipped_gradient=seen['clipped_gradient'],
                                update=after - before, params=after, ema=after)  # no EMA: their weights
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm

    seeds, cap = 4, 2048
    law = {}
    for seed in range(seeds):
        for n, p in ours_from_theirs(dict(build(seed).named_parameters()), n_blocks).items():
            law.setdefault(n, []).append(p.detach().reshape(-1)[:cap].double())
    rec.close()

    tmp = a.out + '.partial'
    with h5py.File(ours, 'r') as src, h5py.File(tmp, 'w') as dst:
        copy_our_run(src, dst)
        dst.attrs['source'] = ('facebookresearch/flow_matching (commit %s, flow_matching %s): examples/text '
                               'model.Transformer(masked=True), logic.flow (mask source, PolynomialConvexScheduler(1), '
                               'MixturePathGeneralizedKL mean), logic.training.step and optimization_step (AdamW, '
                               'clip_grad_norm_, cosine lr, GradScaler), no EMA; float64 with LayerNorm, time features '
                               'and rotary in the input dtype'
                               % (os.environ.get('FM_REF_COMMIT', '11568d37'), flow_matching.__version__))
        dst.attrs['torch'] = str(torch.__version__)
        dst.attrs['generator'] = 'tests/data/make_dfm_step_reference.py'
        # loss per token: MixturePathGeneralizedKL's mean over the batch's B L positions
        write_authors(dst, out, snaps, law, seeds, cap, loss_per='token')
    os.replace(tmp, a.out)
    with h5py.File(ours, 'r') as f:
        ours_loss = f['ours']['loss'][:a.steps] / L
    print(json.dumps(dict(out=a.out, steps=a.steps, loss=out['loss'], grad_norm=out['grad_norm'], lr=out['lr'],
                          max_rel_loss_diff_vs_recorded=float(np.max(np.abs(ours_loss - out['loss']) /
                                                                     np.abs(out['loss']))),
                          clipped_steps=int(sum(c < 1 for c in out['clip_coef'])))))


if __name__ == '__main__':
    main()
