"""The transformers-5 shims that ImageReward's BERT needs, against hand-computed values and, where
transformers still ships an equivalent, against it."""

import pytest
import torch
from torch import nn

from popalign.score import compat


def test_apply_chunking_equals_the_unchunked_call_and_transformers():
    from transformers.pytorch_utils import apply_chunking_to_forward as reference

    layer = nn.Linear(4, 3)
    hidden = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = layer(hidden)
        assert torch.allclose(compat.apply_chunking_to_forward(layer.forward, 2, 1, hidden), direct, atol=1e-6)
        assert torch.allclose(compat.apply_chunking_to_forward(layer.forward, 0, 1, hidden), direct)
        assert torch.allclose(compat.apply_chunking_to_forward(layer.forward, 3, 1, hidden), reference(layer.forward, 3, 1, hidden))
    with pytest.raises(ValueError, match="not a multiple"):
        compat.apply_chunking_to_forward(layer.forward, 4, 1, hidden)
    with pytest.raises(ValueError, match="takes 1 arguments, got 2"):
        compat.apply_chunking_to_forward(layer.forward, 2, 1, hidden, hidden)


def test_find_pruneable_heads_hand_computed():
    # 3 heads of size 2 -> features 0..5; pruning head 1 keeps features 0, 1, 4, 5
    heads, kept = compat.find_pruneable_heads_and_indices([1], n_heads=3, head_size=2, already_pruned_heads=set())
    assert heads == {1} and kept.tolist() == [0, 1, 4, 5]
    # head 0 already gone: the layer now holds heads 1, 2 (positions 0, 1); pruning head 2 keeps position 0
    heads, kept = compat.find_pruneable_heads_and_indices([0, 2], n_heads=2, head_size=2, already_pruned_heads={0})
    assert heads == {2} and kept.tolist() == [0, 1]
    assert kept.dtype == torch.long


@pytest.mark.parametrize("dim", [0, 1])
def test_prune_linear_layer_keeps_the_chosen_rows_or_columns(dim):
    from transformers.pytorch_utils import prune_linear_layer as reference

    torch.manual_seed(0)
    layer = nn.Linear(5, 4)
    index = torch.tensor([0, 2, 3])
    pruned, expected = compat.prune_linear_layer(layer, index, dim), reference(layer, index, dim)
    assert torch.equal(pruned.weight, layer.weight.index_select(dim, index))
    assert torch.equal(pruned.weight, expected.weight) and torch.equal(pruned.bias, expected.bias)


class _Float32Model(nn.Module):
    dtype = torch.float32


def test_invert_attention_mask_and_head_mask():
    mask = torch.tensor([[1, 1, 0]])
    inverted = compat.invert_attention_mask(_Float32Model(), mask)
    assert inverted.shape == (1, 1, 1, 3)
    assert inverted[0, 0, 0, :2].tolist() == [0.0, 0.0] and inverted[0, 0, 0, 2].item() == torch.finfo(torch.float32).min
    assert compat.get_head_mask(_Float32Model(), None, 3) == [None, None, None]
    per_layer = compat.get_head_mask(_Float32Model(), torch.tensor([1.0, 0.0]), 3)
    assert per_layer.shape == (3, 1, 2, 1, 1) and per_layer[2, 0, :, 0, 0].tolist() == [1.0, 0.0]


def test_image_reward_imports_and_its_bert_prunes_heads_with_the_shims():
    import transformers.modeling_utils as modeling_utils

    compat.import_image_reward()
    for name in ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer"):
        assert callable(getattr(modeling_utils, name))
    from ImageReward.models.BLIP.med import BertAttention, BertConfig, BertModel

    config = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=4, num_hidden_layers=1, vocab_size=10,
                        max_position_embeddings=8, encoder_width=8, add_cross_attention=True)
    attention = BertAttention(config)
    attention.prune_heads([1])
    assert attention.self.num_attention_heads == 1 and attention.self.query.out_features == 4
    # BertModel's __init__ runs init_weights (transformers 5 needs post_init first)
    model = BertModel(config, add_pooling_layer=False).eval()
    output = model(torch.tensor([[2, 3, 4]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                   encoder_hidden_states=torch.randn(1, 5, 8), encoder_attention_mask=torch.ones(1, 5, dtype=torch.long),
                   return_dict=True)
    assert output.last_hidden_state.shape == (1, 3, 8) and torch.isfinite(output.last_hidden_state).all()
