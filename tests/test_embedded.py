"""The real embedded default end to end: GGUF teacher, pruned student, shipped data.

Slow (one to two minutes: dequantize the GGUF once, prune, two training steps, the offline
suite on 4 documents for student, teacher and untrained student), still part of `make test`. Uses the real neobench cache, so a later `make demo` reuses what it built.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.embedded]


def test_embedded_default_trains_neo_dora_for_two_steps(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "neobench.cli", "run", "--variant", "dora", "--max-steps", "2",
         "--batch-size", "2", "--grad-accum", "1", "--limit", "4", "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["method"], metrics["variant"], metrics["preset"]) == ("neo", "dora", "smol-cpu")
    assert metrics["budget"]["steps"] == 2
    assert metrics["data"]["report"]["used"] >= 2000
    # The student is the teacher pruned to 15 of its 30 layers, sharing its 49,152-token vocabulary.
    prune_card = json.loads(open(os.path.join(metrics["student_path"], "prune_card.json")).read())
    assert len(prune_card["kept_layers"]) == 15 and len(prune_card["block_influence"]) == 30
    assert metrics["final"]["kd"] > 0 and metrics["final"]["ce"] > 0
    (evaluation,) = (run / "evaluations").glob("*.json")
    roles = {e["role"]: e for e in json.loads(evaluation.read_text())["evaluations"]}
    assert set(roles) == {"student", "teacher", "untrained_student"}
    scores = {(r["task"], r["metric"]): r["value"] for r in roles["student"]["rows"]}
    assert len(scores) == 7 and all(r["n_docs"] == 4 for r in roles["student"]["rows"])
    assert "scores (± stderr)" in result.stderr
