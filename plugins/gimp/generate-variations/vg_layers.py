"""Pixels in and out of GIMP for Generate Variations: the square PNG sent to the gateway
(geometry from ``vg_prepare``), the result layers imported in one group, and the record
(``vg_steer``) each result carries as a parasite."""

import contextlib
import os

import gi

gi.require_version("Gimp", "3.0")
import vg_client  # noqa: E402
import vg_prepare  # noqa: E402
import vg_steer  # noqa: E402
from gi.repository import Gimp, Gio  # noqa: E402
from vg_gimp import Failure, progress  # noqa: E402


def _save_png(image, path):
    ok = Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path), None)
    if not ok:
        raise Failure(f"GIMP could not write the temporary PNG {path}.")
    with open(path, "rb") as f:
        return f.read()


def prepare_upload(layer, plan, tmpdir):
    """Copy the planned part of ``layer`` into a scratch RGBA image, square it, scale it to
    ``plan.upload`` and return the PNG bytes (see ``vg_prepare.upload_steps``)."""
    side = plan.upload
    while True:
        steps = vg_prepare.upload_steps(plan, side)
        tmp = Gimp.Image.new(steps.scratch, steps.scratch, Gimp.ImageBaseType.RGB)
        try:
            # new_from_drawable converts any layer type (grey, indexed, high bit depth)
            # to the scratch image's RGB.
            copy = Gimp.Layer.new_from_drawable(layer, tmp)
            tmp.insert_layer(copy, None, 0)
            if not copy.has_alpha():
                copy.add_alpha()
            # The layer's own pixels, whatever its visibility, opacity or blend mode.
            copy.set_visible(True)
            copy.set_opacity(100.0)
            copy.set_mode(Gimp.LayerMode.NORMAL)
            c = plan.copy
            # Cut the layer to the copied rectangle, (stretch: scale it straight to the
            # upload square,) place it on the scratch square, then scale that.
            copy.resize(c.w, c.h, -c.x, -c.y)
            if steps.layer_scale is not None:
                copy.scale(steps.layer_scale[0], steps.layer_scale[1], False)
            copy.set_offsets(steps.paste_x, steps.paste_y)
            if steps.image_scale is not None:
                tmp.scale(steps.image_scale, steps.image_scale)
            tmp.merge_visible_layers(Gimp.MergeType.CLIP_TO_IMAGE)
            png = _save_png(tmp, os.path.join(tmpdir, "upload.png"))
        finally:
            tmp.delete()
        if len(png) < vg_client.MAX_UPLOAD - 64 * 1024 or side <= 64:
            return png, side
        side = vg_prepare.smaller_upload(side)


def _attach_record(item, record):
    """The settings that made ``item`` as a persistent JSON parasite (saved in .xcf)."""
    item.attach_parasite(Gimp.Parasite.new(vg_steer.PARASITE, Gimp.PARASITE_PERSISTENT,
                                           list(record.to_json())))


def import_results(image, layer, plan, images, scale_to_source, tmpdir, name, records):
    """All result layers in one group ``name`` above ``layer``, in one undo step, each
    with its record (``records[0]``: the group's); on any failure the group is removed
    again so nothing half-done stays in the image."""
    n = len(images)
    image.undo_group_start()
    group = None
    try:
        group = Gimp.GroupLayer.new(image, name)
        parent = layer.get_parent()
        image.insert_layer(group, parent, image.get_item_position(layer))
        _attach_record(group, records[0])
        for k, data in enumerate(images, start=1):
            progress(f"Importing variation {k} of {n}...", (k - 1) / n)
            path = os.path.join(tmpdir, f"variation-{k}.png")
            with open(path, "wb") as f:
                f.write(data)
            result = Gimp.file_load_layer(
                Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path))
            if result is None:
                raise Failure(f"GIMP could not read variation {k} returned by the gateway.")
            result.set_name(f"Variation {k}")
            image.insert_layer(result, group, k - 1)
            _attach_record(result, records[k])
            p = vg_prepare.place(plan, result.get_width(), result.get_height(), scale_to_source)
            if (p.scale_w, p.scale_h) != (result.get_width(), result.get_height()):
                result.scale(p.scale_w, p.scale_h, False)
            if p.crop is not None:
                result.resize(p.crop.w, p.crop.h, -p.crop.x, -p.crop.y)
            result.set_offsets(p.x, p.y)
        progress(f"Imported {n} variation{'s' if n != 1 else ''}.", 1.0)
    except BaseException:
        if group is not None:
            with contextlib.suppress(Exception):  # already failing: keep the first error
                image.remove_layer(group)
        raise
    finally:
        image.undo_group_end()
    return group


def record_of(drawable):
    """The record Generate Variations left on ``drawable`` (a result layer or its group),
    or None."""
    return find_record(drawable)[0]


def find_record(drawable):
    """(record, refused): the record on ``drawable`` or its parent, else None, with
    ``refused`` True when a ``generate-variations`` parasite was there but is not one the
    plug-in wrote (``vg_steer.read_record`` refused it)."""
    refused = False
    for item in (drawable, drawable.get_parent()):
        if item is None:
            continue
        parasite = item.get_parasite(vg_steer.PARASITE)
        if parasite is not None:
            record = vg_steer.read_record(bytes(parasite.get_data()))
            if record is not None:
                return record, False
            refused = True
    return None, refused
