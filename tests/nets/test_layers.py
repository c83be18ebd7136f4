import torch

from prvr_cli.nets import layers


def test_span_means_match_direct_computation():
    x = torch.randn(2, 32, 5)
    spans = layers.span_means(x)
    assert spans.shape == (2, 528, 5)
    start, end = layers.span_index(32)
    for k in [0, 31, 32, 100, 527]:
        direct = x[:, start[k]:end[k] + 1].mean(1)
        assert torch.allclose(spans[:, k], direct, atol=1e-5)


def test_uniform_bins_average_and_repeat():
    frames = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(2, 1, 1)
    lengths = torch.tensor([10, 3])
    w = layers.uniform_bins(lengths, 5, 10)
    assert torch.allclose(w.sum(-1), torch.ones(2, 5))
    pooled = w @ frames
    assert pooled[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5, 8.5]
    assert pooled[1, :, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0]  # short video: nearest frames repeat
    assert (w[1, :, 3:] == 0).all()


def test_downsample_frames_never_upsamples():
    w, mask = layers.downsample_frames(torch.tensor([300, 7]), 128, 300)
    assert mask[0].all() and mask[1].sum() == 7
    assert torch.allclose(w[1, :7, :7], torch.eye(7))
    assert torch.allclose(w[0].sum(-1), torch.ones(128))
    assert (w[1, 7:] == 0).all()


def test_span_to_token_rows_sum_to_one():
    m = layers.span_to_token(32)
    assert m.shape == (528, 32)
    assert torch.allclose(m.sum(-1), torch.ones(528))
    assert m[527].eq(1 / 32).all()


def test_span_means_are_the_direct_means_and_differentiate_as_them():
    from prvr_cli.nets.layers import span_index, span_means

    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    start, end = span_index(7)
    direct = torch.stack([x[:, s:e + 1].mean(1) for s, e in zip(start.tolist(), end.tolist())], 1)
    assert torch.allclose(span_means(x), direct)
    g = torch.randn_like(direct)
    (grad_fast,) = torch.autograd.grad(span_means(x), x, g)
    (grad_direct,) = torch.autograd.grad(direct, x, g)
    assert torch.allclose(grad_fast, grad_direct)


def test_span_means_first_used_in_inference_mode_still_train():
    from prvr_cli.nets.layers import span_averages, span_means

    span_averages.cache_clear()
    with torch.inference_mode():
        span_means(torch.randn(2, 5, 3))       # a search fills the cache
    x = torch.randn(2, 5, 3, requires_grad=True)
    span_means(x).sum().backward()             # training reuses it
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_encode_with_key_bias_is_the_layers_own_computation():
    """Equal to the layer's training-path forward with the per-sample float mask, in eval mode too."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 16, 0.0, batch_first=True)
    x = torch.randn(3, 4, 16)
    sizes = torch.tensor([[1.0, 1, 6, 8], [5, 7, 2, 2], [6, 2, 2, 6]])
    mask = sizes.log().repeat_interleave(2, 0).unsqueeze(1).expand(-1, 4, -1)
    expected = layer(x, src_mask=mask)                                       # training path
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layers.encode_with_key_bias(layer, x, sizes.log()), expected, atol=1e-6)
        assert torch.allclose(layers.encode_with_key_bias(layer, x, torch.zeros(3, 4)), layer(x), atol=1e-5)
