"""Several sequences in one batch row (packing, padding-free batches, shared-prefix masks) for PLDR-LLM's metric tensor.

PLDR-LLM's metric tensor ``A = LayerNorm(sum_s q_s^T q_s)`` summarises a whole sequence. When a row holds several
sequences, each position must get the A of *its own* sequence: the positions it shares attention with (ignoring
causality), padding excluded. Sequences in a row are told apart, in this order, by

* ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (cumulative sequence lengths over the flattened batch, as
  ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` and flash-attention varlen callers give them);
* a custom 4D attention mask (e.g. several continuations attending to one shared prefix): two positions share a
  sequence when one attends to the other; a continuation token's sequence is then the prefix plus its continuation;
* ``position_ids`` that restart (any step other than +1 between consecutive non-padding tokens starts a sequence), as
  ``DataCollatorWithFlattening`` or TRL's padding-free batches give them.

Layout. Each *group* (one per distinct sequence) needs its own A, A_LM, G_LM and every position needs ``q G_LM`` with
its group's G_LM. Rather than one [tokens, d, d] outer product per token (64x the memory of q), or a
[groups, longest sequence] padded layout (memory grows with groups x length), the tokens of each group are cut into
*chunks* of ``CHUNK`` consecutive slots, every chunk holding tokens of one group only (the last chunk of a group is
zero-filled). q is gathered once into a [chunks, heads, CHUNK, d] buffer; then

* A of every group: one batched GEMM per chunk (``x^T x``, float32) and an ``index_add`` of the chunk sums into
  [groups, heads, d, d];
* ``q G_LM``: one batched GEMM of every chunk with its group's G_LM, then scattered back to the token positions.

Memory is proportional to tokens (chunks <= tokens / CHUNK + groups), there is no per-group Python loop, and the only
host synchronisation is one read of the sizes (groups, chunks) while building the layout (two for a 4D mask, whose
distinct rows are found with ``torch.unique``). Shared-prefix groups overlap: their prefix tokens are listed once per
group that contains them for the sums, and each token is listed once (in its own group) for ``q G_LM``.

This module is imported only by ``modeling_pldr.py`` and depends on torch alone.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .metric_learner import _wide_dtype

CHUNK = 64  # slots per chunk: one chunk's x^T x and x G_LM are [64, d] x [d, d] GEMMs, batched over chunks and heads


@dataclass
class ChunkLayout:
    """A list of tokens, sorted by group, laid out in chunks of ``CHUNK`` slots that each hold tokens of one group.

    Args:
        slot: [N] slot ``chunk * CHUNK + offset`` of each listed token.
        token: [N] flat index (``row * seq_len + position``) of each listed token, or None when the list is every
            token of the batch in flat order.
        chunk_group: [chunks] group of each chunk.
    """

    slot: torch.Tensor
    token: torch.Tensor | None
    chunk_group: torch.Tensor

    @property
    def num_chunks(self) -> int:
        return self.chunk_group.shape[0]

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """values [tokens, ...] (flat token order) -> [chunks, CHUNK, ...], zero where a chunk has no token."""
        listed = values if self.token is None else values.index_select(0, self.token)
        buffer = listed.new_zeros((self.num_chunks * CHUNK,) + tuple(values.shape[1:]))
        return buffer.index_copy(0, self.slot, listed).unflatten(0, (self.num_chunks, CHUNK))

    def scatter(self, chunked: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Inverse of :meth:`gather` for a list holding every token once: [chunks, CHUNK, ...] -> [tokens, ...]."""
        listed = chunked.flatten(0, 1).index_select(0, self.slot)
        if self.token is None:
            return listed
        return listed.new_empty((num_tokens,) + tuple(listed.shape[1:])).index_copy(0, self.token, listed)


def _chunk_layout(group: torch.Tensor, counts: torch.Tensor):
    """Layout of a list of tokens sorted by ``group`` ([N]), with ``counts`` [max groups] tokens per group. Returns the
    slots, the chunks per group and, on the device, the number of chunks (read by the caller with the other sizes)."""
    chunks_per_group = (counts + CHUNK - 1) // CHUNK
    first_chunk = torch.cumsum(chunks_per_group, 0) - chunks_per_group
    first_item = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.shape[0], device=group.device) - first_item[group]
    slot = (first_chunk[group] + rank // CHUNK) * CHUNK + rank % CHUNK
    return slot, chunks_per_group, chunks_per_group.sum()


def _chunk_groups(chunks_per_group: torch.Tensor, num_chunks: int) -> torch.Tensor:
    groups = torch.arange(chunks_per_group.shape[0], device=chunks_per_group.device)
    return torch.repeat_interleave(groups, chunks_per_group, output_size=num_chunks)


@dataclass
class SequenceGroups:
    """The sequences of a batch whose rows hold several: which tokens each group's A sums and which group each token
    uses. Built once per forward by ``groups_from_cu_seq_lens``, ``groups_from_mask`` or ``groups_from_position_ids``
    and shared by every layer.

    Args:
        num_groups: number of rows of the deductive tensors A, A_LM, G_LM of this forward (one per sequence).
        token_group: [batch, seq] group of each token (the G_LM its query uses).
        members: chunk layout of the tokens summed into each group's A.
        member_weight: [chunks, CHUNK] 1 for a summed token, 0 for padding (float32); None when no listed token is
            padding (empty slots are zeros anyway).
        queries: chunk layout of every token in its own group (``members`` itself when the groups are disjoint).
        row_group: [batch] group of each row's last non-padding token: its deductive tensors go to the cache.
        mask_function: for packed rows, a transformers mask function ``(batch, head, q, kv) -> bool`` that keeps
            attention inside each sequence (None for a 4D mask, which is used as given).
        source: "cu_seq_lens", "position_ids" or "mask".
    """

    num_groups: int
    token_group: torch.Tensor
    members: ChunkLayout
    member_weight: torch.Tensor | None
    queries: ChunkLayout
    row_group: torch.Tensor
    mask_function: Callable | None
    source: str

    def metric_sum(self, q: torch.Tensor) -> torch.Tensor:
        """``sum q_s^T q_s`` over each group's tokens in float32 (float64 for float64 q): q [batch, heads, seq, d] ->
        [groups, heads, d, d]."""
        x = self.members.gather(_flat_tokens(q))  # [chunks, CHUNK, heads, d]
        x = x.to(_wide_dtype(x.dtype))  # (float32, or float64 in a float64 model)
        weighted = x if self.member_weight is None else x * self.member_weight[:, :, None, None].to(x.dtype)
        partial = torch.einsum("clhd,clhe->chde", weighted, x)
        total = partial.new_zeros((self.num_groups,) + tuple(partial.shape[1:]))
        return total.index_add(0, self.members.chunk_group, partial)

    def apply_metric(self, q: torch.Tensor, G_LM: torch.Tensor) -> torch.Tensor:
        """``q G_LM`` with each token's group's G_LM: q [batch, heads, seq, d], G_LM [groups, heads, d, d]."""
        B, H, S, d = q.shape
        x = self.queries.gather(_flat_tokens(q)).transpose(1, 2)  # [chunks, heads, CHUNK, d]
        y = torch.matmul(x, G_LM.to(x.dtype).index_select(0, self.queries.chunk_group))
        return self.queries.scatter(y.transpose(1, 2), B * S).view(B, S, H, d).transpose(1, 2)


def _flat_tokens(q: torch.Tensor) -> torch.Tensor:
    return q.transpose(1, 2).reshape(-1, q.shape[1], q.shape[3])  # [batch * seq, heads, d]


def _same_group(token_group: torch.Tensor) -> Callable:
    last = token_group.shape[1] - 1

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        # Keys past the current tokens (unfilled slots of a static cache) are masked by causality anyway.
        return token_group[batch_idx, q_idx.clamp(max=last)] == token_group[batch_idx, kv_idx.clamp(max=last)]

    return inner


def _row_group(token_group: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    B, S = token_group.shape
    if token_mask is None:
        last = torch.full((B,), S - 1, device=token_group.device)
    else:
        positions = torch.arange(S, device=token_group.device)
        last = (positions * token_mask.to(positions.dtype)).argmax(-1)
    return token_group.gather(1, last[:, None])[:, 0]


def _disjoint_groups(token_group, token_mask, boundaries, source) -> "SequenceGroups | None":
    """Groups from [batch, seq] group ids that increase along the flattened batch (one sync for the sizes). With
    ``boundaries`` (a device count of sequence starts found inside rows), returns None when there are none."""
    B, S = token_group.shape
    flat = token_group.reshape(-1)
    counts = torch.zeros(B * S, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
    slot, chunks_per_group, num_chunks = _chunk_layout(flat, counts)
    sizes = torch.stack([flat[-1] + 1, num_chunks, boundaries if boundaries is not None else num_chunks])
    num_groups, num_chunks, found = sizes.tolist()
    if boundaries is not None and found == 0:
        return None
    members = ChunkLayout(slot=slot, token=None, chunk_group=_chunk_groups(chunks_per_group, num_chunks))
    member_weight = None if token_mask is None else members.gather(token_mask.reshape(-1).float())
    return SequenceGroups(
        num_groups=num_groups, token_group=token_group,
        members=members, member_weight=member_weight, queries=members, row_group=_row_group(token_group, token_mask),
        mask_function=_same_group(token_group), source=source,
    )


def groups_from_position_ids(position_ids, token_mask, batch_size) -> "SequenceGroups | None":
    """Sequences start where the position id of a non-padding token is not the previous non-padding token's plus one;
    None (after one host sync) when no row has more than one."""
    pos = position_ids.expand(batch_size, -1)
    S = pos.shape[1]
    index = torch.arange(S, device=pos.device).expand(batch_size, S)
    if token_mask is None:
        valid = torch.ones_like(pos, dtype=torch.bool)
        previous = index - 1
    else:
        valid = token_mask.bool()
        # Index of the previous non-padding token (-1: none): padding between or before sequences is skipped, so
        # generate's position ids for left-padded rows (0 on the padding) do not count as a restart.
        latest = torch.cummax(torch.where(valid, index, -1), dim=1).values
        previous = torch.cat([torch.full_like(latest[:, :1], -1), latest[:, :-1]], dim=1)
    previous_pos = pos.gather(1, previous.clamp(min=0))
    start = valid & (previous >= 0) & (pos != previous_pos + 1)
    segment = torch.cumsum(start, 1)
    offsets = torch.cumsum(segment[:, -1] + 1, 0) - (segment[:, -1] + 1)
    return _disjoint_groups(segment + offsets[:, None], token_mask, start.sum(), "position_ids")


def groups_from_cu_seq_lens(cu_seq_lens, token_mask, batch_size, seq_len) -> "SequenceGroups | None":
    """Sequences from cumulative lengths over the flattened batch (flash-attention varlen convention); None when the
    batch holds one sequence per row."""
    cu = cu_seq_lens.to(torch.long).reshape(-1)
    if cu.shape[0] == 2 and batch_size == 1:  # one sequence
        return None
    flat = torch.arange(batch_size * seq_len, device=cu.device)
    token_group = torch.searchsorted(cu[1:], flat, right=True).clamp(max=cu.shape[0] - 2)
    return _disjoint_groups(token_group.view(batch_size, seq_len), token_mask, None, "cu_seq_lens")


def positions_from_cu_seq_lens(cu_seq_lens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """Position ids that restart at 0 at every sequence start given by cumulative lengths over the flattened batch."""
    cu = cu_seq_lens.to(torch.long).reshape(-1)
    flat = torch.arange(batch_size * seq_len, device=cu.device)
    group = torch.searchsorted(cu[1:], flat, right=True).clamp(max=cu.shape[0] - 2)
    return (flat - cu[group]).view(batch_size, seq_len)


def groups_from_mask(mask: torch.Tensor, batch_size: int, past: int = 0):
    """Groups from a 4D attention mask [batch or 1, heads or 1, seq, kv] (bool: True attends; float: 0 attends) whose
    columns ``past .. past + seq`` are the current tokens. A token is padding when it does not attend to itself; two
    tokens share a sequence when one attends to the other, and a group is a distinct set of such partners (plus
    itself). Returns the groups, or None when every row is one sequence, and the [batch, seq] padding mask (two host
    syncs)."""
    S = mask.shape[-2]
    cols = mask[:, 0, :, past: past + S]
    if cols.shape[-1] != S:
        raise ValueError(f"The 4D attention mask has {mask.shape[-1]} key positions; it must cover the {past} cached "
                         f"and {S} new tokens.")
    allowed = cols if cols.dtype == torch.bool else (cols == 0 if cols.is_floating_point() else cols != 0)
    allowed = allowed.expand(batch_size, S, S)
    valid = allowed.diagonal(dim1=-2, dim2=-1)
    # Partners that are not padding; a padding token is given every token of its row (so an ordinary padded row stays
    # one sequence: its A is not used).
    shared = (allowed | allowed.transpose(-1, -2) | ~valid[:, :, None]) & valid[:, None, :]
    rows = torch.cat([torch.arange(batch_size, device=mask.device).view(-1, 1, 1).expand(-1, S, 1),
                      shared.long()], dim=-1).view(batch_size * S, S + 1)
    unique, inverse = torch.unique(rows, dim=0, return_inverse=True)  # sorted: groups of row 0 first
    num_groups = unique.shape[0]
    if num_groups == batch_size:
        return None, valid
    token_group = inverse.view(batch_size, S)
    member_mask = unique[:, 1:].bool()
    group_row = unique[:, 0]
    # Members: (group, position) pairs sorted by group; queries: every token in its own group.
    member_counts = member_mask.sum(1)
    member_slot_counts = torch.zeros(batch_size * S, dtype=torch.long, device=mask.device)
    member_slot_counts[:num_groups] = member_counts
    query_counts = torch.zeros(batch_size * S, dtype=torch.long, device=mask.device).index_add_(
        0, inverse, torch.ones_like(inverse))
    chunks_m = (member_slot_counts + CHUNK - 1) // CHUNK
    chunks_q = (query_counts + CHUNK - 1) // CHUNK
    num_members, num_chunks_m, num_chunks_q = torch.stack([member_counts.sum(), chunks_m.sum(), chunks_q.sum()]).tolist()
    pairs = torch.nonzero_static(member_mask, size=num_members)
    member_group, member_pos = pairs[:, 0], pairs[:, 1]
    member_token = group_row[member_group] * S + member_pos
    slot, chunks_per_group, _ = _chunk_layout(member_group, member_slot_counts)
    members = ChunkLayout(slot=slot, token=member_token, chunk_group=_chunk_groups(chunks_per_group, num_chunks_m))
    order = torch.sort(inverse, stable=True).indices
    query_group = inverse[order]
    slot, chunks_per_group, _ = _chunk_layout(query_group, query_counts)
    queries = ChunkLayout(slot=slot, token=order, chunk_group=_chunk_groups(chunks_per_group, num_chunks_q))
    groups = SequenceGroups(
        num_groups=num_groups, token_group=token_group,
        members=members, member_weight=None, queries=queries, row_group=_row_group(token_group, valid),
        mask_function=None, source="mask",
    )
    return groups, valid
