"""The model-family tests again, in a pinned older transformers 5 (``make install`` builds ``.venv-tf5pin``),
driven here in a subprocess. The main environment floats to the newest release (pyproject: ``transformers>=4.45``),
so a release that changes how checkpoints load fails ``make test`` the day it ships; this run keeps the older
releases people still have working too. A failure names each failing test, and with it the family."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PINNED = REPO / ".venv-tf5pin" / "bin" / "python"
FAMILY_TESTS = ["tests/apt/models/test_families.py", "tests/apt/models/test_vision_language.py"]


def test_every_family_also_prunes_in_the_pinned_older_transformers():
    assert PINNED.is_file(), "make install builds .venv-tf5pin (an older transformers 5) for this test"
    version = subprocess.run(
        [str(PINNED), "-c", "import transformers; print(transformers.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    run = subprocess.run(
        [str(PINNED), "-m", "pytest", *FAMILY_TESTS, "-q", "-rfs", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    failed = re.findall(r"^FAILED (\S+)", run.stdout, flags=re.MULTILINE)
    assert run.returncode == 0, f"in transformers {version}: {failed or run.stdout[-3000:] + run.stderr[-3000:]}"
