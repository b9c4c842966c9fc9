#!/usr/bin/env python3
"""Writes tests/data/mdlm_reference.h5: reference vectors computed by the MDLM authors' code
(kuleshov-group/mdlm at c112c52: noise_schedule, models.dit, diffusion), read by the MDLM golden
tests (tests/mdlm_golden_test.cpp; docs/DESIGN.md, "MDLM golden reference").

  git --git-dir=<mirror of kuleshov-group/mdlm> archive c112c52 | tar -x -C /tmp/mdlm-ref
  MDLM_REF=/tmp/mdlm-ref .venv/bin/python tests/data/make_mdlm_reference.py --out FILE [--seed 0]
                                                        [--compare tests/data/mdlm_reference.h5]

Every output is the return value of the authors' own function; this script only draws the inputs and
injects them. Diffusion.__init__ downloads a tokenizer, so the Diffusion object is made with
Diffusion.__new__ and given the fields its methods read (mask_index, neg_infinity, parameterization,
time_conditioning, T, sampling_eps, noise, backbone, config.noise.type, config.model.length).
- /noise/loglinear: t = the 129 dyadic points k / 128 plus 1 - 2^-20 and 1 - 2^-40 (written out, exact
  on any machine; a linspace's last bits depend on the CPU kernel), total and rate =
  noise_schedule.LogLinearNoise()(t) (eps 1e-3), float64.
- /sample_t: eps [8] uniforms; t = Diffusion._sample_t(8) with torch.rand returning eps, sampling_eps
  1e-3, antithetic_sampling on (the authors' "antithetic": (eps / n + k / n) % 1) and off.
- /model: models.dit.DIT (49 tokens + the mask as the last id 49 = vocab 50, hidden 32, 4 heads,
  2 blocks, cond 16, length 16, dropout 0; small, for a small file) with every parameter redrawn as
  0.2 * N(0, 1) (the authors' initialisation zeroes adaLN and the output layer; the buffer
  rotary_emb.inv_freq stays theirs),
  stored in float32 under params/. input/indices [3, 16] (a third of them the mask id), input/sigma
  [3]; output/logits = DIT(indices, sigma) and output/logits_sigma0 = DIT(indices, 0) (what
  Diffusion._process_sigma passes without time conditioning), float32.
- /subs: Diffusion._subs_parameterization(DIT64(xt, sigma), xt) with DIT64 the same network in
  float64; xt [2, 16] with masks, sigma [2]; logits = DIT64's output, log_probs [2, 16, 50]
  float64 (the mask column holds neg_infinity - logsumexp, unmasked rows neg_infinity except 0 at
  xt).
- /nelbo: x0 [4, 16]; per variant tc{0,1} (time_conditioning off, on) and dtype (f64: DIT64, f32:
  DIT): t = Diffusion._sample_t(4) on injected uniforms (antithetic, sampling_eps 1e-3), xt =
  Diffusion.q_xt(x0, move_chance) with torch.rand returning the stored uniforms u [4, 16] (the same t,
  u, xt for all variants), then Diffusion._loss(x0, ones): loss = Loss.nlls [4, 16] (the per-position
  continuous-time NELBO -log p(x0 | xt) sigma'/(e^sigma - 1)) and token_nll = Loss.loss (their mean
  over the 64 positions), parameterization 'subs', T = 0.
- /ddpm_step: x [2, 16] with masks, t [2], attribute dt = 1/64; q_xs = the argument that
  Diffusion._ddpm_caching_update(x, t, dt, p_x0) hands to _sample_categorical (unnormalised:
  p_x0 (t - s) and s in the mask column),
  float64: given/ with p_x0 [2, 16, 50] a given distribution (mask column 0), model/ with p_x0 None
  (the float64 DIT run through Diffusion.forward, time_conditioning on; its p_x0 stored too).

Randomness: `--seed` seeds a torch.Generator that draws every input, in this order: the parameters
(named_parameters order), model indices and their mask uniforms, sigma; subs xt and its mask
uniforms, sigma; sample_t eps; nelbo x0, eps, u; ddpm x and its mask uniforms, t, given p_x0
logits, then per variant the uniforms their _sample_categorical draws. torch.manual_seed(seed)
covers the authors' initialisation (overwritten) and nothing else. Rerun with seed 0 on this machine
it rewrites the committed file exactly (--compare: 0 differences); elsewhere the network outputs may
differ by float rounding, which --compare prints.

Dtypes: the authors' LayerNorm and timestep embedding call .float() and build the embedding's
frequencies with torch.arange(dtype=float32); while the float64 network (DIT64) runs, Tensor.float
keeps float64 tensors float64 and that arange gives float64, so every operation of DIT64 is float64
(its rotary inv_freq buffer keeps the float32 values, as in the float32 network and in our weights).
"""
import contextlib
import copy
import os
import sys
import types

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from reference_common import authors_diffusion, golden_arguments, write_and_compare  # noqa: E402
import mdlm_shims  # noqa: F401,E402  (stand-ins for flash_attn/lightning/...; MDLM_REF on sys.path)
import diffusion, noise_schedule  # noqa: E402
from models import dit  # noqa: E402

NS = types.SimpleNamespace
SOURCE = 'kuleshov-group/mdlm c112c52 (noise_schedule, models.dit, diffusion)'

TOKENS = 49            # vocabulary without the mask; the mask is the last id, 49
VOCAB = TOKENS + 1
MODEL = dict(hidden_size=32, n_heads=4, n_blocks=2, cond_dim=16, length=16)
PARAM_STD = 0.2
SAMPLING_EPS = 1e-3
MODEL_B, SUBS_B, NELBO_B, DDPM_B, SAMPLE_T_N = 3, 2, 4, 2, 8
DDPM_DT = 1.0 / 64


def t_grid():
    return torch.tensor([k / 128 for k in range(129)] + [1 - 2.0 ** -20, 1 - 2.0 ** -40], dtype=torch.float64)


@contextlib.contextmanager
def float_keeps_float64():
    """Tensor.float() leaves float64 tensors float64 and torch.arange(dtype=float32) gives float64
    (the authors' LayerNorm and sigma embedding cast to float32 and build the embedding's frequencies
    in float32; the float64 network must stay float64 throughout)."""
    orig, orig_arange = torch.Tensor.float, torch.arange

    def keep(self, *a, **k):
        return self if self.dtype == torch.float64 else orig(self, *a, **k)

    def arange64(*a, **k):
        if k.get('dtype') == torch.float32:
            k['dtype'] = torch.float64
        return orig_arange(*a, **k)
    torch.Tensor.float, torch.arange = keep, arange64
    try:
        yield
    finally:
        torch.Tensor.float, torch.arange = orig, orig_arange


@contextlib.contextmanager
def rand_returns(values):
    """torch.rand / torch.rand_like return `values` (the next one per call): injects this script's
    draws into the authors' functions that draw with the global generator."""
    queue = list(values)
    orig_rand, orig_like = torch.rand, torch.rand_like

    def take(*shape, **k):
        v = queue.pop(0)
        want = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        assert tuple(v.shape) == tuple(want), (v.shape, want)
        return v.clone()
    torch.rand = take
    torch.rand_like = lambda x, **k: take(*x.shape)
    try:
        yield
    finally:
        torch.rand, torch.rand_like = orig_rand, orig_like
    assert not queue, 'not every injected draw was used'


def make_diffusion(backbone, time_conditioning, antithetic=True):
    d = authors_diffusion(diffusion, noise_schedule, backbone, TOKENS, VOCAB)
    d.time_conditioning = time_conditioning
    d.T = 0
    d.sampling_eps = SAMPLING_EPS
    d.antithetic_sampling = antithetic
    d.importance_sampling = False
    d.change_of_variables = False
    d.config = NS(noise=NS(type='loglinear'), model=NS(length=MODEL['length']))
    return d


def with_masks(x, gen, fraction):
    m = torch.rand(x.shape, generator=gen) < fraction
    return torch.where(m, torch.full_like(x, TOKENS), x)


def main():
    a = golden_arguments(__doc__)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)                    # the authors' initialisation (overwritten)
    gen = torch.Generator().manual_seed(a.seed)  # every input of this script
    out = {}                                     # path -> (datasets, attributes)
    L = MODEL['length']

    with torch.no_grad():
        t = t_grid()
        total, rate = noise_schedule.LogLinearNoise()(t)
        out['noise/loglinear'] = (dict(t=t, total=total, rate=rate), dict(eps=1e-3))

        # The network: float32 as stored, DIT64 its float64 copy.
        cfg = NS(model=NS(dropout=0.0, scale_by_sigma=False, **MODEL))
        net = dit.DIT(cfg, vocab_size=VOCAB)
        for _, p in net.named_parameters():
            p.copy_(PARAM_STD * torch.randn(p.shape, generator=gen))
        net.eval()
        net64 = copy.deepcopy(net).double()
        indices = with_masks(torch.randint(0, TOKENS, (MODEL_B, L), generator=gen), gen, 1 / 3)
        in_sigma = 0.01 + 3.0 * torch.rand(MODEL_B, generator=gen)
        logits = net(indices, in_sigma)
        logits0 = net(indices, torch.zeros(MODEL_B))
        assert logits.dtype == torch.float32 and logits.shape == (MODEL_B, L, VOCAB)
        out['model/params'] = ({k: v.clone() for k, v in net.state_dict().items()}, None)
        out['model/input'] = (dict(indices=indices, sigma=in_sigma), None)
        out['model/output'] = (dict(logits=logits, logits_sigma0=logits0), None)
        out['model'] = ({}, dict(graph='absorb', noise='loglinear', eps=1e-3, objective='mdlm', scale_by_sigma=0,
                                 tokens=TOKENS, **MODEL))

        # SUBS on float64 network logits.
        xt = with_masks(torch.randint(0, TOKENS, (SUBS_B, L), generator=gen), gen, 0.5)
        sigma = 0.01 + 3.0 * torch.rand(SUBS_B, generator=gen, dtype=torch.float64)
        with float_keeps_float64():
            raw = net64(xt, sigma)
        assert raw.dtype == torch.float64
        d = make_diffusion(net64, True)
        log_probs = diffusion.Diffusion._subs_parameterization(d, raw.clone(), xt)
        out['subs'] = (dict(xt=xt, sigma=sigma, logits=raw, log_probs=log_probs), None)

        # The authors' time sampling.
        eps = torch.rand(SAMPLE_T_N, generator=gen, dtype=torch.float32)
        ts = {}
        for anti in (True, False):
            with rand_returns([eps]):
                ts[anti] = make_diffusion(net, True, anti)._sample_t(SAMPLE_T_N, 'cpu')
        out['sample_t'] = (dict(eps=eps, t_antithetic=ts[True], t_iid=ts[False]),
                           dict(sampling_eps=SAMPLING_EPS))

        # NELBO with injected t and corruption.
        x0 = torch.randint(0, TOKENS, (NELBO_B, L), generator=gen)
        eps_t = torch.rand(NELBO_B, generator=gen, dtype=torch.float64)
        u = torch.rand(NELBO_B, L, generator=gen, dtype=torch.float64)
        captured = {}
        nelbo = dict(x0=x0, eps=eps_t, u=u)
        for tc in (0, 1):
            for name, backbone, dtype in (('f64', net64, torch.float64), ('f32', net, torch.float32)):
                d = make_diffusion(backbone, bool(tc))
                orig_q_xt = d.q_xt

                def q_xt(x, move_chance, orig=orig_q_xt):
                    captured['move_chance'] = move_chance
                    captured['xt'] = orig(x, move_chance)
                    return captured['xt']
                d.q_xt = q_xt
                lift = float_keeps_float64() if dtype == torch.float64 else contextlib.nullcontext()
                with rand_returns([eps_t.to(dtype), u.to(dtype)]), lift:
                    res = d._loss(x0, torch.ones(NELBO_B, L))
                assert res.nlls.dtype == dtype, (res.nlls.dtype, dtype)
                if 't' in nelbo:
                    assert torch.equal(nelbo['xt'], captured['xt']), 'the corruption differs between dtypes'
                else:
                    with rand_returns([eps_t]):
                        nelbo['t'] = d._sample_t(NELBO_B, 'cpu')
                    nelbo['xt'] = captured['xt']
                nelbo['tc%d/%s/loss' % (tc, name)] = res.nlls
                nelbo['tc%d/%s/token_nll' % (tc, name)] = res.loss
        out['nelbo'] = (nelbo, dict(sampling_eps=SAMPLING_EPS, antithetic=1))

        # One DDPM caching step.
        x = with_masks(torch.randint(0, TOKENS, (DDPM_B, L), generator=gen), gen, 0.6)
        t_step = 0.05 + 0.9 * torch.rand(DDPM_B, generator=gen, dtype=torch.float64)
        given = torch.softmax(2 * torch.randn(DDPM_B, L, VOCAB, generator=gen, dtype=torch.float64), -1)
        given[..., TOKENS] = 0
        given = given / given.sum(-1, keepdim=True)
        ddpm = dict(x=x, t=t_step, p_x0_given=given)
        for variant, p_x0 in (('given', given), ('model', None)):
            d = make_diffusion(net64, True)
            seen = {}
            orig_sample = diffusion._sample_categorical

            def capture(probs, orig=orig_sample):
                seen['q_xs'] = probs.clone()
                return orig(probs)
            diffusion._sample_categorical = capture
            try:
                draws = torch.rand(DDPM_B, L, VOCAB, generator=gen, dtype=torch.float64)
                with rand_returns([draws]), float_keeps_float64():
                    p_used, _ = d._ddpm_caching_update(x, t_step[:, None], DDPM_DT, p_x0=p_x0)
            finally:
                diffusion._sample_categorical = orig_sample
            assert seen['q_xs'].dtype == torch.float64
            ddpm[variant + '/q_xs'] = seen['q_xs']
            if p_x0 is None:
                ddpm[variant + '/p_x0'] = p_used
        out['ddpm_step'] = (ddpm, dict(dt=DDPM_DT))

    write_and_compare(a, out, SOURCE)


if __name__ == '__main__':
    main()
