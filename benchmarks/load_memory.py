"""Peak host RSS of `load_hf_model` on a ~500 MB random checkpoint, as a ratio to its size.

    python benchmarks/load_memory.py [--dir /tmp/qwen2_500mb] [--mesh-fsdp 8]

Builds a random Qwen2 checkpoint with transformers (once), then loads it in a fresh process under
`/usr/bin/time -v` and reports "Maximum resident set size". The baseline process (imports and
JAX start-up, no load) is measured the same way so the loader's own footprint is visible.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=5,
              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)

LOAD = """
import os, sys, jax, recllm_jax
from recllm_jax import sharding
mesh = sharding.make_mesh(fsdp=int(sys.argv[2])) if int(sys.argv[2]) > 1 else None
if sys.argv[1] != "baseline":
  model = recllm_jax.load_hf_model(sys.argv[1], mesh=mesh)
  jax.block_until_ready(model.norm.scale[...])
"""


def build_checkpoint(path: Path) -> None:
  import torch
  import transformers
  cfg = transformers.Qwen2Config(**CONFIG)
  torch.manual_seed(0)
  transformers.Qwen2ForCausalLM(cfg).save_pretrained(path, max_shard_size="200MB")


def peak_rss_bytes(args: list[str], env: dict[str, str]) -> int:
  proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", LOAD, *args], env=env,
                        capture_output=True, text=True, check=True)
  kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
  return int(kib.group(1)) * 1024


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--dir", default="/tmp/recllm_qwen2_500mb")
  parser.add_argument("--mesh-fsdp", type=int, default=1,
                      help="simulate this many CPU devices and shard over fsdp")
  args = parser.parse_args()
  path = Path(args.dir)
  if not (path / "config.json").exists():
    print(f"building random checkpoint in {path} ...")
    build_checkpoint(path)
  size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
  env = dict(os.environ)
  if args.mesh_fsdp > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.mesh_fsdp}"
  baseline = peak_rss_bytes(["baseline", str(args.mesh_fsdp)], env)
  loaded = peak_rss_bytes([str(path), str(args.mesh_fsdp)], env)
  print(f"checkpoint size:            {size / 1e6:8.1f} MB")
  print(f"peak RSS, imports only:     {baseline / 1e6:8.1f} MB")
  print(f"peak RSS, load_hf_model:    {loaded / 1e6:8.1f} MB")
  print(f"peak RSS / checkpoint size: {loaded / size:8.2f}")
  print(f"(peak RSS - imports) / size: {(loaded - baseline) / size:8.2f}")


if __name__ == "__main__":
  main()
