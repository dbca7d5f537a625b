"""House rules that are cheap to check: module docstrings, file length, no hub ids in library code."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = [p for d in ("storymaker_serve", "export", "runtime", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in PY
               if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


def test_no_file_over_400_lines():
    long = [(str(p.relative_to(ROOT)), n) for p in PY if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def test_library_code_downloads_nothing():
    hub_id = re.compile(r"from_pretrained\(\s*['\"][\w-]+/[\w.-]+['\"]")
    bad = [str(p) for p in PY if "tests" not in p.parts and hub_id.search(p.read_text())]
    assert not bad, bad
