"""scripts/results_table.py and results_reading.py: published rows parsed from a README, one
results.json, what the table shows (on hand-made tables), example users, next steps."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import pytest  # noqa: E402
from results_reading import Roles, next_steps_lines, noise_band, reading_lines  # noqa: E402
from results_table import (derive_roles, example_lines, find_readme, main,  # noqa: E402
                           parse_published, pick_examples, predictions_for)

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


def _row(user: str, rank: int | None = None) -> dict:
  """A prediction row whose true next item is at 1-based `rank` of our 20 (None: absent)."""
  ranked = [f"i{k}" for k in range(20)]
  return {"user_id": user, "history": ["h"], "ranked": ranked,
          "targets": [ranked[rank - 1] if rank else "t"]}


def test_pick_examples_spreads_over_distinct_users():
  rows = [_row(u) for u in ["a", "a", "b", "b", "c", "c"]]
  assert [r["user_id"] for r in pick_examples(rows, 3)] == ["a", "b", "c"]
  rows = [_row("a")] * 4 + [_row("b")] * 2
  assert [r["user_id"] for r in pick_examples(rows, 3)] == ["a", "b"]  # only two users exist


def test_pick_examples_shows_two_hits_and_a_miss():
  # Mostly misses, as a weak model gives: the hits are still found, and come first.
  rows = [_row(f"m{i}") for i in range(30)] + [_row("h1", 1), _row("h1", 2), _row("h2", 5)]
  rows += [_row(f"n{i}") for i in range(30)] + [_row("far", 7)]  # rank 7: not in the top-5 shown
  chosen = pick_examples(rows, 3)
  assert [r["user_id"] for r in chosen] == ["h1", "h2", "m0"]
  assert [r["user_id"] for r in pick_examples(rows, 1)] == ["h1"]
  assert [r["user_id"] for r in pick_examples(rows, 2)] == ["h1", "m0"]
  # One kind only: the count is filled from the other.
  assert len(pick_examples([_row(f"m{i}") for i in range(9)], 3)) == 3
  assert [r["user_id"] for r in pick_examples([_row(f"h{i}", 1) for i in range(3)], 3)] == [
      "h0", "h1", "h2"]
  assert [r["user_id"] for r in pick_examples([_row("h", 1), _row("far", 9)], 3)] == ["h", "far"]


def test_example_lines_marks_the_hit_and_names_missing_slots():
  row = {"user_id": "u1", "history": ["h1", "h2", "h3", "h4", "h5", "h6"], "targets": ["t"],
         "ranked": ["x", "t", None, "y", "z", "w"]}
  lines = example_lines(row, lambda i: i.upper())
  assert lines[0] == "user u1 (last 5 of 6 items, oldest first):"
  assert lines[1:6] == ["    H2", "    H3", "    H4", "    H5", "    H6"]
  assert lines[7:12] == ["    1. X", "   *2. T", "    3. (no valid item)", "    4. Y", "    5. Z"]
  assert lines[-1] == "  true next item: T  (hit: our #2)"
  assert example_lines({**row, "ranked": ["x"] * 6 + ["t"]}, str)[-1].endswith("(miss: our #7)")
  assert example_lines({**row, "ranked": ["x"] * 20}, str)[-1].endswith(
      "(miss: not in our top-20)")


# The demo's table (400 users, scripts/demo.sh), as results_table.py collects it.
DEMO = {"sft": (.3125, .2300), "grpo": (.3275, .2484), "sft+cf": (.4400, .3997),
        "grpo+cf": (.4400, .3998), "cf prior alone": (.4400, .3987), "markov": (.4400, .3988),
        "popularity": (.0650, .0285), "sasrec": (.4425, .3579)}
ROLES = Roles(models=("sft", "grpo"), trained_from={"grpo": "sft"},
              guided={"sft+cf": "sft", "grpo+cf": "grpo"}, prior="cf prior alone",
              baselines=("markov", "popularity", "sasrec"))


def table(users: int | None = 400, **changes: tuple[float, float]) -> dict[str, dict]:
  rows = {**DEMO, **changes}
  return {name: {"hr@10": hr, "ndcg@10": ndcg, **({"num_examples": users} if users else {})}
          for name, (hr, ndcg) in rows.items()}


def reading(results: dict, roles: Roles = ROLES) -> str:
  lines = reading_lines(results, roles)
  assert all(len(line) <= 100 for line in lines)
  return re.sub(r"\s+", " ", " ".join(lines))  # undo the wrapping


def test_reading_of_the_demo_table():
  text = reading(table())
  assert text.startswith("What the table shows (400 test examples: gaps under about 0.07,")
  assert ("hr@10: best sasrec 0.4425, level within noise: sft+cf, grpo+cf, cf prior alone, "
          "markov; the model alone: sft 0.3125 (0.71x the best), grpo 0.3275 (0.74x the best)"
          in text)
  assert "ndcg@10: best grpo+cf 0.3998, level within noise: sft+cf, cf prior alone, markov" in text
  assert ("grpo (trained from sft) vs sft: hr@10 0.3275 vs 0.3125 (+4.8%), ndcg@10 0.2484 vs "
          "0.2300 (+8.0%): within noise") in text
  assert "over the model alone on ndcg@10: sft+cf vs sft +73.8%, grpo+cf vs grpo +61.0%" in text
  assert ("In short: the model alone is below the best CF baseline (grpo ndcg@10 0.2484 vs "
          "markov 0.3988, 0.62x); grpo over sft is within noise; the CF-guided rows add nothing "
          "measurable over the CF prior alone") in text


def test_reading_follows_the_numbers():
  # Many users: the same +8% of GRPO is now real, and a CF-guided row above the prior counts.
  text = reading(table(users=100_000, **{"grpo+cf": (.47, .43)}))
  assert "grpo over sft is a real gain" in text
  assert "CF-guided (best: grpo+cf) vs cf prior alone:" in text
  assert "the LLM adds to the CF prior" in text
  # GRPO really below its SFT; the CF-guided rows really below the prior.
  text = reading(table(grpo=(.20, .12), **{"sft+cf": (.30, .25), "grpo+cf": (.30, .25)}))
  assert "grpo over sft is a real loss" in text
  assert "mixing the LLM into the CF prior hurts" in text
  # The model alone wins: no "model alone" ratios, and it is above every baseline.
  text = reading(table(grpo=(.70, .60)))
  assert "hr@10: best grpo 0.7000" in text and "ndcg@10: best grpo 0.6000" in text
  assert "the model alone:" not in text
  assert "the model alone is above the best CF baseline (grpo ndcg@10 0.6000" in text


def test_reading_without_user_counts_or_roles():
  text = reading(table(users=None))
  assert text.startswith("What the table shows: ")  # no noise band without num_examples
  assert "grpo over sft is a real gain" in text  # every gap is taken at face value
  # Published rows are a yardstick, never "best"; rows without a role are not read at all.
  results = {**table(), "published D3": {"hr@10": .1634, "ndcg@10": .1213}}
  assert "best published (other training data): D3 0.1213" in reading(results)
  assert reading_lines(results, Roles()) == []
  assert reading(results, Roles(models=("grpo",))).startswith(
      "What the table shows (400 test examples: gaps under about 0.06,")
  assert noise_band(0.5, 0.5, 400) == pytest.approx(0.0707, abs=1e-4)


def _workdir(root: Path, name: str, evals: dict[str, dict], init_from: Path | None = None) -> Path:
  workdir = root / name
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {"task": name, **({"init_from": str(init_from)} if init_from else {})}))
  for tag, metrics in evals.items():
    (workdir / f"eval_{tag}.json").write_text(json.dumps(metrics))
  return workdir


def test_roles_and_predictions_come_from_the_files(tmp_path):
  sft = _workdir(tmp_path, "sft", {"test": {}, "test_cf": {"cf_model": "markov"}})
  grpo = _workdir(tmp_path, "grpo", {"test": {}, "test_cf": {"cf_model": "markov"},
                                     "test_cf_markov": {}}, init_from=sft)
  models = [f"sft={sft / 'eval_test.json'}", f"grpo={grpo / 'eval_test.json'}",
            f"sft+cf={sft / 'eval_test_cf.json'}", f"grpo+cf={grpo / 'eval_test_cf.json'}"]
  results = {"sft": {}, "grpo": {}, "sft+cf": {"cf_model": "markov"},
             "grpo+cf": {"cf_model": "markov"}, "prior": {}, "markov": {}}
  roles = derive_roles(results, models, f"prior={grpo / 'eval_test_cf_markov.json'}", ["markov"])
  assert roles == Roles(models=("sft", "grpo"), trained_from={"grpo": "sft"},
                        guided={"sft+cf": "sft", "grpo+cf": "grpo"}, prior="prior",
                        baselines=("markov",))
  assert predictions_for(grpo / "eval_test_cf.json") == grpo / "predictions_test_cf.jsonl"
  assert predictions_for(grpo / "eval_test.json") == grpo / "predictions_test.jsonl"


def test_examples_come_from_the_best_row_and_the_run_ends_with_next_steps(tmp_path, capsys):
  data = tmp_path / "data"
  data.mkdir()
  (data / "catalog.jsonl").write_text("".join(
      json.dumps({"item_id": f"i{k}", "title": f"Item {k}"}) + "\n" for k in range(20)))
  (data / "interactions.jsonl").write_text("".join(
      json.dumps({"user_id": f"u{u}", "history": [f"i{(u + k) % 20}" for k in range(5)]}) + "\n"
      for u in range(6)))
  sft = _workdir(tmp_path, "sft", {"test": {"hr@10": .3, "ndcg@10": .2, "num_examples": 6}})
  grpo = _workdir(tmp_path, "grpo", {
      "test": {"hr@10": .3, "ndcg@10": .25, "num_examples": 6},
      "test_cf": {"hr@10": .5, "ndcg@10": .4, "num_examples": 6, "cf_model": "markov",
                  "cf_weight": 256.0, "cf_from": "OUT/baselines"}}, init_from=sft)
  rows = [_row(f"u{u}", rank) for u, rank in enumerate([None, 1, None, 3, None, None])]
  for workdir, tag in ((sft, "test"), (grpo, "test"), (grpo, "test_cf")):
    (workdir / f"predictions_{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  main(["--out", str(tmp_path / "out"), "--data_dir", str(data), "--data_format", "jsonl",
        "--model", f"sft={sft / 'eval_test.json'}", "--model", f"grpo={grpo / 'eval_test.json'}",
        "--model", f"grpo+cf={grpo / 'eval_test_cf.json'}", "--examples", "3", "--next_steps"])
  out = capsys.readouterr().out
  assert "grpo (trained from sft) vs sft:" in out
  assert (f"3 example users of grpo+cf, our best row on ndcg@10 "
          f"({grpo / 'predictions_test_cf.jsonl'}):\n2 with the true next item in our top-5 "
          "(marked *), 1 without.") in out
  assert [line.split()[1] for line in out.splitlines() if line.startswith("user ")] == [
      "u1", "u3", "u0"]
  assert out.rstrip().endswith("bash scripts/reproduce.sh THAT_DIR workdirs/office")
  steps = out[out.index("Next steps"):]
  assert f"recllm_jax.load_checkpoint({str(grpo)!r})" in steps
  assert "prior = prior_from_models('markov', load_cf_models('OUT/baselines', ds))" in steps
  assert "recommend(..., cf_prior=prior, cf_weight=256)" in steps


def test_next_steps_of_a_plain_model_name_every_way_in():
  lines = next_steps_lines(workdir=Path("W/grpo"), history=["a", "b", "c", "d"], cf=None)
  text = "\n".join(lines)
  assert "me = ['b', 'c', 'd']" in text
  assert "recllm_jax.recommend(model, tokenizer, [me], codec, prompt, k=10)" in text
  assert "cf_prior" not in text
  for needed in ("catalog.jsonl", "interactions.jsonl", ".parquet", "FORMAT=jsonl",
                 "items.json, valid.csv", "MiniOneRec", "data/Amazon/", "docs/data.md"):
    assert needed in text
  mix = next_steps_lines(workdir=Path("W"), history=[], cf={"cf_model": "mix", "cf_weight": 8,
                                                            "cf_from": "B"})
  assert "me = ['ITEM_ID']" in "\n".join(mix)
  assert "load_cf_models('B', ds, sasrec=SASRecConfig(seed=config.seed))" in "\n".join(mix)


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
