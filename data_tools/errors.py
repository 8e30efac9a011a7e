"""The one error type the command line turns into a one-line message and exit code 2."""

PROG = "python -m data_tools"  # every error line starts `python -m data_tools: error:`


class ToolError(Exception):
    """Bad input or a state the user must fix; printed as `python -m data_tools: error: MESSAGE`, never as a
    traceback."""
