"""Several GPTs of one shape computed as one: the members of a packed run (``lmlab.train.pack``).

Every weight of the N members is stacked into one ``[N, ...]`` tensor, and each member's own
:class:`~lmlab.model.gpt.GPT` keeps working on a view of its slice: the member's optimizer,
checkpoint, evaluation and diagnostics use that module exactly as a solo run does, and an update
through the view is an update of the stack. The forward pass goes through the members at once:

- every linear layer is one batched matmul (``baddbmm`` over the member dimension);
- attention folds the members into the batch dimension, ``[N·B, H, T, head_dim]``, so the same
  fused SDPA kernel a solo run calls serves the whole pack in one call;
- embeddings are one lookup into the members' tables laid end to end;
- norms normalise the whole stack, then scale (and shift) by each member's own weights.

Why not ``torch.func.vmap`` over ``functional_call``: vmap has no batching rule for the CPU
flash-attention kernel and falls back to a loop over members (PyTorch warns about it), and its
random draws cannot come from each member's own generator. Here each member draws its dropout
masks from its own :class:`torch.Generator`, in the order and shapes a solo run draws them from
the global one, so on CPU a member's masks are exactly its solo run's.

The maths is that of ``gpt.py``; ``tests/test_pack.py`` checks the two agree for every
architecture knob, so a knob added to one and not the other fails there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmlab.model.attention import apply_rope, causal_probs
from lmlab.model.gpt import GPT, NORM_EPS

# What a member may have of its own: these change no tensor shape and no kernel the pack runs.
# Everything else in a member's ModelConfig must be the same across the pack.
MEMBER_OWN = ("dropout", "init_std", "scaled_init")


def stack_mismatch(members: Sequence[GPT]) -> str | None:
    """Why these models cannot be stacked, or None."""
    first = members[0]
    fixed = first.cfg.model_dump(exclude=set(MEMBER_OWN))
    shapes = {n: p.shape for n, p in first.named_parameters()}
    for m in members[1:]:
        if m.cfg.model_dump(exclude=set(MEMBER_OWN)) != fixed:
            return "model configs differ in more than " + ", ".join(MEMBER_OWN)
        if {n: p.shape for n, p in m.named_parameters()} != shapes or m.vocab_size != first.vocab_size:
            return "parameter shapes differ"
    return None


class StackedGPT:
    """N member GPTs whose weights live in ``[N, ...]`` stacks (``weights``, name -> leaf tensor).

    ``hidden(idx)`` maps tokens ``[N, B, T]`` to final hidden states ``[N, B, T, d_model]``, member
    ``n`` computed with member ``n``'s weights; ``head`` is the ``[N, vocab, d_model]`` output
    projection. Gradients land in ``weights[name].grad``; :meth:`member_grads` hands each member
    its slices. ``generators`` (one per member, or None) drive dropout.
    """

    def __init__(self, members: Sequence[GPT], generators: Sequence[torch.Generator] | None = None,
                 ) -> None:
        why = stack_mismatch(members)
        if why is not None:
            raise ValueError(f"cannot stack these models: {why}")
        self.members = list(members)
        self.template = members[0]
        self.cfg = self.template.cfg
        self.n = len(members)
        self.generators = list(generators) if generators is not None else None
        self.dropout = [m.cfg.dropout for m in members]
        self.training = True
        self.weights: dict[str, nn.Parameter] = {}
        for name, first in self.template.named_parameters():
            own = [dict(m.named_parameters())[name] for m in members]
            stacked = nn.Parameter(torch.stack([p.detach() for p in own]),
                                   requires_grad=first.requires_grad)
            for i, p in enumerate(own):
                # The member's Parameter object stays (its optimizer holds it); its data becomes
                # a view of slice i of the stack, so the two are one tensor in memory.
                p.data = stacked.detach()[i]
            self.weights[name] = stacked
        self._member_params = [[m.get_parameter(name) for name in self.weights] for m in members]
        first_param = next(iter(self.weights.values()))
        self._offsets = torch.arange(self.n, device=first_param.device).view(-1, 1, 1)

    # -- the members' side ---------------------------------------------------------------------

    def parameters(self) -> list[nn.Parameter]:
        return list(self.weights.values())

    def member_grads(self) -> None:
        """Point each member parameter's ``.grad`` at its slice of the stacked gradient (a view:
        the member's optimizer, clipping and diagnostics read and scale it in place)."""
        for j, stacked in enumerate(self.weights.values()):
            for i, params in enumerate(self._member_params):
                params[j].grad = None if stacked.grad is None else stacked.grad[i]

    def zero_grad(self) -> None:
        for stacked in self.weights.values():
            stacked.grad = None

    def grad_norms(self) -> Tensor:
        """Each member's global gradient norm ``[N]`` (what ``get_total_norm`` gives a solo run:
        the 2-norm of the per-tensor 2-norms), computed on the stacks."""
        norms = [torch.linalg.vector_norm(w.grad.flatten(1), dim=1)
                 for w in self.weights.values() if w.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms), dim=0)

    # -- the forward pass ----------------------------------------------------------------------

    @property
    def head(self) -> Tensor:
        """The output projection ``[N, vocab, d_model]`` (the token embedding when tied)."""
        return self.weights["lm_head.weight" if "lm_head.weight" in self.weights
                            else "tok_emb.weight"]

    def hidden(self, idx: Tensor) -> Tensor:
        n, b, t = idx.shape
        if n != self.n:
            raise ValueError(f"a pack of {self.n} got inputs for {n} members")
        if t > self.template.max_seq_len:
            raise ValueError(f"sequence of length {t} is longer than "
                             f"max_seq_len={self.template.max_seq_len}")
        w, vocab, width = self.weights, self.template.vocab_size, self.cfg.d_model
        # The members' tables end to end: member i's token j is row i·vocab + j.
        x = F.embedding(idx + self._offsets * vocab, w["tok_emb.weight"].view(-1, width))
        if "pos_emb.weight" in w:
            x = x + w["pos_emb.weight"][:, None, :t]
        x = self._dropout(x).view(n, b * t, width)
        for i, block in enumerate(self.template.blocks):
            p = f"blocks.{i}."
            if block.pre_norm:
                x = x + self._attention(i, self._norm(x, p + "norm1"), b, t)
                x = x + self._mlp(p, self._norm(x, p + "norm2"))
            else:
                x = self._norm(x + self._attention(i, x, b, t), p + "norm1")
                x = self._norm(x + self._mlp(p, x), p + "norm2")
        if self.cfg.norm_position == "pre":
            x = self._norm(x, "norm_f")
        return x.view(n, b, t, width)

    def _linear(self, x: Tensor, name: str) -> Tensor:
        """``x`` [N, M, in] through each member's ``name`` layer -> [N, M, out]."""
        weight = self.weights[f"{name}.weight"].transpose(1, 2)
        bias = self.weights.get(f"{name}.bias")
        return torch.bmm(x, weight) if bias is None else torch.baddbmm(bias[:, None], x, weight)

    def _norm(self, x: Tensor, name: str) -> Tensor:
        shape = (self.cfg.d_model,)
        weight = self.weights[f"{name}.weight"][:, None]
        if self.cfg.norm == "rmsnorm":
            return F.rms_norm(x, shape, eps=NORM_EPS) * weight
        x = F.layer_norm(x, shape, eps=NORM_EPS)
        bias = self.weights.get(f"{name}.bias")
        return x * weight if bias is None else torch.addcmul(bias[:, None], x, weight)

    def _attention(self, i: int, x: Tensor, b: int, t: int) -> Tensor:
        attn = self.template.blocks[i].attn
        heads, head_dim = attn.n_head, attn.head_dim
        qkv = self._linear(x, f"blocks.{i}.attn.qkv")
        # [N, B·T, 3·C] -> three [N·B, H, T, head_dim]: the members fold into the batch.
        q, k, v = qkv.view(self.n * b, t, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        if attn.rotary is not None:
            cos, sin = attn.rotary(t)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self._drops():
            # Each member's attention dropout from its own generator (the fused kernel would
            # draw one mask for the whole pack from the global one).
            probs = causal_probs(q, k)
            probs = self._dropout(probs.view(self.n, b, *probs.shape[1:])).flatten(0, 1)
            y = probs.to(v.dtype) @ v
        elif attn.impl == "manual":
            y = causal_probs(q, k).to(v.dtype) @ v
        else:
            y = attn._sdpa(q, k, v)  # dropout 0 for every member here; a pinned backend applies
        y = y.transpose(1, 2).reshape(self.n, b * t, heads * head_dim)
        return self._dropout(self._linear(y, f"blocks.{i}.attn.proj"))

    def _mlp(self, p: str, x: Tensor) -> Tensor:
        if f"{p}mlp.gate.weight" in self.weights:
            h = F.silu(self._linear(x, p + "mlp.gate")) * self._linear(x, p + "mlp.fc")
        else:
            h = F.gelu(self._linear(x, p + "mlp.fc"), approximate="tanh")
        return self._dropout(self._linear(h, p + "mlp.proj"))

    def _drops(self) -> bool:
        return self.training and any(p > 0 for p in self.dropout)

    def _dropout(self, x: Tensor) -> Tensor:
        """Member i's slice of ``x`` [N, ...] dropped with member i's rate and generator, drawn
        exactly as ``F.dropout`` draws on CPU (a Bernoulli mask of the slice's shape, divided by
        the keep probability); a member at rate 0 draws nothing, as ``F.dropout`` does not."""
        if not self._drops():
            return x
        masks = []
        for i, p in enumerate(self.dropout):
            if p == 0:
                masks.append(torch.ones(x.shape[1:], dtype=x.dtype, device=x.device))
                continue
            g = self.generators[i] if self.generators is not None else None
            noise = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
            masks.append(noise.bernoulli_(1 - p, generator=g).div_(1 - p))
        return x * torch.stack(masks)

    def train(self, mode: bool = True) -> StackedGPT:
        self.training = mode
        return self
