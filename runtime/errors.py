"""The one error class a user can cause. It lives in the runtime, the bottom layer, so that every
other part of mllmc (compiler, passes, CLI) can raise it; the CLI prints it as one line, exit 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix: bad path, unsupported model, unknown pass, bad option, ...

    The message is one line and says what to do next.
    """
