"""The rules for every name and text a client chooses: model names, job outputs, goal titles, paths.

Pure: no I/O. Each check returns the value unchanged or raises `InvalidRequest(field, why)`, so
the transports, the manager, learning and goals refuse the same names with the same words, with
a 400 before any work starts. Names are data: they end up as SQLite keys, metric labels, URL
path segments, gossip metadata and file names, so a name must survive all of them.

- A model name (a load's `model_name`, a job's `output_name`, an id) is 1..128 bytes of UTF-8,
  every character printable and none of them whitespace, without `/` or `\\`, and not starting
  with `.`. 128 bytes: the name rides in the 512-byte gossip metadata beside the devices, and a
  job output becomes the file `<name>.gguf.partial` (and the default `<model>@<job id>`), which
  must stay under the 255-byte file-name limit of every Linux file system.
- A title (a goal's) is 1..256 printable characters; spaces allowed, other whitespace not.
- Text (prompts, stop sequences, chat messages, descriptions) may hold anything UTF-8 can
  encode: only lone surrogates (which JSON's `\\ud800` escapes can produce) are refused, since
  neither SQLite nor llama.cpp nor a UTF-8 reply can carry them.
- A path is 1..4095 bytes of UTF-8 (PATH_MAX less the NUL), each component at most 255 bytes
  (NAME_MAX), without NUL or lone surrogates: longer ones fail in the kernel (ENAMETOOLONG).
"""

from __future__ import annotations

from typing import Any

from actors.errors import InvalidRequest

MODEL_NAME_MAX_BYTES = 128
TITLE_MAX_CHARS = 256
PATH_MAX_BYTES = 4095
PATH_COMPONENT_MAX_BYTES = 255


def name_problem(value: Any) -> str | None:
    """Say why `value` is not a valid model name, or None if it is one."""
    problem = _string_problem(value)
    if problem is not None:
        return problem
    assert isinstance(value, str)
    size = len(value.encode("utf-8"))
    if size > MODEL_NAME_MAX_BYTES:
        return f"is {size} bytes in UTF-8; the limit is {MODEL_NAME_MAX_BYTES}"
    for i, ch in enumerate(value):
        if ch.isspace():
            return f"contains whitespace at character {i}"
        if not ch.isprintable():
            return f"contains a control or unprintable character at character {i}"
        if ch in "/\\":
            return f"contains a path separator {ch!r} at character {i}"
    if value.startswith("."):
        return "must not start with '.'"
    return None


def title_problem(value: Any) -> str | None:
    """Say why `value` is not a valid title, or None if it is one."""
    problem = _string_problem(value)
    if problem is not None:
        return problem
    assert isinstance(value, str)
    if not value.strip():
        return "must not be blank"
    if len(value) > TITLE_MAX_CHARS:
        return f"is {len(value)} characters; the limit is {TITLE_MAX_CHARS}"
    for i, ch in enumerate(value):
        if not ch.isprintable():  # str.isprintable allows the space and no other whitespace
            return f"contains a control or unprintable character at character {i}"
    return None


def text_problem(value: Any) -> str | None:
    """Say why `value` cannot be carried as text (not a string, or a lone surrogate), or None."""
    if not isinstance(value, str):
        return "expected a string"
    if value.isascii():  # the usual case, and a fast one: no surrogate can be in it
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"contains a lone surrogate at character {exc.start} "
            "(not encodable as UTF-8; send the character itself or a valid pair)"
        )
    return None


def path_problem(value: Any) -> str | None:
    """Say why `value` is not a usable file path, or None if it is one."""
    problem = _string_problem(value)
    if problem is not None:
        return problem
    assert isinstance(value, str)
    if "\x00" in value:
        return "contains a NUL byte"
    size = len(value.encode("utf-8"))
    if size > PATH_MAX_BYTES:
        return f"is {size} bytes in UTF-8; the limit is {PATH_MAX_BYTES}"
    for part in value.split("/"):
        if len(part.encode("utf-8")) > PATH_COMPONENT_MAX_BYTES:
            return f"has a component longer than {PATH_COMPONENT_MAX_BYTES} bytes"
    return None


def check_name(value: Any, field: str) -> str:
    """Return `value` if it is a valid model name, else raise InvalidRequest naming `field`."""
    return _checked(value, field, name_problem(value))


def check_title(value: Any, field: str) -> str:
    """Return `value` if it is a valid title, else raise InvalidRequest naming `field`."""
    return _checked(value, field, title_problem(value))


def check_text(value: Any, field: str) -> str:
    """Return `value` if it is a string UTF-8 can carry, else raise InvalidRequest naming `field`."""
    return _checked(value, field, text_problem(value))


def check_path(value: Any, field: str) -> str:
    """Return `value` if it is a usable path, else raise InvalidRequest naming `field`."""
    return _checked(value, field, path_problem(value))


def _checked(value: Any, field: str, problem: str | None) -> str:
    if problem is not None:
        raise InvalidRequest(field, problem)
    assert isinstance(value, str)
    return value


def _string_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "expected a string"
    if not value:
        return "must not be empty"
    return text_problem(value)
