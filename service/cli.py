"""Start the classification service.

    flower serve --ensemble demo/ensemble [--host 127.0.0.1] [--port 8000] [--workers 1]
    flower serve --run demo/runs/demo-cnn-64

Every flag can also come from the environment: FLOWER_ENSEMBLE, FLOWER_RUN, FLOWER_HOST, FLOWER_PORT,
FLOWER_WORKERS, FLOWER_BATCHING, FLOWER_MAX_BATCH_SIZE, FLOWER_MAX_WAIT_MS, FLOWER_MAX_IMAGE_BYTES,
FLOWER_MAX_PIXELS, FLOWER_MAX_IMAGES, FLOWER_API_KEY, FLOWER_MODEL_NAME. Flags win over the environment;
--ensemble on the command line also sets aside FLOWER_RUN, and --run sets aside FLOWER_ENSEMBLE.
Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

from service.settings import Settings


def parse_settings(argv: list[str] | None = None, prog: str = "python -m service") -> Settings:
    """Flags over environment over defaults."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = Settings.model_fields
    for name, info in fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (info.description or name.replace("_", " ")) + f" (default {info.default!r})"
        if info.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(info.annotation, str)
            parser.add_argument(flag, dest=name, type=kind, default=None, help=help_text)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    for chosen, other in (("ensemble", "run"), ("run", "ensemble")):
        if chosen in given and other not in given:
            given[other] = None  # a flag naming what to serve also overrides the other one from the environment
    return Settings(**given)


def _problems(err: ValidationError) -> list[str]:
    """One line per invalid setting, named by its flag: 'error: --port: Input should be ...'."""
    lines = []
    for problem in err.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        flag = "--" + field.replace("_", "-") if field in Settings.model_fields else field or "settings"
        lines.append(f"error: {flag}: {problem['msg']}")
    return lines


def _hand_to_workers(settings: Settings) -> None:
    """Workers are separate processes: hand them the settings through the environment (unset ones removed)."""
    for name, value in settings.model_dump().items():
        if value is None:
            os.environ.pop(f"FLOWER_{name.upper()}", None)
        else:
            os.environ[f"FLOWER_{name.upper()}"] = str(value)


def main(argv: list[str] | None = None, prog: str = "python -m service") -> int:
    """Command line entry point: validate settings, then run uvicorn."""
    import uvicorn

    try:
        settings = parse_settings(argv, prog)
    except ValidationError as err:
        print("\n".join(_problems(err)), file=sys.stderr)
        return 2
    if bool(settings.ensemble) == bool(settings.run):
        print("error: give exactly one of --ensemble or --run", file=sys.stderr)
        return 2
    target = settings.ensemble or settings.run
    if not os.path.exists(target):
        print(f"error: {target} not found", file=sys.stderr)
        return 2
    _hand_to_workers(settings)
    print(f"serving {target} on http://{settings.host}:{settings.port}/  (page at /, API docs at /docs; "
          f"Ctrl-C stops)", flush=True)
    uvicorn.run("service.server:app", factory=False, host=settings.host, port=settings.port,
                workers=settings.workers, log_level="warning")
    return 0
