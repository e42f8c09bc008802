"""Shared test setup.

The SDK writes ``error.<timestamp>.log`` into the working directory unless
ADB_LOG_FILE is empty; set it before any test module imports ``aperturedb``.
"""

import os

os.environ.setdefault("ADB_LOG_FILE", "")
