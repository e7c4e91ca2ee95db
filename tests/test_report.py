"""Tidy results and leaderboards: intervals, fair comparisons, every output format, byte-for-byte regeneration."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from neobench.reporting.formats import FORMATS
from neobench.reporting.leaderboard import render
from neobench.reporting.selection import interval, select_comparable
from neobench.runs.results import COLUMNS, load_curves, load_results, read_curves, read_per_doc, read_rows, write_rows

REPO = Path(__file__).resolve().parent.parent
SCORES = {  # (task, metric): (untrained, teacher, higher_is_better)
    ("neo_heldout_nll", "nll"): (6.0, 1.4, False),
    ("neo_heldout_match", "acc"): (0.35, 0.9, True),
    ("neo_fidelity", "kl"): (4.0, None, False),
}


def eval_rows(values: dict, with_fidelity: bool = True) -> list[dict]:
    return [
        {"task": t, "metric": m, "value": v, "stderr": 0.01, "higher_is_better": SCORES[(t, m)][2], "n_docs": 50,
         "limit": 50, "num_fewshot": 0, "task_hash": f"hash-{t}", "evaluator": "test"}
        for (t, m), v in values.items() if with_fidelity or t != "neo_fidelity"
    ]


def make_run(root: Path, method: str, variant, seed: int, shift: float, steps: int = 12, data_hash: str = "d1",
             rank: int = 32, stamp: str = "0", tokens: int = 0, dtype: str = "float32", per_doc: list | None = None,
             lr_scale: float = 1.0, study: str | None = None, trial: int | None = None, epoch: bool = False) -> str:
    """A finished run directory; ``per_doc``: its student's NLL per document (doc0, doc1, ...)."""
    run_id = f"p-{method}-{variant or 'full'}-s{seed}-r{rank}-{steps}-{data_hash}-{stamp}"
    run = root / run_id
    (run / "evaluations").mkdir(parents=True)
    config = {"preset": "p", "method": method, "variant": variant, "loss": "forward_kl", "rank": rank, "seed": seed,
              "kd_ratio": 0.5, "temperature": 1.0, "lr_scale": lr_scale, "study": study, "trial": trial}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    uses_teacher = method in ("kd", "neo")
    metrics = {
        "run_id": run_id, "preset": "p", "method": method, "variant": variant, "seed": seed,
        "loss": "forward_kl" if uses_teacher else None, "lr": 1e-4, "wall_seconds": 100.0 + seed,
        "budget": {"steps": steps, "tokens": tokens or 1000 * steps + (seed if seed < 3 else 0), "data_hash": data_hash, "seq_len": 256, "batch_size": 4,
                   "grad_accum": 2, "stopped_by": "epoch" if epoch else "max_steps"},
        "cost": {"trainable_params": 5e6 if variant else 8e7, "peak_memory_bytes": (3 if variant else 4) * 2**30,
                 "memory_kind": "rss", "train_seconds": (60.0 if variant else 80.0) + seed, "tokens_per_second": 200.0,
                 "device": "cpu", "dtype": dtype},
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    student = {k: (u + (t if t is not None else 0.0)) / 2 + shift for k, (u, t, _) in SCORES.items()}
    if per_doc is not None:
        student[("neo_heldout_nll", "nll")] = sum(per_doc) / len(per_doc)
    evaluations = [
        {"role": "student", "rows": eval_rows(student), "per_doc": {} if per_doc is None else {
            "neo_heldout_nll": {"docs": [f"doc{i}" for i in range(len(per_doc))], "metrics": {"nll": per_doc}}}},
        {"role": "teacher", "rows": eval_rows({k: t for k, (u, t, _) in SCORES.items() if t is not None}, with_fidelity=False),
         "model_fingerprint": "teacherfp"},
        {"role": "untrained_student", "rows": eval_rows({k: u for k, (u, t, _) in SCORES.items()}), "model_fingerprint": "studentfp"},
    ]
    (run / "evaluations" / "abc.json").write_text(json.dumps({"evaluations": evaluations}))
    return run_id


@pytest.fixture
def matrix(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        for i, (method, variant) in enumerate([("sft", None), ("lora", "lora"), ("kd", None), ("neo", "lora"), ("neo", "dora")]):
            make_run(root, method, variant, seed, shift=0.01 * i + 0.002 * seed)
    return root


def test_interval_is_student_t_over_seeds_by_hand():
    mean, half, kind = interval([1.0, 2.0, 4.0], stderr=None)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == pytest.approx(7 / 3) and kind == "ci95"
    assert half == pytest.approx(4.302652729911275 * sd / math.sqrt(3), rel=1e-9)  # t(0.975, df=2)
    assert interval([0.5], stderr=0.03) == (0.5, 0.03, "stderr")


def test_tidy_rows_have_every_column_and_references_once(matrix, tmp_path):
    rows = load_results(matrix)
    assert list(rows.columns) == COLUMNS
    assert len(rows[rows["model"] == "student"]) == 15 * 3
    assert len(rows[rows["model"] == "teacher"]) == 2 and len(rows[rows["model"] == "untrained_student"]) == 3
    path = tmp_path / "rows.jsonl"
    write_rows(rows, path)
    again = read_rows(path)
    pd.testing.assert_frame_equal(rows, again)
    assert json.loads(path.read_text().splitlines()[0])["seed"] in (None, 0)  # integers stay integers


def test_budget_and_data_hash_mismatches_are_left_out_with_reasons(matrix):
    make_run(matrix, "kd", None, 7, 0.0, steps=24)
    make_run(matrix, "lora", "lora", 8, 0.0, data_hash="d2")
    make_run(matrix, "neo", "lora", 0, 0.0, rank=8)
    make_run(matrix, "sft", None, 0, 0.0, stamp="9")  # a newer sft seed 0
    make_run(matrix, "kd", None, 1, 0.0, stamp="t", tokens=999)  # saw other examples than its seed's runs
    sel = select_comparable(load_results(matrix))
    reasons = dict(sel.left_out)
    assert "steps 24 vs 12" in reasons["p-kd-full-s7-r32-24-d1-0"]
    assert "tokens differ from the other seed-1 runs: 999 vs 12001" in reasons["p-kd-full-s1-r32-12-d1-t"]
    assert "data_hash d2 vs d1" in reasons["p-lora-lora-s8-r32-12-d2-0"]
    assert "other hyperparameters" in reasons["p-neo-lora-s0-r8-12-d1-0"]
    assert "superseded" in reasons["p-sft-full-s0-r32-12-d1-0"]
    assert len(reasons) == 5
    assert set(sel.students["run_id"]) >= {"p-sft-full-s0-r32-12-d1-9"}


def test_runs_of_another_dtype_never_share_a_table(matrix):
    make_run(matrix, "neo", "lora", 5, 0.3, dtype="bfloat16", stamp="b")
    rows = load_results(matrix)
    assert set(rows.loc[rows["model"] != "student", "dtype"]) == {"float32", "bfloat16"}  # references per dtype
    sel = select_comparable(rows)
    assert "dtype bfloat16 vs float32" in dict(sel.left_out)["p-neo-lora-s5-r32-12-d1-b"]
    assert set(sel.students["dtype"]) == {"float32"} and set(sel.references["dtype"]) == {"float32"}


def test_every_format_is_written_and_parses_back(matrix, tmp_path):
    out = tmp_path / "board"
    report = render(load_results(matrix), "p", out)
    main = report.table("main")
    labels = ["teacher", "untrained", "sft", "lora", "kd", "neo"]
    assert list(main.display["model"]) == labels
    assert list(report.table("variants").display["model"]) == ["lora", "neo", "neo+dora"]
    for name in ("main", "variants", "efficiency"):
        n = len(report.table(name).display)
        md = (out / f"{name}.md").read_text().strip().splitlines()
        assert len(md) == n + 2 and md[0].startswith("| model")
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
        assert len(pd.read_html(out / f"{name}.html")[0]) == n
        tex = (out / f"{name}.tex").read_text()
        assert "\\begin{tabular}" in tex and tex.count("\\\\") == n + 1
    for png in ("scores.png", "score_vs_memory.png", "score_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Main table" in (out / "README.md").read_text()
    # 3 seeds -> a Student-t interval; the best student column entry is bold.
    assert " ± " in main.display.iloc[2, 2] and main.display["seeds"].tolist()[2:] == ["3"] * 4
    assert any(str(v).startswith("**") for v in main.display.iloc[:, 2])


def test_efficiency_is_relative_to_kd(matrix, tmp_path):
    report = render(load_results(matrix), "p", tmp_path / "board")
    eff = report.table("efficiency").display.set_index("model")
    assert eff.loc["neo", "vs KD (mem)"] == "-25%" and eff.loc["kd", "vs KD (mem)"] == "—"


def test_same_rows_give_the_same_bytes(matrix, tmp_path):
    rows = load_results(matrix)
    render(rows, "p", tmp_path / "a")
    render(rows, "p", tmp_path / "b")
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name


def test_committed_leaderboards_regenerate_byte_for_byte(tmp_path):
    boards = sorted((REPO / "leaderboards").glob("*/results.jsonl"))
    if not boards:
        pytest.skip("no committed leaderboard yet")
    for rows_file in boards:
        committed = rows_file.parent
        out = tmp_path / committed.name
        render(read_rows(rows_file), committed.name, out, curves=read_curves(committed / "curves.jsonl"),
               per_doc=read_per_doc(committed / "per_doc.csv"))
        for path in sorted(out.iterdir()):
            assert path.read_bytes() == (committed / path.name).read_bytes(), f"{committed.name}/{path.name} differs"


def test_report_command_and_its_errors(matrix, tmp_path, cli):
    code, stderr = cli("report", "--runs", str(matrix), "--out", str(tmp_path / "lb"), "--format", "md,csv")
    assert code == 0, stderr
    assert (tmp_path / "lb" / "p" / "main.md").is_file() and not (tmp_path / "lb" / "p" / "main.tex").exists()
    assert (tmp_path / "lb" / "p" / "results.jsonl").is_file()
    code, stderr = cli("report", "--runs", str(matrix), "--out", str(tmp_path / "lb"), "--format", "md,pdf")
    assert code == 2 and stderr.strip() == "error: unknown format 'pdf'; valid: md, csv, html, tex"
    code, stderr = cli("report", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "nothing"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1


def label_boxes(labels):
    from matplotlib.text import Text

    renderer = labels[0].figure.canvas.get_renderer()
    boxes = []
    for note in labels:
        note.update_positions(renderer)
        boxes.append(Text.get_window_extent(note, renderer))
    return boxes


def assert_identifiable(labels, points_px, frame):
    boxes = label_boxes(labels)
    for i, a in enumerate(boxes):
        assert frame.contains(a.x0, a.y0) and frame.contains(a.x1, a.y1), f"label {labels[i].get_text()!r} leaves the axes"
        for j, b in enumerate(boxes[:i]):
            assert not a.overlaps(b), f"labels {labels[i].get_text()!r} and {labels[j].get_text()!r} overlap"
        for (px, py), note in zip(points_px, labels):
            assert not a.contains(px, py), f"label {labels[i].get_text()!r} covers the point of {note.get_text()!r}"


def test_crowded_points_get_labels_that_overlap_nothing():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neobench.reporting.plots import label_points

    # The collisions of the old plots: near-equal points with long labels.
    points = [(2.93, 23.4, "lora+dora"), (2.95, 23.0, "neo (jsd)"), (2.96, 23.3, "neo"), (2.98, 23.3, "neo+moslora"),
              (3.0, 23.2, "neo+dora"), (2.35, 22.5, "lora"), (2.37, 22.8, "lora+moslora"), (2.9, 39.8, "neo+rslora"),
              (2.92, 40.0, "neo+pissa"), (2.36, 39.0, "lora+rslora")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for x, y, _ in points:
        ax.plot([x], [y], "o")
    ax.margins(x=0.2, y=0.15)
    fig.tight_layout()
    labels = label_points(ax, points)
    assert [n.get_text() for n in labels] == [p[2] for p in points]
    renderer = fig.canvas.get_renderer()
    assert_identifiable(labels, [ax.transData.transform((x, y)) for x, y, _ in points], ax.get_window_extent(renderer))
    plt.close(fig)


def test_committed_plots_label_every_point_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neobench.reporting.plots import SCATTERS, scatter
    from neobench.reporting.selection import headline_metrics, row_labels

    rows_file = REPO / "leaderboards" / "smol-cpu" / "results.jsonl"
    sel = select_comparable(read_rows(rows_file))
    _, _, everyone = row_labels(sel)
    columns = headline_metrics(pd.concat([sel.students, sel.references]))
    for key, xlabel, scale, _ in SCATTERS:
        fig, labels = scatter(sel, everyone, columns, key, xlabel, scale)
        ax = fig.axes[0]
        points = [ax.transData.transform(n.xy) for n in labels]
        assert len(labels) == len(everyone)
        assert_identifiable(labels, points, ax.get_window_extent(fig.canvas.get_renderer()))
        plt.close(fig)



def test_training_curves_come_from_the_train_logs_mean_over_seeds(matrix, tmp_path):
    for run in matrix.iterdir():  # three steps per run; the loss falls with the step, seeds shift it
        seed = yaml.safe_load((run / "config.yaml").read_text())["seed"]
        (run / "train_log.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 5.0 - s + seed, "ce": 6.0 - s, "kd": 0.0}) + "\n" for s in (1, 2, 3)
        ))
    curves = load_curves(matrix)
    assert len(curves) == 15 * 3
    lora = curves[curves["run_id"].str.contains("-lora-lora-")]
    assert lora["kd"].isna().all(), "a method without a KD term has no KD curve (its log says 0)"
    report = render(load_results(matrix), "p", tmp_path / "board", curves=curves)
    assert tmp_path / "board" / "training_curves.png" in report.files
    assert "![training curves](training_curves.png)" in (tmp_path / "board" / "README.md").read_text()
    without = render(load_results(matrix), "p", tmp_path / "bare")
    assert not (tmp_path / "bare" / "training_curves.png").exists() and without.files


# --- paired comparisons and the tuned protocol ----------------------------------------------------

DOC_DIFFICULTY = [4.0, 4.6, 3.8, 5.1, 4.4, 4.9, 4.2, 3.9, 4.7, 5.3]
SHIFTS = {"sft": 0.30, "lora": 0.10, "kd": 0.25, "neo": 0.0}  # neo: 0.10 below LoRA on every document


def noisy(method: str, seed: int, extra: float = 0.0) -> list[float]:
    return [d + SHIFTS[method] + extra + 0.01 * ((i * 7 + seed * 3) % 5 - 2) for i, d in enumerate(DOC_DIFFICULTY)]


@pytest.fixture
def paired_matrix(tmp_path):
    root = tmp_path / "runs"
    for seed in range(3):
        for method, variant in [("sft", None), ("lora", "lora"), ("kd", None), ("neo", "lora")]:
            make_run(root, method, variant, seed, 0.0, per_doc=noisy(method, seed))
    return root


def test_every_student_is_compared_with_lora_and_kd_on_the_same_documents(paired_matrix, tmp_path):
    from neobench.reporting.paired import compare, holm
    from neobench.runs.results import load_per_doc

    per_doc = load_per_doc(paired_matrix)
    assert len(per_doc) == 12 * len(DOC_DIFFICULTY)
    report = render(load_results(paired_matrix), "p", tmp_path / "board", per_doc=per_doc)
    paired = report.table("paired").numeric.set_index(["model", "baseline", "metric"])
    # Each pair once: kd vs LoRA is lora vs KD turned round (the main table shows it both ways).
    pairs = {("sft", "lora"), ("sft", "kd"), ("lora", "kd"), ("neo", "lora"), ("neo", "kd"), ("neo", "sft")}
    assert set(paired.index) == {(m, b, "nll") for m, b in pairs}
    neo = paired.loc[("neo", "lora", "nll")]
    by_hand = sum(sum(noisy("neo", s)) - sum(noisy("lora", s)) for s in range(3)) / (3 * len(DOC_DIFFICULTY))
    assert neo["delta"] == pytest.approx(by_hand) and neo["high"] < 0 and neo["significant"]
    # The same comparison computed directly, then Holm over the table's 6 comparisons.
    a = [noisy("neo", s) for s in range(3)]
    b = [noisy("lora", s) for s in range(3)]
    assert neo["p"] == compare(a, b).p
    assert list(paired["p_holm"]) == pytest.approx(holm(list(paired["p"])))
    main = report.table("main").display.set_index("model")
    lora_kd = paired.loc[("lora", "kd", "nll")]
    assert main.loc["kd", "Δ NLL vs LoRA ↓"].startswith(f"{-lora_kd['delta']:+.3f} [{-lora_kd['high']:+.3f}, {-lora_kd['low']:+.3f}]")
    assert main.loc["neo", "Δ NLL vs LoRA ↓"].endswith("]*") and main.loc["neo", "Δ NLL vs LoRA ↓"].startswith("-0.100 [")
    assert main.loc["lora", "Δ NLL vs LoRA ↓"] == "—" and main.loc["teacher", "Δ NLL vs KD ↓"] == "—"
    readme = (tmp_path / "board" / "README.md").read_text()
    assert "### Paired comparisons, main table" in readme and "## Tuned protocol" not in readme


def test_the_tuned_protocol_takes_each_methods_best_validation_rate_and_never_mixes(paired_matrix, tmp_path):
    from neobench.runs.results import load_per_doc

    # The tune-lr study: validation NLL per (method, lr_scale); lora is best at 3.16, neo at 1.
    validation = {("sft", 1.0): 5.0, ("sft", 3.16): 4.9, ("lora", 1.0): 4.6, ("lora", 3.16): 4.4,
                  ("kd", 1.0): 4.8, ("kd", 3.16): 4.8, ("neo", 1.0): 4.3, ("neo", 3.16): 4.5}
    for n, ((method, scale), nll) in enumerate(validation.items()):
        make_run(paired_matrix, method, "lora" if method in ("lora", "neo") else None, 0, nll - 3.7,  # its NLL: 3.7 + shift
                 stamp=f"t{n}", lr_scale=scale, study="tune-lr", trial=n)
    for seed in range(3):  # the tuned runs of sft, lora and kd (neo's best is its paper rate)
        for method, variant in [("sft", None), ("lora", "lora"), ("kd", None)]:
            make_run(paired_matrix, method, variant, seed, 0.0, stamp="tuned", lr_scale=3.16,
                     per_doc=noisy(method, seed, extra=-0.05))
    make_run(paired_matrix, "neo", "lora", 0, 0.0, stamp="x", lr_scale=10.0, per_doc=noisy("neo", 0))
    make_run(paired_matrix, "minillm", None, 0, 0.0, stamp="t9", lr_scale=1.0, study="tune-lr", trial=9)  # its search has just begun
    report = render(load_results(paired_matrix), "p", tmp_path / "board", per_doc=load_per_doc(paired_matrix))
    tuned, paper = report.sections[1], report.sections[0]
    # kd: a tie goes to the smaller; minillm: one of two rates tried, so nothing is chosen for it yet
    assert tuned.protocol.lr_scales == {"sft": 3.16, "lora": 3.16, "kd": 1.0, "neo": 1.0}
    used = lambda section, label: set(section.selection.students.loc[section.selection.students["label"] == label, "run_id"])
    assert all(r.endswith("-tuned") for r in used(tuned, "lora")) and not any(r.endswith("-tuned") for r in used(paper, "lora"))
    assert used(tuned, "neo") == used(paper, "neo")  # at lr_scale 1 the paper runs serve both protocols
    assert "lr_scale 10: neither the paper protocol's 1 nor the tuned choice 1" in dict(report.left_out)["p-neo-lora-s0-r32-12-d1-x"]
    tuning = report.table("tuning").display.set_index("model")
    assert tuning.loc["lora", "×3.16"] == "**4.400**" and tuning.loc["neo", "×1"] == "**4.300**"
    assert not tuning.loc["minillm"].str.startswith("**").any()
    # lora and sft chose the largest multiple they tried: the note says their best may lie beyond
    edge = [n for n in report.table("tuning").notes if n.startswith("At the edge of the grid")]
    assert edge == ["At the edge of the grid: sft, lora chose the largest multiple tried (×3.16); kd, neo chose the "
                    "smallest multiple tried (×1). Their best rate may lie beyond it, so for them the tuned protocol is a "
                    "lower bound on what tuning gives."]
    main_tuned = report.table("main_tuned").display.set_index("model")
    assert main_tuned.loc["lora", "NLL ↓"] != report.table("main").display.set_index("model").loc["lora", "NLL ↓"]
    readme = (tmp_path / "board" / "README.md").read_text()
    assert readme.index("## Paper protocol") < readme.index("## Tuned protocol")
    assert "### Learning-rate search (validation split)" in readme


def test_the_variants_study_tunes_each_adapter_variant_for_the_tuned_variants_table(paired_matrix, tmp_path):
    from neobench.runs.results import load_per_doc

    n = 0
    for method, variant in [("sft", None), ("lora", "lora"), ("kd", None), ("neo", "lora")]:  # tune-lr: every method best at 1
        for scale, shift in ((1.0, 0.6), (3.16, 0.8)):
            make_run(paired_matrix, method, variant, 0, shift, stamp=f"t{n}", lr_scale=scale, study="tune-lr", trial=n)
            n += 1
    for variant, best in (("pissa", 1.0), ("dora", 3.16)):  # tune-lr-variants: the same two multiples per variant
        for scale in (1.0, 3.16):
            make_run(paired_matrix, "neo", variant, 0, 0.3 if scale == best else 0.5, stamp=f"v{n}", lr_scale=scale,
                     study="tune-lr-variants", trial=n)
            n += 1
    pissa = make_run(paired_matrix, "neo", "pissa", 0, 0.0, stamp="paper", per_doc=noisy("neo", 0, extra=-0.02))
    dora_paper = make_run(paired_matrix, "neo", "dora", 0, 0.0, stamp="paper", per_doc=noisy("neo", 0, extra=0.03))
    dora_tuned = make_run(paired_matrix, "neo", "dora", 0, 0.0, stamp="tuned", lr_scale=3.16, per_doc=noisy("neo", 0, extra=-0.04))
    report = render(load_results(paired_matrix), "p", tmp_path / "board", per_doc=load_per_doc(paired_matrix))
    paper, tuned = report.sections
    assert tuned.protocol.lr_scales == {"sft": 1.0, "lora": 1.0, "kd": 1.0, "neo": 1.0, "neo+pissa": 1.0, "neo+dora": 3.16}
    used = lambda section, label: set(section.selection.students.loc[section.selection.students["label"] == label, "run_id"])
    assert used(tuned, "neo+dora") == {dora_tuned} and used(paper, "neo+dora") == {dora_paper}
    assert used(tuned, "neo+pissa") == used(paper, "neo+pissa") == {pissa}  # at its paper rate: one run serves both
    assert {"neo+dora", "neo+pissa"} <= set(report.table("variants_tuned").display["model"])
    tuning = report.table("tuning")
    assert tuning.display.set_index("model").loc["neo+dora", "×3.16"] == "**4.000**"  # NLL 3.7 + shift
    assert ("`neobench ablate tune-lr` (ablations/tune-lr.yaml) and `neobench ablate tune-lr-variants` "
            "(ablations/tune-lr-variants.yaml)") in tuning.notes[0]


# --- budget curves and the verdict per budget -----------------------------------------------------

def test_verdict_per_budget_names_the_budget_where_the_winner_changes(tmp_path):
    """KD beats Neo at 12 steps, Neo beats KD from 192 on: the verdict table says so, pair by pair."""
    from neobench.runs.results import load_per_doc

    root = tmp_path / "runs"
    neo_shift = {12: 0.20, 48: 0.0, 192: -0.20}  # against KD's 0.25 above the base difficulty
    for steps, shift in neo_shift.items():
        for method, variant in [("sft", None), ("lora", "lora"), ("kd", None), ("neo", "lora")]:
            extra = (shift + SHIFTS["kd"] - SHIFTS["neo"]) if method == "neo" else 0.0
            scores = noisy(method, 0, extra - 0.01 * steps / 12)
            if steps == 48 and method == "neo":  # KD's scores, up and down by document: no significant difference
                scores = [v + (0.05 if i % 2 else -0.04) for i, v in enumerate(scores)]
            make_run(root, method, variant, 0, 0.0, steps=steps, per_doc=scores)
    report = render(load_results(root), "p", tmp_path / "board", per_doc=load_per_doc(root))
    assert report.budgets is not None and [b.steps for b in report.budgets.budgets["paper"]] == [12, 48, 192]
    verdict = report.table("verdict").numeric.set_index(["model", "baseline", "budget"])
    assert len(verdict) == 4 * 3, "every main pair at every budget"
    assert verdict.loc[("neo", "kd", 12), "winner"] == "kd" and verdict.loc[("neo", "kd", 12), "delta"] > 0
    assert verdict.loc[("neo", "kd", 48), "winner"] == "tie"
    assert verdict.loc[("neo", "kd", 192), "winner"] == "neo"
    assert verdict.loc[("neo", "lora", 192), "winner"] == "neo" and verdict.loc[("kd", "sft", 12), "winner"] == "kd"
    notes = " ".join(report.table("verdict").notes)
    assert "paper: Neo vs KD: the winner changes from KD to Neo at budget 192" in notes
    assert "paper: KD vs SFT: KD wins wherever the difference is significant (12: KD; 48: KD; 192: KD)" in notes
    assert "paper: Neo vs SFT: the winner changes from SFT to Neo at budget 48" in notes
    # Tidy points: one row per (budget, label, metric); runs of two budgets never share one.
    points = report.budgets.points
    assert not points.duplicated(["protocol", "budget", "label", "task", "metric"]).any()
    nll = points[(points["metric"] == "nll") & (points["label"] == "neo")].set_index("budget")
    assert nll.loc[192, "tokens"] == 192_000 and nll.loc[12, "seeds"] == 1
    assert (tmp_path / "board" / "budget_curves.png").is_file() and (tmp_path / "board" / "budgets.csv").is_file()
    readme = (tmp_path / "board" / "README.md").read_text()
    assert "## Budget curves and the verdict per budget" in readme and "![budget_curves](budget_curves.png)" in readme
    # The main tables hold one budget's runs only.
    assert report.sections[0].selection.students["steps"].nunique() == 1


def test_a_single_budget_draws_no_budget_curves(paired_matrix, tmp_path):
    report = render(load_results(paired_matrix), "p", tmp_path / "board")
    assert report.budgets is None and not (tmp_path / "board" / "budgets.csv").exists()


def test_tuning_at_two_budgets_gives_each_run_the_rate_tuned_nearest_its_budget(paired_matrix, tmp_path):
    """tune-lr at 12 steps picks x3.16 for lora, tune-lr-epoch (250 steps) x1: a 48-step run takes 12's rate,
    a 192-step run the epoch's; the tuning table says how the choice moved."""
    from neobench.runs.results import load_per_doc

    n = 0
    for study, steps, epoch, best in (("tune-lr", 12, False, 3.16), ("tune-lr-epoch", 250, True, 1.0)):
        for method, variant in [("lora", "lora"), ("neo", "lora")]:
            for scale in (1.0, 3.16):
                shift = 0.3 if (scale == best or method == "neo" and scale == 1.0) else 0.5
                make_run(paired_matrix, method, variant, 0, shift, steps=steps, epoch=epoch, stamp=f"t{n}", lr_scale=scale,
                         study=study, trial=n)
                n += 1
    at48 = make_run(paired_matrix, "lora", "lora", 0, 0.0, steps=48, stamp="tuned", lr_scale=3.16, per_doc=noisy("lora", 0))
    at192_wrong = make_run(paired_matrix, "lora", "lora", 0, 0.0, steps=192, stamp="tuned", lr_scale=3.16, per_doc=noisy("lora", 0))
    at192 = make_run(paired_matrix, "lora", "lora", 0, 0.0, steps=192, stamp="paper", per_doc=noisy("lora", 0))
    report = render(load_results(paired_matrix), "p", tmp_path / "board", per_doc=load_per_doc(paired_matrix))
    tuned = report.sections[1].protocol
    assert {b.steps: c for b, c in tuned.by_budget.items()} == {12: {"lora": 3.16, "neo": 1.0}, 250: {"lora": 1.0, "neo": 1.0}}
    in_tuned = set(tuned.rows["run_id"])
    assert at48 in in_tuned and at192 in in_tuned and at192_wrong not in in_tuned
    assert "lr_scale 3.16: neither the paper protocol's 1 nor the tuned choice 1" in dict(report.left_out)[at192_wrong]
    tuning = report.table("tuning")
    assert set(tuning.display["budget"]) == {"12 steps", "250 steps (E)"}
    assert "From 12 steps to 250 steps (E) the chosen multiple moved: lora ×3.16 → ×1; neo ×1 → ×1." in " ".join(tuning.notes)


def test_main_tables_show_the_presets_budget_and_other_budgets_only_in_curves(tmp_path):
    """A preset's own budget (smol-cpu's max_steps) fills the main tables even where another budget has more runs."""
    from neobench.runs.config import load_preset

    root = tmp_path / "runs"
    own = load_preset("smol-cpu").max_steps
    other = own * 4
    for method, variant in [("sft", None), ("lora", "lora"), ("kd", None), ("neo", "lora")]:
        make_run(root, method, variant, 0, 0.0, steps=own)
        for seed in range(3):
            make_run(root, method, variant, seed, -0.01, steps=other)
    make_run(root, "minillm", None, 0, 0.0, steps=other * 2)  # no curve takes it (one budget, and not a curve method)
    report = render(load_results(root), "smol-cpu", tmp_path / "board")
    assert set(report.sections[0].selection.students["steps"]) == {own}
    assert [b.steps for b in report.budgets.budgets["paper"]] == [own, other]
    reasons = dict(report.left_out)
    assert any(f"budget {other * 2} steps: the tables show the preset's {own}" in why for why in reasons.values())


def make_student_run(root: Path, method: str, student: str, bpb: list[float], stamp: str, examples_hash: str = "e1") -> str:
    """A run of ``student`` (a spec) scored on neo_heldout_bpb per document, as a cross-vocabulary board holds."""
    variant = "lora" if method in ("lora", "neo") else None
    own_vocabulary = "+bpe:" in student
    run_id = make_run(root, method, variant, 0, 0.0, data_hash="d-x" if own_vocabulary else "d-1", stamp=stamp)
    run = root / run_id
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "student": student}))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["budget"]["examples_hash"] = examples_hash
    if method in ("kd", "neo") and own_vocabulary:
        metrics["loss"] = "uld"
    (run / "metrics.json").write_text(json.dumps(metrics))
    stored = json.loads((run / "evaluations" / "abc.json").read_text())
    row = {"task": "neo_heldout_bpb", "metric": "bits_per_byte", "value": sum(bpb) / len(bpb), "stderr": 0.01,
           "higher_is_better": False, "n_docs": len(bpb), "limit": None, "num_fewshot": 0, "task_hash": "hash-bpb", "evaluator": "test"}
    stored["evaluations"][0]["rows"].append(row)
    stored["evaluations"][0]["per_doc"] = {"neo_heldout_bpb": {"docs": [f"doc{i}" for i in range(len(bpb))], "metrics": {"bits_per_byte": bpb}}}
    (run / "evaluations" / "abc.json").write_text(json.dumps(stored))
    return run_id


def test_students_of_two_vocabularies_meet_in_the_cross_vocabulary_table(tmp_path):
    from neobench.runs.results import load_per_doc

    root = tmp_path / "runs"
    own, other = "pruned:15+bpe:16384", "pruned:15"
    docs = [1.0, 1.2, 0.8, 1.1, 0.9, 1.3, 1.05, 0.95]
    shifts = {("sft", own): 0.10, ("lora", own): 0.08, ("kd", own): 0.02, ("neo", own): 0.03, ("neo", other): 0.05, ("kd", other): 0.04}
    for (method, student), shift in shifts.items():
        make_student_run(root, method, student, [d + shift + 0.002 * (i % 3) for i, d in enumerate(docs)], stamp=student[-5:])
    stray = make_student_run(root, "lora", other, docs, stamp="stray", examples_hash="e2")  # other examples: not comparable
    report = render(load_results(root), "p", tmp_path / "board", per_doc=load_per_doc(root))

    table = report.table("vocabularies").numeric
    assert list(zip(table["student"], table["model"])) == [
        (own, "kd (uld)"), (own, "lora"), (own, "neo (uld)"), (own, "sft"), (other, "kd"), (other, "neo")]
    by_hand = sum((d + 0.03) - (d + 0.05) for d in docs) / len(docs)  # neo (uld) vs the other vocabulary's neo
    neo = table.set_index("model").loc["neo (uld)"]
    assert neo["delta/neo_heldout_bpb"] == pytest.approx(by_hand) and neo["high/neo_heldout_bpb"] < 0
    assert math.isnan(table.set_index("model").loc["neo"].get("delta/neo_heldout_bpb", math.nan))  # the baseline itself
    assert any(note.startswith(stray) and "examples_hash e2 vs e1" in note for note in report.table("vocabularies").notes)
    # The usual tables hold the board's own student only.
    assert set(report.table("main").numeric["model"]) <= {"sft", "lora", "kd (uld)", "neo (uld)", "teacher", "untrained"}
    assert "## Across vocabularies" in (tmp_path / "board" / "README.md").read_text()


def test_compile_has_a_config_key_of_its_own_and_stored_runs_keep_theirs():
    """Runs stored before the compile field existed keep their key; a compiled run gets its own, since
    its train time (compiling included) must not be averaged with eager seeds; the strategy and the
    loss's chunking change rounding only and stay out of the key."""
    from neobench.runs.config import RunConfig
    from neobench.runs.results import config_key

    stored = RunConfig().to_dict()
    del stored["compile"]  # a config.yaml written before the field existed
    key = config_key(stored, "cpu", "bfloat16")
    for change in ({"compile": False}, {"strategy": "fsdp"}, {"loss_chunk_tokens": 0}):
        assert config_key({**stored, **change}, "cpu", "bfloat16") == key, change
    for change in ({"compile": True}, {"rank": 8}):
        assert config_key({**stored, **change}, "cpu", "bfloat16") != key, change
