#!/usr/bin/env python3
"""Writes tests/data/bd3_reference.h5: reference vectors computed by the BD3-LM authors' code
(kuleshov-group/bd3lms at 1c3e8f4: models/dit.py, diffusion.py, noise_schedule.py, metrics.py), read
by the block-diffusion golden tests.

  git --git-dir=<mirror of kuleshov-group/bd3lms> archive 1c3e8f4 | tar -x -C /tmp/bd3
  .venv/bin/python -m pip install --target /tmp/bd3-deps einops==0.8.1 omegaconf==2.3.0
  BD3_REF=/tmp/bd3 PYTHONPATH=/tmp/bd3-deps .venv/bin/python tests/data/make_bd3_reference.py --out FILE
                                                  [--seed 0] [--compare tests/data/bd3_reference.h5]

(einops and omegaconf at their pins, never into .venv: their DIT uses einops patterns that the stand-in
of reference_shims.py lacks. transformers, which diffusion.py, metrics.py and dataloader.py import
but no function used here calls, is a stand-in unless installed; lightning, hydra, timm, torchmetrics
and flash_attn are the stand-ins of mdlm_shims.py. A few seconds on one core.)

Every output is the return value of the authors' own function; this script only draws the inputs and
injects them (torch.rand, torch.rand_like and torch.randint return the stored draws inside a context
manager). Diffusion.__init__ downloads a tokenizer (and Metrics.__init__ another), so both objects are
made with __new__ and given the fields their methods read: Diffusion gets backbone, noise =
noise_schedule.LogLinearNoise(), mask_index 49, neg_infinity -1e6, parameterization 'subs',
time_conditioning False, cross_attn True, ignore_bos True, mdlm_loss_scale False, block_size,
num_tokens 16, antithetic_sampling True, the buffers sampling_eps_min / sampling_eps_max (float64; see
below), metrics, all_gather = identity, log = no-op, and config (algo.name 'bd3lm', algo.fix_clipping
False, model.length 16, training.resample False, sampling.first_hitting / kv_cache False / nucleus_p).
The configuration is algo=bd3lm (configs/algo/bd3lm.yaml) at a small size.

Network: models.dit.DIT with tokens 49 + the mask as the last id 49 (vocab 50), length L = 16, hidden
32, 4 heads, 2 blocks, cond_dim 16, dropout 0, model.attn_backend 'sdpa' (the dense boolean
block_diff_mask and F.scaled_dot_product_attention), algo.cross_attn True, algo.parameterization
'subs'; adaLN as their code decides (not causal -> adaLN on, sigma_map present, although
configs/model/*.yaml say adaln: False). Every parameter is redrawn as 0.2 * N(0, 1) in float64 (their
init zeroes adaLN and the output layer); the buffer rotary_emb.inv_freq stays theirs (float32 values,
held in float64 after .double()). One DIT per block size with the same state dict (block size only
changes the mask).

Float64: the network runs converted with .double(). Their LayerNorm calls x.float() and their
TimestepEmbedder multiplies t.float() by its frequencies (built as arange(...).to(t.dtype), float64
here, unlike MDLM's float32 arange); while their functions run, Tensor.float keeps float64 tensors
float64 (as make_mdlm_reference.py does for MDLM's identical LayerNorm), so every operation is float64.
Their rotary table is computed from inv_freq in its dtype (float64 after .double()). Their forward
runs under torch.amp.autocast('cuda', ...), a no-op on a CPU. Their _clipped_schedule_search
accumulates into torch.tensor(0.), float32 under torch's default dtype: it runs with the default dtype
float64. Their sampling_eps_min/max buffers are torch.tensor(<float>) (float32 by default; float32(1e-3)
= 0.0010000000474974513): here they are float64 tensors holding the exact window.

Datasets (float64 unless stated):
- root attributes: source, seed, tokens = 49, mask_id = 49, length = 16.
- /mask/block{1,2,4,16}: uint8 [32, 32] = models.dit.block_diff_mask(None, None, arange(32)[:, None],
  arange(32)[None, :], block_size, n=16) (rows: queries x_t 0..15 then x_0 16..31).
- /model/params/<state-dict name>: the parameters (and rotary_emb.inv_freq); attributes hidden_size,
  n_heads, n_blocks, cond_dim, length, tokens, param_std.
- /model/input: x0 [3, 16] int64, xt [3, 16] int64 (x0 with about half the positions the mask id 49),
  sigma [3, 1] (handed to Diffusion.forward; _process_sigma zeroes it: time_conditioning False).
- /model/block{1,4,16}: logits [3, 16, 50] = DIT_b(cat(xt, x0), _process_sigma(sigma)) (their backbone
  returns the first L positions), log_probs [3, 16, 50] = Diffusion.forward(cat(xt, x0), sigma)
  (_subs_parameterization: the mask column -1e6 - logsumexp, unmasked rows -1e6 except 0 at xt, as
  they come out); attribute block_size.
- /sample_t/{block4, block4_clip, block1, block16}: eps [4, N] (N = 16 / block_size) the uniforms their
  torch.rand returns, t = Diffusion._sample_t((4, 16), 'cpu', eps_min, eps_max) (antithetic on) for the
  windows (1e-3, 1), (0.3, 0.8), (1, 1), (1e-3, 1); attributes block_size, eps_min, eps_max. t is their
  return value: [4, 16], except block16 (block size = L: no repeat_interleave) [4, 1], and block1
  (1, 1) all ones.
- /loss/block{1,4,16}: x0 [4, 16] int64; Diffusion._loss(x0, ones) as training_step calls it (module in
  training mode; the window comes from the sampling_eps_min/max buffers: (1e-3, 1) for blocks 4 and
  16, (1, 1) for block 1), with torch.rand returning eps [4, N] (_sample_t) then u [4, 16] (q_xt:
  masked where u <= t); ignore_bos, cross_attn, no resample, no mdlm_loss_scale. t [4, 16]: what
  _sample_t returned (captured), broadcast to the positions as q_xt and the loss scale use it; xt
  [4, 16] int64: the first L tokens of the backbone's input (captured; position 0 is x0's, ignore_bos);
  nlls [4, 16] = Loss.nlls, loss = Loss.loss (the sum over all 64 positions / 64, position 0 counted
  as a zero); eval_nlls, eval_loss: the same draws with the module in eval mode and the window passed
  as validation_step passes it (python floats), where ignore_bos zeroes position 0 of the mask
  (sum / 60); attributes block_size, eps_min, eps_max.
- /nucleus: p_x0 [2, 4, 50] (softmax of 2 N(0, 1) logits, mask column 0, renormalised), out =
  Diffusion._nucleus_sample(p_x0) with block_size 4, nucleus_p 0.9.
- /first_hitting: x [2, 8] int64 (4 clean tokens, then a block of 4 with 2 and 3 masks), t [2, 1],
  p_x0 [2, 4, 50] given (the network is not called), gumbel_u [2, 4, 50] the uniforms their
  _sample_categorical draws with torch.rand_like, index_draw [2] int64 what their torch.randint(0,
  num_masked, (1,)) returns; x_new [2, 8] = Diffusion._ddpm_caching_update(x, t, dt, p_x0)[1] with
  sampling.first_hitting True, kv_cache False, block_size 4. One call per row: the sampler needs batch
  1 (their _validate_configuration asserts eval_batch_size 1; torch.randint takes no vector high, and
  nonzero()[ind, 1] indexes the masked positions of the whole batch); attribute dt = 1/8.
- /ddpm: x [2, 8], t [2, 1], p_x0 [2, 4, 50], gumbel_u [2, 4, 50]; q_xs [2, 4, 50] the argument
  _ddpm_caching_update hands to _sample_categorical (captured: p_x0 (1 - s/t), s/t in the mask
  column), x_new [2, 8]; first_hitting False, one batch-2 call; attribute dt = 1/8.
- /clip_search: grid [K, 2] the window keys of metrics.Metrics.init_valid_vars (block_size 4,
  training.sampling_eps 1e-3, algo.clip_search_delta 0.05, algo.clip_search_widths [0.5, 0.6, 0.7,
  0.8, 0.9]) in their dict order: K = 36, the first (1e-3, 1) in python floats, the others float32
  values (torch.arange in float32, clamp(...).item()); losses [K, 3, 2, 4] synthetic per-block losses
  (3 validation batches of 2 sequences x 4 blocks per window: 2 + s_k N(0, 1), s_k = exp(U(-1, 1)) per
  window); variance [K] = each window's accumulator all_vars (the sum over batches of var()) of
  Diffusion._clipped_schedule_search (all_gather = identity, log = no-op; captured); chosen [2] = the
  (eps_min, eps_max) it writes into sampling_eps_min/max (fix_clipping False); attribute
  chosen_index.

Randomness: `--seed` seeds a torch.Generator that draws every input, in this order: the parameters
(named_parameters order, float64); model x0, its mask uniforms, sigma; sample_t eps per case (block4,
block4_clip, block1, block16); loss x0, eps, u per block (1, 4, 16); nucleus logits; first_hitting x's
tokens, t, p_x0 logits, mask positions (a randperm per row), index draws, gumbel_u; ddpm the same except
index draws; clip_search per-window scales, then losses. All batch x block counts of _sample_t are
powers of two, so their antithetic offsets arange(n) / n (float32) are exact. torch.manual_seed(seed)
covers the authors' initialisation (overwritten) and nothing else. Rerun with seed 0 on this machine
it rewrites the committed file exactly (--compare: 0 differences); elsewhere network outputs may differ
by float rounding, which --compare prints.
"""
import contextlib
import os
import sys
import types

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
BD3_REF = os.environ['BD3_REF']
os.environ['MDLM_REF'] = BD3_REF  # mdlm_shims.py puts $MDLM_REF on sys.path: the authors' BD3 tree here
try:  # the real packages (their DIT's einops patterns; mdlm_shims.py reads sys.modules['einops'])
    import einops, omegaconf  # noqa: F401,E402
except ImportError:
    sys.exit('needs einops and omegaconf: pip install --target /tmp/bd3-deps einops==0.8.1 omegaconf==2.3.0, '
             'then PYTHONPATH=/tmp/bd3-deps')
from reference_common import authors_diffusion, golden_arguments, write_and_compare  # noqa: E402
import reference_shims  # noqa: E402
import mdlm_shims  # noqa: E402  (stand-ins for flash_attn/lightning/hydra/timm/torchmetrics)
reference_shims.install([('transformers', mdlm_shims._Anything('transformers'))])  # imported, never called
import diffusion, metrics, noise_schedule  # noqa: E402
from models import dit  # noqa: E402

NS = types.SimpleNamespace
SOURCE = ('kuleshov-group/bd3lms 1c3e8f4 (models/dit.py: DIT, block_diff_mask; diffusion.py: Diffusion.forward, '
          '_process_sigma, _subs_parameterization, _sample_t, q_xt, _loss, _nucleus_sample, _ddpm_caching_update, '
          '_sample_categorical, _clipped_schedule_search; noise_schedule.py: LogLinearNoise; metrics.py: '
          'Metrics.init_valid_vars)')

TOKENS = 49            # vocabulary without the mask; the mask is the last id, 49
VOCAB = TOKENS + 1
L = 16
MODEL = dict(hidden_size=32, n_heads=4, n_blocks=2, cond_dim=16, length=L)
PARAM_STD = 0.2
MODEL_B, LOSS_B, STEP_B = 3, 4, 2
MODEL_BLOCKS = (1, 4, 16)
MASK_BLOCKS = (1, 2, 4, 16)
SAMPLE_T_CASES = (('block4', 4, 1e-3, 1.0), ('block4_clip', 4, 0.3, 0.8), ('block1', 1, 1.0, 1.0),
                  ('block16', 16, 1e-3, 1.0))
LOSS_WINDOWS = {1: (1.0, 1.0), 4: (1e-3, 1.0), 16: (1e-3, 1.0)}
STEP_BLOCK, NUCLEUS_P, STEP_DT = 4, 0.9, 1.0 / 8
CLIP = dict(sampling_eps=1e-3, delta=0.05, widths=[0.5, 0.6, 0.7, 0.8, 0.9], batches=3, blocks=4)


@contextlib.contextmanager
def float_keeps_float64():
    """Tensor.float() leaves float64 tensors float64 (their LayerNorm and timestep embedding cast to
    float32; the float64 network must stay float64 throughout)."""
    orig = torch.Tensor.float

    def keep(self, *a, **k):
        return self if self.dtype == torch.float64 else orig(self, *a, **k)
    torch.Tensor.float = keep
    try:
        yield
    finally:
        torch.Tensor.float = orig


@contextlib.contextmanager
def draws_returned(rand=(), randint=()):
    """torch.rand / torch.rand_like return the next of `rand`, torch.randint the next of `randint`:
    injects this script's draws into the authors' functions that draw with the global generator."""
    rand, randint = list(rand), list(randint)
    orig_rand, orig_like, orig_randint = torch.rand, torch.rand_like, torch.randint

    def take(*shape, **k):
        v = rand.pop(0)
        want = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        assert tuple(v.shape) == tuple(want), (v.shape, want)
        return v.clone()

    def take_int(low, high, size, **k):  # their call: torch.randint(0, num_masked, (batch,))
        v = randint.pop(0)
        assert low == 0 and tuple(v.shape) == tuple(size), (low, v.shape, size)
        assert bool((v >= 0).all()) and bool((v < high).all()), (v, high)
        return v.clone()
    torch.rand, torch.rand_like, torch.randint = take, (lambda x, **k: take(*x.shape)), take_int
    try:
        yield
    finally:
        torch.rand, torch.rand_like, torch.randint = orig_rand, orig_like, orig_randint
    assert not rand and not randint, 'not every injected draw was used'


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def dit_config(block_size):
    return NS(block_size=block_size,
              model=NS(dropout=0.0, attn_backend='sdpa', tie_word_embeddings=True, scale_by_sigma=True, **MODEL),
              algo=NS(name='bd3lm', parameterization='subs', cross_attn=True),
              loader=NS(eval_batch_size=1), sampling=NS(kv_cache=False))


def make_diffusion(backbone, block_size, eps_min=1e-3, eps_max=1.0, first_hitting=True, nucleus_p=1.0):
    d = authors_diffusion(diffusion, noise_schedule, backbone, TOKENS, VOCAB)
    d.time_conditioning = False
    d.cross_attn = True
    d.ignore_bos = True
    d.mdlm_loss_scale = False
    d.block_size = block_size
    d.num_tokens = L
    d.T = 0
    d.antithetic_sampling = True
    d.var_min = True
    d.register_buffer('sampling_eps_min', torch.tensor(eps_min, dtype=torch.float64))
    d.register_buffer('sampling_eps_max', torch.tensor(eps_max, dtype=torch.float64))
    d.all_gather = lambda x: x
    d.log = lambda *a, **k: None
    d.config = NS(block_size=block_size,
                  algo=NS(name='bd3lm', parameterization='subs', cross_attn=True, fix_clipping=False, backbone='dit'),
                  model=NS(length=L, attn_backend='sdpa'),
                  training=NS(resample=False, antithetic_sampling=True, sampling_eps=1e-3, eval_nll=True),
                  sampling=NS(first_hitting=first_hitting, kv_cache=False, nucleus_p=nucleus_p))
    return d


def make_metrics():
    m = metrics.Metrics.__new__(metrics.Metrics)
    m.config = NS(algo=NS(clip_search_widths=CLIP['widths'], clip_search_delta=CLIP['delta'], var_min=True),
                  training=NS(sampling_eps=CLIP['sampling_eps']))
    m.block_size = STEP_BLOCK
    m.sampling_eps = CLIP['sampling_eps']
    m.clip_search_delta = CLIP['delta']
    m.init_valid_vars()
    return m


def with_masks(x, gen, fraction):
    m = torch.rand(x.shape, generator=gen) < fraction
    return torch.where(m, torch.full_like(x, TOKENS), x)


def given_p_x0(gen, shape):
    p = torch.softmax(2 * torch.randn(*shape, generator=gen, dtype=torch.float64), -1)
    p[..., TOKENS] = 0
    return p / p.sum(-1, keepdim=True)


def step_inputs(gen, masks_per_row):
    """x [B, 8]: 4 clean tokens, then a block of 4 with the given numbers of masks; t [B, 1]; p_x0."""
    B = len(masks_per_row)
    x = torch.randint(0, TOKENS, (B, 2 * STEP_BLOCK), generator=gen)
    t = 0.2 + 0.7 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    p_x0 = given_p_x0(gen, (B, STEP_BLOCK, VOCAB))
    for r, k in enumerate(masks_per_row):
        pos = torch.randperm(STEP_BLOCK, generator=gen)[:k] + STEP_BLOCK
        x[r, pos] = TOKENS
    return x, t, p_x0


def main():
    a = golden_arguments(__doc__)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)                    # the authors' initialisation (overwritten)
    gen = torch.Generator().manual_seed(a.seed)  # every input of this script
    out = {'/': ({}, dict(tokens=TOKENS, mask_id=TOKENS, length=L))}  # path -> (datasets, attributes)

    with torch.no_grad():
        # The mask.
        q, kv = torch.arange(2 * L)[:, None], torch.arange(2 * L)[None, :]
        out['mask'] = ({'block%d' % b: dit.block_diff_mask(b=None, h=None, q_idx=q, kv_idx=kv, block_size=b, n=L)
                        .to(torch.uint8) for b in MASK_BLOCKS}, None)

        # The network, one per block size with the same state dict.
        base = dit.DIT(dit_config(MODEL_BLOCKS[0]), vocab_size=VOCAB).double()
        assert base.adaLN and not base.causal and hasattr(base, 'block_diff_mask')
        for _, p in base.named_parameters():
            p.copy_(PARAM_STD * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        state = {k: v.clone() for k, v in base.state_dict().items()}
        nets = {}
        for b in MODEL_BLOCKS:
            net = dit.DIT(dit_config(b), vocab_size=VOCAB).double()
            net.load_state_dict(state)
            nets[b] = net.eval()
        out['model/params'] = (state, None)
        out['model'] = ({}, dict(tokens=TOKENS, param_std=PARAM_STD, adaLN=1, cross_attn=1, **MODEL))

        x0 = torch.randint(0, TOKENS, (MODEL_B, L), generator=gen)
        xt = with_masks(x0, gen, 0.5)
        sigma = torch.rand(MODEL_B, 1, generator=gen, dtype=torch.float64)
        out['model/input'] = (dict(x0=x0, xt=xt, sigma=sigma), None)
        for b in MODEL_BLOCKS:
            d = make_diffusion(nets[b], b)
            x_in = torch.cat((xt, x0), dim=-1)
            with float_keeps_float64():
                logits = nets[b](x_in, d._process_sigma(sigma))
                log_probs = d.forward(x_in, sigma)
            assert logits.dtype == torch.float64 and logits.shape == (MODEL_B, L, VOCAB)
            assert torch.equal(log_probs, d._subs_parameterization(logits.clone(), xt))
            out['model/block%d' % b] = (dict(logits=logits, log_probs=log_probs), dict(block_size=b))

        # The authors' time sampling.
        for name, b, lo, hi in SAMPLE_T_CASES:
            eps = torch.rand(LOSS_B, L // b, generator=gen, dtype=torch.float64)
            with draws_returned(rand=[eps]):
                t = make_diffusion(nets[MODEL_BLOCKS[0]], b)._sample_t((LOSS_B, L), 'cpu', lo, hi)
            out['sample_t/' + name] = (dict(eps=eps, t=t), dict(block_size=b, eps_min=lo, eps_max=hi))

        # The training loss (and its evaluation variant) on injected draws.
        for b in MODEL_BLOCKS:
            lo, hi = LOSS_WINDOWS[b]
            x0 = torch.randint(0, TOKENS, (LOSS_B, L), generator=gen)
            eps = torch.rand(LOSS_B, L // b, generator=gen, dtype=torch.float64)
            u = torch.rand(LOSS_B, L, generator=gen, dtype=torch.float64)
            d = make_diffusion(nets[b], b, lo, hi)
            seen = {}
            hook = d.backbone.register_forward_pre_hook(lambda m, args: seen.__setitem__('xt', args[0][:, :L].clone()))

            def sample_t(*args, **kw):
                seen['t'] = diffusion.Diffusion._sample_t(d, *args, **kw)
                return seen['t']
            d._sample_t = sample_t
            res = {}
            for mode in ('train', 'eval'):
                d.train(mode == 'train')
                window = {} if mode == 'train' else dict(sampling_eps_min=lo, sampling_eps_max=hi)
                with draws_returned(rand=[eps, u]), float_keeps_float64():
                    res[mode] = d._loss(x0, torch.ones(LOSS_B, L), **window)
                res[mode + '_xt'], res[mode + '_t'] = seen['xt'], seen['t']
            hook.remove()
            assert torch.equal(res['train_xt'], res['eval_xt']) and torch.equal(res['train_t'], res['eval_t'])
            assert res['train'].nlls.dtype == torch.float64
            t = res['train_t'].expand(LOSS_B, L)
            out['loss/block%d' % b] = (dict(x0=x0, eps=eps, u=u, t=t, xt=res['train_xt'], nlls=res['train'].nlls,
                                            loss=res['train'].loss, eval_nlls=res['eval'].nlls,
                                            eval_loss=res['eval'].loss),
                                       dict(block_size=b, eps_min=lo, eps_max=hi))

        # Nucleus filter.
        p_x0 = given_p_x0(gen, (STEP_B, STEP_BLOCK, VOCAB))
        d = make_diffusion(nets[STEP_BLOCK], STEP_BLOCK, nucleus_p=NUCLEUS_P)
        out['nucleus'] = (dict(p_x0=p_x0, out=d._nucleus_sample(p_x0.clone())), dict(block_size=STEP_BLOCK,
                                                                                     nucleus_p=NUCLEUS_P))

        # One first-hitting step (batch 1 per call, as their sampler requires).
        x, t, p_x0 = step_inputs(gen, (2, 3))
        num_masked = (x[:, -STEP_BLOCK:] == TOKENS).sum(-1)
        index_draw = torch.cat([torch.randint(0, int(n), (1,), generator=gen) for n in num_masked])
        gumbel_u = torch.rand(STEP_B, STEP_BLOCK, VOCAB, generator=gen, dtype=torch.float64)
        d = make_diffusion(nets[STEP_BLOCK], STEP_BLOCK, first_hitting=True)
        rows = []
        for r in range(STEP_B):
            with draws_returned(rand=[gumbel_u[r:r + 1]], randint=[index_draw[r:r + 1]]):
                _, x_new = d._ddpm_caching_update(x[r:r + 1], t[r:r + 1], STEP_DT, p_x0=p_x0[r:r + 1].clone())
            rows.append(x_new)
        x_new = torch.cat(rows)
        assert torch.equal((x_new != x).sum(-1), torch.ones(STEP_B, dtype=torch.int64))
        out['first_hitting'] = (dict(x=x, t=t, p_x0=p_x0, gumbel_u=gumbel_u, index_draw=index_draw, x_new=x_new),
                                dict(dt=STEP_DT, block_size=STEP_BLOCK))

        # One DDPM step.
        x, t, p_x0 = step_inputs(gen, (2, 3))
        gumbel_u = torch.rand(STEP_B, STEP_BLOCK, VOCAB, generator=gen, dtype=torch.float64)
        d = make_diffusion(nets[STEP_BLOCK], STEP_BLOCK, first_hitting=False)
        seen = {}
        orig_sample = diffusion._sample_categorical

        def capture(probs):
            seen['q_xs'] = probs.clone()
            return orig_sample(probs)
        diffusion._sample_categorical = capture
        try:
            with draws_returned(rand=[gumbel_u]):
                _, x_new = d._ddpm_caching_update(x, t, STEP_DT, p_x0=p_x0.clone())
        finally:
            diffusion._sample_categorical = orig_sample
        out['ddpm'] = (dict(x=x, t=t, p_x0=p_x0, gumbel_u=gumbel_u, q_xs=seen['q_xs'], x_new=x_new),
                       dict(dt=STEP_DT, block_size=STEP_BLOCK))

        # The clipped-schedule search.
        m = make_metrics()
        keys = list(m.valid_vars)
        K = len(keys)
        scales = torch.exp(2 * torch.rand(K, generator=gen, dtype=torch.float64) - 1)
        losses = 2 + scales[:, None, None, None] * torch.randn(K, CLIP['batches'], STEP_B, CLIP['blocks'],
                                                               generator=gen, dtype=torch.float64)
        for k, key in enumerate(keys):
            m.valid_vars[key] = [losses[k, i].clone() for i in range(CLIP['batches'])]
        d = make_diffusion(nets[STEP_BLOCK], STEP_BLOCK)
        d.metrics = m
        accumulators = []
        orig_tensor = torch.tensor

        def tensor(*args, **kw):  # their all_vars = torch.tensor(0., device=self.device), one per window
            v = orig_tensor(*args, **kw)
            accumulators.append(v)
            return v
        torch.tensor = tensor
        try:
            with default_dtype(torch.float64):
                d._clipped_schedule_search()
        finally:
            torch.tensor = orig_tensor
        assert len(accumulators) == K and all(v.dtype == torch.float64 for v in accumulators)
        variance = torch.stack(accumulators)
        chosen = torch.stack([d.sampling_eps_min, d.sampling_eps_max])
        grid = torch.tensor([list(k) for k in keys], dtype=torch.float64)
        best = int(torch.argmin(variance))
        assert torch.equal(chosen, grid[best])
        out['clip_search'] = (dict(grid=grid, losses=losses, variance=variance, chosen=chosen),
                              dict(block_size=STEP_BLOCK, sampling_eps=CLIP['sampling_eps'], delta=CLIP['delta'],
                                   widths=CLIP['widths'], chosen_index=best))

    write_and_compare(a, out, SOURCE)


if __name__ == '__main__':
    main()
