"""`flower serve`: serve an ensemble, one run or a model repository over HTTP (see service/serving.py).

Exit status 2: bad settings (one line `error: --flag: ...` per problem); 1: the models cannot be served or the
address cannot be bound; 0 after Ctrl-C once serving.
"""

from __future__ import annotations

import argparse
import os
from typing import Literal, get_args, get_origin

import service.serving as serving
from core.errors import ConfigError, FlowerError, Kind
from flower.commands import command, error
from service.settings import Settings

SOURCES = ("ensemble", "run", "model_repository")  # what to serve: exactly one
NOT_SERVED = 1  # documented: the models cannot be served, or the address cannot be bound


def parser(prog: str) -> argparse.ArgumentParser:
    """The command line of `flower serve`: one flag per `Settings` field, None where not given (the environment
    or the field's default applies)."""
    parser = argparse.ArgumentParser(prog=prog, description=serving.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or name.replace("_", " ")) + f" (default {info.default!r})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(info.annotation, str)
            words = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text,
                                metavar="{" + ",".join(words) + "}" if words else None)
    return parser


def parse_settings(argv: list[str] | None = None, prog: str = "flower serve") -> Settings:
    """Flags over environment over defaults."""
    args = parser(prog).parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    for chosen in SOURCES:
        for other in set(SOURCES) - {chosen}:
            if chosen in given and other not in given:
                given[other] = None  # a flag naming what to serve also overrides the others from the environment
    return Settings(**given)


def problems(err: Exception) -> list[str]:
    """One line per invalid setting of a pydantic ValidationError, named by its flag: '--port: Input should be ...'."""
    lines = []
    for problem in err.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        flag = "--" + field.replace("_", "-") if field in Settings.model_fields else field or "settings"
        lines.append(f"{flag}: {problem['msg']}")
    return lines


def checked_settings(argv: list[str] | None, prog: str) -> Settings | None:
    """The settings, or None once each invalid one is an error line; ConfigError when not exactly one source."""
    from pydantic import ValidationError

    try:
        settings = parse_settings(argv, prog)
    except ValidationError as err:
        for line in problems(err):
            error(line)
        return None
    if sum(bool(getattr(settings, name)) for name in SOURCES) != 1:
        raise ConfigError("give exactly one of --ensemble, --run or --model-repository")
    target = settings.ensemble or settings.run or settings.model_repository
    if not os.path.exists(target):
        raise FlowerError(f"{target} not found", Kind.NOT_FOUND)
    return settings


@command
def main(argv: list[str] | None = None, prog: str = "flower serve") -> int:
    """Run `flower serve`: check the settings, bind the port, load and check the models, then serve until Ctrl-C.

    The address is printed only once the models are loaded and the port is bound.
    """
    settings = checked_settings(argv, prog)
    if settings is None:
        return 2
    target = settings.ensemble or settings.run or settings.model_repository
    try:
        sock = serving.listen(settings.host, settings.port)
    except OSError as err:
        error(f"cannot listen on {settings.host}:{settings.port}: {err.strerror or err}")
        return NOT_SERVED
    try:
        try:
            repository = serving.load_checked(settings)
        except FlowerError as err:  # an ArtifactError or ModelError names the file and the problem
            error(str(err))
            return NOT_SERVED
        serving.hand_to_workers(settings)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        print(f"serving {target} on http://{host}:{settings.port}/  (page at /, API docs at /docs; "
              f"Ctrl-C stops)", flush=True)
        serving.serve(settings, repository, sock)
    finally:
        sock.close()
    return 0
