"""The exceptions that the CLI prints as one line, each with its exit status.

A UserError is a problem with the user's input (bad config, bad data, bad paths): exit 2. Its
subclasses say what else went wrong without a bug in lmforge: the machine (a full or read-only disk,
exit 1) or the training itself (a loss or gradient that stopped being finite, exit 3). Anything else
is a bug in lmforge and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that says where and what was expected."""

    exit_code = 2


class EnvironmentFault(UserError):
    """The machine refused: a full disk, a read-only mount, a path that is in the way. The message names
    the path and, for a write, the free space there."""

    exit_code = 1


class Diverged(UserError):
    """Training produced a non-finite loss or gradient norm: the message names the step, the value, the
    last good checkpoint and what to change."""

    exit_code = 3


def one_line(e: BaseException, limit: int = 200) -> str:
    """A library exception's message as one line: torch's state-dict errors put the key on the line after
    their header ("Error(s) in loading state_dict for GPT:"), so the lines are joined, not cut to the first."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:limit]
