"""Export the query side of an index (CLIP's text tower, a trained model's query branch) so search needs no torch.

Written into the index's `text/` folder at ingest and reindex time and read by `prvr_cli.query`:

    clip_text.json / .safetensors     the text transformer, tokenizer vocabulary name, encoder fingerprint
    vocab.txt.gz                      the BPE merge list of the tokenizer
    query_branch.json / .safetensors  ProtoPRVR's query branch and the builder fingerprint (trained indexes only)

Weights are stored as float32, so search maps them in place without a conversion (and matches torch's float32
path); for ViT-B-32's text side that is 253 MB per index.
Only what the numpy towers implement is exported: open_clip's standard CLIP text transformer
with its SimpleTokenizer. Any other encoder exports nothing, and search loads it with torch.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..index.meta import TEXT_FOLDER, read_text_config


def _write_atomically(folder: Path, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """`name`.safetensors then `name`.json (the json, written last, marks the pair complete)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights, meta = folder / f"{name}.safetensors", folder / f"{name}.json"
    meta.unlink(missing_ok=True)
    tmp = folder / f".{name}.tmp{os.getpid()}"
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # as any other file of the index (the writer makes it private)
        os.replace(tmp, weights)
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True))
        os.replace(tmp, meta)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def text_tower_export(encoder) -> tuple[dict, dict] | None:
    """(config, tensors) of an open_clip model's text side, or None when the numpy tower cannot run it."""
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    model, tokenizer = encoder.model, encoder.tokenizer
    blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if (blocks is None or not hasattr(model, "token_embedding") or getattr(model, "text_pool_type", None) != "argmax"
            or getattr(model, "cls_emb", None) is not None or model.attn_mask is None
            or type(tokenizer) is not SimpleTokenizer or tokenizer.reduction_fn is not None
            or tokenizer.clean_fn.__name__ != "_clean_lower" or len(tokenizer.encoder) != 49408):
        return None
    if any(type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv") or not isinstance(b.ls_1, torch.nn.Identity)
           for b in blocks):
        return None
    act = blocks[0].mlp.gelu
    activation = "quick_gelu" if isinstance(act, QuickGELU) else "gelu" if (
        isinstance(act, torch.nn.GELU) and act.approximate == "none") else None
    proj = model.text_projection
    if activation is None or isinstance(proj, torch.nn.Linear) and proj.bias is not None:
        return None
    tensors = {"token_embedding": model.token_embedding.weight, "positional_embedding": model.positional_embedding,
               "ln_final.weight": model.ln_final.weight, "ln_final.bias": model.ln_final.bias}
    if proj is not None:
        tensors["text_projection"] = proj.weight.T if isinstance(proj, torch.nn.Linear) else proj
    for i, b in enumerate(blocks):
        for name, t in {"ln_1": b.ln_1, "ln_2": b.ln_2, "c_fc": b.mlp.c_fc, "c_proj": b.mlp.c_proj,
                        "attn.out_proj": b.attn.out_proj}.items():
            tensors[f"blocks.{i}.{name}.weight"], tensors[f"blocks.{i}.{name}.bias"] = t.weight, t.bias
        tensors[f"blocks.{i}.attn.in_proj_weight"] = b.attn.in_proj_weight
        tensors[f"blocks.{i}.attn.in_proj_bias"] = b.attn.in_proj_bias
    config = {"layers": len(blocks), "heads": blocks[0].attn.num_heads, "eps": float(model.ln_final.eps),
              "activation": activation, "context_length": int(tokenizer.context_length or 77),
              "encoder": encoder.spec()["fingerprint"]}
    return config, tensors


def export_text_tower(encoder, index_root: Path) -> bool:
    """Write the encoder's text side into the index (once per encoder); False if it cannot be exported."""
    from open_clip.tokenizer import default_bpe

    folder = Path(index_root) / TEXT_FOLDER
    found = read_text_config(Path(index_root), "clip_text")
    if found and found.get("encoder") == encoder.spec()["fingerprint"]:
        return True
    exported = text_tower_export(encoder)
    if exported is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".vocab.tmp{os.getpid()}"
    try:
        shutil.copyfile(default_bpe(), tmp)
        os.replace(tmp, folder / "vocab.txt.gz")
    finally:
        tmp.unlink(missing_ok=True)
    _write_atomically(folder, "clip_text", *exported)
    return True


def export_query_branch(builder, index_root: Path) -> None:
    """Write a trained builder's query branch into the index; a zero-shot builder removes any old one."""
    folder = Path(index_root) / TEXT_FOLDER
    for stale in ("query_branch.json", "query_branch.safetensors"):
        (folder / stale).unlink(missing_ok=True)
    if builder.kind != "trained":
        return
    m = builder.model
    if m.cfg.query_encoder == "mean":
        tensors = {f"mean.{b}.{k}": getattr(m.query_mean[b], k) for b in ("clip", "frame") for k in ("weight", "bias")}
        config = {"encoder": "mean", "max_query_tokens": int(m.max_words), "builder": builder.spec()["fingerprint"]}
        _write_atomically(folder, "query_branch", config, tensors)
        return
    tensors = {"proj.norm.weight": m.query_proj[0].weight, "proj.norm.bias": m.query_proj[0].bias,
               "proj.linear.weight": m.query_proj[2].weight, "proj.linear.bias": m.query_proj[2].bias,
               "positions": m.query_pos.weight, "positions.norm.weight": m.query_pos.norm.weight,
               "positions.norm.bias": m.query_pos.norm.bias}
    enc = m.query_encoder
    for name in ("self_attn.out_proj", "linear1", "linear2", "norm1", "norm2"):
        layer = enc.get_submodule(name)
        tensors[f"encoder.{name}.weight"], tensors[f"encoder.{name}.bias"] = layer.weight, layer.bias
    tensors["encoder.self_attn.in_proj_weight"] = enc.self_attn.in_proj_weight
    tensors["encoder.self_attn.in_proj_bias"] = enc.self_attn.in_proj_bias
    for branch in ("clip", "frame"):
        tensors[f"pool.{branch}.weight"] = m.query_pool[branch].score.weight
        tensors[f"pool.{branch}.bias"] = m.query_pool[branch].score.bias
    config = {"heads": enc.self_attn.num_heads, "max_query_tokens": int(m.max_words),
              "builder": builder.spec()["fingerprint"]}
    _write_atomically(folder, "query_branch", config, tensors)

