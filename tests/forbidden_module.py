"""A module outside every allowed prefix: a worker must refuse its functions without importing it.

Importing it leaves a trace (IMPORTED_FLAG in os.environ), so a test can tell
whether a refusal happened before or after the import.
"""

import os

IMPORTED_FLAG = "GUILLOTINA_AMQP_FORBIDDEN_MODULE_IMPORTED"
os.environ[IMPORTED_FLAG] = "1"


async def write_marker(path: str) -> str:
    with open(path, "a") as fh:
        fh.write("forbidden ran\n")
    return "ran"
