"""Image processors the tiny models need where transformers has only a torchvision one.

transformers' ``Llama4ImageProcessor`` is torchvision-only; driftlens's tests run without
torchvision. :class:`Llama4ImageProcessorPil` is a NumPy/PIL port of its algorithm (the same
canvas choice, resize without distortion, right/bottom zero padding, tiles and global tile,
``pixel_values`` and ``aspect_ratios``), used by :func:`driftlens.testing.tiny.build` when
torchvision is missing. It saves as ``Llama4ImageProcessor`` (transformers strips the ``Pil``
suffix), so a folder it wrote loads with the real processor where torchvision is installed;
without it, :func:`driftlens.testing.tiny.load_processor` reads the folder back with this port.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict


def _factors(n: int) -> list[int]:
    return sorted({d for i in range(1, int(n ** 0.5) + 1) if n % i == 0 for d in (i, n // i)})


def supported_resolutions(max_chunks: int, tile: int) -> np.ndarray:
    """Canvas sizes [N, 2] (height, width) of at most ``max_chunks`` tiles, in Llama 4's order."""
    by_ratio: dict[float, list] = defaultdict(list)
    for chunks in range(max_chunks, 0, -1):
        for f in _factors(chunks):
            by_ratio[f / (chunks // f)].append((f, chunks // f))
    return np.array([(h * tile, w * tile) for v in by_ratio.values() for h, w in v], dtype=np.int64)


def best_fit(size: tuple[int, int], canvases: np.ndarray, to_max: bool = False) -> tuple[int, int]:
    """The canvas an image of ``size`` is resized into without distortion (Llama 4's ``get_best_fit``)."""
    h, w = size
    scales = np.minimum(canvases[:, 1] / w, canvases[:, 0] / h)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if up.size else scales[scales < 1].max()
    cands = canvases[scales == chosen]
    best = cands[np.argmin(cands[:, 0] * cands[:, 1])] if len(cands) > 1 else cands[0]
    return int(best[0]), int(best[1])


def max_size_without_distortion(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The largest (height, width) of ``size``'s aspect ratio inside ``target``."""
    (h, w), (th, tw) = size, target
    sw, sh = tw / w, th / h
    if sw < sh:
        return max(min(math.floor(h * sw), th), 1), max(tw, 1)
    return max(th, 1), max(min(math.floor(w * sh), tw), 1)


class Llama4ImageProcessorPil(PilBackend):
    """Llama 4's image processor on the PIL/NumPy backend (see the module docstring)."""

    resample = PILImageResampling.BILINEAR
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 336, "width": 336}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    max_patches = 16
    resize_to_max_canvas = False
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Tiles of one image (with the global tile when there are several)."""
        kw = self._merge_and_standardize_kwargs(**(images_kwargs or {}))
        tile = kw["size"].height
        th, tw = best_fit((height, width), supported_resolutions(kw["max_patches"], tile), kw["resize_to_max_canvas"])
        n = (th // tile) * (tw // tile)
        return n + 1 if n > 1 else 1

    def _preprocess(self, images, do_resize: bool, size: SizeDict, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, return_tensors=None,
                    max_patches: int | None = None, resize_to_max_canvas: bool | None = None, **kwargs) -> BatchFeature:
        max_patches = self.max_patches if max_patches is None else max_patches
        to_max = self.resize_to_max_canvas if resize_to_max_canvas is None else resize_to_max_canvas
        tile = size.height
        canvases = supported_resolutions(max_patches, tile)
        tiles, ratios = [], []
        for image in images:                                        # [C, H, W]
            hw = image.shape[-2:]
            target = best_fit(hw, canvases, to_max)
            limit = target if to_max else (min(max(hw[0], tile), target[0]), min(max(hw[1], tile), target[1]))
            nh, nw = max_size_without_distortion(hw, limit)
            img = self.resize(image, SizeDict(height=nh, width=nw), resample=resample)
            img = np.pad(img, ((0, 0), (0, target[0] - nh), (0, target[1] - nw)))
            img = self._scale(img, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            rh, rw = target[0] // tile, target[1] // tile
            parts = [img[:, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] for i in range(rh) for j in range(rw)]
            if rh * rw > 1:                                         # a global tile after the tiles
                glob = self.resize(image, SizeDict(height=tile, width=tile), resample=resample)
                parts.append(self._scale(glob, do_rescale, rescale_factor, do_normalize, image_mean, image_std))
            tiles += parts
            ratios.append([rh, rw])
        return BatchFeature(data={"pixel_values": np.stack(tiles), "aspect_ratios": np.array(ratios)},
                            tensor_type=return_tensors)

    def _scale(self, img, do_rescale, factor, do_normalize, mean, std):
        if do_rescale:
            img = self.rescale(img, factor)
        if do_normalize:
            img = self.normalize(img, mean, std)
        return img.astype(np.float32)
