"""Temp memory of the SFT loss gradient with a 152k vocabulary: full vs chunked logits.

    python benchmarks/vocab_memory.py [--batch 4] [--length 512] [--hidden 64] [--layers 1]
                                      [--chunks 0,512,256,128,64] [--dtype float32]
    python benchmarks/vocab_memory.py --paper-width --batch 32 --length 1024 --layers 2

Nothing is executed or allocated: `jax.value_and_grad` of `sft_loss_fn` is lowered on abstract
inputs and compiled, and XLA's `memory_analysis()` reports the temp buffers its schedule needs
(everything but parameters, inputs and outputs). The model is tiny except for the vocabulary,
so the temp bytes are dominated by the logits and their gradient. Chunk 0 = the full [B, T, V]
logits path. Tests assert the same numbers (tests/train/test_logprobs.py). `--paper-width` uses
DeepSeek-R1-Distill-Qwen-1.5B's layer sizes and the SFT numerics (fp32 params, bf16 compute,
remat) with `--layers` of its 28 layers; its temp bytes then include the layers' own working
set. On CPU, XLA computes bf16 elementwise ops in fp32, which inflates that part.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from recllm_jax import sharding
from recllm_jax.models import Qwen2Config, Qwen2ForCausalLM
from recllm_jax.models.config import deepseek_r1_distill_qwen_1_5b
from recllm_jax.train.sft import sft_loss_fn

VOCAB = 151_936  # Qwen2 / DeepSeek-R1-Distill-Qwen


def small_model_config(hidden: int = 64, layers: int = 1, dtype: str = "float32",
                       vocab: int = VOCAB) -> Qwen2Config:
  """Every size small but the vocabulary (untied head, as in DeepSeek-R1-Distill-Qwen-1.5B)."""
  return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=False, dtype=dtype)


def sft_grad_temp_bytes(cfg: Qwen2Config, batch: int, length: int, chunk_size: int) -> int:
  """Compiled temp bytes of value_and_grad(SFT mean loss) w.r.t. the parameters."""
  abstract = sharding.abstract_module(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract, nnx.Param)

  def loss(p, b):
    total, count, _ = sft_loss_fn(nnx.merge(graphdef, p), b, jax.random.key(0),
                                  logits_chunk_size=chunk_size)
    return total / jnp.maximum(count, 1.0)

  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  inputs = {"input_ids": tokens, "attention_mask": tokens, "targets": tokens,
            "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, inputs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--layers", type=int, default=1)
  parser.add_argument("--chunks", default="0,512,256,128,64")
  parser.add_argument("--dtype", default="float32", help="compute dtype (logits stay fp32)")
  parser.add_argument("--paper-width", action="store_true",
                      help="1.5B layer sizes, fp32 params, bf16 compute, remat")
  args = parser.parse_args()

  if args.paper_width:
    cfg = deepseek_r1_distill_qwen_1_5b(param_dtype="float32", dtype="bfloat16", remat=True,
                                        num_hidden_layers=args.layers)
  else:
    cfg = small_model_config(args.hidden, args.layers, args.dtype)
  logits_bytes = args.batch * args.length * cfg.vocab_size * 4
  gb = 1e9
  print(f"device: {jax.devices()[0].device_kind}; vocab {cfg.vocab_size}, hidden "
        f"{cfg.hidden_size}, {cfg.num_hidden_layers} layer(s), {cfg.dtype} compute, batch "
        f"{args.batch} x {args.length}")
  print(f"one [B, T, V] fp32 array: {logits_bytes / gb:.3f} GB")
  for chunk in (int(c) for c in args.chunks.split(",")):
    temp = sft_grad_temp_bytes(cfg, args.batch, args.length, chunk)
    name = "full logits" if chunk == 0 else f"chunk {chunk:4d}"
    print(f"{name:12s} temp {temp / gb:7.3f} GB  = {temp / logits_bytes:5.2f} x [B, T, V]")


if __name__ == "__main__":
  main()
