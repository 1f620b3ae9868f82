"""The exit status rules of the `flower` commands: a user's error is one line and status 2, Ctrl-C is 130, a bug is
a traceback and status 1 (never an `error:` line with status 2, as if an option were wrong)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import flower.commands.compare as compare_command
from core.errors import DataError, FlowerError, Kind
from flower.cli import main as flower
from flower.commands import command
from tests.conftest import REPO


def test_a_flower_error_is_one_error_line_and_status_2(tmp_path, capsys):
    assert flower(["compare", str(tmp_path / "nothing-here")]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: {tmp_path / 'nothing-here'} is not a run directory (no member.json or checkpoints/" \
                  "epoch-NNNN/state.json)\n" and out == ""


def test_every_kind_of_flower_error_exits_2_and_keeps_its_message(capsys):
    for kind in Kind:
        @command
        def failing(argv, prog, kind=kind):
            raise FlowerError(f"refused: {kind.value}", kind)

        assert failing([], "flower x") == 2
        assert capsys.readouterr().err == f"error: refused: {kind.value}\n"


def test_an_os_error_names_its_file_and_exits_2(tmp_path, capsys):
    @command
    def failing(argv, prog):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out.csv"))

    assert failing([], "flower x") == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'out.csv'}: Permission denied\n"


def test_a_bug_propagates_with_its_traceback_not_as_an_error_line(tmp_path, monkeypatch, capsys):
    def broken(run_dir):
        return 1 / 0

    monkeypatch.setattr(compare_command, "run_row", broken)
    (tmp_path / "run").mkdir()
    with pytest.raises(ZeroDivisionError):
        flower(["compare", str(tmp_path / "run")])
    assert "error:" not in capsys.readouterr().err


def test_a_bug_exits_1_with_a_traceback_in_a_fresh_process(tmp_path):
    code = ("import sys, flower.commands.compare as c\n"
            "c.run_row = lambda run_dir: 1 / 0\n"
            "from flower.cli import main\n"
            f"sys.exit(main(['compare', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert "error:" not in result.stderr


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_command, "run_row", interrupted)
    assert flower(["compare", str(tmp_path)]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


def _ctrl_c():
    raise KeyboardInterrupt


def _interrupted_in_a_compiled_module():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as err:  # what a pybind11 module (scipy's) makes of a Ctrl-C while it initialises
        raise ImportError("initialization failed") from err


@pytest.mark.parametrize("interrupt", [_ctrl_c, _interrupted_in_a_compiled_module])
def test_ctrl_c_while_a_command_loads_its_libraries_is_one_line_and_status_130(monkeypatch, capsys, interrupt):
    from flower import cli

    def loading(name):  # Ctrl-C during `import tensorflow`, seconds before the command's main runs
        interrupt()

    monkeypatch.setattr(cli.importlib, "import_module", loading)
    assert flower(["predict", "ens", "photos", "--out", "x.csv"]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")

    @command
    def imports_inside_main(argv, prog):  # flower train imports TensorFlow inside its main
        interrupt()

    assert imports_inside_main([], "flower x") == 130 and capsys.readouterr().err == "interrupted\n"


def test_a_finished_command_run_as_the_program_is_not_ended_by_a_late_ctrl_c(tmp_path, monkeypatch, capsys):
    import signal

    set_to = []  # recorded, not set: pytest keeps its own Ctrl-C
    monkeypatch.setattr(signal, "signal", lambda signum, handler: set_to.append((signum, handler)))
    _member(tmp_path / "a", 0.5)
    assert flower(["compare", str(tmp_path / "a")]) == 0 and set_to == []  # called from Python: left alone
    monkeypatch.setattr(sys, "argv", ["flower", "compare", str(tmp_path / "a")])
    assert flower() == 0  # as the program: the libraries' shutdown (a second for TensorFlow's) ignores Ctrl-C
    assert set_to == [(signal.SIGINT, signal.SIG_IGN)]
    capsys.readouterr()


def test_a_library_that_is_missing_is_still_a_traceback(monkeypatch):
    from flower import cli

    def missing(name):
        raise ImportError("No module named 'tensorflow'")

    monkeypatch.setattr(cli.importlib, "import_module", missing)
    with pytest.raises(ImportError, match="tensorflow"):
        flower(["train"])


def test_ctrl_c_inside_an_exec_of_a_string_still_exits_130_not_by_sigint(tmp_path):
    (tmp_path / "interrupted_in_exec.py").write_text(  # run as `python -m`, as `python -m flower` runs
        "import sys\nfrom flower.commands import command\n"
        "sys.exit(command(lambda argv, prog: exec('raise KeyboardInterrupt'))([], 'flower x'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "interrupted_in_exec"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "interrupted\n")  # -2 (ended by SIGINT) before


def test_every_commands_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import argparse
    import importlib

    from flower.cli import COMMANDS

    def interrupted(self, args=None, namespace=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", interrupted)
    for name, entry in COMMANDS.items():
        assert importlib.import_module(entry.module).main([], f"flower {name}") == 130, name
        assert capsys.readouterr() == ("", "interrupted\n"), name


def test_a_bad_option_is_argparses_status_2(capsys):
    with pytest.raises(SystemExit) as bad:
        flower(["compare", str(REPO), "--sort", "size"])
    assert bad.value.code == 2 and "invalid choice: 'size'" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "message"), [
    ("augment.flip_left_right=no", "augment.flip_left_right: expected bool, got 'no'"),
    ("schedule.decay=2", "schedule.decay must be in (0, 1], got 2.0"),
    ("train.loss=hinge", "train.loss must be cce or focal, got 'hinge'"),
    ("augment.rotation=-1", "augment.rotation must be >= 0, got -1.0"),
    ("nosuch=1", "unknown option 'nosuch'; top-level keys: name, output, data, model, schedule, train, augment, "
                 "predict, distil, export"),
    ("export.runtimes=tflite", "export.runtimes must be 'none' or runtimes from ['litert', 'onnx'] separated by "
                               "commas (each once), got 'tflite'"),
])
def test_flower_train_with_a_bad_config_value_exits_2_with_its_message(setting, message, capsys):
    assert flower(["train", "--set", setting]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_a_bad_config_value_is_a_config_error_that_old_callers_still_catch_as_value_error():
    from training.config import load_config
    from training.config_values import parse_assignments

    with pytest.raises(ValueError, match="train.loss must be cce or focal") as bad:
        load_config(None, parse_assignments(["train.loss=hinge"]))
    assert isinstance(bad.value, FlowerError) and bad.value.kind is Kind.INVALID
    assert issubclass(DataError, FlowerError)


def test_the_librarys_own_errors_are_flower_errors_of_a_fitting_kind():
    from core.photos import TooManyPixels
    from ensemble.members import MemberError
    from ensemble.output import OutputError
    from ensemble.spec import SpecError
    from service.scoring import InputError
    from service.serving import ModelError
    from training.models.backbones import WeightsUnavailable
    from training.models.torch_weights import CheckpointError

    kinds = {MemberError: Kind.INVALID, OutputError: Kind.CONFLICT, SpecError: Kind.INVALID,
             ModelError: Kind.UNAVAILABLE, InputError: Kind.INVALID, TooManyPixels: Kind.TOO_LARGE,
             WeightsUnavailable: Kind.UNAVAILABLE, CheckpointError: Kind.INVALID}
    for error, kind in kinds.items():
        assert issubclass(error, FlowerError) and error("x").kind is kind, error
    assert issubclass(WeightsUnavailable, RuntimeError) and issubclass(TooManyPixels, ValueError)


def test_a_damaged_member_json_is_one_error_line_in_flower_compare(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "member.json").write_text('{"config": {}, "metrics": []}')
    assert flower(["compare", str(run)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {run / 'member.json'} has no 'config.train.epochs' (") and out == ""
    assert err.count("\n") == 1
    shutil.rmtree(run)
    _member(run, 0.5)
    document = json.loads((run / "member.json").read_text())
    document["config"]["model"]["dropout"] = "high"  # a field of the wrong type
    (run / "member.json").write_text(json.dumps(document))
    assert flower(["compare", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {run}: not a run directory's files (ValueError: ")


def test_a_split_argument_of_flower_overlap_says_what_is_wrong(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "data").mkdir()
    for spec, message in ((f"{tmp_path}/nodata:train", f"data folder not found: {tmp_path}/nodata"),
                          (f"{tmp_path}/data:tr ain", "unknown split 'tr ain'")):
        assert flower(["overlap", spec, str(tmp_path / "photos"), "--quiet"]) == 2
        assert message in capsys.readouterr().err


def _member(run, f1, **extra) -> None:
    from core.members import write_member
    from training.config import load_config

    run.mkdir()
    write_member(run, {"name": run.name, "config": load_config(None, {}).to_dict(), "metrics": {"val_macro_f1": f1},
                       **extra})


def test_flower_compare_shows_what_a_run_lacks_as_a_dash_and_sorts_runs_without_an_f1_last(tmp_path, capsys):
    _member(tmp_path / "a", 0.5)  # no timings, no parameter counts: a run written by another tool
    _member(tmp_path / "b", float("nan"), timings={"seconds_per_epoch": 2.0})
    _member(tmp_path / "c", 0.8, timings={"seconds_per_epoch": 3.0}, parameters={"trainable": 1234})
    _member(tmp_path / "d", None)
    assert flower(["compare", str(tmp_path / "*")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[-2], r[-1]) for r in rows] == [("c", "0.8000", "3.0"), ("a", "0.5000", "-"), ("b", "-", "2.0"),
                                                    ("d", "-", "-")]
    assert "1,234" in rows[0]


def test_flower_compare_names_the_field_a_member_json_lacks(tmp_path, capsys):
    _member(tmp_path / "a", 0.5)
    document = json.loads((tmp_path / "a" / "member.json").read_text())
    del document["config"]["model"]["backbone"]
    (tmp_path / "a" / "member.json").write_text(json.dumps(document))
    assert flower(["compare", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'a' / 'member.json'} has no 'config.model.backbone' "
                                       "(not a run directory's files, or of another version)\n")


def test_a_markdown_table_escapes_a_bar_in_a_name(tmp_path, capsys):
    _member(tmp_path / "a|b", 0.5)
    assert flower(["compare", str(tmp_path / "a|b"), "--markdown"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.startswith("| a\\|b | ") and row.replace("\\|", "").count("|") == 12
