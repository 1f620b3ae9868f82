"""`flower distil`: train one student member on an ensemble's answers (knowledge distillation, Hinton et al. 2015).

    flower distil ENSEMBLE --config STUDENT.toml [--unlabeled DATA:SPLIT | FOLDER] [--set distil.temperature=4 ...]

1. The teacher: ENSEMBLE (an ensemble directory, its ensemble.json, or a run directory) answers for every record of
   the student's training split (data.dir:train) and every unlabeled image, as `flower predict` would (the service's
   decoding, each member at its own size and geometry, the blend): RUN/teacher.npz. A FOLDER of photos is first made
   records of the student's size in RUN/unlabeled/, as `flower import` makes them (its test split: no labels).
2. The student: a `flower train` run of STUDENT.toml (plus --set) whose loss is the distillation loss on the
   teacher's probabilities at distil.temperature, plus distil.hard_weight x the cross-entropy on the true labels;
   unlabeled images count as soft targets, or with distil.pseudo_threshold > 0 as pseudo-labels (only those whose
   teacher's top probability reaches it). Validation rows are never trained on (an unlabeled image with a
   validation id is refused); every epoch is scored on them, and the best epoch by validation macro F1 is exported.
The run directory is an ordinary one (servable, blendable) with teacher.npz in it; its member.json "teacher" names
the teacher (path, sha256 fingerprint of its ensemble.json) and the unlabeled data. The same command run again
resumes: the teacher file is kept when the teacher and the images are the same.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.contract import parse_split_spec
from core.errors import ConfigError
from core.names import shown
from core.teacher import TEACHER_FILE, read_teacher, teacher_fingerprint
from flower.commands import command, stop_on_sigterm
from training.config import RunConfig, config_from_dict, describe_options, load_config, with_overrides
from training.config_values import parse_assignments

UNLABELED_FOLDER = "unlabeled"  # RUN/unlabeled/: the records made of a folder of unlabeled photos


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower distil`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=describe_options(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ensemble", metavar="ENSEMBLE", help="the teacher: an ensemble directory, its ensemble.json, "
                                                             "or a run directory")
    parser.add_argument("--config", help="the student's TOML config (defaults apply where it is silent)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option, e.g. --set distil.temperature=4 --set train.epochs=10")
    parser.add_argument("--unlabeled", metavar="DATA:SPLIT|FOLDER",
                        help="images without labels to train on too, with the teacher's answers: a split of a data "
                             "folder (e.g. data/flowers5:test) or a folder of photos")
    parser.add_argument("--teacher-tta", type=int, default=1, metavar="N",
                        help="the teacher's passes per image and member, as flower serve --tta (default 1: the "
                             "plain pass)")
    parser.add_argument("--print-config", action="store_true", help="print the student's resolved config and exit")
    return parser


def student_config(args: argparse.Namespace) -> RunConfig:
    """The student's config: STUDENT.toml and --set, with distil.teacher at RUN/teacher.npz."""
    config = load_config(args.config, parse_assignments(args.set))
    if config.distil.teacher:
        raise ConfigError(f"distil.teacher={config.distil.teacher!r}: flower distil writes the teacher file itself "
                          f"(RUN/{TEACHER_FILE}); leave it unset")
    if "://" in config.data.dir:
        raise ConfigError(f"data.dir={config.data.dir!r}: flower distil scores the training records with the teacher "
                          "on this machine; give a local data folder")
    teacher = str(config.run_dir / TEACHER_FILE)
    return config_from_dict(with_overrides(config.to_dict(), {"distil.teacher": teacher}))


def unlabeled_input(value: str | None, data_dir: str) -> tuple[str | None, bool]:
    """--unlabeled as (what it names, whether it is a folder of photos); ConfigError for neither, or for the
    student's own training or validation split."""
    if value is None:
        return None, False
    spec = parse_split_spec(value)
    if spec is None:
        if not os.path.isdir(value):
            raise ConfigError(f"--unlabeled {shown(value)}: not a folder of photos nor DATA:SPLIT of a data folder")
        return str(Path(value).resolve()), True
    if spec.split in ("train", "val") and os.path.samefile(spec.data, data_dir):
        why = "validation rows are never trained on" if spec.split == "val" else "they are trained on already"
        raise ConfigError(f"--unlabeled {shown(value)} is the student's own {spec.split} split: {why}")
    return value, False


def ensure_teacher(model: str, config: RunConfig, unlabeled: str | None, folder: bool, tta: int = 1) -> None:
    """Write RUN/teacher.npz, unless it holds the answers of this teacher for these images already (a rerun)."""
    from service.teacher import make_teacher
    from training.fit.checkpoints import saved_epoch

    out, train = Path(config.distil.teacher), f"{config.data.dir}:train"
    wanted = {"path": str(Path(model).resolve()), "fingerprint": teacher_fingerprint(model), "train": train,
              "unlabeled_from": unlabeled, "tta": tta}
    if out.is_file():
        facts = read_teacher(out).facts
        if all(facts.get(key) == value for key, value in wanted.items()):
            print(f"teacher: keeping {out} (the same teacher and images)")
            return
        if saved_epoch(config.run_dir / "checkpoints"):
            raise ConfigError(f"{config.run_dir} holds a student of another teacher or other images ({out}: "
                              f"{facts.get('path')}, unlabeled {facts.get('unlabeled_from')}); name another output, "
                              f"or remove {config.run_dir} to start over")
    records = unlabeled
    if folder:
        records = unlabeled_records(Path(unlabeled), config)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    make_teacher(model, train, out, records, unlabeled, classes=load_classes_of(config), tta=tta)


def unlabeled_records(folder: Path, config: RunConfig) -> str:
    """A folder of photos as records at the student's record size and fit, in RUN/unlabeled/; their DATA:SPLIT."""
    from core.members import data_fit
    from training.data.layout import choose_file_size
    from training.data.unlabeled import write_unlabeled_records

    data = config.data
    size = choose_file_size(data.dir, data.image_size, data.file_size or None)
    return write_unlabeled_records(folder, config.run_dir / UNLABELED_FOLDER, size, data_fit(data.dir, data.fit)["fit"])


def load_classes_of(config: RunConfig) -> list[str]:
    """The class names of the student's data."""
    from training.data.layout import load_classes

    return load_classes(config.data.dir)


@command
def main(argv: list[str] | None = None, prog: str = "flower distil") -> int:
    """Run `flower distil`; returns the exit status."""
    import json

    args = parser(prog).parse_args(argv)
    if args.teacher_tta < 1:
        raise ConfigError(f"--teacher-tta must be a whole number of passes >= 1, got {args.teacher_tta}")
    config = student_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    from service.scoring import model_kind
    from training.fit.checkpoints import check_resumable
    from training.fit.loop import train_member  # TensorFlow is imported only from here on

    model_kind(args.ensemble)  # an ensemble or run directory, else one error line
    unlabeled, folder = unlabeled_input(args.unlabeled, config.data.dir)
    check_resumable(config.run_dir / "checkpoints", config.to_dict())  # another run there: refused before writing
    stop_on_sigterm()
    ensure_teacher(args.ensemble, config, unlabeled, folder, args.teacher_tta)
    train_member(config)
    return 0
