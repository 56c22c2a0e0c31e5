"""Module glossaries agree with the project glossary (docs/glossary.md).

docs/glossary.md holds markdown tables ``| Letter | Meaning | Key words |``. A module states its
letters in a docstring, in one of two parseable forms:

* a block: a line ``Glossary`` (optionally followed by `` (letters as in docs/glossary.md)``
  and/or ``:``), then lines indented by 4 spaces, each with one or more ``LETTER  meaning``
  cells (cells of a two-column layout are separated by 3+ spaces; a line indented deeper than 4
  continues the previous meaning). A blank line ends the block.
* inline: ``Glossary ...: X meaning, Y meaning, H×W meaning.`` up to the end of the sentence.

Every letter a module defines must be a row of docs/glossary.md, and the module's meaning must
share a key word with the row (stems compared: "tiles" matches "tile"), or only restate the
row's formula (``S  = T + 2h``). So ``T  number of diffusion steps`` fails: T is the tile side.
Any other mention of "glossary" in a docstring is an unparseable glossary and fails too. Nothing
is skipped: files owned by anyone are checked alike.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "glossary.md"
SCANNED = ("bdgf", "kernels")

SYM = r"[A-Za-z][A-Za-z0-9]{0,3}(?:_[A-Za-z0-9]+)?"
SYMLIST = rf"{SYM}(?:\s*[,×]\s*{SYM})*"
HEADING = re.compile(r"^Glossary(?:\s*\([^)]*\))?\s*:?\s*$")
INLINE = re.compile(r"\bGlossary\b(?:\s*\([^)]*\))?\s*:")
MENTION = re.compile(r"glossary(?!\.md)", re.IGNORECASE)


def _stem(word: str) -> str:
    w = word.lower()
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("ches", "shes", "sses", "xes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss") and len(w) > 3:
        return w[:-1]
    return w


def _words(text: str) -> set[str]:
    return {_stem(w) for w in re.findall(r"[A-Za-z][A-Za-z0-9_]*", text)}


def _symbols(cell: str) -> list[str]:
    return [s for s in re.split(r"\s*[,×]\s*", cell.replace("`", "").strip()) if s]


# ------------------------------------------------------------------------------ project glossary


def project_glossary() -> dict[str, tuple[str, set[str]]]:
    """{letter: (meaning, key-word stems)} from every ``| Letter | Meaning | Key words |`` table."""
    rows: dict[str, tuple[str, set[str]]] = {}
    in_table = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            in_table = False
            continue
        if [c.lower() for c in cells] == ["letter", "meaning", "key words"]:
            in_table = True
            continue
        if not in_table or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == 3, f"docs/glossary.md: a row needs 3 cells: {line!r}"
        letters, meaning, keys = cells
        stems = {_stem(k.strip().strip("`")) for k in keys.split(",") if k.strip()}
        assert stems, f"docs/glossary.md: no key words in {line!r}"
        for s in _symbols(letters):
            assert re.fullmatch(SYM, s), f"docs/glossary.md: {s!r} is not a letter symbol ({line!r})"
            assert s not in rows, f"docs/glossary.md defines {s!r} twice"
            rows[s] = (meaning, stems)
    return rows


# ------------------------------------------------------------------------------ module glossaries


def _block_entries(lines: list[str]) -> list[tuple[str, str]] | str:
    """Entries of a block (lines after the heading), or an error message."""
    entries: list[list[str]] = []
    for line in lines:
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip(" "))
        if indent < 4:
            break
        if indent > 4:
            if not entries:
                return f"continuation line before any entry: {line!r}"
            entries[-1][1] += " " + line.strip()
            continue
        pending: str | None = None
        for seg in re.split(r"\s{3,}", line.strip()):
            if pending is not None:
                entries.append([pending, seg])
                pending = None
            elif re.fullmatch(SYMLIST, seg):
                pending = seg
            else:
                m = re.fullmatch(rf"({SYMLIST})\s+(\S.*)", seg)
                if not m:
                    return f"not a 'LETTER  meaning' entry: {seg!r} in {line!r}"
                entries.append([m.group(1), m.group(2)])
        if pending is not None:
            return f"letter {pending!r} without a meaning in {line!r}"
    if not entries:
        return "empty glossary block"
    return [(s, e[1]) for e in entries for s in _symbols(e[0])]


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _inline_entries(rest: str) -> list[tuple[str, str]] | str:
    """Entries of ``X meaning, Y meaning.`` (``rest`` = the paragraph after the colon)."""
    depth, end = 0, len(rest)
    for i, ch in enumerate(rest):
        depth += (ch == "(") - (ch == ")")
        if ch == "." and depth == 0 and (i + 1 == len(rest) or rest[i + 1].isspace()):
            end = i
            break
    out: list[tuple[str, str]] = []
    for part in _split_top(" ".join(rest[:end].split())):
        m = re.fullmatch(rf"\s*({SYM}(?:\s*×\s*{SYM})*)\s+(\S.*?)\s*", part)
        if not m:
            return f"not a 'LETTER meaning' entry: {part.strip()!r}"
        out += [(s, m.group(2)) for s in _symbols(m.group(1))]
    return out or "empty inline glossary"


def _dedent(doc: str) -> list[str]:
    """Docstring lines with the common indentation of lines 2.. removed (line count kept)."""
    lines = doc.expandtabs().splitlines()
    indents = [len(x) - len(x.lstrip()) for x in lines[1:] if x.strip()]
    cut = min(indents, default=0)
    return lines[:1] + [x[cut:] for x in lines[1:]]


def parse_docstring(doc: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """([(letter, meaning, line offset)], [errors]) for one docstring."""
    lines = _dedent(doc)
    entries, errors = [], []
    covered: set[int] = set()
    for i, line in enumerate(lines):
        if HEADING.match(line):
            got = _block_entries(lines[i + 1 :])
            covered.add(i)
        elif m := INLINE.search(line):
            para = [line[m.end() :]]
            for nxt in lines[i + 1 :]:
                if not nxt.strip():
                    break
                para.append(nxt)
            got = _inline_entries(" ".join(para))
            covered.add(i)
        else:
            continue
        if isinstance(got, str):
            errors.append(f"line +{i}: {got}")
        else:
            entries += [(s, meaning, i) for s, meaning in got]
    for i, line in enumerate(lines):
        if i not in covered and MENTION.search(line):
            errors.append(f"line +{i}: 'glossary' outside a parseable Glossary heading: {line.strip()!r}")
    return entries, errors


def module_glossaries() -> list[tuple[str, int, str, str]]:
    """[(file, line, letter, meaning)] of every glossary in bdgf/ and kernels/ docstrings; parse
    errors are collected and reported as one failure."""
    found, errors = [], []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                if not (node.body and isinstance(node.body[0], ast.Expr)
                        and isinstance(node.body[0].value, ast.Constant)
                        and isinstance(node.body[0].value.value, str)):
                    continue
                doc_node = node.body[0].value
                entries, errs = parse_docstring(doc_node.value)
                line0 = doc_node.lineno
                found += [(rel, line0 + off, s, meaning) for s, meaning, off in entries]
                errors += [f"{rel}:{line0} (docstring) {e}" for e in errs]
    if errors:
        pytest.fail("unparseable glossaries:\n  " + "\n  ".join(errors))
    return found


# ------------------------------------------------------------------------------ tests


def test_project_glossary_parses():
    rows = project_glossary()
    for letter in ("B", "C", "M", "H", "W", "T", "h", "S", "P", "K", "F", "n_t", "n", "t", "N", "L",
                   "D", "E", "N_s", "G", "Q", "k", "Hh", "Dh"):
        assert letter in rows, f"docs/glossary.md lacks {letter!r}"
    assert rows["T"][1] == {"tile"}
    assert "num_timesteps" in DOC.read_text(encoding="utf-8")


def test_parser_catches_clashes():
    """The checks can fail: a clashing meaning, an unknown letter, an unparseable mention."""
    rows = project_glossary()
    doc = ("Title.\n\nGlossary (letters as in docs/glossary.md)\n    B   batch\n"
           "    T   number of diffusion steps\n    XQ  unknown\n\nTensor-shape glossary\n    B  batch\n")
    entries, errors = parse_docstring(doc)
    assert [(s, m) for s, m, _ in entries] == [("B", "batch"), ("T", "number of diffusion steps"),
                                              ("XQ", "unknown")]
    assert len(errors) == 1 and "Tensor-shape glossary" in errors[0]
    assert _mismatch(rows, "T", "number of diffusion steps")
    assert _mismatch(rows, "XQ", "unknown")
    assert not _mismatch(rows, "T", "output tile side")
    two_col, errors = parse_docstring("Title.\n\nGlossary\n    B   tiles in a batch          C   input bands\n"
                                      "    n_t timesteps                 n   n_t × draws\n")
    assert not errors and [s for s, _, _ in two_col] == ["B", "C", "n_t", "n"]
    inline, errors = parse_docstring("x. Glossary (letters as in docs/glossary.md): H×W grid, "
                                     "K classes (0..K-1, i.e. labels - 1), S = T + 2h window side.")
    assert not errors and [s for s, _, _ in inline] == ["H", "W", "K", "S"]
    assert _mismatch(rows, "B", "HSI bands")
    assert not _mismatch(rows, "S", "= T + 2h") and _mismatch(rows, "S", "= P + 2h")
    assert _mismatch(rows, "B", "windows")


def _mismatch(rows, letter: str, meaning: str) -> str | None:
    if letter not in rows:
        return f"{letter!r} is not in docs/glossary.md (add it there if it clashes with nothing)"
    project_meaning, keys = rows[letter]
    # A meaning that only restates the row's formula ("= T + 2h" for S) agrees too.
    formula = re.sub(r"[\s`]", "", meaning)
    if formula.startswith("=") and "=" + formula.lstrip("=") in re.sub(r"[\s`]", "", project_meaning):
        return None
    if not keys & _words(meaning):
        return (f"{letter!r} means {meaning!r} here but {project_meaning!r} in docs/glossary.md "
                f"(key words: {', '.join(sorted(keys))})")
    return None


def test_module_glossaries_match_project():
    rows = project_glossary()
    found = module_glossaries()
    assert found, "no module glossaries found"
    problems = [f"{f}:{line}: {msg}" for f, line, s, meaning in found
                if (msg := _mismatch(rows, s, meaning))]
    assert not problems, "module glossaries disagree with docs/glossary.md:\n  " + "\n  ".join(problems)
