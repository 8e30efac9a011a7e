"""The process context every worker pool of data_tools uses."""

import multiprocessing
import sys


def process_context():
    """fork on Linux (workers start at once and inherit imports); spawn elsewhere, where fork is unsafe."""
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
