"""Reading a preset's files: the Hugging Face Hub, Kaggle and local folders, with errors that say what to do.

`fetch_file` is KerasHub's `get_file` for every handle the package accepts;
`read_json_file` reads a JSON object and names the file in its errors.
"""

import json
import os

from keras_t5gemma.utils.keras_hub_compat import get_file

KAGGLE_SCHEME = "kaggle://"


# Hub endpoints that answered once in this process.
_REACHABLE_ENDPOINTS = set()


def _hub_unreachable():
    """Why the Hugging Face Hub cannot be reached, or `None` if it can (or a proxy decides).

    `huggingface_hub` retries a failed request five times over some 25
    seconds before it gives up; one connection attempt answers at once.
    """
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if constants.HF_HUB_OFFLINE or endpoint in _REACHABLE_ENDPOINTS or any(os.environ.get(p) for p in proxies):
        return None
    import socket

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as error:
        return f"{endpoint} did not answer ({error})"
    _REACHABLE_ENDPOINTS.add(endpoint)
    return None


def _cached_hub_file(preset, name):
    """The local copy of `name` of an `hf://` handle in the Hugging Face cache, or `None`."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(preset.split("://", 1)[1], name)
    return path if isinstance(path, str) else None


def fetch_file(preset, name):
    """KerasHub's `get_file`, with hub errors turned into messages that say what to do.

    Without a network an `hf://` handle is served from the Hugging Face cache,
    or refused at once with a `ConnectionError`.
    """
    if preset.startswith("hf://"):
        reason = _hub_unreachable()
        if reason is not None:
            cached = _cached_hub_file(preset, name)
            if cached is None:
                raise ConnectionError(
                    f"Cannot reach the Hugging Face Hub to download `{name}` of `{preset}`: {reason}, and "
                    "the file is not in the local cache. Check the network, or download the checkpoint "
                    "elsewhere and pass its local folder instead."
                )
            return cached
    try:
        return get_file(preset, name)
    except FileNotFoundError:
        raise
    except Exception as error:
        kind = type(error).__name__
        if preset.startswith(KAGGLE_SCHEME) and isinstance(error, (OSError, ImportError)):
            raise ConnectionError(
                f"Could not fetch `{name}` of `{preset}` through kagglehub ({kind}: {str(error)[:200]}). "
                "Kaggle is unreachable or kagglehub is missing: attach the model to a Kaggle notebook "
                "(kagglehub then finds it offline), or download the preset folder elsewhere and pass "
                "its path instead."
            ) from error
        if kind == "GatedRepoError":
            raise PermissionError(
                f"`{preset}` is gated. Accept the Gemma license on its Hugging Face page, then log "
                "in with `hf auth login` or set the `HF_TOKEN` environment variable."
            ) from error
        if kind == "RepositoryNotFoundError":
            raise FileNotFoundError(
                f"`{preset}` was not found on the Hugging Face Hub (or is private and no token is set)."
            ) from error
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            raise ConnectionError(
                f"Could not download `{name}` of `{preset}`: the hub is unreachable or offline mode is "
                "on. Download the checkpoint elsewhere and pass its local folder instead."
            ) from error
        raise


def read_json_file(path, what=None):
    """A JSON object from `path`; errors name the file (`what`, if given, in its place).

    Raises:
        ValueError: the file is not UTF-8 JSON holding an object.
    """
    what = what or f"`{path}`"
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} is not UTF-8 text ({error.reason}).") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})."
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must hold a JSON object; it holds a {type(value).__name__}.")
    return value
