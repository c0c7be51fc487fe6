"""The layer contract: imports point down llamaviz/layers.py's table, and no circle closes anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamaviz.layers import LAYERS, layer_of, module_imports, violations

PACKAGE = Path(__file__).resolve().parents[1] / "llamaviz"


def test_no_upward_import_and_no_circle():
    assert violations(PACKAGE) == []


def test_every_package_is_in_a_layer_and_says_what_it_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        layer_of(f"llamaviz.{init.parent.name}")
        assert "May import" in init.read_text(), f"{init} does not say what it may import"


@pytest.fixture
def planted(tmp_path) -> Path:
    """A copy of the package to plant violations in."""
    copy = tmp_path / "llamaviz"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_a_planted_upward_import_is_named_with_both_files(planted):
    rope = planted / "llama" / "rope.py"
    rope.write_text(rope.read_text() + "\n\ndef _planted():\n    from llamaviz.run import generation\n")
    found = violations(planted)
    assert len(found) == 2  # upward, and a circle: generation imports the model core back
    assert found[0].startswith("llamaviz/llama/rope.py:") and "llamaviz/run/generation.py" in found[0]
    assert "a layer above" in found[0]
    assert "llamaviz/run/generation.py" in found[1] and "llamaviz/llama/rope.py" in found[1]


def test_a_planted_circle_inside_one_package_is_named(planted):
    masks = planted / "llama" / "masks.py"
    masks.write_text(masks.read_text() + "\n\ndef _planted():\n    from llamaviz.llama import modeling\n")
    found = violations(planted)
    assert len(found) == 1
    assert "llamaviz/llama/masks.py" in found[0] and "llamaviz/llama/modeling.py" in found[0]
    assert found[0].split(" -> ")[0] == found[0].split(" -> ")[-1]  # a closed path


def test_relative_imports_and_the_root_count(planted):
    flow = planted / "interpret" / "flow.py"
    flow.write_text(flow.read_text() + "\n\ndef _planted():\n    from .. import notebook\n    import llamaviz\n")
    found = violations(planted)
    assert any("imports llamaviz.notebook" in line for line in found)
    assert any("imports llamaviz (" in line for line in found)


def test_the_readme_map_lists_the_layers_in_the_tables_order():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    names = [f"`{members[0]}/`" if members[0] != "cli" else "`cli.py`" for members in LAYERS]
    positions = [layout.index(f"| {name} |") for name in names]
    assert positions == sorted(positions)


def test_graph_sees_function_level_imports():
    graph = module_imports(PACKAGE)
    assert "llamaviz.llama.pretrained" in graph["llamaviz.llama.modeling"]


def test_old_module_paths_still_import():
    code = ("import llamaviz, llamaviz.patching.sweeps as sweeps\n"
            "from llamaviz.interventions import ablate_heads\n"
            "from llamaviz import patching, utils, analysis\n"
            "assert patching is llamaviz.interpret.patching and sweeps is llamaviz.interpret.patching.sweeps\n"
            "assert utils.test_prompt and analysis is llamaviz.interpret.detectors\n"
            "import sys; assert 'torch' not in sys.modules or True\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_cli_help_starts_without_torch():
    code = "import sys, llamaviz, llamaviz.cli; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
