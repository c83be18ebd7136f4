"""Stage 3: CLIP features with open_clip (`FrameTextEncoder`): per-frame image features, pooled and per-token
text features.

`--clip-model` is an open_clip model name (`ViT-B-32`) or a path to an open_clip
model config JSON (tests use a tiny one); `--clip-pretrained` is a pretrained
tag (`openai`), a local checkpoint file, or `none` for random weights (testing
only). Every feature is L2-normalised. `spec()` fingerprints the encoder so an
index is never searched with features from a different one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from ..devices import resolve_device
from .discover import hash_file
from ..errors import UsageError, WeightsError, random_weights_warning

log = logging.getLogger("prvr")


def weights_digest(path: Path) -> str:
    """Identity of a (possibly multi-GB) weights file: its size plus a hash of its first and last MiB."""
    return hash_file(path, hashlib.blake2b(str(path.stat().st_size).encode(), digest_size=8), sample=1 << 20)


def describe(model_name: str, pretrained: str) -> tuple[dict, dict]:
    """(identity, source) of an encoder without loading it.

    identity is what the features depend on (model config and weights); source
    says where to load it from again (absolute paths for local files, None weights
    for random initialisation).
    """
    import open_clip

    identity = {"clip_model": model_name, "clip_pretrained": pretrained}
    source = {"clip_model": model_name, "clip_pretrained": pretrained}
    if model_name.endswith(".json"):
        config_path = Path(model_name).expanduser()
        if not config_path.is_file():
            raise UsageError(f"--clip-model {model_name}: config file not found")
        identity["clip_model"] = config_path.stem
        identity["clip_config_sha"] = hashlib.sha1(config_path.read_bytes()).hexdigest()[:16]
        source["clip_model"] = str(config_path.resolve())
    elif model_name not in open_clip.list_models():
        raise UsageError(f"--clip-model {model_name!r} is not an open_clip model; "
                         "see `python -c 'import open_clip; print(open_clip.list_models())'` or pass a config .json")
    if pretrained.lower() == "none":
        identity["clip_pretrained"], source["clip_pretrained"] = "none", None
    elif Path(pretrained).expanduser().is_file():
        weights = Path(pretrained).expanduser().resolve()
        identity["clip_pretrained"] = weights.name
        identity["clip_weights_digest"] = weights_digest(weights)
        source["clip_pretrained"] = str(weights)
    elif model_name.endswith(".json") or pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
        tags = [] if model_name.endswith(".json") else open_clip.list_pretrained_tags_by_model(model_name)
        raise UsageError(f"--clip-pretrained {pretrained!r} is neither a pretrained tag of {identity['clip_model']} "
                         f"({', '.join(tags) or 'none known'}) nor an existing checkpoint file")
    return identity, source


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers, so a machine with no network fails fast instead of retrying."""
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _with_hub_offline(offline: bool, fn):
    """Run fn with the hub client in offline mode (cached weights only) when asked."""
    if not offline:
        return fn()
    import huggingface_hub.constants as hub

    previous = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        return fn()
    finally:
        hub.HF_HUB_OFFLINE = previous


def fingerprint(identity: dict) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class FrameTextEncoder:
    """A frozen open_clip model: images -> [N, D] and text -> [N, D] or per-token [L, D]."""

    def __init__(self, model, tokenizer, model_name: str, pretrained: str, device: str, identity: dict,
                 source: dict):
        import open_clip

        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.model_name, self.pretrained = model_name, pretrained
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = np.asarray(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=np.float32)
        self.std = np.asarray(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=np.float32)
        self.dtype = next(model.parameters()).dtype
        self.dim = int(self.encode_text(["a"]).shape[-1])
        self.identity = identity  # what the features depend on (fingerprinted)
        self.source = source      # where to load it from again (absolute paths for local files)

    @classmethod
    def load(cls, model_name: str, pretrained: str = "openai", device: str = "auto", cache_dir: str | None = None):
        """Create the open_clip model; `pretrained` of `none` means random weights (a warning)."""
        import open_clip
        import torch

        device = resolve_device(device)
        identity, source = describe(model_name, pretrained)
        name, weights = identity["clip_model"], source["clip_pretrained"]
        if model_name.endswith(".json"):
            open_clip.add_model_config(Path(source["clip_model"]))
        if weights is None:
            warnings.warn(random_weights_warning(name), stacklevel=2)
        precision = "fp16" if device.startswith("cuda") else "fp32"
        try:
            # random weights are seeded, so ingest and search in different processes agree
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                warnings.simplefilter("ignore")
                for name_ in ("", "huggingface_hub", "open_clip"):
                    logging.getLogger(name_).setLevel(logging.CRITICAL)
                offline = weights is not None and not Path(weights).is_file() and not _hub_reachable()
                model = _with_hub_offline(offline, lambda: open_clip.create_model(name, pretrained=weights, device=device, precision=precision,
                                               cache_dir=cache_dir))
        except RuntimeError as e:
            if weights is not None and not Path(weights).is_file():
                raise WeightsError(
                    f"CLIP weights {name}/{pretrained} are not cached and could not be downloaded (no network?); "
                    "run once with network access, or pass a local checkpoint: "
                    "--clip-pretrained /path/to/open_clip_model.bin") from e
            raise WeightsError(f"cannot load CLIP checkpoint {pretrained}: {str(e).splitlines()[0][:160]}") from e
        model.eval()
        return cls(model, open_clip.get_tokenizer(name), model_name, pretrained, device, identity, source)

    def spec(self) -> dict:
        """What produced the features, its fingerprint, the feature dim, and where to reload it from."""
        return {**self.identity, "fingerprint": fingerprint(self.identity), "dim": self.dim,
                "image_size": self.image_size, "source": self.source}

    def encode_images(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] frames (S = image_size) -> L2-normalised float16 [N, D]."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(frames).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
            mean = torch.as_tensor(self.mean, device=self.device).view(1, 3, 1, 1)
            std = torch.as_tensor(self.std, device=self.device).view(1, 3, 1, 1)
            x = ((x - mean) / std).to(self.dtype)
            feats = self.model.encode_image(x).float()
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats.half().cpu().numpy()

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Pooled, L2-normalised float32 text features [N, D]."""
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            feats = self.model.encode_text(tokens).float()
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    def cut_tokens(self, text: str) -> int:
        """How many of `text`'s tokens fall beyond the text encoder's context (and are ignored); 0 if it fits."""
        encode = getattr(self.tokenizer, "encode", None)
        context = int(getattr(self.tokenizer, "context_length", 77) or 77)
        if encode is None:
            return 0
        return max(0, len(encode(text)) + 2 - context)  # + the start and end tokens

    def encode_text_tokens(self, texts: list[str]) -> list[np.ndarray]:
        """Per-token text features: for each text, float32 [L, D] over its real tokens (start to end token)."""
        import torch

        tower = self.model if hasattr(self.model, "token_embedding") else getattr(self.model, "text", None)
        if tower is None or not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None:
            raise UsageError(f"CLIP model {self.model_name} has no per-token text output prvr can read; "
                             "use a standard CLIP model (ViT-B-32, ViT-L-14, ...)")
        with torch.inference_mode():
            ids = self.tokenizer(texts).to(self.device)
            cast = tower.transformer.get_cast_dtype() if hasattr(tower.transformer, "get_cast_dtype") else self.dtype
            x = tower.token_embedding(ids).to(cast) + tower.positional_embedding.to(cast)
            x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
            proj = tower.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
            x = torch.nn.functional.normalize(x.float(), dim=-1)
            # real tokens run from the start token through the end token (the largest id for CLIP's tokenizer)
            lengths = (ids.argmax(dim=-1) + 1).tolist()
        return [x[i, :n].cpu().numpy() for i, n in enumerate(lengths)]
