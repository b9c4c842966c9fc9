"""Writes the evaluation-protocol fixtures of tests/eval_protocol_test.cpp: the evaluation windows that
the authors' own data pipelines build from a set of documents, token for token.

  SEDD_REF=/tmp/sedd-ref MDLM_REF=/tmp/mdlm-ref .venv/bin/python tests/data/make_protocol_reference.py \
      [--out tests/data]

Needs `transformers` and `datasets` (the authors' pipelines call them) and the authors' code, never the
tests. It writes into --out:
  protocol_tokenizer.json   a small byte-level BPE trained with `tokenizers` on the documents, with
                            <|endoftext|> (what GPT2TokenizerFast.from_pretrained('gpt2') would give);
  protocol_documents.jsonl  the documents, {"text": ...} per line: empty strings, whitespace, unicode,
                            long documents spanning several windows, more than 1000 of them (so that
                            the map batches of 1000 documents matter), few tokens each;
  protocol_reference.h5     the windows:
    /sedd/L{L}_procs{P}/input_ids       data.get_dataset of SEDD (tokens + EOS per document, group_texts
                                         under Dataset.map(batched=True, num_proc=P)), block_size L;
    /mdlm-wrap/L{L}_procs{P}/input_ids  dataloader.get_dataset of MDLM with wrap=True
    /mdlm-wrap/L{L}_procs{P}/attention_mask
    /mdlm-pad/L{L}/input_ids            the same with wrap=False (one padded document per window)
    /mdlm-pad/L{L}/attention_mask
  each group with an int attribute `windows` (the datasets are absent when it is 0) and the root with
  `source` (the authors' repositories and commits), `pad_id`, `bos_id`, `eos_id`, `batch_docs`.

Each pipeline runs in its own process (both repositories have a module named utils): SEDD's with
reference_shims.py, `data.load_dataset` returning a local DatasetDict of the documents and
`data.GPT2TokenizerFast.from_pretrained` loading the fixture tokenizer; MDLM's with mdlm_shims.py,
`datasets.load_dataset` patched the same way, the tokenizer made by `dataloader.get_tokenizer` (its
own post-processing: BertProcessing with <|endoftext|> as BOS and EOS, [PAD] added) from the fixture
tokenizer, and a fresh temporary cache_dir per call (MDLM caches by name and block size only).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

SEDD_COMMIT = '0605786'
MDLM_COMMIT = 'c112c52'
SEDD_BLOCKS = [8, 30, 1024]   # 1024: with 1 process the map batch of the last 30 documents yields no window
PAD_BLOCKS = [8, 16, 40]
PROCS = [1, 2]


def make_documents():
    rng = random.Random(0)
    words = ('the of and to in is was for on that with as by at from his an were are which this be has '
             'river city north music album game season film school war team world Größe naïve café über '
             'Straße 日本語 東京 Привет мир 🙂 🚀 ñandú ελληνικά 3.14 1,000 "quoted" (parens)').split()
    docs = []
    for i in range(1030):
        r = rng.random()
        if r < 0.07:
            docs.append('')
        elif r < 0.095:
            docs.append(rng.choice([' ', '\n', '  \n\t', ' 🙂']))
        elif r < 0.1:  # long: spans several windows of the larger blocks
            docs.append(' '.join(rng.choice(words) for _ in range(rng.randint(30, 80))))
        else:
            docs.append(' '.join(rng.choice(words) for _ in range(rng.randint(1, 5))))
    docs[0] = ''                         # the very first document empty
    docs[-1] = 'the end Größe 🙂'
    return docs


def train_tokenizer(docs, path):
    from tokenizers import ByteLevelBPETokenizer
    t = ByteLevelBPETokenizer()
    t.train_from_iterator(docs, vocab_size=300, min_frequency=2, special_tokens=['<|endoftext|>'])
    t.save(path)


def local_dataset(docs):
    import datasets
    return datasets.DatasetDict({'validation': datasets.Dataset.from_dict({'text': docs})})


def run_sedd(docs, tokenizer_file):
    import reference_shims  # noqa: F401  (SEDD_REF on sys.path, stand-ins)
    import transformers
    import data
    data.load_dataset = lambda name, cache_dir=None: local_dataset(docs)
    data.GPT2TokenizerFast.from_pretrained = staticmethod(
        lambda name: transformers.GPT2TokenizerFast(tokenizer_file=tokenizer_file))
    out = {}
    for L in SEDD_BLOCKS:
        for P in PROCS:
            with tempfile.TemporaryDirectory() as cache:
                ds = data.get_dataset('fixture-documents', 'validation', cache_dir=cache, block_size=L, num_proc=P)
                out[f'sedd/L{L}_procs{P}'] = {'input_ids': [list(map(int, r)) for r in ds['input_ids']]}
    return out


def run_mdlm(docs, tokenizer_file):
    import mdlm_shims  # noqa: F401  (MDLM_REF on sys.path, stand-ins)
    import types
    import datasets
    import transformers
    import dataloader
    datasets.load_dataset = lambda *a, **k: local_dataset(docs)
    transformers.AutoTokenizer.from_pretrained = staticmethod(
        lambda name: transformers.GPT2TokenizerFast(tokenizer_file=tokenizer_file))
    config = types.SimpleNamespace(data=types.SimpleNamespace(tokenizer_name_or_path='fixture-tokenizer'))
    tokenizer = dataloader.get_tokenizer(config)
    out = {'ids': {'pad': tokenizer.pad_token_id, 'bos': tokenizer.bos_token_id, 'eos': tokenizer.eos_token_id}}
    cases = [('mdlm-wrap', True, L, P) for L in SEDD_BLOCKS for P in PROCS]
    cases += [('mdlm-pad', False, L, P) for L in PAD_BLOCKS for P in PROCS]
    for kind, wrap, L, P in cases:
        with tempfile.TemporaryDirectory() as cache:
            ds = dataloader.get_dataset('fixture-documents', tokenizer, wrap, 'validation', cache, block_size=L,
                                        num_proc=P)
            got = {'input_ids': [list(map(int, r)) for r in ds['input_ids']],
                   'attention_mask': [list(map(int, r)) for r in ds['attention_mask']]}
        key = f'{kind}/L{L}_procs{P}' if wrap else f'{kind}/L{L}'
        if not wrap and key in out:  # one document per window: the processes cannot matter
            assert out[key] == got, f'{key}: num_proc changed the unwrapped windows'
        out[key] = got
    return out


def part_main(args):
    docs = [json.loads(line)['text'] for line in open(args.docs, encoding='utf-8')]
    result = run_sedd(docs, args.tokenizer) if args.part == 'sedd' else run_mdlm(docs, args.tokenizer)
    with open(args.result, 'w') as f:
        json.dump(result, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument('--part', choices=['sedd', 'mdlm'])
    ap.add_argument('--docs')
    ap.add_argument('--tokenizer')
    ap.add_argument('--result')
    args = ap.parse_args()
    if args.part:
        return part_main(args)
    for var in ('SEDD_REF', 'MDLM_REF'):
        if var not in os.environ:
            sys.exit(f'set {var} to an unpacked copy of the authors\' repository')
    import h5py
    import numpy as np
    os.makedirs(args.out, exist_ok=True)
    docs = make_documents()
    docs_path = os.path.join(args.out, 'protocol_documents.jsonl')
    with open(docs_path, 'w', encoding='utf-8') as f:
        for d in docs:
            f.write(json.dumps({'text': d}, ensure_ascii=False) + '\n')
    tok_path = os.path.join(args.out, 'protocol_tokenizer.json')
    train_tokenizer(docs, tok_path)
    results = {}
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        for part, keep in (('sedd', 'SEDD_REF'), ('mdlm', 'MDLM_REF')):
            env = {k: v for k, v in os.environ.items() if k not in ('SEDD_REF', 'MDLM_REF')}
            env[keep] = os.environ[keep]
            env['PYTHONPATH'] = here
            res = os.path.join(tmp, part + '.json')
            subprocess.run([sys.executable, os.path.abspath(__file__), '--part', part, '--docs', docs_path,
                            '--tokenizer', tok_path, '--result', res], env=env, check=True)
            results.update(json.load(open(res)))
    ids = results.pop('ids')
    h5_path = os.path.join(args.out, 'protocol_reference.h5')
    with h5py.File(h5_path, 'w') as f:
        f.attrs['source'] = (f'louaaron/Score-Entropy-Discrete-Diffusion {SEDD_COMMIT} data.get_dataset; '
                             f'kuleshov-group/mdlm {MDLM_COMMIT} dataloader.get_dataset and get_tokenizer')
        f.attrs['pad_id'] = ids['pad']
        f.attrs['bos_id'] = ids['bos']
        f.attrs['eos_id'] = ids['eos']
        f.attrs['batch_docs'] = 1000
        for key in sorted(results):
            g = f.create_group(key)
            rows = results[key]['input_ids']
            g.attrs['windows'] = len(rows)
            print(f'{key}: {len(rows)} windows')
            if not rows:
                continue
            g.create_dataset('input_ids', data=np.asarray(rows, dtype=np.int16), compression='gzip')
            if 'attention_mask' in results[key]:
                g.create_dataset('attention_mask', data=np.asarray(results[key]['attention_mask'], dtype=np.int8),
                                 compression='gzip')


if __name__ == '__main__':
    main()
