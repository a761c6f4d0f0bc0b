"""The kinds of failure a user can fix, told apart by type (never by the text of a library's message).

Every command line catches :class:`UserError`, prints its one line and exits 2: the message names the
input (a key, a file, a port) and what to do. Failures of the run itself (a dead peer, a preemption,
broken data past the allowed fraction) have their own types where they are raised.
"""
from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message names it and says what to do (exit 2)."""

    label = "error"


class OptionError(UserError):
    """A library option out of range, said in the library's terms: ``template`` names the options as {0}, {1}...
    (their field names by default); a command renders it with its own spelling of them (its flags)."""

    def __init__(self, options: str | tuple[str, ...], template: str):
        self.options = (options,) if isinstance(options, str) else tuple(options)
        self.template = template
        super().__init__(self.render())

    def render(self, spell=lambda name: name) -> str:
        return self.template.format(*(spell(o) for o in self.options))


class ConfigError(UserError):
    """A config problem the user can fix: the message names the key and what is allowed."""

    label = "config error"


class DamagedFile(UserError):
    """A file we read (an index.json, a build record, a model.json) is not what was written: truncated,
    cut by a kill or copied in part."""

    label = "damaged file"


class MissingShardSet(UserError, FileNotFoundError):
    """A data key names no shard set (no index.json there); still a FileNotFoundError for callers that
    treat a missing set as "not built yet"."""

    label = "data error"


class PortInUse(UserError):
    """The rendezvous port is held by another process: rerunning the same command fails the same way."""

    label = "port in use"


class MissingExtra(UserError):
    """An optional part of the install the input needs (a cloud store's filesystem, the device decoder):
    the message names the input and the ``pip install "distssl[...]"`` that brings it."""

    label = "missing package"


class MissingCredentials(UserError):
    """An object store that answered "no credentials": final at once (not an outage to retry); the message names
    the input and the credential chain of its store."""

    label = "no credentials"


def require(module: str, extra: str, needed_by: str):
    """``module`` imported, or MissingExtra naming ``needed_by`` (a key and its value, a URL) and the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{needed_by} needs {module.split('.')[0]}, which is not installed: "
                           f'pip install "distssl[{extra}]"') from None
