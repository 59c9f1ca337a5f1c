"""The study's web server: the rating page, its API, the images by id, and the admin's export of votes.

    GET  /r/{rater}                   the rating page (a rater joins by opening it)
    GET  /api/raters/{rater}/next     the rater's next task: question, prompt, the two image URLs, progress
    POST /api/raters/{rater}/votes    {"position", "choice": left|right|tie, "time_ms"}; a second vote on a position is ignored
    GET  /images/{id}                 an image of the study, looked up by id in a table built at start
    GET  /api/export                  every vote as CSV; needs `Authorization: Bearer <admin token>`

Nothing here reads private/key.json: the server never knows which model drew a picture. Votes live in SQLite
(votes.sqlite in the study folder), one row per vote, unique per (rater, position), so they survive a restart and
a vote sent twice counts once.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
import socket
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from pydantic import BaseModel, Field

from popalign.io import InputError
from popalign.study import ADMIN_TOKEN_FILE, IMAGES_DIR, PRIVATE_DIR, QUESTIONS, TASKS_FILE, VOTES_FILE, read_study
from popalign.study.page import rating_page, welcome_page
from popalign.study.votes import VOTE_COLUMNS, VoteStore

RATER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Vote(BaseModel):
    position: int = Field(ge=0)
    choice: Literal["left", "right", "tie"]
    time_ms: int = Field(ge=0, le=24 * 3600 * 1000)


def read_admin_token(study_dir: str | Path) -> str:
    path = Path(study_dir) / PRIVATE_DIR / ADMIN_TOKEN_FILE
    token = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if not token:
        raise InputError(f"{path}: no admin token there (give one with --admin_token)")
    return token


def create_app(study_dir: str | Path, admin_token: str):
    """The FastAPI application of a prepared study."""
    study_dir = Path(study_dir)
    settings, tasks = read_study(study_dir)
    tasks_by_id = {task["id"]: task for task in tasks}
    # The only images the server can send: the study's, by id. A URL's path is looked up here, never joined to a folder.
    image_files: dict[str, Path] = {}
    for task in tasks:
        for option in ("a", "b"):
            path = study_dir / IMAGES_DIR / f"{task[option]}.png"
            if not path.is_file():
                raise InputError(f"{study_dir / TASKS_FILE}: task {task['id']} shows image {task[option]}, which "
                                 f"{study_dir / IMAGES_DIR} does not have")
            image_files[task[option]] = path
    grid_size = settings["settings"]["grid_size"]
    store = VoteStore(study_dir / VOTES_FILE, settings["pool"], settings["gold"], settings["settings"])

    app = FastAPI(title="Image study", docs_url=None, redoc_url=None, openapi_url=None)

    def checked_rater(rater: str) -> str:
        if not RATER_ID.fullmatch(rater):
            raise HTTPException(status_code=404, detail="unknown rater link (ids are letters, digits, '_', '-')")
        return rater

    def progress(plan: list[dict], answered: set[int]) -> dict:
        return {"answered": len(answered), "total": len(plan)}

    @app.get("/", response_class=HTMLResponse)
    def welcome():
        return welcome_page()

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/r/{rater}", response_class=HTMLResponse)
    def page(rater: str):
        return rating_page(checked_rater(rater))

    @app.get("/api/raters/{rater}/next")
    def next_task(rater: str):
        rater = checked_rater(rater)
        plan = store.plan(rater)
        answered = store.answered_positions(rater)
        position = next((index for index in range(len(plan)) if index not in answered), None)
        if position is None:
            return {"done": True, **progress(plan, answered)}
        entry = plan[position]
        task = tasks_by_id[entry["task"]]
        right = "b" if entry["left"] == "a" else "a"
        return {"done": False, "position": position, **progress(plan, answered),
                "question": QUESTIONS[task["question"]], "prompt": task["prompt"],
                "grid": grid_size if task["kind"] == "population" else 0,
                "left": f"/images/{task[entry['left']]}", "right": f"/images/{task[right]}"}

    @app.post("/api/raters/{rater}/votes")
    def vote(rater: str, body: Vote):
        rater = checked_rater(rater)
        plan = store.plan(rater)
        if body.position >= len(plan):
            raise HTTPException(status_code=422, detail=f"position {body.position} is past this rater's {len(plan)} tasks")
        accepted = store.record_vote(rater, body.position, plan[body.position], body.choice, body.time_ms)
        return {"accepted": accepted, **progress(plan, store.answered_positions(rater))}

    @app.get("/images/{image_id}")
    def image(image_id: str):
        path = image_files.get(image_id)
        if path is None:
            raise HTTPException(status_code=404, detail="no such image")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/export")
    def export(request: Request):
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if not given or not secrets.compare_digest(given.encode(), admin_token.encode()):
            raise HTTPException(status_code=401, detail="the export needs the admin token (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=VOTE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(store.votes())
        return Response(buffer.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="votes.csv"', "Cache-Control": "no-store"})

    app.state.store = store
    return app


def serve(study_dir: str | Path, host: str, port: int, admin_token: str | None = None, links: int = 0) -> None:
    """Run the server until interrupted; prints `links` fresh rater links."""
    import uvicorn

    token = admin_token or read_admin_token(study_dir)
    app = create_app(study_dir, token)  # checks the study's files before anything listens
    # Listening on every interface: the links name this machine as others on the network reach it.
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else "localhost" if host == "127.0.0.1" else host
    print(f"study {study_dir}: http://{shown_host}:{port}/r/<rater id>  (ids: letters, digits, '_', '-')", flush=True)
    for _ in range(links):
        print(f"  http://{shown_host}:{port}/r/{secrets.token_urlsafe(6).replace('-', 'x').replace('_', 'y')}", flush=True)
    print(f"export: curl -H 'Authorization: Bearer <token in {Path(study_dir) / PRIVATE_DIR / ADMIN_TOKEN_FILE}>' "
          f"http://{shown_host}:{port}/api/export", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
