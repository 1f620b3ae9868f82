#!/usr/bin/env python3
"""Where a request's time goes outside the models: the service's path with a stand-in model that costs nothing.

    python scripts/bench_request_path.py [--members 3] [--size 128] [--photo PATH.jpg] [--reps 400] [--rounds 5]

The stand-in is the real EnsemblePredictor with real members (their squares, TTA code, thread pool and blend), each
member's pixel model replaced by a function answering constant probabilities for the 104 classes at once: what is
left is the fixed cost every request pays. Stages, each timed in-process (median over --reps calls, per round):
  multipart   Starlette's parser on the request's body (one JPEG in the field 'files'), as /v1/predict reads it
  decode      service.images.decode_image on the JPEG (TensorFlow's decoder for a plain JPEG, its header read by PIL);
              `decode with PIL` PIL's decoder on the same bytes (the same pixels), for comparison
  predict     EnsemblePredictor.predict on the decoded image: each member's square, the member threads, the blend
  batcher     DynamicBatcher.submit_many on the decoded image (the predict above inside it: the hand-off to the
              model thread and back to the event loop)
  infer       InferencePath.infer on the encoded JPEG: the header read, the pixel budget, decode and the batcher
  response    the route's answer: top-5 classes built as PredictResponse and serialised as FastAPI does
  app         the whole request through the ASGI app in-process (httpx's ASGI transport: middleware, routing, all of
              the above); `app /healthz` the same for GET /healthz, the floor of the transport and the middleware
  http        the whole request over loopback HTTP to `uvicorn` serving the same app in another process (one httpx
              client); `http /healthz` its floor; `http: server CPU` the server process's CPU time per request (all
              its threads: the model thread and the members' too), the figure a saturated machine's throughput divides
The photo is --photo, else a 128 px JPEG of the demo flower (the size of the imported flowers5 records).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: testkit is not installed

import numpy as np  # noqa: E402

CLASSES = 104


def stand_in(members: int, size: int):
    """An EnsemblePredictor of `members` real members at `size` px whose pixel models answer at once."""
    from core.contract import competition_classes
    from ensemble.spec import BlendSpec
    from service.predictor import EnsemblePredictor, MemberModel

    answer = np.full((1, CLASSES), 1.0 / CLASSES, np.float32)
    models = []
    for i in range(members):
        member = MemberModel(f"m{i}", Path("."), size, predict_pixels=None, fit="crop", record_size=size)
        member.runtime = lambda batch: np.repeat(answer, len(batch), 0)
        models.append(member)
    predictor = EnsemblePredictor(competition_classes(), models, BlendSpec("mean", weights=(1 / members,) * members))
    predictor.warm_up()
    return predictor


def app_for(predictor):
    """The service's app around the stand-in, warmed up."""
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings(ensemble="stand-in"), predictor)


def multipart_body(blob: bytes) -> tuple[bytes, str]:
    """A multipart body with the JPEG in the field 'files', and its content type."""
    boundary = "benchboundary1234"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"f.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def median_us(call, reps: int) -> float:
    """Median microseconds of `call()` over `reps` calls after 20 warm-ups; a coroutine function's calls are awaited
    on one event loop, all of them in one run of it (as a server's loop runs on)."""
    if asyncio.iscoroutinefunction(call):
        return asyncio.get_event_loop().run_until_complete(_median_us_async(call, reps))
    for _ in range(20):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


async def _median_us_async(call, reps: int) -> float:
    """median_us for a coroutine function."""
    for _ in range(20):
        await call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def stages(blob: bytes, members: int, size: int, reps: int) -> dict:
    """Callables for each in-process stage (see the module docstring)."""
    import httpx
    from PIL import Image
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartParser

    from service.batching import DynamicBatcher
    from service.images import decode_image
    from service.inference import EncodedImage, InferencePath, batch_function
    from service.limits import PixelBudget
    from service.routes.predict import _image_result
    from service.schemas import PredictResponse

    predictor = stand_in(members, size)
    image = decode_image(blob, 40_000_000, size, 4_000_000)
    body, content_type = multipart_body(blob)
    headers = Headers({"content-type": content_type, "content-length": str(len(body))})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    batcher = DynamicBatcher(batch_function(predictor))
    loop.run_until_complete(batcher.start())
    app = app_for(predictor)

    async def parse():
        async def stream():
            yield body
        form = await MultiPartParser(headers, stream()).parse()
        await form.close()

    class Served:
        model, number = "flowers", 1

    Served.predictor = predictor
    blended, votes = predictor.predict([image])

    def response():
        from fastapi.encoders import jsonable_encoder
        from fastapi.responses import JSONResponse

        from service.inference import Prediction

        answer = PredictResponse(model="flowers", version=1, classes=CLASSES, results=[
            _image_result(Served, "f.jpg", Prediction(blended[0], votes[:, 0]), 5, False, False)])
        return JSONResponse(jsonable_encoder(answer.model_dump(exclude_none=True))).body

    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    loop.run_until_complete(asyncio.sleep(0.5))  # the handed-in predictor's warm-up

    async def through_app():
        response = await client.post("/v1/predict", content=body, headers={"content-type": content_type})
        response.raise_for_status()

    async def healthz():
        (await client.get("/healthz")).raise_for_status()

    async def batched():
        await batcher.submit_many([image])

    path = InferencePath(batcher.submit_many, 40_000_000, size, 4_000_000, 100_000_000, PixelBudget(200_000_000))

    async def inferred():
        await path.infer([EncodedImage.of("f.jpg", blob)])

    return {"multipart": parse, "decode": lambda: decode_image(blob, 40_000_000, size, 4_000_000),
            "decode with PIL": lambda: np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")),
            "predict": lambda: predictor.predict([image]), "batcher": batched, "infer": inferred,
            "response": response,
            "app /healthz": healthz, "app": through_app}


def serve(port: int, members: int, size: int) -> None:
    """Serve the stand-in over HTTP on loopback (the child process of --http)."""
    import uvicorn

    from service.serving import uvicorn_config
    from service.settings import Settings

    settings = Settings(ensemble="stand-in", port=port)
    config = uvicorn_config(settings, app_for(stand_in(members, size)))
    uvicorn.Server(config).run()


def cpu_seconds(pid: int) -> float:
    """A process's CPU seconds so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def http_median_us(port: int, pid: int, body: bytes, content_type: str, reps: int) -> list[float]:
    """One client's requests to the stand-in server, back to back: the median microseconds of GET /healthz (the
    HTTP floor) and of POST /v1/predict, and the server's CPU microseconds per /v1/predict (all its threads)."""
    import httpx

    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        def call():
            client.post("/v1/predict", content=body, headers={"content-type": content_type}).raise_for_status()
        floor = median_us(lambda: client.get("/healthz").raise_for_status(), reps)
        before = cpu_seconds(pid)
        predict = median_us(call, reps)
        return [floor, predict, 1e6 * (cpu_seconds(pid) - before) / (reps + 20)]


def start_http(port: int, members: int, size: int) -> subprocess.Popen:
    """This script serving the stand-in in a child process, once /readyz answers 200."""
    import httpx

    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--members", str(members),
                              "--size", str(size)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                return child
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    child.kill()
    raise SystemExit("the stand-in server did not become ready")


def photo_bytes(path: str | None, size: int) -> bytes:
    """The photo's bytes: --photo, else a demo flower JPEG at `size` px."""
    if path:
        return Path(path).read_bytes()
    from testkit.artifacts import flower_jpeg

    return flower_jpeg(size)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--photo", help="a JPEG to send (default: a 128 px demo flower)")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.members, args.size)
        return 0
    from testkit.artifacts import free_port

    blob = photo_bytes(args.photo, args.size)
    calls = stages(blob, args.members, args.size, args.reps)
    port = free_port()
    server = start_http(port, args.members, args.size)
    body, content_type = multipart_body(blob)
    http = ("http /healthz", "http", "http: server CPU")
    rounds: dict[str, list[float]] = {name: [] for name in [*calls, *http]}
    try:
        for _ in range(args.rounds):
            for name, call in calls.items():
                rounds[name].append(median_us(call, args.reps))
            for name, value in zip(http, http_median_us(port, server.pid, body, content_type, args.reps),
                                   strict=True):
                rounds[name].append(value)
    finally:
        server.terminate()
        server.wait(30)
    print(f"\n{args.members} stand-in members at {args.size} px, a {len(blob)}-byte JPEG, {os.cpu_count()} CPUs; "
          f"median of {args.rounds} rounds of {args.reps} calls each")
    print("| stage | µs, median round | fastest round | rounds |\n|---|---|---|---|")
    for name, values in rounds.items():
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f} | "
              f"{', '.join(f'{v:.0f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
