"""The carry table against the own and the strongest no-carry control, on hand-built arms."""

from __future__ import annotations

import copy

import pytest

from memllm.evaluation.carry import carry_checks, control_arms
from memllm.evaluation.experiment_config import ArmSettings
from memllm.evaluation.ladder import render_ladder, summarize
from memllm.evaluation.markdown import carry_section, render_markdown
from memllm.evaluation.results import build_arm_result, experiment_info, make_results

EARLIER, N_EARLIER, N_WINDOW = "facts earlier", 150, 50
IDS = [f"q{k}" for k in range(N_EARLIER + N_WINDOW)]
LABELS = {i: EARLIER if k < N_EARLIER else "facts in window" for k, i in enumerate(IDS)}
PAIRS = {"episodic": "episodic_no_carry", "latent": "latent_no_carry"}


def _arm(name: str, right: range):
    """An arm right on the ``facts earlier`` questions ``right`` and on every window question
    (the window's own facts: any arm may answer them)."""
    correct = [float(k in right or k >= N_EARLIER) for k in range(len(IDS))]
    return build_arm_result(name, {"accuracy": correct}, example_ids=IDS, n_resamples=200)


def _results():
    """``window`` and ``episodic_no_carry`` at 0 % on the facts-earlier questions (nothing
    stored, nothing read), ``latent_no_carry`` at 30 % (it learnt the answer's format);
    ``episodic`` at 35.3 %, on other questions than ``latent_no_carry``'s (beats its own
    degenerate control, not the format bar); ``latent`` at 90 % (beats both)."""
    arms = [
        _arm("window", range(0)),
        _arm("latent", range(0, 135)),
        _arm("latent_no_carry", range(30, 75)),
        _arm("episodic", range(0, 53)),
        _arm("episodic_no_carry", range(0)),
    ]
    return make_results(experiment_info("synthetic", {"model": "tiny"}, 0, device="cpu"), arms)


def _rows(results):
    return {row["arm"]: row for row in results["carry"]["rows"]}


SETTINGS = {
    "window": ArmSettings(kind="window"),
    "latent": ArmSettings(kind="memory", memory={"type": "latent"}),
    "latent_no_carry": ArmSettings(kind="memory", memory={"type": "latent"}, carry=False),
    "episodic": ArmSettings(kind="memory", memory={"type": "episodic"}),
    "episodic_no_carry": ArmSettings(kind="memory", memory={"type": "episodic"}, carry=False),
}


CONTROLS = control_arms(SETTINGS)


def test_control_arms_are_the_no_carry_memories_and_window():
    assert CONTROLS == ["window", "latent_no_carry", "episodic_no_carry"]


def test_beating_a_degenerate_control_is_not_beating_the_strongest():
    results = _results()
    carry_checks(results, PAIRS, LABELS, controls=CONTROLS)
    episodic = _rows(results)["episodic"]
    assert episodic["n"] == N_EARLIER and episodic["control"] == "episodic_no_carry"
    assert episodic["carries"] and episodic["test"]["p_value"] < 0.01
    assert episodic["strongest_control"] == "latent_no_carry"
    assert episodic["strongest_summary"]["value"] == pytest.approx(0.3)
    test = episodic["strongest_test"]
    assert test["diff"] == pytest.approx(8 / 150) and test["p_value"] > 0.01
    assert episodic["carries_over_strongest"] is False


def test_an_arm_whose_own_control_is_the_strongest_gets_no_second_test():
    results = _results()
    carry_checks(results, PAIRS, LABELS, controls=CONTROLS)
    latent = _rows(results)["latent"]
    assert latent["strongest_control"] == latent["control"] == "latent_no_carry"
    assert latent["strongest_test"] is None
    assert latent["strongest_summary"] == latent["control_summary"]
    assert latent["carries"] and latent["carries_over_strongest"] is True


def test_ties_go_to_the_own_control_then_to_name_order():
    results = _results()
    del results["arms"]["latent_no_carry"]  # window and episodic_no_carry: both 0 %
    pairs = {"episodic": "episodic_no_carry", "latent": "window"}
    carry_checks(results, pairs, LABELS, controls=CONTROLS)
    rows = _rows(results)
    assert rows["episodic"]["strongest_control"] == "episodic_no_carry"
    assert rows["latent"]["strongest_control"] == "window"
    assert rows["episodic"]["strongest_test"] is None
    assert rows["episodic"]["carries_over_strongest"] is rows["episodic"]["carries"] is True


def test_memory_arms_are_never_controls():
    """``latent`` (90 %) is not a control: the strongest one stays a no-carry arm."""
    results = _results()
    carry_checks(results, PAIRS, LABELS, controls=CONTROLS)
    assert {r["strongest_control"] for r in results["carry"]["rows"]} == {"latent_no_carry"}


def test_the_report_shows_the_strongest_control_and_old_results_still_render():
    results = _results()
    carry_checks(results, PAIRS, LABELS, controls=CONTROLS)
    text = "\n".join(carry_section(results))
    assert "| strongest no-carry control | Δ vs it, p |" in text
    assert "format-only bar" in text
    episodic = next(line for line in text.splitlines() if line.startswith("| episodic |"))
    assert "latent_no_carry 30.0 [" in episodic and "+5.3 [" in episodic
    assert episodic.endswith("✗ |")  # beats its own control (✔), not the strongest (✗)
    latent = next(line for line in text.splitlines() if line.startswith("| latent |"))
    assert "latent_no_carry (its own) | as its own ✔ |" in latent

    old = copy.deepcopy(results)
    for row in old["carry"]["rows"]:
        for key in ("strongest_control", "strongest_summary", "strongest_test"):
            del row[key]
        del row["carries_over_strongest"]
    old_text = "\n".join(carry_section(old))
    assert "## Does the memory carry?" in old_text and "strongest" not in old_text
    assert "## Does the memory carry?" in render_markdown(old)


def test_the_ladder_marks_beating_the_strongest_control_and_reads_old_ladders():
    results = _results()
    carry_checks(results, PAIRS, LABELS, controls=CONTROLS)
    ladder = summarize({"k1": results}, {"name": "t", "subset": "all", "rungs": ["k1"]})
    cells = {a: ladder["cells"][a]["k1"]["accuracy"] for a in ("episodic", "latent")}
    assert cells["episodic"]["carries"] and not cells["episodic"]["carries_over_strongest"]
    assert cells["episodic"]["strongest_control"] == "latent_no_carry"
    assert cells["latent"]["carries_over_strongest"] and cells["latent"]["vs_strongest"] is None
    assert "carries_over_strongest" not in ladder["cells"]["window"]["k1"]["accuracy"]
    text = render_ladder(ladder)
    assert "✔✔" in text.split("## accuracy")[0]  # the intro explains the mark
    table = text.split("## accuracy")[1].split("## Every cell")[0]
    line = {row.split(" | ")[0].strip("| "): row for row in table.splitlines()}
    assert line["latent"].endswith("✔✔ |")
    assert line["episodic"].endswith("✔ |") and "✔✔" not in line["episodic"]

    # a ladder.json written before the strongest control: ✔ alone, no error
    for arm in ladder["cells"].values():
        for cell in arm["k1"].values():
            for key in ("strongest_control", "vs_strongest", "carries_over_strongest"):
                cell.pop(key, None)
    old = render_ladder(ladder)
    assert "✔✔ |" not in old and "✔ |" in old
