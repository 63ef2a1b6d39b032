"""The one exception type users see.

Anything that is the user's fault (bad config, missing file, unreadable data, a checkpoint
from another run) is raised as :class:`LostLMError` with a message that names the problem
and the fix. The CLI prints it as a single ``error: ...`` line and exits with status 2.
"""


class LostLMError(Exception):
    """A problem with the user's input, with a one-line message that says how to fix it."""
