"""The benchmarks' settings ids: a setting added to SearchConfig at a default that changes no
retrain must leave the id of the committed retrains as it is, or every recorded retrain is silently
missed and run again (issue 35's teacher_files and teacher_input did so, unnoticed, for a session).
A change that does change the retrain recipe changes the id on purpose: then this test's
reference moves with the first retrains recorded under the new one."""

from __future__ import annotations

from benchmarks import budget_edge
from benchmarks.results import RESULTS, ResultsFile
from nas_kd.core.config import SearchConfig
from nas_kd.data.datasets import load_dataset


def test_the_committed_50m_retrains_are_found_under_todays_settings_id() -> None:
    sid = budget_edge.retrain_sid("50M", load_dataset(SearchConfig().dataset))
    recorded = [key for name in ("headroom.json", "budget_edge.json")
                for key in ResultsFile(RESULTS / name).data.get("retrains", {})]
    assert any(key.endswith(f"|{sid}") for key in recorded), (
        f"settings id {sid} matches no committed 50M retrain: a new SearchConfig field at its default "
        "belongs in search_vs_baselines.LATER_KEYS")
