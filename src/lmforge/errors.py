"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI prints a UserError as one line and exits non-zero without a traceback; anything else is a
bug in lmforge and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, with a message that says where and what was expected."""
