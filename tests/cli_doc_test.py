#!/usr/bin/env python3
"""docs/cli.md against every executable's --help, and the relative links of the docs.

    cli_doc_test.py BIN_DIR SOURCE_DIR

For every executable built from tools/*.cpp (BIN_DIR/sedd-*) and the Python tools
tools/sedd_convert.py and tools/sedd_plot.py (run with $SEDD_PYTHON, else SOURCE_DIR/.venv): the
option names its --help prints must all be mentioned in that executable's section of docs/cli.md
(its `## NAME` heading down to the next `##`), and every --option that section names must be one
its --help prints. sedd-bench-train and
`sedd-parity record` take every sedd-train key: those are documented once, under sedd-train.

Then every relative link in README.md and docs/*.md must point to a file that exists, and a
`#anchor` into a Markdown file to one of its headings.

Prints what is missing per executable and exits 1 if anything is; 0 otherwise.
"""
import os
import re
import subprocess
import sys

# boost::program_options and argparse print one option per line, indented two spaces:
# "  --name arg (=1)", "  -h [ --help ]", "  -h, --help", "  --config CONFIG".
HELP_OPTION = re.compile(r"^  (?:-\w(?:, | \[ ))?--([A-Za-z][\w.-]*)", re.M)
# In the doc: --name in lower case (so a placeholder such as --SECTION.KEY is not an option).
DOC_OPTION = re.compile(r"(?<![\w-])--([a-z](?:[\w.-]*\w)?)")
# Options that every tool has and the doc need not repeat.
IGNORED = {"help"}
# Executables whose --help includes every sedd-train key; those keys are documented under sedd-train.
INHERITS = {"sedd-bench-train": "sedd-train", "sedd-parity": "sedd-train"}


def run_help(cmd):
    """(exit code, stdout + stderr) of a --help command line."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return p.returncode, p.stdout


def help_options(text, argparse_style):
    """Option names (without --) listed by one --help text."""
    if argparse_style:  # only the "options:" block; the description may start lines with --flags
        m = re.search(r"^(?:options|optional arguments):\n(.*)", text, re.M | re.S)
        text = m.group(1) if m else ""
    return {o for o in HELP_OPTION.findall(text) if o not in IGNORED}


def sections(doc):
    """{heading text without backticks: section text} for every level-2 heading of docs/cli.md."""
    out, name, lines = {}, None, []
    for line in doc.splitlines():
        m = re.match(r"^## (.+?)\s*$", line)
        if m:
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = m.group(1).replace("`", ""), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out


def executables(bin_dir, src):
    """[(name, [help command lines], argparse style)] for every tool this test covers."""
    tools = []
    names = sorted(f[:-4].replace("_", "-") for f in os.listdir(os.path.join(src, "tools")) if f.endswith(".cpp")
                   and f.startswith("sedd_"))
    for name in names:
        path = os.path.join(bin_dir, name)
        if name == "sedd-parity":  # `sedd-parity COMMAND --help`
            tools.append((name, [[path, "compare", "--help"], [path, "record", "--help"]], False))
        else:
            tools.append((name, [[path, "--help"]], False))
    # The Python tools run with the project's Python: $SEDD_PYTHON, else SOURCE_DIR/.venv, else this one.
    py = os.environ.get("SEDD_PYTHON") or os.path.join(src, ".venv", "bin", "python")
    if not os.access(py, os.X_OK):
        py = sys.executable
    convert = os.path.join(src, "tools", "sedd_convert.py")
    if os.path.exists(convert):
        tools.append(("tools/sedd_convert.py",
                      [[py, convert, "--help"], [py, convert, "to-h5", "--help"], [py, convert, "to-torch", "--help"]],
                      True))
    plot = os.path.join(src, "tools", "sedd_plot.py")
    if os.path.exists(plot):
        tools.append(("tools/sedd_plot.py", [[py, plot, "--help"]], True))
    return tools


def check_cli(bin_dir, src):
    with open(os.path.join(src, "docs", "cli.md")) as f:
        secs = sections(f.read())
    helps, problems, notes = {}, [], []
    for name, cmds, argparse_style in executables(bin_dir, src):
        if not name.startswith("tools/") and not os.access(cmds[0][0], os.X_OK):
            problems.append("%s: not built in %s" % (name, bin_dir))
            continue
        opts, answered, failures = set(), 0, []
        for cmd in cmds:
            rc, text = run_help(cmd)
            if rc == 0:
                answered += 1
                opts |= help_options(text, argparse_style)
            else:
                failures.append("`%s` exit %d: %s" % (" ".join(os.path.basename(c) for c in cmd[-3:]), rc,
                                                      text.strip().splitlines()[-1] if text.strip() else ""))
        if answered == 0:
            # Nothing to compare with: say so rather than pass silently.
            notes.append("%s: no --help printed an option list, not checked (%s)" % (name, "; ".join(failures)))
            continue
        helps[name] = opts
    for name, opts in helps.items():
        if name not in secs:
            problems.append("%s: docs/cli.md has no '## %s' section" % (name, name))
            continue
        documented = {o for o in DOC_OPTION.findall(secs[name]) if o not in IGNORED}
        parent = INHERITS.get(name)
        inherited = helps.get(parent, set()) if parent else set()
        parent_doc = {o for o in DOC_OPTION.findall(secs.get(parent, ""))} if parent else set()
        undocumented = sorted(o for o in opts - documented if not (o in inherited and o in parent_doc))
        unknown = sorted(documented - opts)
        for o in undocumented:
            problems.append("%s: --%s is in --help but not in its docs/cli.md section" % (name, o))
        for o in unknown:
            problems.append("%s: --%s is in its docs/cli.md section but not in --help" % (name, o))
        print("%-24s %3d options in --help, %3d named in docs/cli.md" % (name, len(opts), len(documented)))
    return problems, notes


def slug(heading):
    """GitHub's anchor of a heading."""
    s = heading.strip().lower().replace("`", "")
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(path):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+?)\s*$", text, re.M)}


def check_links(src):
    problems = []
    files = [os.path.join(src, "README.md")]
    docs = os.path.join(src, "docs")
    files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    for path in files:
        with open(path) as f:
            text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            where = os.path.relpath(path, src)
            if not os.path.exists(dest):
                problems.append("%s: link %s: no file %s" % (where, target, os.path.relpath(dest, src)))
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                problems.append("%s: link %s: no heading #%s in %s" % (where, target, anchor,
                                                                     os.path.relpath(dest, src)))
    return problems


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    bin_dir, src = sys.argv[1], sys.argv[2]
    problems, notes = check_cli(bin_dir, src)
    problems += check_links(src)
    for n in notes:
        print("note: " + n)
    for p in problems:
        print("MISSING " + p)
    print("%d problems" % len(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
