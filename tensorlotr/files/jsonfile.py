"""JSON files read with errors that name the file: not UTF-8, not JSON, not an object."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def read_json(path: Path) -> Any:
    """The JSON document in ``path``.

    Raises ``ValueError`` naming ``path`` when it is a folder, not UTF-8 text (a UTF-16
    file, say; a UTF-8 byte-order mark is accepted) or not JSON. A missing or unreadable
    file raises the ``OSError`` that ``open`` raises, which names the file.
    """
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a JSON file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None


def read_json_object(path: Path) -> dict[str, Any]:
    """:func:`read_json`, which must give an object (a dict); errors name ``path``."""
    document = read_json(path)
    if not isinstance(document, dict):
        raise ValueError(f"{path} holds {_KINDS.get(type(document), 'a value')}, not a JSON object")
    return document
