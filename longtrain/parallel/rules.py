"""The rules of sequence parallelism, in one place and without torch: recipe validation, the
planner, the training runtime and evaluation all ask here, so they cannot drift apart.

  SP_IMPLS / SP_IMPL_CHOICES   the attention implementations (and 'auto')
  SP_LAYOUTS                   how a sequence is dealt out to the ranks (parallel/sharding.py)
  resolve_sp_impl              what 'auto' means for a model's heads
  sequence_multiple            what a sequence length must be divisible by
  default_ulysses_degree       the Ulysses group size 'hybrid' uses when none is given
  ulysses_heads_ok             whether Ulysses can split the heads over a degree
  ulysses_split_degree         the ranks one attention call's heads are split over
  check_dp_replicate / choose_dp_replicate   hybrid sharding (parallel.dp_replicate)
"""

from __future__ import annotations

from typing import Callable

from longtrain.errors import ConfigError

SP_IMPLS = ("ring", "tokenring", "ulysses", "hybrid", "hybrid-tokenring")
SP_IMPL_CHOICES = ("auto",) + SP_IMPLS
SP_LAYOUTS = ("zigzag", "contiguous")


def resolve_sp_impl(impl: str, n_heads: int, n_kv_heads: int) -> str:
    """'auto': TokenRing for multi-head attention (Q and K,V weigh the same on the wire, and TokenRing
    uses both link directions), ring for GQA/MQA (K,V are smaller than Q, so moving K,V is cheaper).
    Measured: docs/sequence-parallel.md (TokenRing 0.41x ring for MHA, 1.6x for GQA 8/2 on a
    rate-limited mesh). Any other name is returned as given."""
    if impl != "auto":
        return impl
    return "tokenring" if n_kv_heads == n_heads else "ring"


def sequence_multiple(sp: int, layout: str) -> int:
    """Tokens per sequence must be a multiple of this: 2*sp chunks for zigzag, sp for contiguous."""
    if layout not in SP_LAYOUTS:
        raise ConfigError(f"sequence-parallel layout must be one of {', '.join(SP_LAYOUTS)}, got {layout!r}")
    if sp <= 1:
        return 1
    return 2 * sp if layout == "zigzag" else sp


def check_sequence_length(seq_len: int, sp: int, layout: str, what: str = "data.seq_len") -> None:
    """ConfigError naming the length and the rule when `seq_len` cannot be split over sp ranks."""
    m = sequence_multiple(sp, layout)
    if seq_len % m:
        raise ConfigError(f"{what} {seq_len} must be divisible by {m} ({'2*' if layout == 'zigzag' else ''}sp "
                          f"for sp = {sp} in the {layout} layout)")


def ulysses_heads_ok(degree: int, n_heads: int, n_kv_heads: int) -> bool:
    """Ulysses over `degree` ranks: query heads divide evenly; K/V heads divide evenly, or each K/V
    head goes whole to degree/n_kv_heads ranks."""
    return n_heads % degree == 0 and (n_kv_heads % degree == 0 or degree % n_kv_heads == 0)


def default_ulysses_degree(world: int, n_heads: int, n_kv_heads: int) -> int:
    """'hybrid' without ulysses_degree: the largest PROPER divisor u of the sp degree whose head split
    works (Ulysses inside groups of u ranks, ring across world/u of them); 1 = plain ring."""
    for u in range(world - 1, 0, -1):
        if world % u == 0 and ulysses_heads_ok(u, n_heads, n_kv_heads):
            return u
    return 1


def ulysses_split_degree(sp: int, impl: str, ulysses_degree: int) -> int:
    """The ranks one attention call's heads are split over by Ulysses: sp for 'ulysses', the given
    degree for a hybrid (its automatic degree adapts to each call's heads: 1), else 1."""
    if sp > 1 and impl == "ulysses":
        return sp
    return ulysses_degree if sp > 1 and impl.startswith("hybrid") and ulysses_degree else 1


def check_dp_replicate(value: int | str, engine: str) -> None:
    """What the recipe alone can check: an integer >= 1 or "auto", and hybrid only with FSDP2
    (divisibility of the world is checked at launch, parallel/engines.py: check_replicate)."""
    if value != "auto" and (isinstance(value, str) or value < 1):
        raise ConfigError(f"'parallel.dp_replicate' must be an integer >= 1 or \"auto\", got {value!r}")
    if value != 1 and engine != "fsdp2":
        raise ConfigError(f"'parallel.dp_replicate' = {value!r} (hybrid sharding) needs parallel.dp_engine = "
                          f"\"fsdp2\", got {engine!r}")


def choose_dp_replicate(value: int | str, *, world: int, local_world: int,
                        fits: Callable[[int], bool]) -> tuple[int, str]:
    """Replica groups for FSDP2 and why. An integer is taken as is. "auto": the number of nodes
    (world // local_world) when the run spans nodes and `fits(nodes)` (the step's memory per GPU with
    the state sharded over one node's ranks fits the device), else 1 (plain FSDP2 over all ranks)."""
    if value != "auto":
        return int(value), "set in the recipe"
    nodes = world // local_world if 0 < local_world < world and world % local_world == 0 else 1
    if nodes == 1:
        return 1, "auto: one node"
    if not fits(nodes):
        return 1, f"auto: sharded over one node ({local_world} ranks) it would not fit; sharding over all {world}"
    return nodes, f"auto: {nodes} nodes, sharded within each node of {local_world} ranks"
