"""The ASGI app uvicorn workers import: settings from the environment (FLOWER_*).

A worker first ties its life to the `flower serve` process that started it (before the models load).
"""

from service.serving import follow_supervisor

follow_supervisor()

from service.app import create_app  # noqa: E402 - after the tie: a worker of a dead supervisor loads nothing

app = create_app()
