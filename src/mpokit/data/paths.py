"""Where the shared data folder is: one rule for tests, benches, training and evaluation."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir"]


def shared_data_dir() -> Path:
    """MPOKIT_DATA, else ../shared/data beside the repository root, else beside the working directory.

    The data is read in place, never copied into the repository.
    """
    if os.environ.get("MPOKIT_DATA"):
        return Path(os.environ["MPOKIT_DATA"])
    beside_repo = Path(__file__).resolve().parents[3].parent / "shared" / "data"  # src/mpokit/data -> root/..
    if beside_repo.is_dir():
        return beside_repo
    return Path.cwd().parent / "shared" / "data"  # an installed package: the checkout one is run from
