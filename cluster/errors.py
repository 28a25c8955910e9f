"""What the `herd` CLI reports as one line on stderr, and the exit status of each kind.

Raise a `CliError` (or a subclass) for an error the user can act on: `herd` prints its message as
`herd COMMAND: error: MESSAGE` without a traceback and exits with its `exit_code`. Anything else
that escapes a command is a bug: its traceback is printed (cluster/cli.py: main)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the server reported an error (its message is printed), or bad input
EXIT_USAGE = 2  # bad arguments (argparse's own exit status)
EXIT_UNREACHABLE = 3  # no herd cluster answers at the address
EXIT_BUG = 4  # an unexpected exception: a bug in herd, printed with its traceback
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)

EXIT_STATUS_HELP = f"""\
exit status:
  {EXIT_OK}    success (`herd chat` also on Ctrl-D and Ctrl-C)
  {EXIT_FAILED}    the request failed: an error reported by the server (its message is printed), or bad input
  {EXIT_USAGE}    usage error: bad or missing arguments
  {EXIT_UNREACHABLE}    no herd cluster answers at the address: start one with `herd up` (or pass --address)
  {EXIT_BUG}    internal error, a bug in herd: its traceback is printed, please report it
  {EXIT_INTERRUPTED}  interrupted by Ctrl-C
  `herd plan` exits 1 when the deployment does not fit; `herd bench` with its benchmark's status.

Errors print one line on stderr; with -v/--verbose their traceback too."""


class CliError(Exception):
    """An expected error: one line on stderr, no traceback."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    """Arguments that argparse accepts but that do not go together."""

    exit_code = EXIT_USAGE


class RequestFailed(CliError):
    """The cluster answered with an error (bad input, unknown model, overloaded, a part down...)."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code  # the gRPC status name, e.g. "NOT_FOUND"


class ClusterUnreachable(CliError):
    """Nothing (or no herd application) answers at the address."""

    exit_code = EXIT_UNREACHABLE
