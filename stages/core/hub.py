"""Loading from the Hugging Face hub without hanging when it cannot be reached.

huggingface_hub retries a failed request for half a minute or more before giving up, and the
libraries built on it (transformers, sentence-transformers, open_clip, timm) then raise a long
multi-line error. Here a model is first looked up in the local cache only; the network is
tried only if the hub answers a short probe, so an offline run fails in seconds with one line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlparse

from stages.core.errors import LangdmlError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "on", "yes", "true"}


def offline_requested() -> bool:
    """Whether the user asked for offline mode (read now, not at import, so tests can set it)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Silence library log records (open_clip logs a failed cache lookup as an ERROR) for the block."""
    before = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def cache_only() -> Iterator[None]:
    """Within the block, huggingface_hub serves files from the local cache and sends no request.

    The library reads ``HF_HUB_OFFLINE`` once at import; its module constant is what every
    request checks, so it is switched here for the block only and restored afterwards.
    """
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _connect(host: str, port: int, timeout: float) -> None:
    with socket.create_connection((host, port), timeout=timeout):
        pass


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A TCP connection to the hub within ``timeout`` seconds (DNS included, hence the thread)."""
    url = urlparse(endpoint or hub_endpoint())
    host = url.hostname
    if not host:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(_connect, host, port, timeout).result(timeout=timeout + 0.5)
    except (OSError, concurrent.futures.TimeoutError):
        return False
    finally:
        pool.shutdown(wait=False)
    return True


def load_cached_or_online(what: str, load: Callable[[], T], hint: str) -> T:
    """``load()`` from the local cache; if that fails, from the hub, but only when it is reachable.

    ``what`` names the model in the error ("text encoder hf:bert-base-uncased"); ``hint`` says
    which offline alternative works. Any failure becomes one :class:`LangdmlError` line.
    """
    try:
        with cache_only(), _quiet_logs():
            return load()
    except LangdmlError:
        raise
    except Exception as err:  # any library's "not cached" error; the online try reports real ones
        log.debug("%s: not loadable from the local cache (%s)", what, first_line(err))
    if offline_requested():
        raise LangdmlError(f"{what}: files are not in the local cache and HF_HUB_OFFLINE is set; {hint}")
    endpoint = hub_endpoint()
    if not hub_reachable(endpoint):
        raise LangdmlError(
            f"{what}: files are not in the local cache and the model hub {endpoint} is unreachable; {hint}"
        )
    log.info("%s: downloading from %s", what, endpoint)
    try:
        return load()
    except LangdmlError:
        raise
    except Exception as err:
        raise LangdmlError(f"{what}: could not load it from {endpoint}: {first_line(err)}") from err


def load_local(what: str, load: Callable[[], T]) -> T:
    """``load()`` from a local path, never touching the network; failures become one line."""
    try:
        with cache_only():
            return load()
    except LangdmlError:
        raise
    except Exception as err:
        raise LangdmlError(f"{what}: could not load it: {first_line(err)}") from err
