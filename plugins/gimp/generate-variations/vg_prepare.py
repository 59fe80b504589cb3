"""Geometry of Generate Variations: which pixels go up, and where the results land.

Pure Python (standard library only, no GIMP): the plug-in asks this module for a
:class:`Plan` and then performs it with GIMP calls, so every number can be unit-tested
without GIMP.

Coordinates: *image* coordinates are GIMP's canvas coordinates; *layer* coordinates are
relative to the source layer's top-left corner (image coordinates minus the layer offsets).

Square modes (the gateway only takes square images):

``selection-or-center-crop``
    The largest square centred in the source region (the region itself when it is square).
``pad``
    The region centred on a transparent square whose side is the region's longer side.
``stretch``
    The region scaled, ignoring its aspect ratio, to a square.

Uploads are never larger than the requested size (``256``/``512``/``1024``), and never
upscaled: a region smaller than the requested size goes up at its own size.

Placement of a result (``r x r`` pixels as the gateway returned it):

* ``scale_to_source`` on: the result is scaled back over the pixels it was made from
  (the crop square; the region for ``pad``, whose padding is cut off again; the region for
  ``stretch``, un-stretched), so the variation covers exactly that part of the image.
* ``scale_to_source`` off: the result keeps its size and is centred on the region.
"""

from __future__ import annotations

from dataclasses import dataclass

SQUARE_MODES = ("selection-or-center-crop", "pad", "stretch")
SIZES = ("256x256", "512x512", "1024x1024")
DEFAULT_SQUARE_MODE = "selection-or-center-crop"


class PrepareError(ValueError):
    """A source that cannot be used; the message is a sentence for the user."""


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    w: int
    h: int

    @property
    def x2(self) -> int:
        return self.x + self.w

    @property
    def y2(self) -> int:
        return self.y + self.h

    def moved(self, dx: int, dy: int) -> Rect:
        return Rect(self.x + dx, self.y + dy, self.w, self.h)


@dataclass(frozen=True)
class Plan:
    """What to upload and how to map results back.

    ``region``: the source region in image coordinates (selection bounds clipped to the
    layer, or the whole layer). ``copy``: the part of the layer copied, in layer
    coordinates. ``canvas``: the side of the square the copy is put on before scaling, and
    ``paste_x``/``paste_y`` where the copy's top-left goes on it (non-zero for ``pad``);
    ``stretch`` instead scales the copy straight to the upload size (see
    :func:`upload_steps`). ``upload``: the side of the PNG sent to the gateway. ``cover``:
    the image-coordinate square (or, for ``stretch``, the region) the uploaded pixels stand
    for.
    """

    mode: str
    size: int
    region: Rect
    copy: Rect
    canvas: int
    paste_x: int
    paste_y: int
    upload: int
    cover: Rect


@dataclass(frozen=True)
class Placement:
    """How one result layer is fitted: scale to ``scale_w`` x ``scale_h``, then (when
    ``crop`` is set) cut the layer to ``crop`` (in the scaled layer's coordinates), then
    move its top-left to ``x``, ``y`` (image coordinates)."""

    scale_w: int
    scale_h: int
    crop: Rect | None
    x: int
    y: int

    @property
    def width(self) -> int:
        return self.crop.w if self.crop else self.scale_w

    @property
    def height(self) -> int:
        return self.crop.h if self.crop else self.scale_h


def parse_size(size: str) -> int:
    """``"512x512"`` -> ``512``; only the gateway's three sizes are accepted."""
    if size not in SIZES:
        raise PrepareError(
            f"Size {size!r} is not one the gateway makes; choose one of {', '.join(SIZES)}."
        )
    return int(size.split("x", 1)[0])


def source_region(
    layer_x: int,
    layer_y: int,
    layer_w: int,
    layer_h: int,
    selection: tuple[int, int, int, int] | None,
) -> Rect:
    """The source region in image coordinates.

    ``selection`` is the selection's bounds ``(x1, y1, x2, y2)`` in image coordinates, or
    ``None`` when nothing is selected; the region is its intersection with the layer.
    """
    if layer_w <= 0 or layer_h <= 0:
        raise PrepareError("The active layer is empty (0 pixels wide or high).")
    layer = Rect(layer_x, layer_y, layer_w, layer_h)
    if selection is None:
        return layer
    x1, y1, x2, y2 = selection
    ix1, iy1 = max(x1, layer.x), max(y1, layer.y)
    ix2, iy2 = min(x2, layer.x2), min(y2, layer.y2)
    if ix2 <= ix1 or iy2 <= iy1:
        raise PrepareError(
            "The selection does not overlap the active layer: select part of the layer, "
            "or choose Select > None to use the whole layer."
        )
    return Rect(ix1, iy1, ix2 - ix1, iy2 - iy1)


def make_plan(
    layer_x: int,
    layer_y: int,
    layer_w: int,
    layer_h: int,
    selection: tuple[int, int, int, int] | None,
    mode: str,
    size: str,
) -> Plan:
    """Everything the plug-in needs to prepare the upload (see the module docstring)."""
    if mode not in SQUARE_MODES:
        raise PrepareError(
            f"Unknown square mode {mode!r}; choose one of {', '.join(SQUARE_MODES)}."
        )
    side = parse_size(size)
    region = source_region(layer_x, layer_y, layer_w, layer_h, selection)
    if mode == "selection-or-center-crop":
        c = min(region.w, region.h)
        cover = Rect(region.x + (region.w - c) // 2, region.y + (region.h - c) // 2, c, c)
        copy = cover.moved(-layer_x, -layer_y)
        canvas, paste_x, paste_y = c, 0, 0
    elif mode == "pad":
        c = max(region.w, region.h)
        paste_x, paste_y = (c - region.w) // 2, (c - region.h) // 2
        cover = Rect(region.x - paste_x, region.y - paste_y, c, c)
        copy = region.moved(-layer_x, -layer_y)
        canvas = c
    else:  # stretch
        c = max(region.w, region.h)
        cover = region
        copy = region.moved(-layer_x, -layer_y)
        canvas, paste_x, paste_y = c, 0, 0
    return Plan(
        mode=mode,
        size=side,
        region=region,
        copy=copy,
        canvas=canvas,
        paste_x=paste_x,
        paste_y=paste_y,
        upload=min(canvas, side),
        cover=cover,
    )


@dataclass(frozen=True)
class UploadSteps:
    """How the plug-in builds an upload of ``side`` x ``side`` pixels from ``plan``: a
    scratch image of ``scratch`` x ``scratch``; the copied part of the layer, first scaled
    to ``layer_scale`` (``(w, h)``, or ``None``), placed at ``paste_x``, ``paste_y``; then the
    whole scratch image scaled to ``image_scale`` x ``image_scale`` (or ``None``)."""

    scratch: int
    layer_scale: tuple[int, int] | None
    paste_x: int
    paste_y: int
    image_scale: int | None


def upload_steps(plan: Plan, side: int) -> UploadSteps:
    """The GIMP steps for an upload of ``side`` pixels (``plan.upload``, or less after a PNG
    came out too big). Stretch scales the copy straight to ``side`` x ``side`` in one step:
    never to ``canvas`` x ``canvas`` first, which for a long thin layer (16000 x 300) would
    be a 16000 x 16000 layer to scale down again."""
    if plan.mode == "stretch":
        return UploadSteps(side, (side, side), 0, 0, None)
    return UploadSteps(plan.canvas, None, plan.paste_x, plan.paste_y,
                       side if side != plan.canvas else None)


def smaller_upload(side: int) -> int:
    """The next side to try when a PNG came out at 4 MB or more (noise compresses badly)."""
    return max(1, (side * 7) // 10)


def place(plan: Plan, result_w: int, result_h: int, scale_to_source: bool) -> Placement:
    """Where a ``result_w`` x ``result_h`` result of ``plan`` goes in the image."""
    if result_w <= 0 or result_h <= 0:
        raise PrepareError("The gateway returned an empty image.")
    region = plan.region
    if not scale_to_source:
        cx = region.x + region.w // 2
        cy = region.y + region.h // 2
        return Placement(result_w, result_h, None, cx - result_w // 2, cy - result_h // 2)
    if plan.mode == "pad":
        # Back to the padded square's size, then cut the padding off again.
        crop = Rect(plan.paste_x, plan.paste_y, region.w, region.h)
        return Placement(plan.canvas, plan.canvas, crop, region.x, region.y)
    cover = plan.cover
    return Placement(cover.w, cover.h, None, cover.x, cover.y)
