"""A masked autoencoder (He et al. 2022) around a timm ViT encoder, with a light decoder.

The encoder sees only the visible patches (plus its prefix tokens); the decoder restores the
full sequence with a shared mask token, adds its own position embedding and predicts the
normalised pixels of every patch; the loss counts the masked ones.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitsem.errors import UnsupportedModelError


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch * patch * 3), patches row-major as the ViT flattens."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MaskedAutoencoder(nn.Module):
    """``encoder``: a timm VisionTransformer (fixed image size, absolute position
    embedding). ``decoder_dim`` / ``decoder_depth``: the light decoder (MAE uses 512 / 8 at
    ImageNet scale; a few narrow blocks suffice for small images). ``norm_pix_loss``: the
    target is each patch's pixels normalised by the patch's own mean and standard deviation
    (MAE's default); False predicts the pixels themselves."""

    def __init__(self, encoder: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True) -> None:
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        for name in ("patch_embed", "pos_embed", "blocks", "norm"):
            if getattr(encoder, name, None) is None:
                raise UnsupportedModelError(
                    f"{type(encoder).__name__} lacks {name}; MAE pre-training needs a timm "
                    "VisionTransformer with an absolute position embedding")
        if getattr(encoder, "dynamic_img_size", False):
            raise UnsupportedModelError("MAE pre-training needs a fixed image size; create the "
                                        "encoder without dynamic_img_size")
        enc: Any = encoder
        self.encoder = encoder
        self.patch = int(enc.patch_embed.patch_size[0])
        self.num_patches = int(enc.patch_embed.num_patches)
        self.num_prefix = int(getattr(enc, "num_prefix_tokens", 1))
        self.no_embed_class = bool(getattr(enc, "no_embed_class", False))
        width = int(enc.embed_dim)
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.num_patches, decoder_dim))
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    @property
    def grid_patches(self) -> int:
        return self.num_patches

    def _prefix(self) -> torch.Tensor | None:
        enc: Any = self.encoder
        parts = [t for t in (getattr(enc, "cls_token", None), getattr(enc, "reg_token", None))
                 if t is not None]
        if not parts:
            return None
        prefix = torch.cat(parts, 1)
        if not self.no_embed_class:
            prefix = prefix + enc.pos_embed[:, : self.num_prefix]
        return prefix

    def _patch_pos(self) -> torch.Tensor:
        enc: Any = self.encoder
        return enc.pos_embed if self.no_embed_class else enc.pos_embed[:, self.num_prefix:]

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output (B, P + V, D) for the visible patches (all when ``mask`` is None;
        every row must mask the same number). P prefix tokens first."""
        enc: Any = self.encoder
        x = enc.patch_embed(images) + self._patch_pos()
        if mask is not None:
            b, _, d = x.shape
            keep = (~mask).nonzero()[:, 1].reshape(b, -1)  # visible patches in order
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, d))
        prefix = self._prefix()
        if prefix is not None:
            x = torch.cat([prefix.expand(len(x), -1, -1), x], 1)
        x = enc.norm_pre(x) if hasattr(enc, "norm_pre") else x
        return enc.norm(enc.blocks(x))

    @torch.no_grad()
    def cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N) attention of the first prefix token (CLS) to the patch tokens in the last
        block, averaged over heads and renormalised over the patches, with every patch
        visible (a no-grad forward; AttMask's ranking). Encoders without a prefix token
        rank by the mean attention each patch receives instead."""
        enc: Any = self.encoder
        x = enc.patch_embed(images) + self._patch_pos()
        prefix = self._prefix()
        if prefix is not None:
            x = torch.cat([prefix.expand(len(x), -1, -1), x], 1)
        x = enc.norm_pre(x) if hasattr(enc, "norm_pre") else x
        *body, last = list(enc.blocks)
        for block in body:
            x = block(x)
        attn: Any = last.attn
        b, t, _ = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(b, t, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1)  # (B, H, T, T)
        rows = a[:, :, 0] if self.num_prefix > 0 else a.mean(2)
        cls = rows[..., self.num_prefix:].mean(1)
        return cls / cls.sum(1, keepdim=True).clamp_min(1e-12)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) image features for probing: the mean of the patch tokens."""
        return self.encode(images)[:, self.num_prefix:].mean(1)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, P * P * 3) reconstruction target: the patches' pixels, each patch normalised
        by its own mean and (unbiased) variance when ``norm_pix_loss`` (MAE)."""
        target = patchify(images, self.patch)
        if not self.norm_pix_loss:
            return target
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        return (target - mean) / (var + 1e-6).sqrt()

    def forward(self, images: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction loss: mean squared error against :meth:`target` over the masked
        patches, weighted by ``weights`` (B, N) when given (KAMIM)."""
        b = len(images)
        latent = self.decoder_embed(self.encode(images, mask))
        tokens = latent[:, self.num_prefix:]
        full = self.mask_token.expand(b, self.num_patches, -1).clone()
        full[~mask] = tokens.reshape(-1, tokens.shape[-1])
        y = self.decoder_blocks(torch.cat([latent[:, : self.num_prefix],
                                           full + self.decoder_pos], 1))
        pred = self.decoder_pred(self.decoder_norm(y))[:, self.num_prefix:]
        target = self.target(images)
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        w = mask.float() if weights is None else mask.float() * weights
        return (per_patch * w).sum() / w.sum()
