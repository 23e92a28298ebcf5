"""Workdir paths: gs:// URIs stay URIs (no cwd, no `~`), local paths become absolute."""

from __future__ import annotations

import os

from etils import epath

from recllm_jax import paths


def test_workdir_path_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  remote = paths.workdir_path("gs://bucket/runs/sft")  # builds a path, no network access
  assert isinstance(remote, epath.Path) and paths.is_uri(remote)
  assert os.fspath(remote / "checkpoints") == "gs://bucket/runs/sft/checkpoints"
  monkeypatch.chdir(tmp_path)
  local = paths.workdir_path("run")
  assert isinstance(local, epath.Path) and not paths.is_uri(local)
  assert os.fspath(local) == str(tmp_path / "run")
  assert paths.workdir_path(local) == local


def test_append_text_appends_locally(tmp_path):
  path = paths.workdir_path(tmp_path / "log.txt")
  paths.append_text(path, "a\n")
  paths.append_text(path, "b\n")
  assert path.read_text() == "a\nb\n"


def test_expand_paths_leaves_uris_alone(monkeypatch):
  import sys
  from pathlib import Path

  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import sft as sft_configs
  from recllm_jax.train.checks import expand_paths

  monkeypatch.setenv("HOME", "/home/someone")
  config = sft_configs.get_config("tiny")
  config.workdir = "gs://bucket/~x/$RUN"
  assert expand_paths(config).workdir == "gs://bucket/~x/$RUN"
