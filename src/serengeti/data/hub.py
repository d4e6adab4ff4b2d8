"""Offline first: decide in about a second whether the Hugging Face hub can be reached.

Without a network, ``transformers`` and ``datasets`` retry the hub for close to a minute before
they fail with a message that names no setting (``Name or service not known``, "Couldn't reach
'wikitext' on the Hub"). The datamodules instead ask :func:`check_hub_needs` before they load
anything: it lists what would come from the hub (the text when ``dataset.path`` is null, the
tokenizer when ``dataset.tokenizer`` is a hub name), and when the hub cannot be reached and those
are not in the local Hugging Face cache, it raises one error naming the keys to set. When they
are cached, it switches the Hugging Face libraries to offline mode, so they read the cache
without retrying.

The hub counts as unreachable when ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or
``HF_DATASETS_OFFLINE`` is set, or when a TCP connection to the hub's host (``HF_ENDPOINT``,
default huggingface.co, port 443) does not open within :data:`PROBE_TIMEOUT_S` (name lookup
included). The answer is remembered for the process.
"""
from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from serengeti.errors import ConfigError

PROBE_TIMEOUT_S = 2.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUE = {"1", "ON", "YES", "TRUE"}
_reachable: bool | None = None


class HubUnreachable(ConfigError):
    """Something the config asks for would come from the Hugging Face hub, which cannot be reached."""


def offline_by_environment() -> bool:
    """Whether the user switched the Hugging Face libraries to offline mode."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in _OFFLINE_VARS)


def _probe(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout_s`` (DNS lookup included)."""
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub can be reached (see the module docstring); checked once per process."""
    global _reachable
    if _reachable is None:
        if offline_by_environment():
            _reachable = False
        else:
            endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
            _reachable = _probe(endpoint.hostname or "huggingface.co", port, timeout_s)
    return _reachable


def use_offline_mode() -> None:
    """Make ``huggingface_hub``, ``transformers`` and ``datasets`` read only their caches (no retries)."""
    for var in _OFFLINE_VARS:
        os.environ[var] = "1"
    try:  # the libraries read these module constants at call time; imported already or not
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - a dependency of transformers and datasets
        pass
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    except ImportError:  # pragma: no cover
        pass


def tokenizer_cached(name: str) -> bool:
    """Whether the local Hugging Face cache holds hub tokenizer ``name`` (``tokenizer.json`` or its config)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    for filename in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
        try:
            if isinstance(try_to_load_from_cache(name, filename), str):
                return True
        except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
            return False
    return False


def dataset_cached(hf_name: str) -> bool:
    """Whether the ``datasets`` cache has a folder for ``hf_name`` (a dataset loaded before)."""
    try:
        import datasets.config as datasets_config
    except ImportError:  # pragma: no cover
        return False
    folder = Path(datasets_config.HF_DATASETS_CACHE) / hf_name.replace("/", "___")
    return folder.is_dir() and any(folder.iterdir())


@dataclass
class HubNeed:
    """One thing a config would fetch from the hub: the key that avoids it, what to set it to, whether it is cached."""

    key: str
    local_value: str
    cached: bool


def check_hub_needs(needs: list[HubNeed]) -> None:
    """Raise :class:`HubUnreachable` naming every key to set when the hub is needed but cannot be reached.

    Nothing happens when nothing is needed or the hub answers. When everything needed is cached,
    the libraries are switched to offline mode (:func:`use_offline_mode`) and read their caches.
    """
    if not needs or hub_reachable():
        return
    missing = [n for n in needs if not n.cached]
    if not missing:
        use_offline_mode()
        return
    keys = " and ".join(n.key for n in missing)
    sets = " ".join(f"{n.key}={n.local_value}" for n in missing)
    how = "offline mode is set (HF_HUB_OFFLINE)" if offline_by_environment() else "no connection"
    raise HubUnreachable(f"{keys}: the Hugging Face hub cannot be reached ({how}), and what "
                         f"{'they name is' if len(missing) > 1 else 'it names is'} not in the local cache; "
                         f"use local files: {sets}")
