"""Image uploads (tus 1.0.0: core, creation, expiration, termination) and submissions.

    OPTIONS /api/v1/uploads              what the server speaks (Tus-Version, Tus-Extension)
    POST    /api/v1/uploads              Upload-Length, Upload-Metadata (challenge, phase)
    HEAD    /api/v1/uploads/{id}         Upload-Offset: where to continue
    PATCH   /api/v1/uploads/{id}         Upload-Offset + application/offset+octet-stream
    DELETE  /api/v1/uploads/{id}         give up an unfinished upload
    POST    /api/v1/submissions          {upload_id, challenge, phase, ...} + Idempotency-Key
    GET     /api/v1/intakes/{id}         how the check of the image goes; its submission

A PATCH body is read as a stream (never whole: memory is bounded by one buffer per
request) and written to disk with its sha256 computed on the way (engine/uploads.py). The
check of the image runs after the request, in the server's background threads
(engine/intakes.py). `build_router` takes the app's authentication dependency, which
yields the caller's principal (token_id, role, team_id, challenge_ids).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import sys
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import ClientDisconnect

from engine.api.errors import AUTH_RESPONSES, NOT_FOUND, ErrorBody
from engine.api.pagination import RowId
from engine.config import Settings
from engine.db import session_factory
from engine.errors import EpreuveError
from engine.intakes import (
    IntakeRunner,
    SubmissionRequest,
    check_key,
    find_by_key,
    intake_for,
    intake_view,
    open_intake,
    phase_cap,
)
from engine.store import open_store
from engine.uploads import (
    DEFAULT_EXPIRY,
    OffsetMismatch,
    Owner,
    Upload,
    UploadArea,
    UploadTooLarge,
)

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,expiration,termination"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
WRITE_BUFFER = 1 << 20  # bytes gathered before one write to disk (in a worker thread)
MAX_METADATA_HEADER = 4096
PREFIX = "/api/v1"


class BadRequest(EpreuveError):
    http_status = 400


class TusVersionUnsupported(EpreuveError):
    """The client speaks another tus version (412, as the protocol says)."""

    http_status = 412


class WrongContentType(EpreuveError):
    http_status = 415


class TeamRequired(EpreuveError):
    """Images are uploaded and submitted for a team: a token without one cannot."""

    http_status = 403


class SubmissionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upload_id: str = Field(min_length=1, max_length=64)
    challenge: str = Field(min_length=1, max_length=64)
    phase: str = Field(min_length=1, max_length=64)
    source_url: str | None = Field(None, max_length=2000)
    license: str | None = Field(None, max_length=100)


UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES, **NOT_FOUND,
    400: {"model": ErrorBody, "description": "a malformed header or body"},
    412: {"model": ErrorBody, "description": "Tus-Resumable is missing or not 1.0.0"},
    422: {"model": ErrorBody, "description": "a request that does not validate"},
}


def build_router(settings: Settings, principal_dependency: Any, *,
                 sessions: sessionmaker[Session] | None = None,
                 upload_expiry: timedelta = DEFAULT_EXPIRY,
                 intake_runner: IntakeRunner | None = None) -> APIRouter:
    """The upload and submission-creation routes. `principal_dependency` is the callable
    FastAPI depends on for the caller (e.g. `authenticated()`). The router's
    `intake_runner` must be resumed at startup (done by `on_startup` here; an app with
    its own lifespan calls `router.intake_runner.resume_pending()` itself)."""
    sessions = sessions or session_factory(settings.database_url)
    store = open_store(settings.store_dir)
    area = UploadArea(settings.uploads_dir, store, expiry=upload_expiry)
    runner = intake_runner or IntakeRunner(sessions, settings, store)
    router = APIRouter(prefix=PREFIX, tags=["uploads"], responses=UPLOAD_ERRORS,
                       on_startup=[runner.resume_pending],
                       on_shutdown=[runner.shutdown])
    router.intake_runner = runner  # type: ignore[attr-defined]
    router.upload_area = area  # type: ignore[attr-defined]
    caller = Depends(principal_dependency)

    @router.options("/uploads", status_code=204)
    def tus_options() -> Response:
        return Response(status_code=204, headers={
            "Tus-Resumable": TUS_VERSION, "Tus-Version": TUS_VERSION,
            "Tus-Extension": TUS_EXTENSIONS})

    @router.post("/uploads", status_code=201, responses={
        201: {"description": "created; Location names the upload"},
        413: {"description": "over the phase's cap"}})
    def create_upload(principal=caller,
                      upload_length: str | None = Header(None),
                      upload_metadata: str | None = Header(None, max_length=MAX_METADATA_HEADER),
                      tus_resumable: str | None = Header(None)) -> Response:
        _check_tus(tus_resumable)
        owner = _owner(principal)
        metadata = parse_metadata(upload_metadata)
        length = _number(upload_length, "Upload-Length")
        challenge, phase = metadata.get("challenge"), metadata.get("phase")
        if not challenge or not phase:
            raise BadRequest("Upload-Metadata must name the challenge and the phase "
                             "(challenge <base64>,phase <base64>)")
        _check_scope(principal, challenge)
        with sessions() as session:
            cap = phase_cap(session, challenge, phase)
        area.sweep()  # expired uploads go as new ones come: no timer needed
        upload = area.create(owner, length, cap=cap, metadata=metadata)
        return Response(status_code=201, headers={
            "Location": f"{PREFIX}/uploads/{upload.id}",  # relative: no Host trusted
            **_upload_headers(upload)})

    @router.head("/uploads/{upload_id}", name="upload_offset")
    def upload_offset(upload_id: str, principal=caller,
                      tus_resumable: str | None = Header(None)) -> Response:
        _check_tus(tus_resumable)
        upload = area.get(upload_id, _owner(principal))
        return Response(status_code=200, headers={
            **_upload_headers(upload), "Cache-Control": "no-store"})

    @router.patch("/uploads/{upload_id}", status_code=204, responses={
        204: {"description": "appended; Upload-Offset is the new offset"},
        409: {"description": "Upload-Offset is not the upload's offset"},
        413: {"description": "more bytes than declared"},
        415: {"description": "not application/offset+octet-stream"}})
    async def append_upload(upload_id: str, request: Request, principal=caller,
                            upload_offset: str | None = Header(None),
                            content_type: str | None = Header(None),
                            tus_resumable: str | None = Header(None)) -> Response:
        _check_tus(tus_resumable)
        if (content_type or "").split(";")[0].strip().lower() != OFFSET_OCTET_STREAM:
            raise WrongContentType(f"a PATCH body must be sent as {OFFSET_OCTET_STREAM}")
        offset = _number(upload_offset, "Upload-Offset")
        owner = _owner(principal)
        upload = await run_in_threadpool(area.get, upload_id, owner)
        # read from the request, not declared: the HTTP server itself owns Content-Length
        content_length = request.headers.get("content-length")
        if offset != upload.offset:  # asked first, as tus orders it; checked again when held
            raise OffsetMismatch(f"Upload-Offset {offset} is not the upload's offset "
                                 f"{upload.offset}: ask it (HEAD) and continue from there")
        if content_length is not None and offset + _number(content_length, "Content-Length") \
                > upload.length:
            raise UploadTooLarge(f"the request carries more than the {upload.length} bytes "
                                 "the upload declared: refused before reading it")
        upload = await _stream_into(area, upload_id, owner, offset, request)
        if upload is None:  # the client went away: its bytes are kept for it to resume
            return Response(status_code=400)
        return Response(status_code=204, headers=_upload_headers(upload))

    @router.delete("/uploads/{upload_id}", status_code=204)
    def delete_upload(upload_id: str, principal=caller,
                      tus_resumable: str | None = Header(None)) -> Response:
        _check_tus(tus_resumable)
        area.delete(upload_id, _owner(principal))
        return Response(status_code=204, headers={"Tus-Resumable": TUS_VERSION})

    @router.post("/submissions", status_code=202, responses={
        202: {"description": "the intake: the image is checked after this request"},
        409: {"description": "upload unfinished, already submitted, or for another phase"},
        422: {"description": "the Idempotency-Key was used with another body"}})
    def create_submission(body: SubmissionBody, principal=caller,
                          idempotency_key: str | None = Header(None)) -> JSONResponse:
        owner = _owner(principal)
        key = check_key(idempotency_key)
        _check_scope(principal, body.challenge)
        request = SubmissionRequest(**body.model_dump())
        intake_id, created = _open_once(sessions, area, owner, key, request)
        if created:
            runner.start(intake_id)
        with sessions() as session:
            view = intake_view(session, intake_for(session, intake_id, owner.team_id))
        return JSONResponse(view, status_code=202,
                            headers={"Location": f"{PREFIX}/intakes/{intake_id}"})

    @router.get("/intakes/{intake_id}")
    def get_intake(intake_id: RowId, principal=caller) -> dict:
        with sessions() as session:
            intake = intake_for(session, intake_id, principal.team_id,
                                any_team=principal.role == "admin")
            return intake_view(session, intake)

    return router


def _open_once(sessions, area: UploadArea, owner: Owner, key: str,
               request: SubmissionRequest) -> tuple[int, bool]:
    """The intake for this key: the existing one, or a new one (committed here, at the
    edge). Two racing requests with one key: the loser's insert fails and it reads the
    winner's."""
    for _ in range(2):
        with sessions() as session:
            existing = find_by_key(session, owner.token_id, key, request)
            if existing is not None:
                return existing.id, False
            upload = area.get(request.upload_id, owner)
            try:
                intake, created = open_intake(session, token_id=owner.token_id,
                                              team_id=owner.team_id, key=key,
                                              request=request, upload=upload)
                session.commit()
                return intake.id, created
            except IntegrityError:
                session.rollback()
    raise EpreuveError("the submission could not be recorded; retry with the same key")


async def _stream_into(area: UploadArea, upload_id: str, owner: Owner, offset: int,
                       request: Request) -> Upload | None:
    """The request body, as it arrives, into the upload: gathered in a buffer of at most
    WRITE_BUFFER bytes, each buffer written by a worker thread (disk and hashing never
    block the event loop). None when the client disconnected (what came is kept)."""
    appending = area.appending(upload_id, owner, offset)
    appender = await run_in_threadpool(appending.__enter__)
    buffer = bytearray()
    try:
        async for chunk in request.stream():
            buffer += chunk
            if len(buffer) >= WRITE_BUFFER:
                await run_in_threadpool(appender.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await run_in_threadpool(appender.write, bytes(buffer))
    except ClientDisconnect:
        if buffer:  # what did arrive is kept: the client resumes after it
            with contextlib.suppress(UploadTooLarge):
                await run_in_threadpool(appender.write, bytes(buffer))
        await run_in_threadpool(appending.__exit__, None, None, None)
        return None
    except BaseException:
        if not await run_in_threadpool(appending.__exit__, *sys.exc_info()):
            raise
        return None
    await run_in_threadpool(appending.__exit__, None, None, None)
    return await run_in_threadpool(area.get, upload_id, owner)


def parse_metadata(header: str | None) -> dict[str, str]:
    """tus Upload-Metadata: `key base64,key base64,key` (keys unique, values UTF-8)."""
    metadata: dict[str, str] = {}
    if not header:
        return metadata
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        key = parts[0]
        if not key or len(parts) > 2 or not key.isascii() or not key.isprintable() \
                or key in metadata:
            raise BadRequest(f"Upload-Metadata is malformed near {pair[:40]!r}: write "
                             "key base64value pairs separated by commas, each key once")
        try:
            value = base64.b64decode(parts[1], validate=True).decode() if len(parts) == 2 \
                else ""
        except (binascii.Error, UnicodeDecodeError):
            raise BadRequest(f"Upload-Metadata value of {key[:40]!r} is not base64 of "
                             "UTF-8 text") from None
        metadata[key] = value
    return metadata


def _upload_headers(upload: Upload) -> dict[str, str]:
    headers = {"Tus-Resumable": TUS_VERSION, "Upload-Offset": str(upload.offset),
               "Upload-Length": str(upload.length)}
    if upload.complete:
        headers["Epreuve-Upload-Sha256"] = upload.sha256
    else:
        headers["Upload-Expires"] = format_datetime(upload.expires_at, usegmt=True)
    return headers


def _check_tus(version: str | None) -> None:
    if version != TUS_VERSION:
        raise TusVersionUnsupported(f"this server speaks tus {TUS_VERSION}: send "
                                    f"'Tus-Resumable: {TUS_VERSION}'")


def _number(value: str | None, name: str) -> int:
    if value is None or not value.isascii() or not value.isdigit() or len(value) > 19:
        raise BadRequest(f"{name} must be a number of bytes")
    return int(value)


def _owner(principal) -> Owner:
    if principal.team_id is None:
        raise TeamRequired("images are uploaded and submitted for a team: use a "
                           "participant token")
    return Owner(token_id=principal.token_id, team_id=principal.team_id)


def _check_scope(principal, challenge: str) -> None:
    scope = tuple(getattr(principal, "challenge_ids", ()) or ())
    if scope and challenge not in scope:
        raise TeamRequired(f"this token is not for challenge {challenge[:64]!r}")
