"""Check (or rewrite) the parameter counts stored in the model catalog.

For every record under memplan/catalog/data (recursively) this builds the transformers model of
the record's config on the meta device and compares three numbers: the stored ``num_params``,
``sum(p.numel())`` of the built model, and memplan's ``count_params`` of the layout.

    python scripts/catalog_counts.py             # check all; exit status 1 on any mismatch
    python scripts/catalog_counts.py --write     # store the built model's count in each record
    python scripts/catalog_counts.py gpt2 t5-3b  # only these records

Needs the hf extra (torch, transformers). No weights are downloaded or allocated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from memplan.architecture import count_params
from memplan.catalog import spec_from_hf_config
from memplan.catalog.hf_model import hf_num_params

DATA_DIR = Path(__file__).resolve().parent.parent / "memplan" / "catalog" / "data"


def _record_files(names: list[str]) -> list[Path]:
    files = sorted(DATA_DIR.rglob("*.json"))
    if names:
        files = [f for f in files if f.stem in names]
        missing = sorted(set(names) - {f.stem for f in files})
        if missing:
            sys.exit(f"no catalog record named {', '.join(missing)}")
    return files


def _check(path: Path, *, write: bool) -> bool:
    record = json.loads(path.read_text())
    built = hf_num_params(record["config"])
    spec = spec_from_hf_config(record["config"], name=record["name"], source=str(path))
    laid_out = count_params(spec)
    stored = record.get("num_params")
    if write and stored != built:
        record["num_params"] = built
        path.write_text(json.dumps(record, indent=2) + "\n")
        stored = built
    ok = bool(stored == built == laid_out)
    status = "ok" if ok else "MISMATCH"
    counts = f"stored {stored!s:>16}  built {built:>16,}  memplan {laid_out:>16,}"
    print(f"{path.stem:<24} {counts}  {status}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="record names (default: all)")
    parser.add_argument("--write", action="store_true", help="store the built model's count")
    args = parser.parse_args(argv)
    results = [_check(path, write=args.write) for path in _record_files(args.names)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
