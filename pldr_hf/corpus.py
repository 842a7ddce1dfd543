"""The quickstart's English corpus: real text that ships with the installed software, so no download is needed.

Sources, both written by people (the CPython developers and documentation authors) and distributed with CPython under
the PSF License Agreement, which permits copying and derivative works; present in every CPython install (Debian ships
them in ``libpython3.X-stdlib``):

1. the docstrings of the standard library's modules, classes and functions (read with ``ast`` from the ``.py`` files,
   nothing is imported; test suites are skipped), in sorted file order;
2. the Python Language Reference topics behind ``help('topic')`` (``pydoc_data.topics``).

Paragraphs are joined into single lines; headings and underlines are dropped. About 2 MB of English text.
"""

from __future__ import annotations

import re


def _prose_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if re.fullmatch(r"[*=\-^~\s]+", lines[-1] or "") and len(lines) <= 2:  # headings
            continue
        joined = " ".join(line.strip() for line in lines if not re.fullmatch(r"[*=\-^~]+", line.strip()))
        if len(joined.split()) >= 4:
            out.append(joined)
    return out


def _stdlib_docstrings() -> list[str]:
    import ast
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3"}
    out = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if any(p in skip or p.startswith("test_") for p in parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(_prose_paragraphs(doc))
    return out


def load_english_corpus(max_chars: int | None = None) -> dict:
    """Returns {"name", "licence", "documents" (paragraphs in a fixed order), "prompt"}."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions split the docs out of the stdlib
        raise FileNotFoundError(
            "the quickstart corpus (CPython's bundled documentation, module pydoc_data) is missing from this Python; "
            "on Debian/Ubuntu install it with `apt-get install libpython3-stdlib`"
        ) from e
    docs = _stdlib_docstrings()
    for key in sorted(topics):
        docs.extend(_prose_paragraphs(topics[key]))
    if max_chars is not None:
        kept, n = [], 0
        for d in docs:
            if n >= max_chars:
                break
            kept.append(d)
            n += len(d)
        docs = kept
    if len(docs) < 20:
        raise ValueError(f"quickstart corpus too small ({len(docs)} paragraphs)")
    return {
        "name": "CPython standard library docstrings + language reference topics",
        "licence": "PSF License Agreement",
        "documents": docs,
        "prompt": "Return a new list",
    }
