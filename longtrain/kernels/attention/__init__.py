"""Block attention that returns (out, lse), with masks between arbitrary blocks.

`attention_block` is the unit every sequence-parallel scheme is built from: it
attends a block of queries to a block of keys whose global positions start at
`q_offset` / `k_offset`, so causal, sliding-window and document masks between
any two blocks of a long sequence are right. It returns the log-sum-exp of the
scores so that partial results over different key blocks merge exactly.

Mask semantics (positions are global; i = query, j = key):
  causal          j <= i
  window=N        causal: i - N < j <= i (N keys including itself);
                  non-causal: |i - j| < N (symmetric, flash-attn window_size=(N-1, N-1))
  cu_seqlens      int tensor/list [n_docs + 1] of document starts over the global
                  sequence; i and j must lie in the same document (positions at or
                  past cu_seqlens[-1] form one trailing document).
Rows with no visible key give out = 0 and lse = -inf (no NaN in forward or backward).
K/V may have fewer heads than Q (GQA); every backend but sdpa_efficient takes them without copies.

Backends (a detail, same math; `choose_backend` picks one from dispatch.BACKEND_TABLE, a pure
function of device capability, dtype, head_dim, block kind and shape), one file each:
  cpu.py        cpu: torch's flash-attention CPU op and its backward (explicit mask for partial blocks)
  cudnn.py      cudnn: torch's cuDNN attention op for full and square causal blocks on Hopper/Blackwell
  flashattn.py  flash: flash-attn 2.6-2.8 (CUDA, fp16/bf16) when the mask is expressible
                (full, top-left causal with Sq == Sk, bottom-right causal window)
  sdpa.py       sdpa_flash: torch's fused flash kernel (fp16/bf16, head_dim % 8 == 0, <= 256) for
                full and square causal blocks; sdpa_efficient: the memory-efficient kernel, any float
                dtype, full and top-left causal. Their backward takes the final (merged) out and lse.
  flex.py       flex: FlexAttention (compiled) with a block mask for every other block (documents,
                windows, causal at offsets); one compiled kernel for all block geometries
  naive.py      math: fp32 einsum with an explicit Sq x Sk mask: the reference, and for blocks with
                Sq*Sk <= MATH_MAX_PAIRS on CUDA; and naive_attention, the independent reference
`LONGTRAIN_ATTENTION_BACKEND=<name>` forces one (e.g. math, as the reference) for every block it
can compute.
"""

from .block import attention_block, block_backward, block_forward
from .dispatch import (BACKEND_TABLE, BACKENDS, CUDNN_MIN_VERSION, MATH_MAX_PAIRS, REGISTRY, Backend, Case,
                       backend_for, choose_backend)
from .flashattn import flash_api_of, flash_interface
from .flex import backward_through_lse
from .masks import NEG_INF, Bounds, as_bounds, block_mask, classify_block, tile_kinds
from .naive import math_backward, math_forward, naive_attention
from .spec import BlockSpec, check_qkv, default_scale, make_spec

__all__ = ["BACKENDS", "BACKEND_TABLE", "Backend", "BlockSpec", "Bounds", "CUDNN_MIN_VERSION", "Case",
           "MATH_MAX_PAIRS", "NEG_INF", "REGISTRY", "as_bounds", "attention_block", "backend_for",
           "backward_through_lse", "block_backward", "block_forward", "block_mask", "check_qkv", "choose_backend",
           "classify_block", "default_scale", "flash_api_of", "flash_interface", "make_spec", "math_backward",
           "math_forward", "naive_attention", "tile_kinds"]
