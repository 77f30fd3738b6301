"""The PIL charts of the benchmarks and the evaluation tab: names a reader can read."""

import numpy as np

from studio.charts import COLORS, line_chart


def test_lines_that_end_together_get_names_that_do_not_overlap():
    same = [(0.0, 0.2), (1.0, 0.9)]
    named = np.asarray(line_chart({"shape+colour": same, "joint": same}, "scale")).astype(int)
    nameless = np.asarray(line_chart({"": same, " ": same}, "scale")).astype(int)
    text = (named != nameless).any(axis=-1)
    rows = []
    for color in COLORS[:2]:
        near = np.abs(named - np.array(color)).sum(axis=-1) < 60  # text is anti-aliased
        rows.append(set(np.nonzero((text & near).any(axis=1))[0]))
    assert rows[0] and rows[1]
    assert not (rows[0] & rows[1]), "the two names are drawn on the same rows"


def test_greek_in_a_label_is_spelled_out_not_drawn_as_a_box():
    series = {"joint": [(0.0, 0.1), (1.5, 0.8)]}
    spelled = np.asarray(line_chart(series, "IP-Adapter scale lambda"))
    greek = np.asarray(line_chart(series, "IP-Adapter scale λ"))
    assert (spelled == greek).all()
