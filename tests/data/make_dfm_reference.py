#!/usr/bin/env python3
"""Writes tests/data/dfm_reference.h5: reference vectors computed by Meta's discrete flow matching code
(PyPI flow-matching 1.0.10 = facebookresearch/flow_matching at commit 11568d37: path/mixture.py,
path/scheduler/scheduler.py, loss/generalized_loss.py, solver/discrete_solver.py), for our C++ discrete
flow matching to reproduce to 1e-12. The tests never import flow_matching; only this script does.

  .venv/bin/pip install --no-deps --target /tmp/fm-pkg flow-matching==1.0.10
  PYTHONPATH=/tmp/fm-pkg .venv/bin/python tests/data/make_dfm_reference.py --out FILE [--seed 0]
                                                        [--compare tests/data/dfm_reference.h5]

(run from the project root; the venv's own packages stay untouched). flow_matching/solver/__init__.py
imports ode_solver, which imports torchdiffeq (a declared dependency that --no-deps leaves out); when
it is missing this script puts a stand-in module with an `odeint` that raises in sys.modules. Nothing
here uses the ODE solver.

Every output is the return value of their classes; this script draws the inputs and injects its own
uniforms where their code draws (torch.rand, and torch.multinomial through
flow_matching.solver.discrete_solver.categorical). It runs with torch.set_default_dtype(torch.float64):
their solver makes its time grid with torch.tensor(list of Python floats) and draws with torch.rand in
the default dtype, so under float32 the grid, h, the jump uniforms and the intensity would be float32
whatever dtype_categorical says. Every float is stored float64, every id int64. Sizes: TOKENS = 11
data ids 0..10; the mask source adds the mask id 11 as a 12th column (V' = 12, as their text example:
MaskedSourceDistribution(mask_token=vocab_size) at examples/text/logic/flow.py:74, a network with
vocab_size + 1 outputs at examples/text/model/transformer.py:220-241, a solver with
vocabulary_size + 1 at examples/text/logic/generate.py:44-49); the uniform source has V' = 11. B = 4
sequences of L = 16 positions. The tabular denoiser below works in float64 (their text WrappedModel
takes the softmax in float32, generate.py:23).

Their formulas, with the line numbers of commit 11568d37 (the wheel's files differ only in docstrings
and in discrete_solver.py's optional tqdm import, which makes the wheel's discrete_solver.py lines 9
lower up to the verbose block and 13 lower after it: 163 -> 154, 199 -> 186, 234 -> 221):
- PolynomialConvexScheduler(n).__call__ (path/scheduler/scheduler.py:130-136): kappa_t = alpha_t =
  t**n, sigma_t = 1 - t**n, d_kappa_t = d_alpha_t = n * t**(n - 1). torch's pow special-cases
  integral exponents: t**0 = 1 (also at t = 0), t**1 = t, t**2 = t*t, t**3 = t*t*t (bit for bit;
  std::pow(t, 3) differs from t*t*t in the last bit for about a quarter of the inputs).
- MixtureDiscreteProbPath.sample(x_0, x_1, t) (path/mixture.py:82-87): sigma_t = scheduler(t).sigma_t,
  source = torch.rand(size=x_1.shape) < sigma_t, x_t = where(source, x_0, x_1): x_t = x_0 where
  u < 1 - kappa_t, else x_1 (one uniform u per position, row-major, strict <).
- MixturePathGeneralizedKL(path, reduction).forward (loss/generalized_loss.py:52-74), per position:
  log p = log_softmax(logits) over all V' columns (mask column included; :52), p = exp(log p) (:57),
  jc = d_kappa_t / (1 - kappa_t) (:63-66), delta = [x_t == x_1] (:67),
  loss = -jc * (p[x_t] - delta + (1 - delta) * log p[x_1]) (:69-71); p[x_t] is the probability of the
  column x_t, i.e. of the mask column (11) wherever x_t is masked. reduction 'mean' = torch.mean over
  all B*L positions (:73-74), the default, which their training uses (examples/text/logic/
  training.py:111-114, a further .mean() of the scalar).
- Cross entropy as their text training computes it (examples/text/logic/flow.py:82-83
  torch.nn.CrossEntropyLoss(), examples/text/logic/training.py:109-110
  loss_fn(logits.flatten(0, 1), x_1.flatten(0, 1)).mean()): per position -log_softmax(logits)[x_1]
  over all V' columns, no time weight, every position counted (masked or not); reduced by the mean
  over all B*L positions (CrossEntropyLoss's default 'mean'; the .mean() after it changes nothing).
  Their training draws t = torch.rand(B) * (1 - time_epsilon) (training.py:100), time_epsilon = 1e-3
  for the generalized KL and 0 for cross entropy (examples/text/train.py:88).
- MixtureDiscreteEulerSolver.sample(x_init, step_size=h, div_free, dtype_categorical, time_grid)
  (solver/discrete_solver.py):
  :157-167 n_steps = ceil((tf - t0) / h) with Python floats t0 = time_grid[0].item(),
    tf = time_grid[-1].item(); grid = [t0 + h * i for i in range(n_steps)] + [tf], made a tensor of
    the default dtype (float64 here);
  :194-196 step i: t = grid[i], h_i = grid[i + 1] - grid[i] (a float64 difference, not step_size);
  :199-200 p_1t = model(x_t, t repeated B times); x_1 = categorical(p_1t.to(dtype_categorical));
  :203-204 last step (i = n_steps - 1): x_t = x_1, nothing else (no velocity, no jump draw);
  :207-215 otherwise k = kappa_t, dk = d_kappa_t (the scheduler at the [1]-shaped t),
    u = (dk / (1 - k)) * onehot(x_1);
  :218-224 c = div_free(t) if callable else div_free; only if c > 0:
    u = u + ((c * dk) / (k * (1 - k))) * ((1 - k) * p_0 + k * onehot(x_1)), p_0 = source_distribution_p
    (so the corrector term is skipped where c = 0, e.g. at t = 0 for 12 t^2 (1-t)^0.25);
  :227-230 u[x_t] = 0 (torch.where on onehot(x_t));
  :233-236 intensity = sum over columns of u; jump = torch.rand(size=x_t.shape) < 1 - exp(-h_i * intensity);
  :238-241 if any jump: x_t[jump] = categorical(u[jump].to(dtype_categorical)): the jumping rows in
    row-major order, weights u unnormalised (the new token is drawn from u / intensity and is never x_t,
    whose weight is 0).
  The corrector's div_free is the callable of examples/image/training/eval_loop.py:130,
  `sym = lambda t: 12.0 * torch.pow(t, 2.0) * torch.pow(1.0 - t, 0.25)`, passed as div_free=sym at :142.
- categorical (utils/categorical_sampler.py:21-23) is torch.multinomial(probs.flatten(0, -2), 1,
  replacement=True).view(probs.shape[:-1]); here it is replaced by the inverse-CDF draw from a given
  uniform u per row of weights w (K = V' columns, unnormalised): c_k = w_0 + ... + w_k summed left to
  right in float64, total = c_{K-1}, index = min(K - 1, #{k : c_k <= u * total}); zero-weight columns
  are never chosen.

Layout (root attributes source, seed, tokens = 11):
- /scheduler: t [16] = 0, 1e-6, 1e-3, 0.25, 0.5, 1 - 1e-3, 1 and 9 sorted uniforms; n{1,2,3}/kappa,
  n{1,2,3}/d_kappa [16] = PolynomialConvexScheduler(n)(t).alpha_t, .d_alpha_t.
- /path/{mask,uniform}/n{1,2,3} (attribute n): x_0 [B, L] (mask: all 11; uniform: uniform ids in
  [0, 11)), x_1 [B, L] uniform ids in [0, 11), t [B] uniform in (0, 1), u [B, L] the uniforms their
  torch.rand returns inside sample, x_t [B, L] = MixtureDiscreteProbPath(PolynomialConvexScheduler(n))
  .sample(x_0, x_1, t).x_t.
- /loss/{mask,uniform}/n{1,2,3} (attribute n): logits [B, L, V'] = 2 N(0, 1), x_1 [B, L], t [B] =
  U (1 - 1e-3) as their training draws it, x_t [B, L] from their sample with injected uniforms (x_0
  as above); gkl [B, L] = MixturePathGeneralizedKL(path, reduction='none')(logits, x_1, x_t, t),
  gkl_mean [] = the same with reduction 'mean'; ce [B, L] = torch.nn.CrossEntropyLoss(reduction='none')
  on the flattened logits and x_1, ce_mean [] = CrossEntropyLoss()(...).mean() as training.py:110.
- /solver/{mask,uniform}/{plain,corrector} (attributes n, step_size, t_final = 1 - 1e-3, steps = S):
  plain: PolynomialConvexScheduler(1), div_free = 0.0, h = 1/7 (S = 7); corrector:
  PolynomialConvexScheduler(3), div_free = sym above, h = 0.13 (S = 8). Their
  MixtureDiscreteEulerSolver(model, MixtureDiscreteProbPath(scheduler), vocabulary_size=V',
  source_distribution_p=p_0) (p_0: mask = onehot(11) over 12 columns, uniform = 1/11 each) runs
  sample(x_init, step_size=h, div_free=..., dtype_categorical=torch.float64,
  time_grid=torch.tensor([0.0, 1 - 1e-3])) with the tabular denoiser
  p_1t[b, l, :] = softmax(A[l, x_t[b, l], :] + t * C[l, x_t[b, l], :]) over the V' columns (mask
  column included, as their text model's output layer has vocab_size + 1 outputs).
  Datasets: x_init [B, L] (mask: all 11; uniform: uniform ids), A, C [L, V', V'] = 1.5 N(0, 1);
  per step i (leading axis S): t [S], h [S], div_free [S] (c at step i; 0 for plain and on the last
  step), p_1t [S, B, L, V'] (the model's output), u_x1 [S, B, L] (uniforms of the x_1 draw), x_1
  [S, B, L], velocity [S, B, L, V'] (u after u[x_t] = 0; zeros on the last step), u_jump [S, B, L]
  (their torch.rand; zeros on the last step), jump [S, B, L] int64 0/1, u_new [S, B, L] (the uniform of
  each jumping position's new-token draw; zeros elsewhere), x_after [S, B, L] (x_t after the step;
  x_after[S-1] = x_1[S-1]); x_final [B, L] = the tensor sample returns (= x_after[S-1]).
  The script replays every step from these datasets with the formulas above (plain Python floats and
  numpy, not their code) and asserts the same x_1, jumps, new tokens and x_final, and p_1t and
  velocity to 1e-13.

Randomness: `--seed` seeds one torch.Generator that draws every input, float64, in this order:
scheduler t's 9 uniforms; then per source (mask, uniform) and n (1, 2, 3) the path group: x_1, x_0
(uniform source only), t, u; then per source and n the loss group: x_1, x_0 (uniform only), t, u,
logits; then per source and variant (plain, corrector): A, C, x_init (uniform only), u_x1 [S, B, L],
u_jump [S - 1, B, L], and a uniform for every position of the S - 1 jump steps of which u_new keeps the
jumping ones. Rerun with the same seed it rewrites the file exactly.
"""
import contextlib
import itertools
import math
import os
import sys
import types

import numpy as np
import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from reference_common import stub_torchdiffeq, golden_arguments, write_and_compare  # noqa: E402

stub_torchdiffeq()

import flow_matching  # noqa: E402
from flow_matching.path import MixtureDiscreteProbPath  # noqa: E402
from flow_matching.path.scheduler import PolynomialConvexScheduler  # noqa: E402
from flow_matching.loss import MixturePathGeneralizedKL  # noqa: E402
from flow_matching.solver import MixtureDiscreteEulerSolver  # noqa: E402
from flow_matching.solver import discrete_solver  # noqa: E402
from flow_matching.utils import ModelWrapper  # noqa: E402

SOURCE = ('facebookresearch/flow_matching 1.0.10 (commit 11568d37): path/mixture.py, '
          'path/scheduler/scheduler.py, loss/generalized_loss.py, solver/discrete_solver.py')
VERSION = '1.0.10'
TOKENS = 11            # data ids 0..10
MASK = TOKENS          # the mask source's id, an extra 12th column
B, L = 4, 16
SCHED_T_FIXED = [0.0, 1e-6, 1e-3, 0.25, 0.5, 1 - 1e-3, 1.0]
SCHED_T_RANDOM = 9
LOSS_T_EPS = 1e-3      # examples/text/train.py:88 (time_epsilon for the generalized KL)
LOGIT_SCALE = 2.0
TABLE_SCALE = 1.5
T_FINAL = 1 - 1e-3
SOURCES = ('mask', 'uniform')
EXPONENTS = (1, 2, 3)


def sym(t):  # examples/image/training/eval_loop.py:130
    return 12.0 * torch.pow(t, 2.0) * torch.pow(1.0 - t, 0.25)


VARIANTS = {  # name: (scheduler exponent n, step size, div_free)
    'plain': (1, 1.0 / 7, 0.0),
    'corrector': (3, 0.13, sym),
}


def columns(source):
    return TOKENS + 1 if source == 'mask' else TOKENS


@contextlib.contextmanager
def rand_returns(values, check_caller=None):
    """torch.rand returns `values` (the next one per call; the shape must match the call's `size`):
    injects this script's draws where their code draws with the global generator."""
    queue = list(values)
    orig = torch.rand

    def take(*shape, size=None, **k):
        v = queue.pop(0)
        want = tuple(size) if size is not None else (
            tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape)
        assert tuple(v.shape) == want, (v.shape, want)
        if check_caller:
            check_caller(sys._getframe(1))
        return v.clone()
    torch.rand = take
    try:
        yield
    finally:
        torch.rand = orig
    assert not queue, 'not every injected draw was used'


def inverse_cdf(w, u):
    """The categorical rule: per row of weights w [N, K] (unnormalised) and uniform u [N],
    index = min(K - 1, #{k : c_k <= u * c_{K-1}}) with c the left-to-right float64 cumulative sum."""
    out = []
    for row, v in zip(w.tolist(), u.tolist()):
        c = list(itertools.accumulate(row))
        x = v * c[-1]
        out.append(min(len(row) - 1, sum(1 for ck in c if ck <= x)))
    return out


def draw_ids(gen, source, high=TOKENS):
    if source == 'mask':
        return torch.full((B, L), MASK, dtype=torch.int64)
    return torch.randint(0, high, (B, L), generator=gen)


def sample_path(path, x_0, x_1, t, u):
    def caller(frame):
        assert frame.f_code.co_name == 'sample' and frame.f_code.co_filename.endswith('mixture.py')
    with rand_returns([u], caller):
        return path.sample(x_0=x_0, x_1=x_1, t=t).x_t


class Tabular(ModelWrapper):
    """p_1t[b, l, :] = softmax(A[l, x[b, l], :] + t[b] * C[l, x[b, l], :]) over the V' columns; records
    each call."""

    def __init__(self, A, C, calls):
        super().__init__(None)
        self.A, self.C, self.calls = A, C, calls

    def forward(self, x, t, **extras):
        pos = torch.arange(x.shape[1])[None, :]
        p = torch.softmax(self.A[pos, x] + t[:, None, None] * self.C[pos, x], dim=-1)
        self.calls.append(dict(x=x.clone(), t=t.clone(), p_1t=p.clone()))
        return p


def run_solver(source, variant, gen):
    n, step, div_free = VARIANTS[variant]
    V = columns(source)
    A = TABLE_SCALE * torch.randn(L, V, V, generator=gen)
    C = TABLE_SCALE * torch.randn(L, V, V, generator=gen)
    x_init = draw_ids(gen, source)
    S = math.ceil((T_FINAL - 0.0) / step)          # their n_steps (discrete_solver.py:163)
    u_x1 = torch.rand(S, B, L, generator=gen)
    u_jump = torch.rand(S - 1, B, L, generator=gen)
    u_new_all = torch.rand(S - 1, B, L, generator=gen)

    p_0 = torch.zeros(V)
    if source == 'mask':
        p_0[MASK] = 1.0
    else:
        p_0[:] = 1.0 / TOKENS
    calls, x1s = [], []     # the model's calls (one per step), the x_1 draws
    model = Tabular(A, C, calls)
    solver = MixtureDiscreteEulerSolver(model=model, path=MixtureDiscreteProbPath(PolynomialConvexScheduler(n)),
                                        vocabulary_size=V, source_distribution_p=p_0)
    rec = dict(velocity=torch.zeros(S, B, L, V), jump=torch.zeros(S, B, L, dtype=torch.int64),
               u_new=torch.zeros(S, B, L), div_free=torch.zeros(S), h_seen=[None] * S)

    def their_frame():
        f = sys._getframe(2)
        assert f.f_code.co_name == 'sample' and f.f_code.co_filename == discrete_solver.__file__, f.f_code
        return f.f_locals

    def categorical(w):
        loc = their_frame()
        i = len(calls) - 1
        assert w.dtype == torch.float64
        if len(x1s) == i:                           # the x_1 draw of step i
            assert w.shape == (B, L, V)
            x1 = torch.tensor(inverse_cdf(w.flatten(0, -2), u_x1[i].flatten()), dtype=torch.int64).view(B, L)
            x1s.append(x1.clone())
            return x1
        mask = loc['mask_jump']                     # the new-token draw of the jumping positions
        assert w.shape == (int(mask.sum()), V)
        rec['jump'][i] = mask.to(torch.int64)
        rec['u_new'][i][mask] = u_new_all[i][mask]
        return torch.tensor(inverse_cdf(w, u_new_all[i][mask]), dtype=torch.int64)

    def jump_caller(frame):
        assert frame.f_code.co_name == 'sample' and frame.f_code.co_filename == discrete_solver.__file__
        loc = frame.f_locals
        i = len(calls) - 1
        rec['velocity'][i] = loc['u']
        rec['h_seen'][i] = loc['h'].clone()
        c = loc['div_free_t']
        rec['div_free'][i] = float(c)

    orig_cat = discrete_solver.categorical
    discrete_solver.categorical = categorical
    try:
        with rand_returns(list(u_jump), jump_caller):
            x_final = solver.sample(x_init=x_init.clone(), step_size=step, div_free=div_free,
                                    dtype_categorical=torch.float64,
                                    time_grid=torch.tensor([0.0, T_FINAL]))
    finally:
        discrete_solver.categorical = orig_cat

    assert len(calls) == S and len(x1s) == S
    t = torch.cat([c['t'][:1] for c in calls])
    grid = torch.cat([t, torch.tensor([T_FINAL])])
    h = grid[1:] - grid[:-1]
    for i in range(S - 1):
        assert torch.equal(rec['h_seen'][i], h[i:i + 1])
    x_after = torch.stack([c['x'] for c in calls[1:]] + [x_final])
    u_jump_full = torch.cat([u_jump, torch.zeros(1, B, L)])
    d = dict(x_init=x_init, A=A, C=C, t=t, h=h, div_free=rec['div_free'],
             p_1t=torch.stack([c['p_1t'] for c in calls]), u_x1=u_x1, x_1=torch.stack(x1s),
             velocity=rec['velocity'], u_jump=u_jump_full, jump=rec['jump'], u_new=rec['u_new'],
             x_after=x_after, x_final=x_final)
    assert torch.equal(x_final, x_after[-1]) and torch.equal(x_final, d['x_1'][-1])
    margin = replay(d, n, step, div_free, p_0.numpy(), V, S)
    attrs = dict(n=n, step_size=step, t_final=T_FINAL, steps=S)
    return d, attrs, margin


def replay(d, n, step, div_free, p_0, V, S):
    """Rebuilds the run from the stored uniforms with the docstring's formulas (Python floats and numpy,
    not their code) and asserts the same trajectory; returns the smallest distance between a uniform and
    the threshold or cumulative sum it was compared with."""
    npy = {k: v.numpy() for k, v in d.items()}
    A, C = npy['A'], npy['C']
    steps = math.ceil((T_FINAL - 0.0) / step)
    grid = [0.0 + step * i for i in range(steps)] + [T_FINAL]
    assert steps == S and np.array_equal(np.array(grid[:-1]), npy['t'])
    margin = math.inf
    x = npy['x_init'].copy()

    def draw(w, u):
        nonlocal margin
        c = list(itertools.accumulate(w))
        margin = min(margin, min(abs(u * c[-1] - ck) for ck in c) / c[-1])
        return inverse_cdf(torch.tensor(np.array([w])), torch.tensor([u]))[0]
    for i in range(S):
        t, h = grid[i], grid[i + 1] - grid[i]
        assert h == npy['h'][i]
        logits = A[np.arange(L)[None, :], x] + t * C[np.arange(L)[None, :], x]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        np.testing.assert_allclose(p, npy['p_1t'][i], rtol=1e-13, atol=1e-15)
        x1 = np.array([[draw(npy['p_1t'][i][b, l], npy['u_x1'][i][b, l]) for l in range(L)] for b in range(B)])
        assert np.array_equal(x1, npy['x_1'][i]), i
        if i == S - 1:
            x = x1
        else:
            k, dk = t ** n, n * t ** (n - 1)
            u = dk / (1 - k) * np.eye(V)[x1]
            c = 12.0 * t ** 2 * (1 - t) ** 0.25 if callable(div_free) else div_free
            assert abs(c - npy['div_free'][i]) <= 1e-14
            if c > 0:
                u = u + c * dk / (k * (1 - k)) * ((1 - k) * p_0[None, None, :] + k * np.eye(V)[x1])
            u[np.eye(V, dtype=bool)[x]] = 0.0
            np.testing.assert_allclose(u, npy['velocity'][i], rtol=1e-13, atol=1e-15)
            threshold = 1 - np.exp(-h * npy['velocity'][i].sum(-1))
            jump = npy['u_jump'][i] < threshold
            margin = min(margin, float(np.min(np.abs(npy['u_jump'][i] - threshold))))
            assert np.array_equal(jump, npy['jump'][i].astype(bool)), i
            assert np.all(npy['u_new'][i][~jump] == 0)
            for b, l in zip(*np.nonzero(jump)):
                x[b, l] = draw(npy['velocity'][i][b, l], npy['u_new'][i][b, l])
        assert np.array_equal(x, npy['x_after'][i]), i
    assert np.array_equal(x, npy['x_final'])
    return margin


def main():
    a = golden_arguments(__doc__)
    assert flow_matching.__version__ == VERSION, flow_matching.__version__
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(a.seed)
    out = {'/': ({}, dict(tokens=TOKENS))}

    with torch.no_grad():
        t = torch.cat([torch.tensor(SCHED_T_FIXED), torch.rand(SCHED_T_RANDOM, generator=gen).sort().values])
        sched = dict(t=t)
        for n in EXPONENTS:
            s = PolynomialConvexScheduler(n)(t)
            assert torch.equal(s.sigma_t, 1 - s.alpha_t)
            sched['n%d/kappa' % n], sched['n%d/d_kappa' % n] = s.alpha_t, s.d_alpha_t
        out['scheduler'] = (sched, None)

        margin = math.inf
        for source in SOURCES:
            for n in EXPONENTS:
                path = MixtureDiscreteProbPath(PolynomialConvexScheduler(n))
                x_1 = torch.randint(0, TOKENS, (B, L), generator=gen)
                x_0 = draw_ids(gen, source)
                t = torch.rand(B, generator=gen)
                u = torch.rand(B, L, generator=gen)
                x_t = sample_path(path, x_0, x_1, t, u)
                sigma = (1 - t ** n)[:, None]
                assert torch.equal(x_t, torch.where(u < sigma, x_0, x_1))
                margin = min(margin, float((u - sigma).abs().min()))
                out['path/%s/n%d' % (source, n)] = (dict(x_0=x_0, x_1=x_1, t=t, u=u, x_t=x_t), dict(n=n))

        for source in SOURCES:
            V = columns(source)
            for n in EXPONENTS:
                path = MixtureDiscreteProbPath(PolynomialConvexScheduler(n))
                x_1 = torch.randint(0, TOKENS, (B, L), generator=gen)
                x_0 = draw_ids(gen, source)
                t = torch.rand(B, generator=gen) * (1.0 - LOSS_T_EPS)   # examples/text/logic/training.py:100
                u = torch.rand(B, L, generator=gen)
                logits = LOGIT_SCALE * torch.randn(B, L, V, generator=gen)
                x_t = sample_path(path, x_0, x_1, t, u)
                gkl = MixturePathGeneralizedKL(path, reduction='none')(logits=logits, x_1=x_1, x_t=x_t, t=t)
                gkl_mean = MixturePathGeneralizedKL(path)(logits=logits, x_1=x_1, x_t=x_t, t=t).mean()
                ce = torch.nn.CrossEntropyLoss(reduction='none')(logits.flatten(0, 1), x_1.flatten(0, 1)).view(B, L)
                ce_mean = torch.nn.CrossEntropyLoss()(logits.flatten(0, 1), x_1.flatten(0, 1)).mean()
                for v in (gkl, gkl_mean, ce, ce_mean):
                    assert v.dtype == torch.float64
                out['loss/%s/n%d' % (source, n)] = (dict(logits=logits, x_1=x_1, x_t=x_t, t=t, gkl=gkl,
                                                         gkl_mean=gkl_mean, ce=ce, ce_mean=ce_mean), dict(n=n))

        for source in SOURCES:
            for variant in VARIANTS:
                d, attrs, m = run_solver(source, variant, gen)
                margin = min(margin, m)
                for k, v in d.items():
                    assert v.dtype in (torch.float64, torch.int64), (k, v.dtype)
                out['solver/%s/%s' % (source, variant)] = (d, attrs)
                print('solver/%s/%s: %d steps, h = %s, %d jumps, x_final has %d masks' % (
                    source, variant, attrs['steps'], d['h'].tolist(), int(d['jump'].sum()),
                    int((d['x_final'] == MASK).sum())))
        print('smallest distance between an injected uniform and its threshold: %.3g' % margin)

    write_and_compare(a, out, SOURCE)


if __name__ == '__main__':
    main()
