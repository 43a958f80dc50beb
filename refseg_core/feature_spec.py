"""`FeatureSpec`: one object that says what every stored tensor is (timm's `feature_info` idea).

Built from a UNet config dict (no diffusers import needed), an image size and a token length;
the extractor captures what it lists, the cache allocates arrays from it and stores it as JSON,
and heads are built from it. Nothing downstream hard-codes a channel count.

Naming is by **stride** = image size / feature size, like timm's `reduction`:
  - `s8 s16 s32 s64`: VPD's decoder features. For each UNet decoder level, the output of its second
    layer before upsampling (LDM `output_blocks` 1, 4, 7), and the final decoder output (11).
    In diffusers terms: `up_blocks[i].attentions[1]` for cross-attention levels,
    `up_blocks[i].resnets[1]` for plain levels, and the whole `up_blocks[-1]` output.
  - `attn_s16 attn_s32` (8 and 64 optional): cross-attention (`attn2`) softmax probabilities of the
    down and up blocks at that stride, averaged over heads and over the layers; channels = tokens L.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEFAULT_STRIDES = (8, 16, 32, 64)
DEFAULT_ATTN_STRIDES = (16, 32)


@dataclass(frozen=True)
class TensorInfo:
    """One stored per-sample tensor: `(channels, size, size)` at `stride`."""

    name: str  # "s16", "attn_s32"
    kind: str  # "feature" | "attention"
    channels: int  # feature channels, or token length L for attention maps
    stride: int  # image size / spatial size
    size: int  # spatial side at the spec's image size
    modules: tuple[str, ...]  # diffusers module path(s) captured (attention: every attn2 averaged)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def nbytes(self, itemsize: int = 2) -> int:
        return self.channels * self.size * self.size * itemsize


@dataclass(frozen=True)
class FeatureSpec:
    image_size: int
    token_length: int
    text_dim: int  # text encoder hidden size (= UNet cross_attention_dim)
    latent_channels: int
    latent_stride: int  # VAE downsampling factor (8 for Stable Diffusion)
    tensors: tuple[TensorInfo, ...] = field(default_factory=tuple)

    # ---- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def features(self) -> list[TensorInfo]:
        """Feature tensors, coarsest first (s64, s32, ...), the order a top-down decoder walks them."""
        return sorted((t for t in self.tensors if t.kind == "feature"), key=lambda t: -t.stride)

    @property
    def attention(self) -> list[TensorInfo]:
        return sorted((t for t in self.tensors if t.kind == "attention"), key=lambda t: -t.stride)

    def __getitem__(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no tensor {name!r} in spec (have {', '.join(self.names)})")

    def __contains__(self, name: str) -> bool:
        return any(t.name == name for t in self.tensors)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_stride

    def bytes_per_sample(self, itemsize: int = 2) -> int:
        """Bytes of features + attention stored per sample per noise level (f16 by default)."""
        return sum(t.nbytes(itemsize) for t in self.tensors)

    def select(self, names) -> "FeatureSpec":
        """A spec restricted to `names` (e.g. the tensors a head reads)."""
        names = set(names)
        missing = names - set(self.names)
        if missing:
            raise KeyError(f"not in spec: {', '.join(sorted(missing))} (have {', '.join(self.names)})")
        return FeatureSpec(
            self.image_size, self.token_length, self.text_dim, self.latent_channels, self.latent_stride,
            tuple(t for t in self.tensors if t.name in names),
        )

    # ---- (de)serialisation: stored as the cache's `spec` attribute ----------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [dict(asdict(t), modules=list(t.modules)) for t in self.tensors]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        tensors = tuple(TensorInfo(**dict(t, modules=tuple(t["modules"]))) for t in d["tensors"])
        return cls(
            image_size=int(d["image_size"]), token_length=int(d["token_length"]), text_dim=int(d["text_dim"]),
            latent_channels=int(d["latent_channels"]), latent_stride=int(d["latent_stride"]), tensors=tensors,
        )

    # ---- construction from a backbone config ----------------------------------------------------
    @classmethod
    def from_unet_config(
        cls,
        unet_config: dict,
        image_size: int = 512,
        token_length: int = 40,
        latent_stride: int = 8,
        strides=DEFAULT_STRIDES,
        attn_strides=DEFAULT_ATTN_STRIDES,
    ) -> "FeatureSpec":
        """The spec for a diffusers `UNet2DConditionModel` config (a plain dict)."""
        boc = list(unet_config["block_out_channels"])
        n = len(boc)
        up_types = list(unet_config.get("up_block_types") or [])
        down_types = list(unet_config.get("down_block_types") or [])
        lpb = unet_config.get("layers_per_block", 2)
        lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
        tlpb = unet_config.get("transformer_layers_per_block", 1)
        tlpb = list(tlpb) if isinstance(tlpb, (list, tuple)) else [tlpb] * n
        if image_size % latent_stride:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE stride {latent_stride}")

        def down_stride(i: int) -> int:  # down block i runs at latent resolution / 2**i
            return latent_stride * 2**i

        def up_stride(i: int) -> int:  # up block i mirrors down block n-1-i
            return latent_stride * 2 ** (n - 1 - i)

        tensors: list[TensorInfo] = []
        for stride in sorted(strides):
            ups = [i for i in range(n) if up_stride(i) == stride]
            if not ups or image_size % stride:
                raise ValueError(f"feature stride {stride} does not exist for this UNet at {image_size}px "
                                 f"(available: {sorted(up_stride(i) for i in range(n))})")
            i = ups[0]
            if i == n - 1:
                module = f"up_blocks.{i}"
            elif "CrossAttn" in up_types[i]:
                module = f"up_blocks.{i}.attentions.1"
            else:
                module = f"up_blocks.{i}.resnets.1"
            channels = list(reversed(boc))[i]
            tensors.append(TensorInfo(f"s{stride}", "feature", channels, stride, image_size // stride, (module,)))

        for stride in sorted(attn_strides):
            modules = []
            for i, t in enumerate(down_types):
                if "CrossAttn" in t and down_stride(i) == stride:
                    for j in range(lpb[i]):
                        modules += [f"down_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2" for k in range(tlpb[i])]
            rev_tlpb = list(reversed(tlpb))
            rev_lpb = list(reversed(lpb))
            for i, t in enumerate(up_types):
                if "CrossAttn" in t and up_stride(i) == stride:
                    for j in range(rev_lpb[i] + 1):
                        modules += [f"up_blocks.{i}.attentions.{j}.transformer_blocks.{k}.attn2" for k in range(rev_tlpb[i])]
            if not modules or image_size % stride:
                raise ValueError(f"no cross-attention layers at stride {stride} in this UNet")
            tensors.append(TensorInfo(f"attn_s{stride}", "attention", token_length, stride, image_size // stride,
                                      tuple(modules)))

        return cls(
            image_size=image_size,
            token_length=token_length,
            text_dim=int(unet_config["cross_attention_dim"]),
            latent_channels=int(unet_config.get("in_channels", 4)),
            latent_stride=latent_stride,
            tensors=tuple(tensors),
        )
