"""The one exception type the CLI turns into a single clear error line."""


class RaydiffError(Exception):
    """Bad input or an impossible request, stated in one line for the user.

    The message names the offending file, line, key or value. The CLI prints it as
    ``raydiff: error: <message>`` and exits with status 2; library callers can catch it.
    """
