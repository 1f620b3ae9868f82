"""The shape of the code: one `flower` command, no import cycles, short functions, no TensorFlow for help."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flower.cli import COMMANDS, main
from tests.conftest import REPO

PACKAGES = ("core", "imaging", "training", "ensemble", "service", "flower")
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    """Every module of the project's packages by dotted name."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _dynamic_import(node: ast.AST) -> str | None:
    """The module named by `importlib.import_module("x")` or `__import__("x")` with a literal name, else None."""
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                                                 "__import__"):
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            return node.args[0].value
    return None


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports anywhere in it (top level, inside functions, or by a literal name)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if _dynamic_import(node):
            targets = [_dynamic_import(node)]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_there_is_no_import_cycle_not_even_inside_a_function():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["service.app"] >= {"service.routes.predict", "service.routes.ops", "service.routes.tfserving"}


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    path = tmp_path / "a.py"
    path.write_text("def f():\n    from training.fit.loop import train_member\n")
    assert "training.fit.loop" in _imports(path, "training.something", _modules())


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def _imports_testkit(path: Path) -> bool:
    """Whether a module imports testkit anywhere in it (top level or inside functions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n == "testkit" or n.startswith("testkit.") for n in names):
            return True
    return False


def test_no_product_package_imports_the_testkit():
    assert not [name for name, path in _modules().items() if _imports_testkit(path)]
    assert not (REPO / "service" / "testing.py").exists() and not (REPO / "ensemble" / "synthetic.py").exists()


def test_the_testkit_check_sees_an_import_inside_a_function(tmp_path):
    path = tmp_path / "a.py"
    path.write_text("def f():\n    from testkit.artifacts import make_run\n")
    assert _imports_testkit(path)
    path.write_text("import testkitten\nfrom .testkit import x\n")
    assert not _imports_testkit(path)


# --- the flower command -------------------------------------------------------------------------------

NO_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"


def _flower(*args: str, block_tensorflow: bool = True) -> subprocess.CompletedProcess:
    """Run `flower ARGS` in a fresh interpreter, where importing TensorFlow or Keras fails."""
    code = (NO_TENSORFLOW if block_tensorflow else "") + (
        "from flower.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n" if block_tensorflow else
        f"import sys\nfrom flower.cli import main\nsys.exit(main({list(args)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_flower_lists_its_commands_and_its_version():
    result = _flower("--help")
    assert result.returncode == 0
    for name in ("import", "demo-data", "train", "compare", "augment-grid", "blend", "serve"):
        assert f"\n  {name} " in result.stdout
    version = _flower("--version")
    assert version.returncode == 0 and version.stdout.startswith("flower 0.")
    unknown = _flower("trian")
    assert unknown.returncode == 2 and "did you mean 'train'" in unknown.stderr
    assert main([]) == 2


def test_the_installed_command_runs():
    flower = Path(sys.executable).with_name("flower")
    if not flower.exists():
        pytest.skip("the console script is installed by pip install -e . (scripts/setup_env.sh)")
    result = subprocess.run([str(flower), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("flower ")


PARSER_SPY = """
import argparse, json
from flower.cli import COMMANDS, main
found = {}
class Stop(Exception):
    pass
def spy(self, args=None, namespace=None):
    raise Stop(self)
argparse.ArgumentParser.parse_args = spy
for name in COMMANDS:
    try:
        main([name])
    except Stop as stop:
        parser = stop.args[0]
        found[name] = {"prog": parser.prog, "options": [
            {"flags": a.option_strings, "help": a.help or "", "default": repr(a.default), "required": a.required,
             "flag": a.nargs == 0}
            for a in parser._actions if a.option_strings and a.dest != "help"]}
print(json.dumps(found))
"""


def test_every_subcommands_help_explains_each_option_and_its_default_without_tensorflow():
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW + PARSER_SPY], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parsers = json.loads(result.stdout)
    assert set(parsers) == set(COMMANDS)
    for name, parser in parsers.items():
        assert parser["prog"] == f"flower {name}"
        for option in parser["options"]:
            assert len(option["help"]) > 10, (name, option)
            if not option["flag"] and not option["required"] and option["default"] not in ("None", "[]"):
                assert "default" in option["help"], (name, option)
    for name in COMMANDS:
        help_run = _flower(name, "--help")
        assert help_run.returncode == 0 and f"usage: flower {name}" in help_run.stdout, help_run.stderr[-1000:]


def test_train_help_print_config_and_config_errors_never_load_tensorflow():
    result = _flower("train", "--help")
    assert result.returncode == 0 and "image_size" in result.stdout and "per replica" in result.stdout
    printed = _flower("train", "--config", "training/configs/demo_cnn_64.toml", "--set", "train.epochs=3",
                      "--print-config")
    assert printed.returncode == 0, printed.stderr[-2000:]
    config = json.loads(printed.stdout)
    assert config["train"]["epochs"] == 3 and config["data"]["image_size"] == 64
    assert config["augment"]["erase_area"] == [0.02, 0.2]
    bad = _flower("train", "--set", "augment.flip_left_right=no")
    assert bad.returncode == 2 and "augment.flip_left_right: expected bool, got 'no'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_python_m_flower_runs_a_command_without_tensorflow_for_help():
    code = "import runpy; sys.argv = ['flower', 'train', '--help']; runpy.run_module('flower', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW + code], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "usage: flower train" in result.stdout, result.stderr[-1000:]
    assert not any((REPO / part / "__main__.py").exists() for part in LIBRARIES)


LIBRARIES = ("core", "imaging", "training", "ensemble", "service")  # what the commands in flower/commands use


def test_only_the_commands_parse_arguments_and_no_library_module_is_a_script():
    parsing, scripts = [], []
    for name, path in _modules().items():
        if _part(name) in LIBRARIES:
            parsing += [name] if "argparse" in _third_party(path) else []
            scripts += [name] if '__name__ == "__main__"' in path.read_text() else []
    assert not parsing, f"argparse belongs in flower/commands: {parsing}"
    assert not scripts, f"run a command with python -m flower <command>: {scripts}"


def test_flower_help_shows_the_overview_or_one_commands_help():
    overview = _flower("help")
    assert overview.returncode == 0 and "\n  train " in overview.stdout and "usage: flower <command>" in overview.stdout
    train = _flower("help", "train")
    assert train.returncode == 0 and "usage: flower train" in train.stdout and "image_size" in train.stdout
    assert train.stdout == _flower("train", "--help").stdout
    unknown = _flower("help", "nosuch")
    assert unknown.returncode == 2 and "unknown command 'nosuch'" in unknown.stderr and not unknown.stdout
    assert "did you mean 'train'" in _flower("help", "trian").stderr
    assert _flower("help", "train", "blend").returncode == 2


# The house: each part may import the floors under it and nothing else (`flower`, the commands, may import all).
MAY_IMPORT = {
    "core": set(),  # the ground floor: the contract, files, photos, errors; no TensorFlow
    "imaging": {"core"},  # the TensorFlow pixels that training and serving share: records, decode, square, TTA
    "ensemble": {"core"},  # no TensorFlow
    "training": {"core", "imaging"},
    "service": {"core", "imaging", "ensemble"},
    "flower": set(PACKAGES),
}
SERVICE_USES_OF_ENSEMBLE = {"ensemble.blend", "ensemble.spec"}  # the blend: one function offline and online
NEVER_TENSORFLOW = ("core", "ensemble")


def _part(module: str) -> str:
    return module.partition(".")[0]


def _forbidden(name: str, imported: set[str]) -> set[str]:
    """The project modules a module imports that its part may not."""
    part = _part(name)
    bad = {m for m in imported if _part(m) != part and _part(m) not in MAY_IMPORT[part]}
    if part == "service":
        bad |= {m for m in imported if _part(m) == "ensemble" and m not in SERVICE_USES_OF_ENSEMBLE}
    return bad


def test_each_part_imports_only_the_floors_under_it():
    modules = _modules()
    outside = {}
    for name, path in modules.items():
        bad = _forbidden(name, _imports(path, name, modules))
        if bad:
            outside[name] = sorted(bad)
    assert not outside, outside


def _third_party(path: Path) -> set[str]:
    """The top-level names of every module a file imports, anywhere in it (a literal dynamic import too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if _dynamic_import(node):
            found.add(_dynamic_import(node).partition(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_the_ground_floor_and_the_ensemble_never_import_tensorflow():
    for name, path in _modules().items():
        if _part(name) in NEVER_TENSORFLOW:
            assert not _third_party(path) & {"tensorflow", "keras", "tf_keras"}, name


def test_only_the_beam_runner_imports_apache_beam():
    importers = {name for name, path in _modules().items() if "apache_beam" in _third_party(path)}
    assert importers and {name.rpartition(".")[0] for name in importers} == {"service.beam"}, importers


def test_the_import_check_sees_a_forbidden_import_inside_a_function(tmp_path):
    path = tmp_path / "predictor.py"
    path.write_text("from ensemble.spec import BlendSpec\ndef f():\n"
                    "    from training.models.model import build_classifier\n")
    assert _forbidden("service.predictor", _imports(path, "service.predictor", _modules())) == {"training.models.model"}
    path.write_text("def f():\n    from training.data.layout import join\n")
    assert _forbidden("core.contract", _imports(path, "core.contract", _modules())) == {"training.data.layout"}


# --- one home for each idea ------------------------------------------------------------------------------

# The calls that spell out an idea of the contract, and the only modules that may make them.
HOMES = {
    "Image.open": {"core.photos"},  # the one photo opener
    "os.scandir": {"core.photos",  # the one folder walker ...
                   "training.data.importer.sources"},  # ... and the import's list of class folders
    "tempfile.mkstemp": {"core.files"},  # atomic writing
    "os.umask": {"core.files"},
    "fcntl.flock": {"core.files"},  # the folder lock
    "tf.train.Example.FromString": {"imaging.records"},  # the record fields read on the host
    "glob.glob": {"core.files"},  # which command-line arguments are glob patterns (pattern_matches)
}
CONTRACT_NAMES = {"member.json", "ensemble.json", "classes.json", "import_report.json", "test_answers.csv",
                  "saved_model"}  # file names of the contract: core.contract's constants


def _spelled_out(path: Path) -> set[str]:
    """The HOMES calls, the contract's file names as string literals, and size-folder regexes in a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in HOMES:
            found.add(ast.unparse(node.func))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in CONTRACT_NAMES:
                found.add(node.value)
            elif "tfrecords-jpeg-(" in node.value or "tfrecords-jpeg-*x*" in node.value:
                found.add("size-folder pattern")
    return found


def test_each_idea_of_the_contract_is_spelled_out_in_its_home_only():
    homes = {**HOMES, **{name: {"core.contract"} for name in CONTRACT_NAMES}, "size-folder pattern": {"core.contract"}}
    strays = {}
    for name, path in _modules().items():
        wrong = {idea for idea in _spelled_out(path) if name not in homes[idea]}
        if wrong:
            strays[name] = sorted(wrong)
    assert not strays, strays


def test_the_house_checks_see_dynamic_imports_and_copies(tmp_path):
    path = tmp_path / "a.py"
    path.write_text("import importlib\ndef f():\n    importlib.import_module('training.data.layout')\n"
                    "    __import__('tensorflow')\n")
    assert _forbidden("core.contract", _imports(path, "core.contract", _modules())) == {"training.data.layout"}
    assert "tensorflow" in _third_party(path)
    path.write_text("from PIL import Image\nImage.open('x')\nNAME = 'member.json'\n"
                    "SIZE = r'tfrecords-jpeg-(\\d+)'\n")
    assert _spelled_out(path) == {"Image.open", "member.json", "size-folder pattern"}
