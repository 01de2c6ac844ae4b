"""The operator page (``GET /``) and its JSON API under ``/api/v1/``, served by the upload server.

The page is a static HTML shell with one script and one style sheet (``page_assets/`` beside this
file, read once at start-up); it holds no secret and no data. After sign-in the script keeps the
secret in ``sessionStorage`` and sends it on every API call in the same header ``POST /upload``
takes: ``x-smt-upload-token`` (the upload token) or ``x-smt-upload-ticket`` (a ticket with role
``admin``). The API:

==========================================  ====================================================
``GET  /api/v1/session``                    who the secret is (role, kind), the size cap
``GET  /api/v1/overview``                   last pass, last success, next timer run, queue, disk
``GET  /api/v1/files?outcome=&esiid=``      the per-file rows ``smt-droplet status --json``
                                            prints, newest first (``limit``, default 200;
                                            ``landing=short,none``: by landing verdict)
``GET  /api/v1/files/{sha256}?path=``       one row (``path``: where an upload was stored)
``POST /api/v1/files/{sha256}/forget``      queue a decision for the next pass (202);
``POST /api/v1/files/{sha256}/ignore``      ``{"reason": ...}``
``POST /api/v1/files/{sha256}/post``        ``{"esiid": ..., "meter": ...}``
``POST /api/v1/files/{sha256}/resend``      send a posted file again (its landing was short)
``GET  /api/v1/requests/{id}``             whether a pass has served that queued request
``GET  /api/v1/coverage``                   per ESIID: complete / gaps / missing days of 90
``GET  /api/v1/coverage/{esiid}.svg``       that ESIID's chart
==========================================  ====================================================

The server's user cannot write the ledger: a decision becomes a spool request (``kind="page"``)
that the ingest pass applies (:mod:`smt_droplet.actions`); the ``.path`` unit starts that pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any

from aiohttp import web

from . import coverage_chart, spool
from .config import InboxSettings, UploadSettings
from .esiid import FieldError, parse_esiid, parse_meter
from .httpserver import json_error, secrets_equal, set_outcome
from .landing import NOT_LANDED
from .ledger import Ledger, is_digest
from .outcomes import iso_utc
from .passrecord import verdict
from .status import file_status, inbox_status, next_timer_run
from .tickets import TicketError, verify
from .upload_limits import TICKET_HEADER, TOKEN_HEADER

PREFIX = "/api/v1"
ASSET_NAMES = ("index.html", "page.js", "page.css", "icon.svg")
ASSETS = Path(__file__).with_name("page_assets")
MAX_ROWS = 1000
MAX_ACTION_BODY = 4096

# The page loads only its own script and style sheet; charts are blob: URLs made by the script
# from the SVG the API returns; nothing may frame it, nothing is fetched from elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Asset:
    """One file of the page, in memory, with a strong ETag."""

    def __init__(self, path: Path) -> None:
        self.body = path.read_bytes()
        self.content_type = CONTENT_TYPES[path.suffix]
        self.etag = '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'

    def response(self, request: web.Request) -> web.Response:
        headers = {**PAGE_HEADERS, "ETag": self.etag}
        if request.headers.get("If-None-Match") == self.etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=self.body, headers={**headers, "Content-Type": self.content_type})


def page_weight() -> int:
    """Bytes of HTML + JS + CSS the page loads (for the README and the closing note)."""
    return sum(p.stat().st_size for p in ASSETS.iterdir() if p.suffix in (".html", ".js", ".css"))


class OperatorPage:
    def __init__(self, settings: UploadSettings) -> None:
        self.settings = settings
        self.inbox = InboxSettings(
            local_dir=settings.inbox, state_file=settings.state_file, spool_dir=settings.spool_dir
        )
        self.assets = {name: Asset(ASSETS / name) for name in ASSET_NAMES}

    # -- who is asking ---------------------------------------------------------------------

    def _who(self, request: web.Request) -> str | None:
        """``token`` or ``ticket`` when the request carries an admin's secret, else None."""
        token = self.settings.token
        if token is not None and secrets_equal(request.headers.get(TOKEN_HEADER), token):
            return "token"
        raw = request.headers.get(TICKET_HEADER)
        if raw is not None:
            try:
                ticket = verify(raw.strip(), self.settings.ticket_secrets)
            except TicketError:
                return None
            if ticket.role == "admin":
                return "ticket"
        return None

    def _signed_in_as(self, request: web.Request) -> str:
        """Who made a page decision: an admin ticket's account, else the upload token."""
        raw = request.headers.get(TICKET_HEADER)
        if raw is not None:
            try:
                return verify(raw.strip(), self.settings.ticket_secrets).account
            except TicketError:
                pass
        return "upload token"

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every ``/api/v1`` call needs an admin's secret; answers are never cached."""
        if not request.path.startswith(PREFIX + "/"):
            return await handler(request)
        if self._who(request) is None:
            response: web.StreamResponse = json_error(
                request,
                401,
                "unauthorized",
                "this page needs the upload token or an admin ticket",
            )
        else:
            response = await handler(request)
        response.headers.update(API_HEADERS)
        return response

    # -- the page ----------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        set_outcome(request, "page")
        return self.assets["index.html"].response(request)

    async def asset(self, request: web.Request) -> web.StreamResponse:
        found = self.assets.get(request.match_info["name"])
        if found is None or found.content_type.startswith("text/html"):
            return json_error(request, 404, "not_found", "no such asset")
        return found.response(request)

    # -- the API -----------------------------------------------------------------------------

    async def session(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, "role": "admin", "kind": self._who(request), **self._limits()}
        )

    def _limits(self) -> dict[str, Any]:
        return {"maxBytes": self.settings.max_bytes, "csvPattern": r"\.csv(\.\d+)?$"}

    async def overview(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        return web.json_response(await loop.run_in_executor(None, self._overview))

    def _overview(self) -> dict[str, Any]:
        record = spool.read_last_result(self.settings.spool_dir) or {}
        last_success = record.get("last_success_ts")
        try:
            free: int | None = shutil.disk_usage(self.settings.inbox).free
        except OSError:
            free = None
        problem = verdict(record or None, self.settings.stale_after)
        return {
            "healthy": not problem,
            "reason": problem or None,
            "lastPass": _last_pass(record) if record else None,
            "lastSuccess": _iso(last_success),
            "nextTimerRun": next_timer_run(),
            "queueDepth": spool.depth(self.settings.spool_dir),
            "freeBytes": free,
            **self._limits(),
        }

    async def files(self, request: web.Request) -> web.Response:
        outcome = request.query.get("outcome", "").strip()
        esiid = request.query.get("esiid", "").strip()
        landed = {v for v in request.query.get("landing", "").split(",") if v.strip()}
        try:
            limit = min(MAX_ROWS, max(1, int(request.query.get("limit", "200"))))
        except ValueError:
            return json_error(request, 400, "bad_limit", "limit must be a number")
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(
            None, lambda: inbox_status(self.inbox, save_cache=False, next_pass=next_timer_run())
        )
        rows = report["files"]
        if outcome:
            rows = [r for r in rows if r["state"] == outcome]
        if esiid:
            rows = [r for r in rows if (r["esiid"] or "").startswith(esiid)]
        if landed:
            rows = [r for r in rows if (r.get("landing") or {}).get("verdict") in landed]
        rows.sort(key=lambda r: r["arrived"] or "", reverse=True)
        return web.json_response(
            {
                "files": rows[:limit],
                "matching": len(rows),
                "counts": report["counts"],
                "needs_operator": report["needs_operator"],
            }
        )

    async def file(self, request: web.Request) -> web.Response:
        digest = request.match_info["sha256"].lower()
        if not is_digest(digest):
            return json_error(request, 400, "bad_sha256", "not a sha256")
        hint = request.query.get("path") or None
        if hint is not None and (hint.startswith("/") or ".." in hint.split("/")):
            return json_error(request, 400, "bad_path", "path must be inbox-relative")
        loop = asyncio.get_running_loop()
        try:
            row = await loop.run_in_executor(
                None, file_status, self.inbox, digest, hint, next_timer_run()
            )
        except KeyError:
            return json_error(
                request, 404, "unknown_file", "neither the inbox nor the ledger know it"
            )
        return web.json_response(row)

    async def action(self, request: web.Request) -> web.Response:
        digest, action = request.match_info["sha256"].lower(), request.match_info["action"]
        if not is_digest(digest):
            return json_error(request, 400, "bad_sha256", "not a sha256")
        if request.content_length is not None and request.content_length > MAX_ACTION_BODY:
            return json_error(request, 413, "body_too_large", "the request body is too large")
        try:
            raw = await request.content.read(MAX_ACTION_BODY + 1)
            body = json.loads(raw or b"{}")
        except ValueError:
            return json_error(request, 400, "bad_json", "send a JSON object")
        if len(raw) > MAX_ACTION_BODY or not isinstance(body, dict):
            return json_error(request, 400, "bad_json", "send a JSON object")
        ledger = Ledger.load(self.settings.state_file)
        rel = ledger.path_of(digest)
        by = f"page ({self._signed_in_as(request)})"
        fields: dict[str, Any] = {"extra": {"action": action, "sha256": digest, "by": by}}
        known = rel is not None or ledger.is_posted(digest) or ledger.outcome(digest) is not None
        if action != "post" and not known:  # a decision only for a file the droplet holds
            return json_error(request, 404, "unknown_file", "the ledger does not know this file")
        if action == "ignore":
            reason = " ".join(str(body.get("reason") or "").split())[:500]
            if not reason:
                return json_error(request, 400, "reason_required", "say why the file is ignored")
            fields["reason"] = reason
        elif action == "post":
            if rel is None:
                return json_error(request, 404, "unknown_file", "no such file in the inbox")
            try:
                fields["esiid"] = parse_esiid(str(body.get("esiid") or "") or None)
                fields["meter"] = parse_meter(str(body.get("meter") or "") or None)
            except FieldError as exc:
                return json_error(request, 400, exc.code, exc.message)
            if fields["esiid"] is None:
                return json_error(request, 400, "esiid_required", "post needs a 17-digit ESIID")
            fields.update(filename=rel, reason="page: post with ESIID")
        elif action == "resend":
            record = ledger.apps.get(digest) if ledger.is_posted(digest) else None
            if rel is None or record is None:
                return json_error(request, 404, "unknown_file", "no posted file in the inbox")
            fields.update(
                filename=rel,
                force_repost=True,
                esiid=record.get("esiid"),
                meter=record.get("meter"),
                reason="page: send again",
            )
        try:
            queued = spool.enqueue(self.settings.spool_dir, "page", **fields)
        except spool.SpoolError:
            return json_error(request, 503, "spool_unavailable", "cannot queue the request")
        set_outcome(request, f"page_{action}:{digest[:12]}")
        return web.json_response({"ok": True, "queued": True, "id": queued.id}, status=202)

    async def served(self, request: web.Request) -> web.Response:
        """``{"served": true}`` once no pass has the request waiting or in hand."""
        name = request.match_info["id"]
        waiting = spool.is_waiting(self.settings.spool_dir, name)
        return web.json_response({"id": name, "served": not waiting})

    async def coverage(self, request: web.Request) -> web.Response:
        charts = await self._coverage()
        return web.json_response(
            {"days": coverage_chart.DAYS, "esiids": [c.to_dict() for c in charts.values()]}
        )

    async def coverage_svg(self, request: web.Request) -> web.Response:
        charts = await self._coverage()
        found = charts.get(request.match_info["esiid"])
        if found is None:
            return json_error(request, 404, "unknown_esiid", "no posted data for this ESIID")
        return web.Response(text=coverage_chart.svg(found), content_type="image/svg+xml")

    async def _coverage(self) -> dict[str, coverage_chart.Coverage]:
        def build() -> dict[str, coverage_chart.Coverage]:
            ledger = Ledger.load(self.settings.state_file)
            return coverage_chart.coverage(ledger.apps.values(), date.today())

        return await asyncio.get_running_loop().run_in_executor(None, build)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self.index)
        app.router.add_get("/assets/{name}", self.asset)
        app.router.add_get(f"{PREFIX}/session", self.session)
        app.router.add_get(f"{PREFIX}/overview", self.overview)
        app.router.add_get(f"{PREFIX}/files", self.files)
        app.router.add_get(f"{PREFIX}/files/{{sha256}}", self.file)
        actions = "forget|ignore|post|resend"
        app.router.add_post(f"{PREFIX}/files/{{sha256}}/{{action:{actions}}}", self.action)
        app.router.add_get(f"{PREFIX}/requests/{{id:[0-9A-Za-z-]{{1,64}}}}", self.served)
        app.router.add_get(f"{PREFIX}/coverage", self.coverage)
        app.router.add_get(f"{PREFIX}/coverage/{{esiid:[0-9]{{17}}}}.svg", self.coverage_svg)


def _last_pass(record: dict[str, Any]) -> dict[str, Any]:
    """The overview's summary of the last pass's record (counts by what they mean)."""
    counts = record.get("counts") or {}
    landing = record.get("landing") or {}
    out = {
        key: record.get(key)
        for key in ("trigger", "exit_code", "duration_seconds", "needs_operator", "inbox_files")
    }
    out.update(
        posted=int(counts.get("posted", 0)) + int(counts.get("duplicate", 0)),
        failed=int(counts.get("failed-will-retry", 0)),
        waitingForApp=record.get("waiting_for_app", 0),
        notLanded=sum(int(landing.get(v, 0)) for v in NOT_LANDED),
        fatal=record.get("fatal"),
        finished=_iso(record.get("finished_ts")),
    )
    return out


def _iso(ts: Any) -> str | None:
    return iso_utc(ts) if isinstance(ts, int | float) else None
