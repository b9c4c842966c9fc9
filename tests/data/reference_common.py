"""What the reference generators in this folder share: writing and comparing HDF5 groups, the
Markov-chain token data of the step references, and float64 versions of the two spots where the
authors' networks (SEDD's and MDLM's DDiT, the same code) cast to float32. Generators only; the tests
never import it."""
import math
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch
import torch.nn.functional as F


def authors_diffusion(diffusion_module, noise_schedule_module, backbone, tokens, vocab):
    """The MDLM and BD3-LM authors' Diffusion without its __init__ (which downloads a tokenizer): the
    fields every method used here reads; the caller sets the rest."""
    d = diffusion_module.Diffusion.__new__(diffusion_module.Diffusion)
    torch.nn.Module.__init__(d)
    d.backbone = backbone
    d.noise = noise_schedule_module.LogLinearNoise()
    d.vocab_size = vocab
    d.mask_index = tokens
    d.neg_infinity = -1000000.0
    d.parameterization = 'subs'
    return d


def write(group, datasets, attrs=None):
    for k, v in (attrs or {}).items():
        group.attrs[k] = v
    for k, v in datasets.items():
        group.create_dataset(k, data=v.detach().cpu().numpy() if torch.is_tensor(v) else v)


def compare(new, old):
    """Every dataset and attribute of `new` against `old`: exact, or the largest relative difference."""
    worst, differ = 0.0, 0
    with h5py.File(new, 'r') as f, h5py.File(old, 'r') as g:
        names, other = [], []
        f.visit(names.append)
        g.visit(other.append)
        for n in sorted(set(other) - set(names)):
            print('only in %s: %s' % (old, n))
            differ += 1
        for n in [''] + names:
            obj = f[n] if n else f
            if n and n not in g:
                print('only in %s: %s' % (new, n))
                differ += 1
                continue
            ref = g[n] if n else g
            if set(obj.attrs) != set(ref.attrs) or any(np.any(obj.attrs[k] != ref.attrs[k]) for k in obj.attrs):
                print('attributes differ: /%s' % n)
                differ += 1
            if not isinstance(obj, h5py.Dataset):
                continue
            x, y = obj[()], ref[()]
            if x.dtype != y.dtype or np.shape(x) != np.shape(y):
                print('/%s: %s%s != %s%s' % (n, x.dtype, np.shape(x), y.dtype, np.shape(y)))
                differ += 1
            elif not np.array_equal(x, y):
                if x.dtype.kind in 'iu':
                    print('/%s: integers differ at %d places' % (n, int(np.sum(x != y))))
                    differ += 1
                    continue
                x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                rel = float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-300)))
                print('/%s: max rel diff %.3g (%d of %d values differ)' % (n, rel, int(np.sum(x != y)), x.size))
                worst = max(worst, rel)
    print('compared with %s: %d structural differences, largest relative difference %.3g' % (old, differ, worst))
    return 1 if differ else 0


def markov_tokens(n, V, seed):
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(V, 0.3), size=V)
    x = np.empty(n, dtype=np.uint16)
    s = 0
    for k in range(n):
        x[k] = s
        s = int(rng.choice(V, p=P[s]))
    return x


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def layer_norm_in_input_dtype(self, x):  # authors': F.layer_norm(x.float(), [self.dim]) * weight
    return F.layer_norm(x, [self.dim]) * self.weight[None, None, :]


def timestep_embedding_in_input_dtype(t, dim, max_period=10000):  # authors': float32 freqs and args
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=t.dtype) / half)
    args = t[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def record_our_run(bin_dir, prefix, config, V, L, markov_seed, snapshots, **fields):
    """One shard of Markov tokens (V ids, the last one end-of-text), `config` formatted with it and
    `fields`, and `sedd-parity record` of our trainer on it (one thread): the recording's path."""
    work = tempfile.mkdtemp(prefix=prefix)
    shard = os.path.join(work, 'train-00000.h5')
    with h5py.File(shard, 'w') as f:
        f.create_dataset('tokens', data=markov_tokens(256 * L, V - 1, markov_seed))
        f.attrs['vocab_size'] = V
        f.attrs['eot_id'] = V - 1
        f.attrs['tokenizer'] = 'markov-synthetic'
        f.attrs['format_version'] = 1
    cfg_path = os.path.join(work, 'parity.ini')
    open(cfg_path, 'w').write(config.format(shard=shard, L=L, **fields))
    ours = os.path.join(work, 'ours.h5')
    subprocess.run([os.path.join(bin_dir, 'sedd-parity'), 'record', '--config', cfg_path, '--out', ours,
                    '--snapshots', snapshots], check=True, env=dict(os.environ, SEDD_CORES='1'))
    return ours


def write_reference(path, out, seed, source):
    """`out` {group path: (datasets, attrs)} into `path`, published by rename (never half written)."""
    tmp = path + '.partial'
    with h5py.File(tmp, 'w') as f:
        f.attrs['seed'] = np.int64(seed)
        f.attrs['source'] = source
        for group, (datasets, attrs) in out.items():
            write(f.require_group(group), datasets,
                  {k: np.int64(v) if isinstance(v, (bool, int)) else v for k, v in (attrs or {}).items()})
    os.replace(tmp, path)


# The start of every step reference's sedd-train config (run, data, the small model); each generator
# adds its model and [diffusion]/[train] keys.
STEP_CONFIG_HEAD = """[run]
seed = {seed}
[data]
train = {shard}
seq_len = {L}
prefetch = 0
[model]
hidden_size = 24
n_heads = 2
n_blocks = 2
cond_dim = 8
dropout = 0.0
"""


def stub_torchdiffeq():
    """flow_matching.solver imports torchdiffeq for its ODE solver, which the generators never call:
    a stand-in that refuses to run, when the package is absent."""
    import types
    try:
        import torchdiffeq  # noqa: F401
    except ImportError:
        def _no_odeint(*a, **k):
            raise RuntimeError('torchdiffeq stand-in: the ODE solver is not used by this script')
        sys.modules['torchdiffeq'] = types.ModuleType('torchdiffeq')
        sys.modules['torchdiffeq'].odeint = _no_odeint


def write_authors(dst, out, snaps, law, seeds, cap, loss_per=None):
    """The authors' side of a step reference: /authors (per-step values, the snapshot steps' tensors)
    and /init_law (their initial weights for `seeds`, the first `cap` values of each tensor)."""
    g = dst.create_group('authors')
    if loss_per:
        g.attrs['loss_per'] = loss_per
    for k, v in out.items():
        g.create_dataset(k, data=np.array(v, dtype=np.float64))
    for step, d in snaps.items():
        sg = g.create_group('step_%06d' % step)
        for k, v in d.items():
            sg.create_dataset(k, data=v.numpy())
    lg = dst.create_group('init_law')
    lg.attrs['seeds'] = seeds
    lg.attrs['cap_per_seed'] = cap
    for n, parts in law.items():
        lg.create_dataset(n, data=torch.cat(parts).float().numpy())  # float32 values


def copy_our_run(src, dst):
    """Our side of a step reference, from the file `sedd-parity record` wrote (open h5py files): its
    attributes, data, initial weights and per-step draws, and our per-step values for reference."""
    for k, v in src.attrs.items():
        dst.attrs[k] = v
    for g in ('data', 'init', 'steps'):
        src.copy(g, dst)
    for k in ('loss', 'grad_norm', 'clip_coef', 'lr', 'snapshot_steps'):
        src.copy('ours/' + k, dst, name='ours/' + k)


def golden_arguments(doc):
    """The command line every golden generator takes: --out, --seed, --compare."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--compare', metavar='FILE', help='afterwards, compare every dataset and attribute with FILE')
    return ap.parse_args()


def write_and_compare(a, out, source):
    """Writes the reference `out` to a.out and, with --compare, exits with compare()'s status."""
    write_reference(a.out, out, a.seed, source)
    print('wrote', a.out, os.path.getsize(a.out), 'bytes')
    if a.compare:
        sys.exit(compare(a.out, a.compare))
