"""The one error type the command line turns into a one-line message and exit code 2."""


class ToolError(Exception):
    """Bad input or a state the user must fix; printed as `error: MESSAGE`, never as a traceback."""
