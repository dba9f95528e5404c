"""Write memplan/references/error_bands.json: memplan's error range per method on the
published reference runs (what verdicts compare their margin with).

    python scripts/error_bands.py

Run it after a change to the analytical model; tests/test_validate.py fails until the file
matches what ``memplan validate`` computes.
"""

from __future__ import annotations

import json

from memplan.accuracy import BANDS_FILE
from memplan.validate import error_bands, validate


def main() -> None:
    bands = error_bands(validate().rows)
    payload = {
        "generated_by": "scripts/error_bands.py (memplan validate, SUSPECT cases left out)",
        "bands": {name: band.model_dump() for name, band in bands.items()},
    }
    BANDS_FILE.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    for name, band in bands.items():
        print(f"{name}: {band.describe(name)}")


if __name__ == "__main__":
    main()
