"""The demo's printed figure table, with and without a tuned null threshold."""

from spanqa.demo import figure_table

REPORT = {"exact": 51.0, "f1": 53.25, "HasAns_f1": 40.5, "NoAns_f1": 66.0, "total": 10}


def test_the_table_without_a_tuned_threshold_has_one_column():
    rows = figure_table(REPORT)
    assert "tuned" not in rows[0]
    assert rows[1].split() == ["exact", "51.00"]
    assert len(rows) == 5


def test_the_table_with_a_tuned_threshold_has_two_columns():
    tuned = {"tuned_threshold": -1.5, **{f"tuned_{k}": v + 1 for k, v in REPORT.items() if k != "total"}}
    rows = figure_table({**REPORT, **tuned, "best_f1": 54.25, "best_f1_thresh": -1.5})
    assert "tuned -1.500" in rows[0]
    assert rows[2].split() == ["f1", "53.25", "54.25"]
    assert rows[-1].split()[:2] == ["best_f1", "54.25"]
