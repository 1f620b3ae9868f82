"""The ASGI app uvicorn workers import: settings from the environment (FLOWER_*)."""

from service.app import create_app

app = create_app()
