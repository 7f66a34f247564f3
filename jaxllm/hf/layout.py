"""Where each jaxllm parameter lives in a Hugging Face checkpoint, as data: one :class:`Source` per
parameter, and the two pure maps between a block of a stored tensor and a block of the parameter.

Layouts (per layer ``i``; ours stack layers on a leading ``layers`` axis, theirs name each layer):

- GPT-2 stores ``Conv1D`` weights as ``[in, out]`` (ours too) with q, k, v fused along ``out``:
  ``c_attn [D, 3D]`` holds ``q/k/v kernel [D, N, H]`` side by side (``part`` 0, 1, 2 of 3);
  ``c_proj [D, D]`` is ``o kernel [N, H, D]`` with its first two axes flattened.
- LLaMA stores ``nn.Linear`` weights as ``[out, in]``: transposed, then the head axes unflattened.
  Its rotary embedding already uses the half-split layout of :func:`jaxllm.model.transformer.rope`, so q and k
  need no permutation.
- Mixtral is LLaMA with every MLP a mixture of experts (:mod:`jaxllm.model.moe`): the router
  ``block_sparse_moe.gate [E, D]`` is ours ``[D, E]`` transposed; expert ``j``'s ``w1``, ``w3``, ``w2``
  (``[F, D]``, ``[F, D]``, ``[D, F]``) are row ``j`` of our stacked ``gate``, ``up``, ``down`` kernels
  ``[E, D, F]`` / ``[E, F, D]``, transposed: one stored tensor per layer and expert.

A block is given by one slice per parameter axis (``jax.make_array_from_callback``'s index). The
stored block read for it is the bounding box of those rows and columns, never more than one tensor;
axes that are unflattened from one stored axis (heads x head size) are read whole below the first.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from jaxllm.core.config import ModelConfig


@dataclass(frozen=True)
class Source:
    """A parameter (without its ``layers`` axis) as a Hugging Face tensor.

    ``name``: the tensor, ``{i}`` standing for the layer of a stacked parameter. ``groups``: for each
    stored axis in the parameter's order (after ``transpose``), the parameter axes it flattens.
    ``part``: (which, of how many) equal pieces of the stored tensor's last axis hold this parameter.
    ``experts``: the parameter's leading axis is the experts, each a tensor of its own (``{j}``).
    """

    name: str
    groups: tuple[tuple[int, ...], ...]
    transpose: bool = False
    part: tuple[int, int] = (0, 1)
    experts: bool = False

    def tensor(self, layer: int | None = None, expert: int | None = None) -> str:
        return self.name.format(i=layer, j=expert)

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole stored tensor's shape, for a parameter of ``shape`` (without ``layers``)."""
        dims = [math.prod(shape[a] for a in g) for g in self.groups]
        dims = dims[::-1] if self.transpose else dims
        return (*dims[:-1], dims[-1] * self.part[1])

    def stored_block(self, shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[slice, ...]:
        """The stored tensor's slices that hold the parameter's block ``index`` (bounding box)."""
        ranges = []
        for g in self.groups:
            start, stop, _ = index[g[0]].indices(shape[g[0]])
            inner = math.prod(shape[a] for a in g[1:])
            ranges.append((start * inner, stop * inner))
        ranges = ranges[::-1] if self.transpose else ranges
        last = self.groups[0] if self.transpose else self.groups[-1]  # the group stored on the last axis
        shift = self.part[0] * math.prod(shape[a] for a in last)
        *head, (lo, hi) = ranges
        return (*(slice(a, b) for a, b in head), slice(lo + shift, hi + shift))

    def to_param(self, stored, shape: tuple[int, ...], index: tuple[slice, ...]):
        """The parameter's block ``index`` from the stored block :meth:`stored_block` names."""
        block = stored.T if self.transpose else stored
        dims, inner = [], []
        for g in self.groups:
            start, stop, _ = index[g[0]].indices(shape[g[0]])
            dims += [stop - start, *(shape[a] for a in g[1:])]
            inner += [slice(None), *(index[a] for a in g[1:])]
        return block.reshape(dims)[tuple(inner)]

    def to_stored(self, value, shape: tuple[int, ...]):
        """The stored piece (this parameter's ``part``) of a whole parameter ``value`` of ``shape``."""
        flat = value.reshape([math.prod(shape[a] for a in g) for g in self.groups])
        return flat.T if self.transpose else flat


def _gpt2() -> dict[str, Source]:
    h = "transformer.h.{i}."
    qkv = {
        f"['blocks']['attn']['{n}']['kernel']": Source(h + "attn.c_attn.weight", ((0,), (1, 2)), part=(j, 3))
        for j, n in enumerate("qkv")
    }
    qkv_b = {
        f"['blocks']['attn']['{n}']['bias']": Source(h + "attn.c_attn.bias", ((0, 1),), part=(j, 3))
        for j, n in enumerate("qkv")
    }
    one = ((0,),)
    table = {
        "['wte']['embedding']": Source("transformer.wte.weight", ((0,), (1,))),
        "['wpe']['embedding']": Source("transformer.wpe.weight", ((0,), (1,))),
        **qkv,
        **qkv_b,
        "['blocks']['attn']['o']['kernel']": Source(h + "attn.c_proj.weight", ((0, 1), (2,))),
        "['blocks']['attn']['o']['bias']": Source(h + "attn.c_proj.bias", one),
        "['blocks']['mlp']['up']['kernel']": Source(h + "mlp.c_fc.weight", ((0,), (1,))),
        "['blocks']['mlp']['up']['bias']": Source(h + "mlp.c_fc.bias", one),
        "['blocks']['mlp']['down']['kernel']": Source(h + "mlp.c_proj.weight", ((0,), (1,))),
        "['blocks']['mlp']['down']['bias']": Source(h + "mlp.c_proj.bias", one),
        "['norm_f']['scale']": Source("transformer.ln_f.weight", one),
        "['norm_f']['bias']": Source("transformer.ln_f.bias", one),
    }
    for k in "12":
        table[f"['blocks']['norm{k}']['scale']"] = Source(h + f"ln_{k}.weight", one)
        table[f"['blocks']['norm{k}']['bias']"] = Source(h + f"ln_{k}.bias", one)
    return table


def _llama() -> dict[str, Source]:
    h = "model.layers.{i}."
    one = ((0,),)
    table = {
        "['wte']['embedding']": Source("model.embed_tokens.weight", ((0,), (1,))),
        **{
            f"['blocks']['attn']['{n}']['kernel']": Source(h + f"self_attn.{n}_proj.weight", ((0,), (1, 2)), True)
            for n in "qkv"
        },
        "['blocks']['attn']['o']['kernel']": Source(h + "self_attn.o_proj.weight", ((0, 1), (2,)), True),
        **{
            f"['blocks']['mlp']['{n}']['kernel']": Source(h + f"mlp.{n}_proj.weight", ((0,), (1,)), True)
            for n in ("gate", "up", "down")
        },
        "['blocks']['norm1']['scale']": Source(h + "input_layernorm.weight", one),
        "['blocks']['norm2']['scale']": Source(h + "post_attention_layernorm.weight", one),
        "['norm_f']['scale']": Source("model.norm.weight", one),
    }
    return table


def _mixtral() -> dict[str, Source]:
    table = {k: v for k, v in _llama().items() if "['mlp']" not in k}
    h = "model.layers.{i}.block_sparse_moe."
    table["['blocks']['mlp']['router']['kernel']"] = Source(h + "gate.weight", ((0,), (1,)), True)
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        table[f"['blocks']['mlp']['{ours}']['kernel']"] = Source(
            h + "experts.{j}." + theirs + ".weight", ((0,), (1,)), True, experts=True
        )
    return table


def sources(m: ModelConfig) -> dict[str, Source]:
    """Each parameter's source, keyed by ``jax.tree_util.keystr`` of its path in the params tree."""
    table = _gpt2() if m.arch == "gpt2" else _mixtral() if m.moe.n_experts else _llama()
    if not m.tie_embeddings:
        table["['lm_head']['kernel']"] = Source("lm_head.weight", ((0,), (1,)), True)
    return table


def is_stacked(key: str) -> bool:
    return key.startswith("['blocks']")


def leading(key: str, src: Source) -> int:
    """How many leading axes of the parameter enumerate stored tensors: layers, then experts."""
    return (1 + src.experts) if is_stacked(key) else 0


def pieces(key: str, src: Source, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], str]]:
    """``(index, tensor name)`` of each stored tensor the parameter of ``shape`` is made of: one per
    layer (and expert) of a stacked parameter, index ``()`` for the parameter whole."""
    lead = leading(key, src)
    return [(idx, src.tensor(*idx)) for idx in itertools.product(*(range(n) for n in shape[:lead]))]


def fuse(pieces: list[np.ndarray]) -> np.ndarray:
    """A stored tensor from its parts in order (GPT-2's q, k, v side by side on the last axis)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=-1)
