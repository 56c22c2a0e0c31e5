"""The documentation agrees with the code, where that can be checked mechanically.

* docs/method.md documents every configuration knob of :class:`bdgf.config.RunConfig` (the three
  sections and the nested dicts handed to their owners' dataclasses, walked here) in a table row
  ``| `key` | `default` | what it does |`` whose default is the one a run gets; and every config
  key it mentions in backticks, and every ``--set key=value`` in docs/*.md and README.md, exists;
  the ``--set`` values of each command shown, applied together, pass the config's checks.
* Every ``bdgf <command> --option`` shown as code (fenced and indented code blocks of shell
  kind, inline code spans) in docs/*.md and README.md is a command of the CLI with that option
  (``typer.main.get_command(bdgf.cli.app)``); code blocks for other tools (python, yaml, ...)
  are skipped.
* Every relative link in docs/*.md and README.md points at a file that exists (and at a heading
  of it that exists, for an anchor into a markdown page).
* No git-tracked file outside tests/ mentions the development machine's shared folder or the
  design notes kept there (a clone has neither).

``python tests/test_docs.py`` prints the knob tables' first two columns (key, default) as
docs/method.md needs them, for when a knob is added.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SECTIONS = ("pretrain", "features", "train")
# Shell-kind fence languages: the `bdgf` lines in these are checked against the CLI.
SHELL_FENCES = ("", "bash", "sh", "shell", "console", "text")


def doc_files() -> list[Path]:
    """docs/*.md and the top-level README.md."""
    return sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ----------------------------------------------------------------------------------------
# Configuration knobs
# ----------------------------------------------------------------------------------------


def _owners() -> dict[str, type]:
    """The dataclass that owns each nested dict section of the run config."""
    from bdgf.diffusion.masking import MaskingConfig
    from bdgf.diffusion.schedules import ScheduleConfig
    from bdgf.diffusion.unet import UNetConfig
    from bdgf.losses import MutualLearningConfig
    from bdgf.models.classifier import ClassifierConfig

    return {"pretrain.unet": UNetConfig, "pretrain.schedule": ScheduleConfig, "pretrain.masking": MaskingConfig,
            "train.model": ClassifierConfig, "train.mutual": MutualLearningConfig}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_knobs() -> tuple[dict[str, object], set[str]]:
    """({dotted key: the default a run gets}, {dotted section names}).

    Walks RunConfig's sections; a dict-valued field is a nested section walked through its
    owner's dataclass (less the keys a run sets itself, ``bdgf.config._SET_ELSEWHERE``), with the
    run config's own default dict overriding the owner's defaults (``pretrain.masking`` sets
    ``warmup_steps: 50``; ``train.model`` sizes the Mamba branch down)."""
    from bdgf.config import _SET_ELSEWHERE, RunConfig

    owners = _owners()
    defaults = RunConfig().to_dict()
    knobs: dict[str, object] = {}
    sections: set[str] = set(SECTIONS)

    def walk(cls, path: str, given: dict) -> None:
        sections.add(path)
        skip = _SET_ELSEWHERE.get(path, {})
        for f in dataclasses.fields(cls):
            if not f.init or f.name in skip:
                continue
            key = f"{path}.{f.name}"
            default = _field_default(f)
            assert default is not dataclasses.MISSING, f"{key}: no default and not set by the run"
            if dataclasses.is_dataclass(default):
                walk(type(default), key, given.get(f.name) or {})
            else:
                knobs[key] = given.get(f.name, default)

    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(RunConfig(), section.name))
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            value = defaults[section.name][f.name]
            if key in owners:
                walk(owners[key], key, value)
            else:
                assert not isinstance(value, dict), f"{key} is a nested section with no owner in _owners()"
                knobs[key] = value
    return knobs, sections


def fmt(value) -> str:
    """A default as the tables write it (YAML-like: null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


ROW = re.compile(r"^\|\s*`([A-Za-z0-9_.]+)`\s*\|\s*`([^`]*)`\s*\|")
KEY = re.compile(r"^(?:pretrain|features|train)(?:\.[A-Za-z0-9_]+)+")
SET = re.compile(r"--set\s+['\"]?((?:pretrain|features|train)[A-Za-z0-9_.]*)=")


def table_rows(text: str) -> dict[str, str]:
    """{key: default} of the knob table rows of a markdown page."""
    rows = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and KEY.fullmatch(m.group(1)):
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_knob_is_documented_with_its_default():
    knobs, _ = config_knobs()
    rows = table_rows(METHOD.read_text(encoding="utf-8"))
    missing = sorted(set(knobs) - set(rows))
    assert not missing, f"docs/method.md has no table row for config keys {missing}"
    wrong = {k: (rows[k], fmt(v)) for k, v in knobs.items() if rows[k] != fmt(v)}
    assert not wrong, f"docs/method.md: defaults differ from bdgf.config (doc, code): {wrong}"


def test_method_mentions_only_existing_config_keys():
    knobs, sections = config_knobs()
    known = set(knobs) | sections
    text = METHOD.read_text(encoding="utf-8")
    bad = []
    for span in re.findall(r"`([^`\n]+)`", text):
        m = KEY.match(span.strip())
        if m and m.group(0) not in known:
            bad.append(m.group(0))
    assert not bad, f"docs/method.md mentions config keys that RunConfig does not have: {sorted(set(bad))}"


def test_set_overrides_name_existing_keys():
    knobs, sections = config_knobs()
    known = set(knobs) | sections
    bad = [f"{_rel(p)}: --set {k}=" for p in doc_files() if p.exists()
           for k in SET.findall(p.read_text(encoding="utf-8")) if k not in known]
    assert not bad, f"--set of keys RunConfig does not have: {bad}"


def set_overrides(code: str) -> list[dict[str, str]]:
    """The ``--set key=value`` pairs of each `bdgf` invocation in a line of shell code, as one
    dict of raw values per invocation (a README's ``[--set k=v]`` optional brackets removed)."""
    out = []
    for part in re.split(r"\s\|\s|&&|;", re.split(r"(?:^|\s)#", code)[0]):
        if not INVOCATION.search(part) or "--set" not in part:
            continue
        try:
            words = shlex.split(part)
        except ValueError:
            continue
        pairs = {}
        for i, w in enumerate(words[:-1]):
            if w.lstrip("[") == "--set" and "=" in words[i + 1]:
                item = words[i + 1]
                if item.endswith("]") and item.count("]") > item.count("["):
                    item = item[:-1]
                key, value = item.split("=", 1)
                pairs[key] = value
        if pairs:
            out.append(pairs)
    return out


def test_set_overrides_in_commands_build_a_valid_config():
    """Each command's --set values, applied together to the default config, pass its checks."""
    import yaml

    from bdgf.config import ConfigError, RunConfig

    bad = []
    for path in doc_files():
        if not path.exists():
            continue
        for n, code in code_snippets(path.read_text(encoding="utf-8")):
            for pairs in set_overrides(code):
                if any("…" in v or "..." in v for v in pairs.values()):
                    continue  # a placeholder
                try:
                    RunConfig().with_overrides({k: yaml.safe_load(v) for k, v in pairs.items()})
                except (ConfigError, yaml.YAMLError) as exc:
                    bad.append(f"{_rel(path)}:{n}: {pairs}: {exc}")
    assert not bad, "--set values that the config refuses:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------


def cli_options() -> dict[str, set[str]]:
    """{command path ("train", "client classify"): its option names}."""
    import typer

    import bdgf.cli

    out: dict[str, set[str]] = {}

    def walk(cmd, path: str) -> None:  # typer's (vendored) click: duck-typed
        if isinstance(getattr(cmd, "commands", None), dict):
            out[path] = {"--help"}
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())
            return
        opts = {"--help"}
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":
                opts.update(o for o in p.opts + p.secondary_opts if o.startswith("--"))
        out[path] = opts

    walk(typer.main.get_command(bdgf.cli.app), "")
    return out


def code_snippets(text: str) -> list[tuple[int, str]]:
    """(line number, code) of what a page shows as shell code: the lines of shell-kind fenced
    blocks and of indented blocks (a line ending in a backslash joined with the next), and the
    inline code spans of every other line."""
    out: list[tuple[int, str]] = []
    fence, lang = None, ""
    prev_blank, indented, pending, start = True, False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            m = re.match(r"^\s{0,3}(```+|~~~+)\s*([A-Za-z0-9_+-]*)", line)
            if m:
                fence, lang = m.group(1), m.group(2).lower()
                prev_blank, indented = False, False
                continue
            indented = bool(stripped) and line.startswith("    ") and (prev_blank or indented)
            prev_blank = not stripped
            is_code = indented or bool(pending)
        else:
            if stripped.startswith(fence):
                fence = None
                continue
            is_code = lang in SHELL_FENCES
            if not is_code:
                continue
        if not is_code:
            out.extend((n, span) for span in re.findall(r"`([^`\n]+)`", line))
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


INVOCATION = re.compile(r"(?:^|(?<=[\s(`$]))bdgf\s+([a-z][a-z|-]*)(.*)")


def invocations(code: str) -> list[tuple[str, list[str], str | None]]:
    """[(command, [--options], the next word)] of every `bdgf` command in a line of shell code;
    ``a|b`` in the command position is one invocation per alternative."""
    found = []
    code = re.split(r"(?:^|\s)#", code)[0]  # a comment
    for part in re.split(r"\s\|\s|&&|;|\|\||\$\(|\)", code):
        m = INVOCATION.search(part)
        if not m or re.search(r"\b(?:from|import)\s+bdgf\b", part):
            continue  # no command, or Python in an indented block
        rest = m.group(2)
        sub = re.match(r"\s+([a-z][a-z-]*)", rest)
        opts = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)
        for cmd in m.group(1).split("|"):
            found.append((cmd, opts, sub.group(1) if sub else None))
    return found


def test_documented_commands_and_options_exist():
    commands = cli_options()
    problems = []
    for path in doc_files():
        if not path.exists():
            continue
        for n, code in code_snippets(path.read_text(encoding="utf-8")):
            for cmd, opts, sub in invocations(code):
                name = cmd
                if name not in commands:
                    problems.append(f"{_rel(path)}:{n}: `bdgf {cmd}` is not a command ({code.strip()!r})")
                    continue
                if commands[name] == {"--help"} and sub and f"{name} {sub}" in commands:
                    name = f"{name} {sub}"  # a command group: `bdgf client classify`
                unknown = [o for o in opts if o not in commands[name]]
                if unknown:
                    problems.append(f"{_rel(path)}:{n}: `bdgf {name}` has no option {unknown} ({code.strip()!r})")
    assert not problems, "commands shown in the docs that the CLI does not have:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------------------
# Links and the shared folder
# ----------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def anchors(path: Path) -> set[str]:
    """The heading anchors of a markdown page, as GitHub makes them (lower case, punctuation
    other than hyphens and underscores dropped, spaces to hyphens, repeats numbered -1, -2...)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_point_at_files():
    broken = []
    for path in doc_files():
        if not path.exists():
            continue
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # links in code are code
        text = re.sub(r"`[^`\n]*`", "", text)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # a URL, mailto:
            file, _, anchor = target.partition("#")
            dest = path if not file else path.parent / file
            if not dest.exists():
                broken.append(f"{_rel(path)}: ({target}) no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{_rel(path)}: ({target}) no such heading in {_rel(dest)}")
    assert not broken, f"relative links to files (or headings) that do not exist: {broken}"


SHARED = ("../shared", "/work/shared", "DESIGN.md")


def test_no_file_points_at_the_shared_folder():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = {f for f in listed.decode().split("\0") if f}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): every file but build output
        skip = {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache"}
        files = {_rel(p) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part in skip or part.endswith(".egg-info")
                                            for part in p.relative_to(ROOT).parts)}
    files |= {_rel(p) for p in doc_files() if p.exists()}  # the docs, committed or not yet
    hits = []
    for name in sorted(files):
        if name.startswith("tests/"):
            continue  # the real-data tests look for their files there (conftest.py)
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if any(s in line for s in SHARED):
                hits.append(f"{name}:{n}: {line.strip()[:120]}")
    assert not hits, "files that point at the development machine's shared folder (a clone has none):\n" + \
        "\n".join(hits)


if __name__ == "__main__":  # print the knob tables' key and default columns
    knobs, _ = config_knobs()
    for key, value in knobs.items():
        print(f"| `{key}` | `{fmt(value)}` | |")
