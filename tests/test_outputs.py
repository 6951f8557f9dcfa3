"""Outputs stay the same through a refactor: the session's fixed-seed search (`e2e_run`) against what the
same search wrote when this fixture was committed (`tests/fixtures/e2e_outputs.json`). What is exact on any
CPU is compared exactly: each trial's spec, status, MACs, params, peak int8 memory, int8 weights bytes,
feasibility and share of the budget (the sampler's first trials depend on its seed alone), the files the
export writes, and the keys of metrics.json and of the weights' metadata. Scores come from training, whose
last bits differ between CPUs: they are compared within 0.05. The winner is a best-scored trial.

    python -m tests.test_outputs DIR   # rewrite the fixture from a search's out-dir (after a change that
                                       # is meant to change the outputs; say so in the commit)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "e2e_outputs.json"
EXACT = ("number", "status", "spec", "macs", "params", "peak_memory_int8", "weights_int8", "feasible", "budget_use")
SCORE_TOLERANCE = 0.05


def outputs(study_dir: Path) -> dict[str, Any]:
    """What a search wrote in OUT_DIR/<study>/, reduced to what the fixture compares."""
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    winner = study_dir / "winner"
    with safe_open(str(winner / "model.safetensors"), framework="pt") as f:
        meta = sorted((f.metadata() or {}).keys())
    metrics = json.loads((winner / "metrics.json").read_text())
    return {"trials": [{k: row[k] for k in EXACT} for row in rows],
            "scores": {row["number"]: row["score"] for row in rows if row["score"]},
            "winner_files": sorted(p.name for p in winner.iterdir()),
            "metrics_keys": sorted(metrics), "weights_metadata_keys": meta,
            "winner": {"trial": metrics["trial"], "spec": metrics["spec"]},
            "report_bytes": (study_dir / "report.html").stat().st_size}


def test_the_search_writes_what_it_wrote_when_the_fixture_was_made(e2e_run: dict) -> None:
    ours, fixed = outputs(e2e_run["study_dir"]), json.loads(FIXTURE.read_text())
    assert ours["trials"] == fixed["trials"]
    assert ours["scores"].keys() == fixed["scores"].keys()
    for number, score in fixed["scores"].items():
        assert abs(float(ours["scores"][number]) - float(score)) <= SCORE_TOLERANCE, number
    # the winner is a best-scored trial (two trials of a fixture this small can tie)
    best = max(float(score) for score in ours["scores"].values())
    assert float(ours["scores"][str(ours["winner"]["trial"])]) == best
    for key in ("winner_files", "metrics_keys", "weights_metadata_keys"):
        assert ours[key] == fixed[key], key
    # the report embeds plotly.js and the figures: within 1% of its size then
    assert abs(ours["report_bytes"] - fixed["report_bytes"]) <= 0.01 * fixed["report_bytes"]


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(outputs(Path(sys.argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
