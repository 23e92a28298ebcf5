"""Per-device memory plan of a training config: `python scripts/plan.py --config configs/grpo.py
--device h100-80gb [--num_devices 8] [--config.key=value ...]`.

Nothing is allocated and no weights are needed (`recllm_jax.plan`: `jax.eval_shape` of the real
model, optimizer and KV cache, plus documented activation estimates), so a TPU pod or GPU host
can be planned from a laptop. `model.preset='hf'` without a downloaded `model.hf_path` plans the
DeepSeek-R1-Distill-Qwen-1.5B architecture. The mesh is `config.mesh` over `--num_devices`
(default: the devices of this machine), a -1 axis taking the rest. `--new_tokens N` counts N
tokens the run adds to its tokenizer (item codes), growing the vocabulary as training would.

Prints the per-device table against `--device`'s memory, then two suggestions: the fewest
micro-batches (`train.grad_accum_steps`, then remat) that fit on `--num_devices`, and the
smallest FSDP mesh that fits. See docs/planning.md.

Errors in the config (e.g. rows that do not split over the mesh) end with one line `error: ...`
and exit status 2, like scripts/train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# scripts/train.py defines the `--config` flag; reuse its one-line flag errors and user-error exit.
from train import fail, load_config, parse_flags, start_script  # noqa: E402

from absl import app, flags  # noqa: E402

DEVICE_NAMES = ("gpu-24gb", "h100-80gb", "h200", "tpu-v5e", "tpu-v5p", "tpu-v6e")  # plan.DEVICES (fast --help)
_DEVICE = flags.DEFINE_enum("device", "h100-80gb", list(DEVICE_NAMES), "Accelerator to plan for.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices of the planned mesh (0 = this "
                                    "machine's jax.device_count()).")
_NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", 0, "Tokens the run adds to its tokenizer (e.g. semantic-ID item codes): counted "
    "in the vocabulary, which grows past a pretrained checkpoint's rows as training grows it.")
_MARGIN = flags.DEFINE_float("margin", 0.1, "Share of device memory left free for what the "
                             "plan does not model (XLA temporaries).")


def main(argv: list[str]) -> None:
  start_script(argv)
  import jax

  from recllm_jax import plan
  from recllm_jax.errors import UserError
  config = load_config()
  device = plan.DEVICES[_DEVICE.value]
  num_devices = _NUM_DEVICES.value or jax.device_count()
  margin = _MARGIN.value
  try:
    new_tokens = _NEW_TOKENS.value
    p = plan.plan(config, num_devices, new_tokens=new_tokens, device=device)
    print(plan.format_plan(p, device, margin))
    here = plan.suggest(config, device, num_devices=num_devices, margin=margin,
                        new_tokens=new_tokens)
    print(plan.format_suggestion(here, device, f"on {num_devices} device{'s' * (num_devices > 1)}"))
    smallest = plan.suggest(config, device, margin=margin, new_tokens=new_tokens)
    print(plan.format_suggestion(smallest, device, "smallest FSDP mesh"))
  except UserError as e:
    fail(e)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
