"""What the tests that start Flower processes share: the repository root, the environment every Flower
process of theirs gets, and a SuperLink crash (a coordinator's machine failing, for fault tests).

Imported by the test modules as `from harness import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

from brainjepa.federation.launcher import LocalFederation

REPO = Path(__file__).resolve().parents[1]

# Added to the environment of every Flower process a test starts (`LocalFederation(env_extra=...)`,
# `flower_env(home, ...)`, the CLIs): this checkout on PYTHONPATH, and one BLAS / OpenMP thread per
# process: several sites share the 2 test cores, and two threads per process spin against each other.
# (`flower_env` adds the FLWR_* settings: no runtime dependency install, no update check, no telemetry.)
FLOWER_ENV = {"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def crash_superlink(fed: LocalFederation) -> None:
    """Kill `fed`'s SuperLink and the ServerApp it runs at once, as a machine failure would."""
    assert fed.superlink is not None, "the federation has no SuperLink to crash"
    fed.superlink.kill()
