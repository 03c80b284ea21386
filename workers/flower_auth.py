"""Flower that never runs open: basic auth always, no cross-origin writes, hidden task args.

``tokenmill flower`` (:func:`tokenmill.workers.commands.flower_command`) uses this:

* :func:`resolve_credentials` — ``--basic-auth`` / ``TOKENMILL_FLOWER_BASIC_AUTH``,
  else Flower's own ``FLOWER_BASIC_AUTH``, else a password generated once
  (``secrets.token_urlsafe``) into ``$TOKENMILL_HOME/flower/credentials`` (mode 0600,
  one line ``admin:<password>``) and reused on later starts.
* :func:`install` — makes the Flower command build a :class:`GuardedFlower`, a
  Flower application whose router refuses, before any Flower handler runs:

  - every request without valid basic-auth credentials (401), ``/healthcheck``
    alone excepted. Flower itself leaves ``/metrics`` open and, with
    ``FLOWER_UNAUTHENTICATED_API`` set and no auth, answers its API to anyone with
    ``Access-Control-Allow-Origin: *``;
  - every cross-origin request other than GET/HEAD (403): an ``Origin`` header that
    is not this server's host, or ``Sec-Fetch-Site`` other than ``same-origin`` /
    ``none``. A browser on another site cannot run tasks or shut workers down even
    where it has the credentials cached, whatever the Flower version's own XSRF
    handling does;
  - and, unless ``show_task_args``, blanks the ``args``/``kwargs`` of task events
    and of the worker task lists Flower inspects (``active``, ``reserved``,
    ``scheduled``) before Flower stores them, so request bodies (prompts) appear in
    neither the UI, the API nor its search.
"""

from __future__ import annotations

import binascii
import hmac
import os
import secrets
import stat
from base64 import b64decode
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError

__all__ = [
    "DEFAULT_USER",
    "HIDDEN",
    "credentials_path",
    "install",
    "is_cross_origin",
    "load_or_create_credentials",
    "resolve_credentials",
    "valid_basic_auth",
]

DEFAULT_USER = "admin"
#: what Flower shows instead of a task's arguments
HIDDEN = "<hidden>"
#: the one route answered without credentials (says "OK", nothing else)
OPEN_PATHS = ("/healthcheck",)
SAFE_METHODS = frozenset({"GET", "HEAD"})


# --- credentials -------------------------------------------------------------------


def credentials_path(home: Path) -> Path:
    """Where the generated Flower credentials live under the state directory."""
    return Path(home).expanduser().absolute() / "flower" / "credentials"


def check_basic_auth_value(value: str, source: str) -> str:
    """``value`` if it is ``user:password`` (or several, comma-separated, as Flower
    takes them) with neither part empty; else :class:`ConfigError` (naming ``source``,
    never echoing the value)."""
    value = value.strip()
    pairs = value.split(",")
    for pair in pairs:
        user, sep, password = pair.partition(":")
        if not sep or not user or not password:
            raise ConfigError(
                f"{source}: expected user:password (several separated by commas, "
                "so no comma in a password)"
            )
    return value


def load_or_create_credentials(path: Path, user: str = DEFAULT_USER) -> tuple[str, bool]:
    """(``user:password``, created): the credentials in ``path``, generated first if
    the file does not exist. The file is created 0600 (its folder 0700) atomically,
    so two starts at once agree on one password; a file readable by others is
    narrowed to 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        line = f"{user}:{secrets.token_urlsafe(24)}"
        if _create_exclusive(path, line + "\n"):
            return line, True
    return _read_credentials(path), False


def _create_exclusive(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (mode 0600) unless it exists; True if written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _write_private(tmp, text, exclusive=True)
    try:
        os.link(tmp, path)  # atomic, fails if path exists: readers never see half a file
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links
        try:
            _write_private(path, text, exclusive=True)
            return True
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)


def _write_private(path: Path, text: str, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_credentials(path: Path) -> str:
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(
                f"{path}: not a regular file; remove it to generate new Flower credentials"
            )
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o600)
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the Flower credentials: {exc.strerror}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ConfigError(
            f"{path}: expected one line user:password; remove it to generate a new one"
        )
    return check_basic_auth_value(lines[0], str(path))


def resolve_credentials(
    basic_auth: str | None, home: Path, environ: dict[str, str] | None = None
) -> tuple[str, str]:
    """(credentials for ``--basic-auth``, where they came from, for humans).

    ``basic_auth`` (the option or ``TOKENMILL_FLOWER_BASIC_AUTH``) wins, then Flower's
    own ``FLOWER_BASIC_AUTH``, then the generated file under ``home``. The second item
    never contains the password.
    """
    env = os.environ if environ is None else environ
    if basic_auth:
        return check_basic_auth_value(basic_auth, "--basic-auth / TOKENMILL_FLOWER_BASIC_AUTH"), (
            "basic auth from --basic-auth / TOKENMILL_FLOWER_BASIC_AUTH"
        )
    if env.get("FLOWER_BASIC_AUTH"):
        return check_basic_auth_value(env["FLOWER_BASIC_AUTH"], "FLOWER_BASIC_AUTH"), (
            "basic auth from FLOWER_BASIC_AUTH"
        )
    path = credentials_path(home)
    creds, created = load_or_create_credentials(path)
    user = creds.split(":", 1)[0]
    verb = "generated into" if created else "read from"
    return creds, f"basic auth: user {user!r}, password {verb} {path} (mode 0600)"


# --- request checks ----------------------------------------------------------------


def valid_basic_auth(header: str | None, allowed: Iterable[str]) -> bool:
    """Whether an ``Authorization`` header carries one of ``allowed`` (``user:pw``)."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        given = b64decode(token.strip().encode(), validate=True)
    except (binascii.Error, ValueError):
        return False
    found = False
    for cred in allowed:  # compare with all of them: no timing hint of which matched
        found |= hmac.compare_digest(cred.encode(), given)
    return found


def is_cross_origin(headers: Any, host: str) -> bool:
    """Whether a request with these headers comes from a page of another origin."""
    site = headers.get("Sec-Fetch-Site")
    if site and site.lower() not in ("same-origin", "none"):
        return True
    origin = headers.get("Origin")
    if origin is None:
        return False
    if origin.strip().lower() == "null":
        return True
    return urlsplit(origin.strip()).netloc.lower() != (host or "").lower()


def refusal(method: str, path: str, headers: Any, host: str, allowed: Sequence[str],
            open_paths: Iterable[str] = OPEN_PATHS) -> tuple[int, str] | None:  # fmt: skip
    """(status, reason) to refuse a request with, or None to let Flower answer it."""
    if method.upper() not in SAFE_METHODS and is_cross_origin(headers, host):
        return 403, "Cross-origin request refused"
    if method.upper() in SAFE_METHODS and path in open_paths:
        return None
    if not valid_basic_auth(headers.get("Authorization"), allowed):
        return 401, "Authentication required"
    return None


# --- task arguments ----------------------------------------------------------------


def redact_event(event: dict[str, Any]) -> dict[str, Any]:
    """A task event without its arguments (``args``/``kwargs`` become :data:`HIDDEN`)."""
    if "args" in event or "kwargs" in event:
        event = dict(event)
        for key in ("args", "kwargs"):
            if key in event:
                event[key] = HIDDEN
    return event


def redact_inspect_reply(method: str, reply: Any) -> Any:
    """An ``inspect active/reserved/scheduled`` reply without task arguments."""
    if method not in ("active", "reserved", "scheduled") or not isinstance(reply, list):
        return reply
    out = []
    for item in reply:
        if isinstance(item, dict):
            item = redact_event(item)
            if isinstance(item.get("request"), dict):  # scheduled: {"eta", "request": info}
                item = {**item, "request": redact_event(item["request"])}
        out.append(item)
    return out


# --- the Flower application -----------------------------------------------------------


def _guarded_flower_class(show_task_args: bool) -> type:
    import tornado.web
    from flower.app import Flower

    class Refused(tornado.web.RequestHandler):
        SUPPORTED_METHODS = ("GET", "HEAD", "POST", "DELETE", "PATCH", "PUT", "OPTIONS")

        def initialize(self, status: int, reason: str) -> None:
            self._refusal = (status, reason)

        def _refuse(self, *args: Any, **kwargs: Any) -> None:
            status, reason = self._refusal
            self.set_status(status)
            self.set_header("Content-Type", "text/plain; charset=UTF-8")
            self.set_header("X-Content-Type-Options", "nosniff")
            if status == 401:
                self.set_header("WWW-Authenticate", 'Basic realm="flower"')
            self.finish(reason)

        def check_xsrf_cookie(self) -> None:  # refusing needs no token
            return None

        get = head = post = delete = patch = put = options = _refuse

    class GuardedFlower(Flower):  # type: ignore[misc]
        """Flower behind tokenmill's auth, cross-origin and task-argument guards."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            prefix = (self.options.url_prefix or "").strip("/")
            self._open_paths = tuple(f"/{prefix}{p}" if prefix else p for p in OPEN_PATHS)
            if not show_task_args:
                _hide_task_args(self)

        def find_handler(self, request: Any, **kwargs: Any) -> Any:
            allowed = [c for c in (self.options.basic_auth or []) if c]
            refused = refusal(request.method or "", request.path, request.headers,
                              request.host, allowed, self._open_paths)  # fmt: skip
            if refused is not None:
                status, reason = refused
                return self.get_handler_delegate(
                    request, Refused, {"status": status, "reason": reason}
                )
            return super().find_handler(request, **kwargs)

    return GuardedFlower


def _hide_task_args(app: Any) -> None:
    events = app.events
    on_event: Callable[[dict[str, Any]], None] = events.on_event
    events.on_event = lambda event: on_event(redact_event(event))  # read when capture starts
    inspector = app.inspector
    on_update = getattr(inspector, "_on_update", None)
    if on_update is None:  # another Flower layout: drop the task lists rather than leak them
        inspector.inspect_methods = tuple(
            m for m in inspector.inspect_methods if m not in ("active", "reserved", "scheduled")
        )
        return
    inspector._on_update = lambda worker, method, reply: on_update(
        worker, method, redact_inspect_reply(method, reply)
    )


def install(*, show_task_args: bool = False) -> type:
    """Make the ``flower`` command (in this process) build a :class:`GuardedFlower`."""
    import flower.command

    if not hasattr(flower.command, "Flower"):
        raise ConfigError("this Flower version is not supported: flower.command.Flower not found")
    guarded = _guarded_flower_class(show_task_args)
    flower.command.Flower = guarded  # type: ignore[attr-defined]
    return guarded
