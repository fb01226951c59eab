"""The web app: a plain HTML page and a small JSON API over the generation queue.

    GET  /                               the page (ldm/serve/static/)
    GET  /api/model                      what the model draws, the defaults, the server's limits, the LoRA files
    POST /api/generate                   a multipart form → 202 {"job": id} | 400 {"error"} | 503 {"error", "busy"}
    GET  /api/jobs/{id}                  state, place in the queue, step / total, images or the error
    GET  /api/jobs/{id}/images/{k}       image k's PNG, its parameters in its text chunks

A refused request is answered with a one-line message (shown on the page) and logged; the server keeps serving.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ldm.core.errors import UserError
from ldm.serve.adapter import ModelAdapter
from ldm.serve.form import UPLOAD_FIELDS, Limits, lora_files, parse_form
from ldm.serve.jobs import Busy, Job, JobQueue, State
from ldm.serve.outputs import Outputs

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_FORM_FIELDS = 40


def _refuse(message: str, status: int = 400, **extra) -> JSONResponse:
    log.warning("refused a request: %s", message)
    return JSONResponse({"error": message, **extra}, status_code=status)


def _job_json(job: Job, queue: JobQueue) -> dict:
    images = [{"url": f"/api/jobs/{job.id}/images/{k}", "name": r.name, "seed": r.seed, "parameters": r.parameters,
               "command": r.command} for k, r in enumerate(job.results or [])]
    return {"id": job.id, "state": job.state.value, "position": queue.position(job), "step": job.step,
            "total": job.total, "error": job.error, "images": images}


async def _read_form(request: Request) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form's text fields and uploaded bytes (the browser's file names are dropped here)."""
    form = await request.form(max_files=len(UPLOAD_FIELDS), max_fields=MAX_FORM_FIELDS)
    fields, files = {}, {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[name] = await value.read()
            await value.close()
        else:
            fields[name] = value
    return fields, files


def create_app(adapter: ModelAdapter, limits: Limits = Limits(), queue_limit: int = 16, history: int = 64,
               out: str | Path | None = None, lora_dir: str | Path | None = None) -> FastAPI:
    """The app for one loaded model; ``app.state.queue`` is its job queue (stop it when done)."""
    outputs = Outputs(out)
    loras = lora_files(lora_dir)

    def work(job: Job) -> list:
        def on_step(done: int, total: int) -> None:
            job.step, job.total = done, total

        request, kept = job.request
        paths = {field: outputs.keep_upload(name, data) for field, (name, data) in kept.items()}
        request = replace(request, **{field: path for field, path in paths.items() if path is not None})
        return [outputs.add(drawn) for drawn in adapter.generate(request, on_step)]

    queue = JobQueue(work, queue_limit, history)

    def accept(fields: dict[str, str], files: dict[str, bytes]) -> Job:
        """Parse and check a form, then queue it (UserError / Busy when it cannot be)."""
        page_request, kept = parse_form(fields, files, adapter.info, limits, loras)
        adapter.check(page_request)
        return queue.submit((page_request, kept))
    app = FastAPI(title="ldm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/model")
    def model() -> dict:
        return {**asdict(adapter.info), "limits": asdict(limits), "loras": list(loras)}

    @app.post("/api/generate")
    async def generate(request: Request) -> JSONResponse:
        size = int(request.headers.get("content-length") or 0)
        if size > limits.max_body_bytes():
            return _refuse(f"the request is {size} bytes, more than this server reads "
                           f"({limits.max_body_bytes()}): upload smaller images", 413)
        try:
            fields, files = await _read_form(request)
            job = await run_in_threadpool(accept, fields, files)  # decoding images: off the event loop
        except Busy as e:
            return _refuse(str(e), 503, busy=True)
        except UserError as e:
            return _refuse(" ".join(str(e).split()))
        except Exception as e:  # noqa: BLE001 - e.g. a malformed multipart body: refused, the server goes on
            return _refuse(f"the form could not be read ({type(e).__name__}: {e})")
        log.info("job %d queued (%d ahead)", job.id, queue.position(job))
        return JSONResponse({"job": job.id, "position": queue.position(job)}, status_code=202)

    @app.get("/api/jobs/{job_id}")
    def job_state(job_id: int) -> JSONResponse:
        job = queue.get(job_id)
        if job is None:
            return JSONResponse({"error": f"no job {job_id} (finished jobs are kept for a while only)"}, 404)
        return JSONResponse(_job_json(job, queue))

    @app.get("/api/jobs/{job_id}/images/{index}")
    def image(job_id: int, index: int) -> Response:
        job = queue.get(job_id)
        if job is None or job.state is not State.DONE or not 0 <= index < len(job.results):
            return JSONResponse({"error": f"no image {index} of job {job_id}"}, 404)
        result = job.results[index]
        return Response(result.png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="{result.name}"'})

    return app
