#!/usr/bin/env python3
"""Writes tests/data/detokenizer_reference.json: inputs and what the authors' detokenizers return for
them, read by tests/detokenizer_test.cpp (suite Detokenizer*), which checks that sedd-prepare's
--detokenizer (src/data/detokenizer.cpp) gives the same string for every input.

  MDLM_REF=/tmp/mdlm-ref SEDD_REF=/tmp/sedd-ref .venv/bin/python tests/data/make_detokenizer_reference.py \
      [--out tests/data/detokenizer_reference.json]

MDLM_REF: kuleshov-group/mdlm at c112c52 (dataloader.py: wt_detokenizer, ptb_detokenizer,
lm1b_detokenizer, lambada_detokenizer, scientific_papers_detokenizer). SEDD_REF:
louaaron/Score-Entropy-Discrete-Diffusion at 0605786 (data.py: the first four). The script checks that
the SEDD functions are the MDLM ones (the same syntax tree, the same output on every input) and stores
the MDLM outputs. Inputs: hand-written cases aimed at every str.replace and re.sub of every function
(and their edge cases), then random strings drawn from the rules' pieces so that rules meet each other.
Every output is the return value of the authors' own function."""
import argparse
import ast
import inspect
import json
import os
import random
import sys
import textwrap

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, here)
import mdlm_shims  # noqa: E402,F401  (sets up $MDLM_REF and the stand-ins)

sys.path.insert(0, os.environ['MDLM_REF'])
import dataloader as mdlm  # noqa: E402

# SEDD's data.py sits under a name of its own: both repositories have modules of the same names.
import importlib.util  # noqa: E402
spec = importlib.util.spec_from_file_location('sedd_data', os.path.join(os.environ['SEDD_REF'], 'data.py'))
sedd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sedd)

FUNCTIONS = {
    'wikitext': mdlm.wt_detokenizer,
    'ptb': mdlm.ptb_detokenizer,
    'lm1b': mdlm.lm1b_detokenizer,
    'lambada': mdlm.lambada_detokenizer,
    'scientific_papers': mdlm.scientific_papers_detokenizer,
}
SEDD_FUNCTIONS = {'wikitext': sedd.wt_detokenizer, 'ptb': sedd.ptb_detokenizer, 'lm1b': sedd.lm1b_detokenizer,
                  'lambada': sedd.lambada_detokenizer}

CASES = [
    # shared edge cases
    '', ' ', '\n', 'plain text without rules', 'ünïcödé 你好 🙂 text', '  leading and trailing  ',
    # wt: contractions, "/' N/", number separators
    "the players ' union", "/' 5/ and /' x/ and /'5/", '1 @-@ 2 , 3 @,@ 000 , 4 @.@ 5', ' @-@ @-@ ',
    # wt: punctuation
    'a : b ; c . d ! e ? f , g', 'end .', ' . . . ',
    # wt: brackets, quotes, nesting, unbalanced, newlines, unicode white space inside
    '( a )', '(  spaced  )', '( nested ( inner ) )', '( unbalanced', 'unbalanced )', '[ list ]', '[ [ x ] ]',
    '{ brace }', '{ { x } }', '" quoted "', '" one " and " two "', '" unbalanced', "' single '", "' a ' b '",
    '( line\nbreak )', '(\u00a0nbsp\u00a0)', '(\u3000ideographic\u3000)', '(\x1cfile sep\x1f)', '(\x85next line\x85)',
    '(\u2028line sep\u2029)', '(\u200bzero width\u200b)', '( )', '()', '"\n"', "''", "'\t'",
    # wt: miscellaneous
    '= = = = Heading = = = =', '= = = Sub = = =', '= = Section = =', '= = = = = =', 'it was 5 \u00b0 C',
    'line \nnext', 'line\n next', ' \n \n ', 'he N said', 'a N N b', "John 's book", " 's", 'word \n',
    ' = Valkyria Chronicles III = \n', ' = = Gameplay = = \n',
    # ptb
    "it 's", "the players ' ", "do n't", 'a \n b', 'a\\/b', ' N N N N N ', '$ 1 million', '# 1 seed',
    '<unk> and <unk>', ' N ' * 12, 'costs $ N billion', "they ' re",
    # lm1b
    'see http : / / example.com and https : / / x.org', " 'word and 'quote", " don 'tell", " end . next",
    " final .", " final .\n", " why ? yes", " why ?", " why ?\n", " wow ! yes", " wow !", " wow !\n",
    'a , b : c ; d', 'either / or', '" quoted text "', "' single text '", '( paren text )', '( a ( b ) )',
    '[ bracket text ]', '[ a [ b ] ]', '$ 5 and \u00a3 3', ' café . ', ' x\u0301 . ', ' 42 . ', ' a_b . ',
    " '\u00b2", " 'x\u0301y", ' word .  ', '"" ""', '" "', '( )', '[ ]', ' \u0661\u0662 . ', ' Ⅻ . ',
    # lambada
    '\u201chello\u201d she said', '  padded  ', '\t\n tabs \n\t', '\u3000full width\u3000', '\x85x\x85',
    '\u2028x\u2029', '\u200bnot space\u200b', '\x1cx\x1f', 'a\u201c\u201db',
]

PIECES = ['s', "s '", "'", '/', "/' 7/", '@-@', '@,@', '@.@', ':', ';', '.', '!', '?', ',', '(', ')', '[', ']', '{',
          '}', '"', '=', '\u00b0', '\n', 'N', "'s", "n't", '\\/', '$', '#', '1', '<unk>', 'http', 'https', '\u00a3',
          '\u201c', '\u201d', 'word', 'Word', 'x_y', 'é', '中文', '\u0301', '\u00a0', '\u3000', '\t', '\x1c', '\x85',
          '\u2028', '🙂', '42']


def random_cases(count, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(1, 30)
        sep = [' ', ' ', ' ', '', '  ', '\n']
        out.append(''.join(rng.choice(PIECES) + rng.choice(sep) for _ in range(n)))
    return out


def same_source(a, b):
    def tree(f):
        return [ast.dump(s) for s in ast.parse(textwrap.dedent(inspect.getsource(f))).body[0].body]
    return tree(a) == tree(b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.path.join(here, 'detokenizer_reference.json'))
    ap.add_argument('--random', type=int, default=200)
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args()
    inputs = CASES + random_cases(args.random, args.seed)
    out = {'source': 'kuleshov-group/mdlm c112c52 dataloader.py; louaaron/Score-Entropy-Discrete-Diffusion 0605786 '
                     'data.py (identical functions)',
           'inputs': inputs, 'outputs': {}}
    for name, fn in FUNCTIONS.items():
        outputs = [fn(s) for s in inputs]
        if name in SEDD_FUNCTIONS:
            assert same_source(fn, SEDD_FUNCTIONS[name]), f'{name}: SEDD and MDLM functions differ'
            assert outputs == [SEDD_FUNCTIONS[name](s) for s in inputs], f'{name}: SEDD and MDLM outputs differ'
        changed = sum(o != s for o, s in zip(outputs, inputs))
        print(f'{name}: {changed} of {len(inputs)} inputs changed')
        out['outputs'][name] = outputs
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump(out, f, ensure_ascii=True, indent=0)
        f.write('\n')
    print('wrote', args.out)


if __name__ == '__main__':
    main()
