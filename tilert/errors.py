"""Errors a user can cause and fix: the CLI prints their message and exits non-zero, no traceback."""


class UserError(Exception):
    """Bad input: a missing or misshaped tensor, an unknown model type, a prompt too long..."""


class ScheduleError(UserError):
    """A schedule that the validator refuses (it could race or hang)."""


class HangError(RuntimeError):
    """A schedule stopped making progress; the message names each stuck worker, task and counter."""
