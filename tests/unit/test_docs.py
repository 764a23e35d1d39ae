"""The docs stay true to the tree: every relative link in README.md, docs/*.md and the other pages resolves (files, and #anchors as
GitHub makes them from headings), every `edsr-dist <command> --flag` they quote (also through `python -m edsr_dist`,
torchrun, horovodrun, mpirun and the launch/ scripts) names a real command and a real flag, ARCHITECTURE.md's
package order is test_imports.ORDER, and every `edsr_dist/...` path a docstring or comment names exists.

A command's flags come from the parser the command itself builds: its `main` is called with no arguments and stopped
at the first parse (nothing after it runs); `train` takes `--<field>` for every Config field (config.parse_train_args).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO
from test_imports import ORDER

from edsr_dist.cli import COMMANDS
from edsr_dist.config import field_names

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "BENCHMARKS.md", REPO / "SECURITY.md",
         REPO / "rank_table" / "README.md"]
# `train` flags handled before the Config fields (config.parse_train_args).
TRAIN_OWN_FLAGS = {"--preset", "--config", "--print-config", "--help", "-h"}
# Scripts whose arguments are train arguments; run_8p.sh first takes an optional --nproc N.
SCRIPTS = {"launch/run_1p.sh": set(), "launch/run_8p.sh": {"--nproc"}, "launch/run_hvd.sh": set()}
SHELL_STOPS = {"&&", "||", "|", ";", ">", ">>", "2>&1"}


# ---- reading markdown ------------------------------------------------------------------------------------------

def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """(prose paragraphs, fenced code lines with backslash continuations joined)."""
    prose, code, paragraph, in_code, pending = [], [], [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            if paragraph:
                prose.append(" ".join(paragraph))
                paragraph = []
            continue
        if in_code:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
            else:
                code.append(pending + line)
                pending = ""
        elif line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            prose.append(" ".join(paragraph))
            paragraph = []
    if paragraph:
        prose.append(" ".join(paragraph))
    return prose, code


INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: the rendered text lower-cased, punctuation dropped, spaces -> hyphens."""
    text = LINK.sub(r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    in_code = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} +(.*?) *#* *$", line)):
            slug = github_slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    prose, _ = split_markdown(page.read_text())
    broken = []
    for paragraph in prose:
        for _, target in LINK.findall(INLINE_CODE.sub("", paragraph)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            name = f"{page.relative_to(root)}: ({target})"
            try:
                file.relative_to(root.resolve())
            except ValueError:
                broken.append(f"{name} leaves the repository")
                continue
            if not file.exists():
                broken.append(f"{name} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{name}: no heading makes #{anchor}")
    return broken


# ---- the commands the docs quote ---------------------------------------------------------------------------------

@dataclass
class Invocation:
    where: str
    command: str  # an edsr-dist command, or a launch/ script
    args: list[str]


def tokens_of(snippet: str) -> list[str]:
    try:
        return shlex.split(snippet, comments=True)
    except ValueError:  # an unbalanced quote in a fragment
        return snippet.split()


def invocations(snippet: str, where: str) -> list[Invocation]:
    found = []
    tokens = tokens_of(snippet)
    for i, token in enumerate(tokens):
        if token == "edsr-dist":
            if not starts_a_command(tokens, i):  # `... this edsr-dist reads version 2 ...` in a quoted message
                continue
            start = i + 1
        elif token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "edsr_dist":
            start = i + 2
        elif any(token.endswith(script) for script in SCRIPTS):
            found.append(Invocation(where, next(s for s in SCRIPTS if token.endswith(s)), until_stop(tokens[i + 1:])))
            continue
        else:
            continue
        # `edsr-dist eval: ...` and `edsr-dist train: error: ...` are output lines, `edsr-dist <version>` a value.
        if start < len(tokens) and not tokens[start].endswith(":") and not tokens[start].startswith("<"):
            found.append(Invocation(where, tokens[start], until_stop(tokens[start + 1:])))
    return found


def starts_a_command(tokens: list[str], i: int) -> bool:
    """Token i begins a shell command: only VAR=value assignments since the start or the last `&&`, `|`, `;`."""
    j = i
    while j > 0 and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[j - 1]):
        j -= 1
    return j == 0 or tokens[j - 1] in SHELL_STOPS


def until_stop(tokens: list[str]) -> list[str]:
    out = []
    for token in tokens:
        if token in SHELL_STOPS or "`" in token:
            break
        out.append(token)
    return out


def quoted_invocations(page: Path, root: Path = REPO) -> list[Invocation]:
    prose, code = split_markdown(page.read_text())
    found = []
    for line in code:
        found += invocations(line, f"{page.relative_to(root)}: {line.strip()[:80]}")
    for paragraph in prose:
        for span in INLINE_CODE.findall(paragraph):
            found += invocations(span, f"{page.relative_to(root)}: `{span[:80]}`")
    return found


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser `edsr-dist NAME` builds, caught at its first parse, before the command does anything."""
    module_name, func_name, _ = COMMANDS[name]
    func = getattr(importlib.import_module(module_name), func_name)
    original = argparse.ArgumentParser.parse_known_args

    def caught(self, args=None, namespace=None):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_known_args = caught
    try:
        func([])
    except _Parsed as parsed:
        return parsed.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"edsr-dist {name} returned without parsing its arguments")


def parser_flags(parser: argparse.ArgumentParser) -> tuple[set[str], dict[str, set[str]]]:
    """(the parser's own options, options of each sub-command)."""
    own = set(parser._option_string_actions)
    subs = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs = {sub: set(p._option_string_actions) for sub, p in action.choices.items()}
    return own, subs


def train_flags() -> set[str]:
    return TRAIN_OWN_FLAGS | {"--" + name.replace("_", "-") for name in field_names()}


def flags_in(args: list[str]) -> list[str]:
    """The options among a command's arguments (`[--flag]` as usage lines write optional ones)."""
    options = [arg.strip("[]").split("=", 1)[0] for arg in args]
    return [arg for arg in options if arg.startswith("-") and arg != "--" and len(arg) > 1
            and not re.fullmatch(r"-?\d[\d.e-]*", arg)]


def unknown_flags(invocation: Invocation, parsers: dict[str, argparse.ArgumentParser]) -> list[str]:
    command, args = invocation.command, invocation.args
    if command in SCRIPTS:
        own = SCRIPTS[command]
        if args and args[0].split("=")[0] in own:  # run_8p.sh --nproc N
            args = args[1:] if "=" in args[0] else args[2:]
        return [f for f in flags_in(args) if f not in train_flags()]
    if command in ("--version", "-V", "--help", "-h", "help"):
        return []
    if command not in COMMANDS:
        return [f"unknown command {command!r}"]
    if command == "train":
        return [f for f in flags_in(args) if f not in train_flags()]
    parser = parsers.setdefault(command, command_parser(command))
    own, subs = parser_flags(parser)
    if command == "launch":
        before, after = (args[:args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])
        bad = [f for f in flags_in(before) if f not in own]
        if "--exec" not in before:  # with --exec the rest is a whole command, checked on its own
            bad += [f for f in flags_in(after) if f not in train_flags()]
        return bad
    if subs:
        positional = [a for a in args if not a.startswith("-")]
        if positional and positional[0] in subs:
            own = own | subs[positional[0]]
        elif positional:
            return [f"unknown sub-command {positional[0]!r} of {command}"]
    return [f for f in flags_in(args) if f not in own]


def unknown_in(pages: list[Path], root: Path = REPO) -> list[str]:
    parsers: dict[str, argparse.ArgumentParser] = {}
    return [f"{inv.where}: {bad}" for page in pages for inv in quoted_invocations(page, root)
            for bad in unknown_flags(inv, parsers)]


# ---- the tests -------------------------------------------------------------------------------------------------

def test_every_relative_link_resolves():
    broken = [b for page in PAGES for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_every_quoted_command_and_flag_exists():
    found = [inv for page in PAGES for inv in quoted_invocations(page)]
    assert len(found) > 100 and {inv.command for inv in found} >= set(COMMANDS)  # the scan sees the docs
    bad = unknown_in(PAGES)
    assert not bad, "\n".join(bad)


def test_every_quoted_module_exists():
    missing = []
    for page in PAGES:
        prose, code = split_markdown(page.read_text())
        snippets = code + [span for paragraph in prose for span in INLINE_CODE.findall(paragraph)]
        for snippet in snippets:
            for module in re.findall(r"-m (edsr_dist\.[\w.]+)", snippet):
                if importlib.util.find_spec(module) is None:
                    missing.append(f"{page.relative_to(REPO)}: python -m {module}")
    assert not missing, "\n".join(missing)


PACKAGES = {p.name for p in (REPO / "edsr_dist").iterdir() if (p / "__init__.py").is_file()}
# Top-level folders of this repository whose paths the pages quote in code spans (docs/ and configs/ paths there are
# as often other projects', e.g. BasicSR's docs/ModelZoo.md; links to our pages are checked as links).
REPO_DIRS = {"edsr_dist", "tests", "launch", "rank_table", "scripts", "data_tools"}


def stale_names(page: Path, root: Path = REPO) -> list[str]:
    """Code spans naming a file of the repository (`launcher/plan.py`, `tests/e2e/test_onnx.py`), a name in a module
    (`state/checkpoint.save_checkpoint`) or a dotted module path (`edsr_dist.inference.weights.load_pretrained`) that is
    not there: a module moved and the page kept its old place."""
    prose, _ = split_markdown(page.read_text())
    stale = []
    where = page.relative_to(root) if page.is_relative_to(root) else page.name
    for span in (s for paragraph in prose for s in INLINE_CODE.findall(paragraph)):
        span = span.strip()
        if "/" not in span or not re.fullmatch(r"[\w./]+", span):
            continue
        path = span.rstrip("/")
        first = path.split("/")[0]
        if first in PACKAGES:
            path = "edsr_dist/" + path
        elif first not in REPO_DIRS:
            continue  # runs/sample/..., benchmark/Set5/HR: the user's files
        if (root / path).exists() or (root / f"{path}.py").is_file():  # a file, a folder, or a module by name
            continue
        base, _, name = path.rpartition(".")
        if base and (root / f"{base}.py").is_file():
            if not hasattr(importlib.import_module(base.replace("/", ".")), name):
                stale.append(f"{where}: `{span}`: {base}.py has no {name}")
        else:
            stale.append(f"{where}: `{span}` does not exist")
    for dotted in re.findall(r"\bedsr_dist(?:\.\w+)+", " ".join(prose)):
        parts = dotted.split(".")
        found = 1
        while found < len(parts) and is_module(".".join(parts[:found + 1])):
            found += 1
        obj = importlib.import_module(".".join(parts[:found]))
        for attr in parts[found:]:
            if not hasattr(obj, attr):
                stale.append(f"{where}: {dotted}: no {attr} in {obj.__name__}")
                break
            obj = getattr(obj, attr)
    return stale


def is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a name inside a module, not a submodule
        return False


def test_every_quoted_module_file_and_name_exists():
    stale = [s for page in PAGES for s in stale_names(page)]
    assert not stale, "\n".join(stale)


def test_the_architecture_package_order_is_the_import_test_order():
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("| order | package | holds |", 1)[1].split("\n\n", 1)[0]
    documented = [INLINE_CODE.findall(row.split("|")[2])[0] for row in table.splitlines()[2:]]
    assert documented == ORDER


def test_the_package_maps_list_every_package_and_module():
    readme = (REPO / "README.md").read_text()
    table = (REPO / "docs" / "ARCHITECTURE.md").read_text().split("| package | concern | modules |", 1)[1]
    rows = {row.split("|")[1].replace("`", "").strip(): row for row in table.split("\n\n", 1)[0].splitlines()[2:]}
    missing = [f"README.md: edsr_dist/{pkg}/" for pkg in sorted(PACKAGES) if f"`edsr_dist/{pkg}/`" not in readme]
    for pkg in sorted(PACKAGES):
        if f"{pkg}/" not in rows:
            missing.append(f"ARCHITECTURE.md: a row for {pkg}/")
            continue
        missing += [f"ARCHITECTURE.md: {pkg}/{m.name}" for m in sorted((REPO / "edsr_dist" / pkg).glob("*.py"))
                    if m.name != "__init__.py" and f"`{m.name}`" not in rows[f"{pkg}/"]]
    top = rows.get("edsr_dist/ (top level)", "")
    missing += [f"ARCHITECTURE.md: {m.name}" for m in sorted((REPO / "edsr_dist").glob("*.py"))
                if m.name != "__init__.py" and f"`{m.name}`" not in top]
    assert not missing, missing


def test_the_checks_catch_what_they_are_for(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "OTHER.md").write_text("# Other page\n\n## Resuming a run (`--resume`)\n\n## Resuming a run (`--resume`)\n")
    page = docs / "PAGE.md"
    page.write_text(
        "# Page\n\n"
        "[fine](OTHER.md#resuming-a-run---resume) [second of two](OTHER.md#resuming-a-run---resume-1) [self](#page)\n"
        "[missing file](NOPE.md) [missing anchor](OTHER.md#resuming) [web](https://example.com/x.md)\n\n"
        "`[not a link](inside-code.md)`\n\n"
        "```bash\n"
        "edsr-dist train --preset sample --epochs 2 --no-such-setting 3\n"
        "edsr-dist eval --checkpoints runs/x \\\n    --data s.h5 --no-such-flag   # a comment --not-a-flag\n"
        "edsr-dist launch --nproc 2 --bogus -- --preset sample --lr 1e-3\n"
        "edsr-dist rank-table make --devices 0-7 --chip 910\n"
        "edsr-dist eval: 2 model(s) on sample.h5 --not-an-invocation\n"
        "error: this edsr-dist reads version 2 --not-an-invocation\n"
        "RANK_TABLE_FILE=t.json edsr-dist launch --wait-table 5 --bogus-too\n"
        "torchrun --nproc-per-node 8 -m edsr_dist train --learning-rate 1\n"
        "bash launch/run_8p.sh --nproc 2 --epochs 1 --epoch 2\n"
        "edsr-dist evaluate --checkpoints x\n"
        "```\n")
    assert sorted(broken_links(page, tmp_path)) == [
        "docs/PAGE.md: (NOPE.md) does not exist",
        "docs/PAGE.md: (OTHER.md#resuming): no heading makes #resuming",
    ]
    bad = [line.rsplit(": ", 1)[1] for line in unknown_in([page], tmp_path)]
    assert bad == ["--no-such-setting", "--no-such-flag", "--bogus", "--chip", "--bogus-too", "--learning-rate", "--epoch",
                   "unknown command 'evaluate'"]


def test_a_moved_module_is_caught(tmp_path):
    page = tmp_path / "PAGE.md"
    page.write_text(
        "Fine: `launcher/plan.py`, `state/checkpoint.save_checkpoint`, `inference/torch_runtime`, `tests/e2e/`,\n"
        "`runs/sample/checkpoints/`, `edsr_dist.inference.weights.load_pretrained`.\n"
        "Stale: `parallel/launcher.py`, `state/checkpoint.save_checkpointz`, `tests/test_onnx.py`,\n"
        "`edsr_dist.weights.load_pretrained`, `edsr_dist.inference.weights.load_pretrainedz`.\n")
    assert stale_names(page) == [
        "PAGE.md: `parallel/launcher.py` does not exist",
        "PAGE.md: `state/checkpoint.save_checkpointz`: edsr_dist/state/checkpoint.py has no save_checkpointz",
        "PAGE.md: `tests/test_onnx.py` does not exist",
        "PAGE.md: edsr_dist.weights.load_pretrained: no weights in edsr_dist",
        "PAGE.md: edsr_dist.inference.weights.load_pretrainedz: no load_pretrainedz in edsr_dist.inference.weights",
    ]


@pytest.mark.parametrize("heading,slug", [
    ("Reading (`edsr_dist.data.store.PatchStore`)", "reading-edsr_distdatastorepatchstore"),
    ("4. Two servers, 16 NPUs", "4-two-servers-16-npus"),
    ("Two workers x 1 thread against 1 worker x 2 threads", "two-workers-x-1-thread-against-1-worker-x-2-threads"),
    ("2. Ascend: ONNX -> `.om` with ATC", "2-ascend-onnx---om-with-atc"),
])
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


PATH_IN_TEXT = re.compile(r"\bedsr_dist/[\w/]*\w(?:\.py)?")


def stale_source_paths(files) -> list[str]:
    """`edsr_dist/...` paths named in the comments and strings (docstrings among them) of Python files that are not
    there: a module moved and a comment kept its old place."""
    stale = []
    for path in files:
        with open(path, "rb") as f:
            for token in tokenize.tokenize(f.readline):
                if token.type not in (tokenize.COMMENT, tokenize.STRING):
                    continue
                for named in PATH_IN_TEXT.findall(token.string):
                    if not (REPO / named).exists() and not (REPO / f"{named}.py").is_file():
                        where = Path(path).relative_to(REPO) if Path(path).is_relative_to(REPO) else Path(path).name
                        stale.append(f"{where}:{token.start[0]}: {named}")
    return stale


def test_every_source_path_named_in_comments_and_docstrings_exists():
    files = [p for folder in ("edsr_dist", "tests", "scripts", "data_tools") for p in sorted((REPO / folder).rglob("*.py"))]
    stale = stale_source_paths(files)
    assert not stale, "\n".join(stale)


def test_the_source_path_check_sees_a_moved_module(tmp_path):
    old = "edsr_dist" + "/atomic.py"  # split, so that this file does not name it
    source = tmp_path / "moved.py"
    source.write_text(f'"""Writes atomically ({old})."""\n# see edsr_dist/state/atomic.py\n')
    assert [line.split(": ", 1)[1] for line in stale_source_paths([source])] == [old]
