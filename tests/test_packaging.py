"""Packaging: the core imports torch and nothing else, the tooling stays apart, no import cycles."""

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import adacache_fx

ROOT = Path(adacache_fx.__file__).resolve().parents[1]
#: What the core must not pull in (the extras: diffusers, export, cpu, tools).
FORBIDDEN = ("diffusers", "onnx", "onnxruntime", "onnxscript", "matplotlib", "PIL", "safetensors", "tqdm",
             "transformers", "pytorch_msssim", "cache_dit")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _modules(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return [package] + [info.name for info in pkgutil.walk_packages([str(folder)], prefix=package + ".")]


def test_importing_the_core_adds_nothing_but_itself_to_what_torch_imports():
    out = _python(
        "import json, sys\n"
        "import torch\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import adacache_fx\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps({'file': adacache_fx.__file__, 'before': sorted(before), 'after': sorted(after)}))\n"
    )
    found = json.loads(out)
    assert Path(found["file"]).resolve().parent == ROOT / "adacache_fx"
    before, after = set(found["before"]), set(found["after"])
    added = {m for m in after - before if m not in sys.stdlib_module_names}
    assert added <= {"adacache_fx", "numpy"}
    # tqdm is the one that can be there: torch.hub imports it when it is installed, before adacache_fx runs
    assert {m for m in FORBIDDEN if m in after} <= {"tqdm"} & before
    assert "adacache_fx.tools" not in out


def test_the_core_never_imports_the_tooling():
    out = _python(
        "import sys, importlib\n"
        "names = " + repr([m for m in _modules("adacache_fx") if not m.startswith("adacache_fx.tools")]) + "\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('adacache_fx.tools')))\n"
    )
    assert out.strip() == "[]"


def test_every_module_imports_first_without_a_cycle():
    """Each module imported first (adacache_fx dropped from ``sys.modules`` in between, torch kept): a cycle
    between modules raises ImportError for one of them."""
    names = _modules("adacache_fx")
    assert {"adacache_fx.api", "adacache_fx.passes.insert_cache", "adacache_fx.tools.cli",
            "adacache_fx.tools.bench.registry", "adacache_fx.tools.fixtures.families"} <= set(names)
    out = _python(
        "import importlib, sys\n"
        "import torch\n"
        "failed = []\n"
        "for name in " + repr(names) + ":\n"
        "    for loaded in [m for m in sys.modules if m == 'adacache_fx' or m.startswith('adacache_fx.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        failed.append(f'{name}: {error}')\n"
        "print('\\n'.join(failed) or 'ok')\n"
    )
    assert out.strip() == "ok"


def test_the_command_line_imports_and_every_subcommand_has_help():
    out = _python(
        "import contextlib, io\n"
        "from adacache_fx.tools.cli import build_parser\n"
        "parser = build_parser()\n"
        "for argv in ([], ['demo'], ['speed'], ['compile-bench'], ['export'], ['bench'], ['corpus']):\n"
        "    text = io.StringIO()\n"
        "    with contextlib.redirect_stdout(text):\n"
        "        try:\n"
        "            parser.parse_args([*argv, '--help'])\n"
        "        except SystemExit as exit:\n"
        "            assert exit.code == 0, argv\n"
        "    print(text.getvalue().splitlines()[0])\n"
    )
    usages = out.splitlines()
    assert len(usages) == 7 and all(line.startswith("usage: adacache-fx") for line in usages)
    assert [u.split()[2] for u in usages[1:]] == ["demo", "speed", "compile-bench", "export", "bench", "corpus"]


def test_export_no_longer_offers_the_command_line_helpers():
    import adacache_fx.export as export

    for name in ("add_export_arguments", "build_model", "cli_export"):
        assert name not in export.__all__ and not hasattr(export, name)


@pytest.mark.parametrize("extra, wanted", [("export", {"onnx", "onnxscript"}), ("cpu", {"onnxruntime"}),
                                           ("tools", {"diffusers", "safetensors", "matplotlib", "pillow"})])
def test_the_extras_hold_what_the_optional_modules_import(extra, wanted):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in project["optional-dependencies"][extra]}
    assert wanted <= names
    core = {req.split(">")[0].split("=")[0].strip() for req in project["dependencies"]}
    assert core == {"torch", "numpy"}
