"""`make install`: put scripts/ on the virtualenv's path (a .pth file), so that the shipped
config.yaml, which names the demo application scripts/demo_app.py, works for `g amqp-tasks`,
`g amqp-worker` and `g serve` run from the project's root, without setting PYTHONPATH.

guillotina's `g` imports every application of the configuration before any command runs,
so no command of ours could add the path itself.
"""

import sysconfig
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PTH = Path(sysconfig.get_paths()["purelib"]) / "guillotina_amqp_scripts.pth"

if not PTH.exists() or PTH.read_text().strip() != str(SCRIPTS):
    PTH.write_text(f"{SCRIPTS}\n")
