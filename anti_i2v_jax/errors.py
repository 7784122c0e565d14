"""Errors the library raises on purpose; the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input or settings: the message names the problem and the fix."""


class ImageError(UserError):
    """An input image that cannot be read or used."""


class AttackError(RuntimeError):
    """An optimisation run that cannot go on."""


class NonFiniteError(AttackError):
    """A loss term or its gradient became NaN or infinite; the message names the step and the term."""
