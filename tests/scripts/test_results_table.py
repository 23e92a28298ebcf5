"""scripts/results_table.py: published rows parsed from a README, one results.json, example users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from results_table import example_lines, find_readme, parse_published, pick_examples  # noqa: E402

README = """# Some dataset

| file | rows |
|---|---|
| `valid.csv` | 4,866 |

## Published
| model | HR@3 | NDCG@3 | HR@10 | NDCG@10 |
|---|---|---|---|---|
| SASRec | .0861 | .0769 | .1120 | 0.0858 |
| note: see paper | - | - | - | - |

Text between tables.

| Model | Recall@20 |
|:--|--:|
| GRU4Rec | .2 |
"""


def test_parse_published_reads_metric_tables_only():
  rows = parse_published(README)
  # The file table has no metric columns; the note row is not numeric; "Model" matches any case.
  assert rows == {"published SASRec": {"hr@3": 0.0861, "ndcg@3": 0.0769, "hr@10": 0.112,
                                       "ndcg@10": 0.0858},
                  "published GRU4Rec": {"recall@20": 0.2}}


def test_find_readme_prefers_own_then_a_parent_that_names_the_folder(tmp_path):
  data = tmp_path / "Office"
  data.mkdir()
  assert find_readme(data) is None
  (tmp_path / "README.md").write_text("about Books only")
  assert find_readme(data) is None  # a parent README about another dataset is not ours
  (tmp_path / "README.md").write_text("# Office data")
  assert find_readme(data) == tmp_path / "README.md"
  (data / "README.md").write_text("own")
  assert find_readme(data) == data / "README.md"


def test_pick_examples_spreads_over_distinct_users():
  rows = [{"user_id": u} for u in ["a", "a", "b", "b", "c", "c"]]
  assert [r["user_id"] for r in pick_examples(rows, 3)] == ["a", "b", "c"]
  rows = [{"user_id": "a"}] * 4 + [{"user_id": "b"}] * 2
  assert [r["user_id"] for r in pick_examples(rows, 3)] == ["a", "b"]  # only two users exist


def test_example_lines_marks_the_hit_and_names_missing_slots():
  row = {"user_id": "u1", "history": ["h1", "h2", "h3", "h4", "h5", "h6"], "targets": ["t"],
         "ranked": ["x", "t", None, "y", "z", "w"]}
  lines = example_lines(row, lambda i: i.upper())
  assert lines[0] == "user u1 (last 5 of 6 items, oldest first):"
  assert lines[1:6] == ["    H2", "    H3", "    H4", "    H5", "    H6"]
  assert lines[7:12] == ["    1. X", "   *2. T", "    3. (no valid item)", "    4. Y", "    5. Z"]
  assert lines[-1] == "  true next item: T"


def test_cli_writes_results_json_and_chart(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "README.md").write_text(README)
  sft = tmp_path / "eval_sft.json"
  sft.write_text(json.dumps({"hr@10": 0.05, "ndcg@10": 0.02}))
  base = tmp_path / "baselines_test.json"
  base.write_text(json.dumps({"markov": {"hr@10": 0.1, "ndcg@10": 0.08}}))
  out = tmp_path / "out"
  cmd = [sys.executable, str(REPO / "scripts" / "results_table.py"), "--out", str(out),
         "--data_dir", str(data), "--model", f"sft={sft}", "--baselines", str(base)]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True)
  assert json.loads((out / "results.json").read_text()) == {
    "sft": {"hr@10": 0.05, "ndcg@10": 0.02}, "markov": {"hr@10": 0.1, "ndcg@10": 0.08}}
  assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
  table = proc.stdout.splitlines()
  assert [line.split()[0] for line in table[1:4]] == ["sft", "markov", "published"]
  assert "0.0858" in table[3]


def test_cli_missing_eval_file_is_one_line_error(tmp_path):
  cmd = [sys.executable, str(REPO / "scripts" / "results_table.py"), "--out", str(tmp_path),
         "--model", f"sft={tmp_path / 'nope.json'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error:") and "nope.json" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
