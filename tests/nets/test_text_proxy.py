"""The text-proxy head: director and dash on a hand case, pairs against all pairs, switches, loading."""
import math

import pytest
import torch
from torch import nn

from prvr_cli.errors import UsageError
from prvr_cli.nets.text_proxy import ProxyConfig, ProxyLayer, TextProxyHead, load_proxy_head


class FixedDecoderOutput(nn.Module):
    """Stands in for the decoder's last norm: every proxy reads p = [0, 1]."""

    def forward(self, x):
        return torch.tensor([0.0, 1.0]).expand_as(x)


def hand_head(**cfg) -> TextProxyHead:
    head = TextProxyHead(2, {"n_layers": 0, "dropout": 0.0, **cfg})
    head.final_norm = FixedDecoderOutput()
    with torch.no_grad():
        head.theta.fill_(0.4)
    return head


@pytest.mark.parametrize("heads", [1, 4])
def test_folded_attention_equals_the_attention_layer(heads):
    """Re-ranking's cheaper read (key map folded into the query, value map after averaging) gives the attention's
    own output, padding included; the layer takes it only in eval mode with fewer query rows than vectors."""
    torch.manual_seed(0)
    layer = ProxyLayer(16, heads, 16, 0.1).eval()
    with torch.no_grad():
        layer.attn.in_proj_bias.normal_()                      # biases start at zero; the folding must handle them
    x, memory = torch.randn(3, 2, 16), torch.randn(3, 5, 16)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        expected, _ = layer.attn(x, memory, memory, key_padding_mask=pad, need_weights=False)
        assert torch.allclose(layer.read_folded(x, memory, pad), expected, atol=1e-5)
        calls = []
        folded = layer.read_folded
        layer.read_folded = lambda *args: calls.append(args[0].shape) or folded(*args)
        layer(x, memory, pad)
        layer(torch.randn(3, 6, 16), memory, pad)              # more rows than vectors: the attention itself
        layer.train()
        layer(x, memory, pad)                                  # training: the attention, with its dropout
    assert calls == [x.shape]


def test_director_and_dash_hand_case():
    t = torch.tensor([[1.0, 0.0]])
    videos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # cos with t: 1 and 0, mean 0.5
    mask = torch.ones(1, 2, dtype=torch.bool)
    proxy = hand_head().proxies(t, videos, mask)[0, 0]
    d = torch.tensor([1.0, -1.0]) / math.sqrt(2)               # normalize(1 * t - 1 * p)
    assert torch.allclose(proxy, t[0] + math.exp(0.4 * 0.5) * d, atol=1e-6)
    proxy = hand_head(delta=2.0, eta=0.5).proxies(t, videos, mask)[0, 0]
    d = torch.tensor([2.0, -0.5]) / math.hypot(2.0, 0.5)
    assert torch.allclose(proxy, t[0] + math.exp(0.2) * d, atol=1e-6)
    only_first = torch.tensor([[True, False]])                  # masked vectors leave the dash's mean
    proxy = hand_head().proxies(t, videos, only_first)[0, 0]
    assert torch.allclose(proxy, t[0] + math.exp(0.4) * torch.tensor([1.0, -1.0]) / math.sqrt(2), atol=1e-6)


def test_pair_scores_equal_the_all_pairs_proxies():
    torch.manual_seed(0)
    for dash in ("theta", "linear"):
        head = TextProxyHead(8, {"dash": dash}, n_vectors=5).eval()
        t, videos = torch.randn(3, 8), torch.randn(4, 5, 8)
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[2, 3:] = False
        proxies = head.proxies(t, videos, mask)                                     # [3, 4, 8]
        cos = torch.einsum("qbd,bmd->qbm", nn.functional.normalize(proxies, dim=-1),
                           nn.functional.normalize(videos, dim=-1)).masked_fill(~mask, -2).amax(-1)
        q, b = torch.arange(3).repeat_interleave(4), torch.arange(4).repeat(3)
        assert torch.allclose(head.pair_scores(t[q], videos[b], mask[b]).view(3, 4), cos, atol=1e-5)


def test_losses_train_the_head():
    torch.manual_seed(0)
    head = TextProxyHead(8, {"dropout": 0.0})
    videos = torch.randn(4, 5, 8)
    owner = torch.tensor([0, 0, 1, 2, 3])
    t = videos[owner].mean(1) + 0.1 * torch.randn(5, 8)
    terms = head.loss(t, videos, torch.ones(4, 5, dtype=torch.bool), owner)
    assert set(terms) == {"proxy", "proxy_pos"}
    first = sum(terms.values()).item()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(20):
        loss = sum(head.loss(t, videos, torch.ones(4, 5, dtype=torch.bool), owner).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_bad_settings_and_missing_head_are_usage_errors():
    with pytest.raises(UsageError, match="dash"):
        ProxyConfig.from_dict({"dash": "cubic"}, "proxy")
    with pytest.raises(UsageError, match="fixed number"):
        TextProxyHead(8, {"dash": "linear"})
    with pytest.raises(UsageError, match="--proxy-head"):
        load_proxy_head({"config": {}}, 8)
