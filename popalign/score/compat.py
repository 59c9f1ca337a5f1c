"""Packaging shims that let the `image-reward` package (ImageReward-v1.0) run on transformers 5.

`ImageReward/models/BLIP/med.py` (a copy of BERT from transformers 4.15) imports
`apply_chunking_to_forward`, `find_pruneable_heads_and_indices` and `prune_linear_layer` from
`transformers.modeling_utils`, and its BertModel calls `get_head_mask` / `invert_attention_mask`,
methods transformers 4 inherited from `ModuleUtilsMixin`, and `init_weights()` without the
`post_init()` that transformers 5 needs first. transformers 5 removed all of these
from those places, so importing or running ImageReward fails. The functions below implement the
documented behaviour of those helpers; `import_image_reward()` installs them only where they are
missing (an older transformers keeps its own) and then imports the package.

`import ImageReward` also imports its ReFL training module, which needs `datasets` and
`diffusers`; `clip` (clip-anytorch) is needed by its CLIPScore module.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn


def apply_chunking_to_forward(forward_fn: Callable[..., torch.Tensor], chunk_size: int, chunk_dim: int,
                              *input_tensors: torch.Tensor) -> torch.Tensor:
    """Apply `forward_fn` to `input_tensors` in slices of `chunk_size` along `chunk_dim`, concatenated.

    Equal to `forward_fn(*input_tensors)` when `forward_fn` acts independently along `chunk_dim`;
    `chunk_size == 0` means no chunking.
    """
    if not input_tensors:
        raise ValueError("apply_chunking_to_forward needs at least one input tensor")
    expected_arguments = len(inspect.signature(forward_fn).parameters)
    if expected_arguments != len(input_tensors):
        raise ValueError(f"forward_fn takes {expected_arguments} arguments, got {len(input_tensors)} tensors")
    if chunk_size <= 0:
        return forward_fn(*input_tensors)
    length = input_tensors[0].shape[chunk_dim]
    if any(tensor.shape[chunk_dim] != length for tensor in input_tensors):
        raise ValueError(f"all input tensors must have the same size along dimension {chunk_dim}")
    if length % chunk_size != 0:
        raise ValueError(f"size {length} along dimension {chunk_dim} is not a multiple of chunk_size {chunk_size}")
    chunked_inputs = [tensor.split(chunk_size, dim=chunk_dim) for tensor in input_tensors]
    outputs = [forward_fn(*chunk) for chunk in zip(*chunked_inputs)]
    return torch.cat(outputs, dim=chunk_dim)


def find_pruneable_heads_and_indices(heads: list[int], n_heads: int, head_size: int,
                                     already_pruned_heads: set[int]) -> tuple[set[int], torch.LongTensor]:
    """Heads still to prune and the flat indices (into n_heads * head_size features) to keep.

    `heads` are numbered as in the unpruned layer; heads in `already_pruned_heads` are ignored,
    and each remaining head's position shifts down by the number of pruned heads before it.
    Returns (heads to prune, LongTensor of kept feature indices in increasing order).
    """
    heads_to_prune = set(heads) - already_pruned_heads
    keep = torch.ones(n_heads, head_size)
    for head in heads_to_prune:
        shifted_head = head - sum(1 for pruned in already_pruned_heads if pruned < head)
        keep[shifted_head] = 0
    kept_indices = torch.arange(len(keep.view(-1)))[keep.view(-1).eq(1)].long()
    return heads_to_prune, kept_indices


def prune_linear_layer(layer: nn.Linear, index: torch.LongTensor, dim: int = 0) -> nn.Linear:
    """A new nn.Linear keeping only rows (`dim=0`, output features) or columns (`dim=1`) `index`."""
    index = index.to(layer.weight.device)
    weight = layer.weight.index_select(dim, index).detach().clone()
    bias = None
    if layer.bias is not None:
        bias = layer.bias.detach().clone() if dim == 1 else layer.bias[index].detach().clone()
    out_features, in_features = weight.shape
    pruned = nn.Linear(in_features, out_features, bias=bias is not None).to(layer.weight.device, layer.weight.dtype)
    with torch.no_grad():
        pruned.weight.copy_(weight)
        if bias is not None:
            pruned.bias.copy_(bias)
    return pruned


def invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """Additive cross-attention mask: 0 where the mask is 1, the dtype's minimum where it is 0.

    encoder_attention_mask: (B, S) or (B, T, S) -> (B, 1, 1, S) or (B, 1, T, S) in the model's dtype.
    """
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    elif encoder_attention_mask.dim() == 2:
        extended = encoder_attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention mask must have 2 or 3 dimensions, got shape {tuple(encoder_attention_mask.shape)}")
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def get_head_mask(self, head_mask: torch.Tensor | None, num_hidden_layers: int,
                  is_attention_chunked: bool = False) -> torch.Tensor | list[None]:
    """Per-layer head mask: [None] * layers when absent, else a (layers, B, heads, T, S)-broadcastable tensor.

    A (heads,) mask applies to every layer; a (layers, heads) mask gives one per layer.
    """
    if head_mask is None:
        return [None] * num_hidden_layers
    if head_mask.dim() == 1:
        head_mask = head_mask[None, None, :, None, None].expand(num_hidden_layers, -1, -1, -1, -1)
    elif head_mask.dim() == 2:
        head_mask = head_mask[:, None, :, None, None]
    else:
        raise ValueError(f"head mask must have 1 or 2 dimensions, got shape {tuple(head_mask.shape)}")
    head_mask = head_mask.to(dtype=self.dtype)
    if is_attention_chunked:
        head_mask = head_mask.unsqueeze(-1)
    return head_mask


def _init_weights_after_post_init(original_init_weights):
    """BERT models written for transformers 4 call `self.init_weights()` at the end of __init__;
    transformers 5 expects `post_init()` first (it records tied weights, which init_weights reads)."""

    def init_weights(self):
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
        original_init_weights(self)

    init_weights.popalign_compat = True
    return init_weights


_MODELING_UTILS_FUNCTIONS = {
    "apply_chunking_to_forward": apply_chunking_to_forward,
    "find_pruneable_heads_and_indices": find_pruneable_heads_and_indices,
    "prune_linear_layer": prune_linear_layer,
}
_BERT_METHODS = {"invert_attention_mask": invert_attention_mask, "get_head_mask": get_head_mask}


def restore_modeling_utils_names() -> list[str]:
    """Put the helpers transformers 5 removed back into transformers.modeling_utils; returns the names added."""
    import transformers.modeling_utils as modeling_utils

    added = []
    for name, function in _MODELING_UTILS_FUNCTIONS.items():
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, function)
            added.append(name)
    return added


def import_image_reward():
    """Import and return the `ImageReward` package, made runnable on the installed transformers."""
    restore_modeling_utils_names()
    import ImageReward
    from ImageReward.models.BLIP import med

    bert = med.BertPreTrainedModel
    for name, method in _BERT_METHODS.items():
        if not hasattr(bert, name):
            setattr(bert, name, method)
    # transformers 5 (the release with tied-weight mappings) needs post_init before init_weights.
    if hasattr(bert, "get_expanded_tied_weights_keys") and not getattr(bert.init_weights, "popalign_compat", False):
        bert.init_weights = _init_weights_after_post_init(bert.init_weights)
    return ImageReward
