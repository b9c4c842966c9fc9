#!/usr/bin/env python3
"""Writes tests/data/sedd_reference.h5: reference vectors computed by the authors' SEDD code
(louaaron/Score-Entropy-Discrete-Diffusion: graph_lib, noise_lib, losses, model.transformer), read by
the golden tests (tests/golden.cpp; docs/DESIGN.md, "Golden reference").

  git --git-dir=<mirror of louaaron/Score-Entropy-Discrete-Diffusion> archive HEAD | tar -x -C /tmp/sedd-ref
  SEDD_REF=/tmp/sedd-ref .venv/bin/python tests/data/make_sedd_reference.py --out FILE [--seed 0]
                                                         [--compare tests/data/sedd_reference.h5]

Every output is the return value of the authors' own function; this script only draws the inputs.
- /noise/{loglinear,geometric}: t = 101 points of [0, 1]; sigma = total_noise(t), dsigma = rate_noise(t)
  (noise_lib.LogLinearNoise(eps=1e-3), GeometricNoise(1e-4, 20)), float64.
- /graph/{absorb,uniform} (20 tokens; dim 21 and 20): x0 [4, 12] tokens, x = the graph's own
  sample_transition(x0, sigma), sigma = (1e-3, 0.3, 1.7, 6), dsigma = (1e-4, 0.05, 0.2, 1), log_score
  [4, 12, dim] standard normal; outputs score_entropy(log_score, sigma, x, x0), transp_transition(x, sigma),
  transition(x, sigma) (uniform only: absorbing's is `pass`), staggered_score(exp(log_score), dsigma),
  reverse_rate(x, exp(log_score)), rate(x), transp_rate(x), float64 (the absorbing graph's rate and
  transp_rate are integer one-hot differences, stored as float64).
- /model/{absorb_small,uniform_small}: model.transformer.SEDD (50 tokens, hidden 64, 4 heads, 2 blocks,
  cond 32, length 16, dropout 0) in float32 with every parameter redrawn as 0.2 * N(0, 1) (the authors'
  initialisation zeroes adaLN and the output layer, which would make the output independent of the
  input; buffers, i.e. rotary_emb.inv_freq, stay theirs); output/log_score = the network on
  input/indices [3, 16] and input/sigma [3]; loss/loss = losses.get_loss_fn(noise, graph, train=True)
  on loss/x0 [3, 16] with their t = loss/t and perturbed_batch = loss/xt, xt being the graph's own
  sample_transition(x0, noise(t)). absorb_small: absorbing graph, log-linear noise, scale_by_sigma;
  uniform_small: uniform graph, geometric noise, no scaling.

Randomness: `--seed` seeds two streams. A torch.Generator draws this script's inputs (in this order:
absorb x0 and log_score, uniform x0 and log_score; then per model: parameters in named_parameters order,
indices, sigma = 0.01 + 3 U, x0, t = 0.01 + 0.98 U). The global generator (torch.manual_seed) is left to
the authors' code: sample_transition of the absorbing then the uniform graph (float64), then per model
their initialisation (overwritten) and sample_transition for loss/xt (float32). indices range over the
graph's dim (the absorbing mask id included), x0 over the 50 tokens. With seed 0 this is the order that
made the committed file: rerun, it rewrites its attributes, inputs, parameters, integers and noise
schedules exactly, its graph outputs to 2e-16..2e-14 relative and its float32 model outputs to float32
rounding (log-scores 4e-6 absolute, losses 7e-7 relative), as --compare prints.

The grid t is written out (t_grid) rather than taken from torch.linspace, whose last bits depend on the
CPU kernel torch picks (on one machine linspace(0, 1, 101) in float64 differs from the committed t in 14
to 19 places depending on ATEN_CPU_CAPABILITY); t_grid is the value the committed file holds.

Dtypes: the model and its loss run in float32, the file's dtype (the authors' bf16 autocast is a no-op
on the CPU); the graph and noise parts run with torch's default dtype set to float64, so that the
authors' internal tensors (torch.ones / torch.zeros in Uniform.rate, Uniform.transition, Absorbing.score_entropy, the
geometric schedule's sigmas) are float64 too.
"""
import os
import sys
import types
from fractions import Fraction

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
from reference_common import golden_arguments, write_and_compare  # noqa: E402
import reference_shims  # noqa: F401,E402  (stand-ins for einops/flash_attn/...; SEDD_REF on sys.path)
import graph_lib, losses, noise_lib  # noqa: E402
from model import transformer  # noqa: E402

NS = types.SimpleNamespace
SOURCE = 'louaaron/Score-Entropy-Discrete-Diffusion (graph_lib, noise_lib, losses, model.transformer)'

GRAPH_TOKENS, GRAPH_B, GRAPH_L = 20, 4, 12
GRAPH_SIGMA = [1e-3, 0.3, 1.7, 6.0]
GRAPH_DSIGMA = [1e-4, 0.05, 0.2, 1.0]
LOGLINEAR_EPS = 1e-3
GEOMETRIC = dict(sigma_min=1e-4, sigma_max=20.0)
MODEL_B = 3
PARAM_STD = 0.2
MODELS = [  # name, graph, noise, scale_by_sigma
    ('absorb_small', 'absorb', 'loglinear', True),
    ('uniform_small', 'uniform', 'geometric', False),
]
MODEL = dict(tokens=50, hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, length=16)


def t_grid(n=101):
    """torch.linspace(0, 1, n) in float64 as torch's AVX2 CPU kernel computed it for the committed file:
    blocks of 4; a block's first value start + step * p (p < n // 2) or end - step * (n - 1 - p), each a
    fused multiply-add; the others that value + step * j; the last n % 4 values one by one, the same
    way. Exact rational arithmetic rounded once per operation, so the same on any machine."""
    step = 1.0 / (n - 1)

    def fma(a, b, c):
        return float(Fraction(a) * Fraction(b) + Fraction(c))

    def first(p):
        return fma(step, p, 0.0) if p < n // 2 else fma(-step, n - 1 - p, 1.0)

    out = []
    for i in range(n):
        p = i - i % 4
        if p + 4 > n:      # the tail, one by one
            out.append(first(i))
        elif i == p:       # a block's first value
            out.append(first(p))
        else:
            out.append(first(p) + step * (i - p))
    return torch.tensor(out, dtype=torch.float64)


def model_config(graph, scale_by_sigma):
    return NS(tokens=MODEL['tokens'], graph=NS(type=graph),
              model=NS(hidden_size=MODEL['hidden_size'], n_heads=MODEL['n_heads'], n_blocks=MODEL['n_blocks'],
                       cond_dim=MODEL['cond_dim'], length=MODEL['length'], scale_by_sigma=scale_by_sigma,
                       dropout=0.0))


def make_noise(kind):
    if kind == 'loglinear':
        return noise_lib.LogLinearNoise(eps=LOGLINEAR_EPS)
    return noise_lib.GeometricNoise(GEOMETRIC['sigma_min'], GEOMETRIC['sigma_max'])


def noise_attrs(kind):
    return dict(eps=LOGLINEAR_EPS) if kind == 'loglinear' else dict(GEOMETRIC)


def main():
    a = golden_arguments(__doc__)
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)                    # the authors' own draws (sample_transition, initialisation)
    gen = torch.Generator().manual_seed(a.seed)  # this script's inputs
    out = {}                                     # path -> (datasets, attributes)

    # Noise schedules and graphs: float64 throughout, the authors' internal tensors included.
    torch.set_default_dtype(torch.float64)
    t = t_grid()
    for kind in ('loglinear', 'geometric'):
        noise = make_noise(kind)
        with torch.no_grad():
            out['noise/' + kind] = (dict(t=t, sigma=noise.total_noise(t), dsigma=noise.rate_noise(t)), noise_attrs(kind))

    graphs = {'absorb': graph_lib.Absorbing(GRAPH_TOKENS), 'uniform': graph_lib.Uniform(GRAPH_TOKENS)}
    inputs = {}
    for kind, graph in graphs.items():
        x0 = torch.randint(0, GRAPH_TOKENS, (GRAPH_B, GRAPH_L), generator=gen)
        log_score = torch.randn(GRAPH_B, GRAPH_L, graph.dim, dtype=torch.float64, generator=gen)
        inputs[kind] = (x0, log_score)
    sigma = torch.tensor(GRAPH_SIGMA, dtype=torch.float64)
    dsigma = torch.tensor(GRAPH_DSIGMA, dtype=torch.float64)
    for kind, graph in graphs.items():
        x0, log_score = inputs[kind]
        x = graph.sample_transition(x0, sigma[:, None])
        score = log_score.exp()
        ds = dict(x0=x0, x=x, sigma=sigma, dsigma=dsigma, log_score=log_score,
                  score_entropy=graph.score_entropy(log_score, sigma[:, None], x, x0),
                  transp_transition=graph.transp_transition(x, sigma[:, None]),
                  staggered_score=graph.staggered_score(score, dsigma[:, None]),
                  reverse_rate=graph.reverse_rate(x, score),
                  rate=graph.rate(x).double(),
                  transp_rate=graph.transp_rate(x).double())
        if kind == 'uniform':  # Absorbing.transition is `pass` in the authors' code
            ds['transition'] = graph.transition(x, sigma[:, None])
        for k, v in ds.items():
            assert v.dtype == (torch.int64 if k in ('x0', 'x') else torch.float64), (kind, k, v.dtype)
        out['graph/' + kind] = (ds, dict(dim=graph.dim, tokens=GRAPH_TOKENS))

    # Models: float32, as the authors train them (their autocast is a no-op on the CPU).
    torch.set_default_dtype(torch.float32)
    for name, graph_kind, noise_kind, scale_by_sigma in MODELS:
        cfg = model_config(graph_kind, scale_by_sigma)
        model = transformer.SEDD(cfg)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.copy_(PARAM_STD * torch.randn(p.shape, generator=gen))
        graph = graph_lib.get_graph(cfg, torch.device('cpu'))
        noise = make_noise(noise_kind)
        indices = torch.randint(0, graph.dim, (MODEL_B, MODEL['length']), generator=gen)
        in_sigma = 0.01 + 3.0 * torch.rand(MODEL_B, generator=gen)
        x0 = torch.randint(0, MODEL['tokens'], (MODEL_B, MODEL['length']), generator=gen)
        t_loss = 0.01 + 0.98 * torch.rand(MODEL_B, generator=gen)
        with torch.no_grad():
            xt = graph.sample_transition(x0, noise(t_loss)[0][:, None])
            model.eval()
            log_score = model(indices, in_sigma)
            loss = losses.get_loss_fn(noise, graph, train=True)(model, x0, t=t_loss, perturbed_batch=xt)
        assert log_score.dtype == loss.dtype == torch.float32 and loss.shape == (MODEL_B,)
        attrs = dict(graph=graph_kind, noise=noise_kind, scale_by_sigma=int(scale_by_sigma), **MODEL,
                     **noise_attrs(noise_kind))
        out['model/%s/params' % name] = ({k: v.clone() for k, v in model.state_dict().items()}, None)
        out['model/%s/input' % name] = (dict(indices=indices, sigma=in_sigma), None)
        out['model/%s/output' % name] = (dict(log_score=log_score), None)
        out['model/%s/loss' % name] = (dict(x0=x0, t=t_loss, xt=xt, loss=loss), None)
        out['model/' + name] = ({}, attrs)

    write_and_compare(a, out, SOURCE)


if __name__ == '__main__':
    main()
