"""benchmarks/gui/rcpo_schedules.py on the quick box VLM: one row per schedule, accuracies in range, files written."""

import json


def test_rcpo_schedules_quick(load_script, tmp_path):
    mod = load_script("benchmarks/gui/rcpo_schedules.py")
    res = mod.main(["--quick", "--seeds", "0", "--screens", "2", "--grid", "1e-4:1", "1e-2:2",
                    "--cache", str(tmp_path / "cache"), "--out", str(tmp_path)])
    assert [(r["lr"], r["passes"]) for r in res["rcpo"]] == [(1e-4, 1), (1e-2, 2)]
    for value in [res["greedy"], res["gui_rc_16"], *(r["greedy_after"] for r in res["rcpo"])]:
        assert 0.0 <= value <= 1.0
    assert res["greedy_box_area"] > 0
    assert json.loads((tmp_path / "rcpo_schedules.json").read_text())["rcpo"] == res["rcpo"]
    assert "| 0.01 | 2 |" in (tmp_path / "rcpo_schedules.md").read_text()
