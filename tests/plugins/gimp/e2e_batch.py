# Runs INSIDE a Debian root (build_root.sh), in gimp-console-3's python-fu-eval interpreter:
#   gimp-console-3 -i --batch-interpreter=python-fu-eval \
#     -b "JOB='/tmp/x/job.json'; exec(open('/tmp/x/e2e_batch.py').read())" --quit
# Creates test images, calls python-fu-generate-variations non-interactively on each case,
# and writes what it saw (statuses, messages, layer tree, sizes, offsets, pixels) into the
# job's output folder for tests/plugins/test_gimp_e2e.py to check on the host.
# Not a pytest module (no test_ prefix); GIMP's Python, standard library + gi only.
import json
import os
import shutil
import sys
import traceback

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

with open(JOB) as _f:  # noqa: F821 - JOB is set by the -b command line
    job = json.load(_f)
OUT = job["out"]
PLUGIN_DIR = job["plugin_dir"]
sys.path.insert(0, PLUGIN_DIR)
import vg_settings  # noqa: E402

results = {"cases": {}}


def pattern(w, h, channels, salt=0):
    """Deterministic pixels the host can recompute: R=x, G=y, B=x^y (scaled), A=255.
    ``salt`` changes B, so an image's pixels (and so the gateway's cache key) differ."""
    rows = []
    for y in range(h):
        row = bytearray()
        for x in range(w):
            r, g, b = (x * 255) // max(1, w - 1), (y * 255) // max(1, h - 1), (x ^ y ^ salt) & 255
            if channels == 1:
                row.append((r + g) // 2)
            elif channels == 2:
                row += bytes(((r + g) // 2, 255))
            elif channels == 3:
                row += bytes((r, g, b))
            else:
                row += bytes((r, g, b, 255))
        rows.append(bytes(row))
    return b"".join(rows)


FORMATS = {1: "Y' u8", 2: "Y'A u8", 3: "R'G'B' u8", 4: "R'G'B'A u8"}


def fill(layer, channels, salt=0):
    w, h = layer.get_width(), layer.get_height()
    buf = layer.get_shadow_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, w, h), FORMATS[channels], pattern(w, h, channels, salt))
    buf.flush()
    layer.merge_shadow(False)
    layer.update(0, 0, w, h)


def new_image(w, h, base=Gimp.ImageBaseType.RGB):
    img = Gimp.Image.new(w, h, base)
    img.undo_disable()
    return img


def add_layer(img, name, w, h, itype, channels, x=0, y=0, salt=0):
    layer = Gimp.Layer.new(img, name, w, h, itype, 100, Gimp.LayerMode.NORMAL)
    img.insert_layer(layer, None, 0)
    layer.set_offsets(x, y)
    fill(layer, channels, salt)
    return layer


def offsets(item):
    t = tuple(item.get_offsets())
    return [t[-2], t[-1]]


def record(item):
    """The plug-in's JSON parasite on ``item`` (issue 22), and its flags."""
    p = item.get_parasite("generate-variations")
    if p is None:
        return None
    return {"flags": p.get_flags(), "data": json.loads(bytes(p.get_data()).decode())}


def tree(img):
    def node(item):
        d = {"name": item.get_name(), "size": [item.get_width(), item.get_height()],
             "offsets": offsets(item), "group": isinstance(item, Gimp.GroupLayer),
             "record": record(item)}
        if d["group"]:
            d["children"] = [node(c) for c in item.get_children()]
        return d
    return [node(x) for x in img.get_layers()]


def dump_pixels(case, img):
    for top in img.get_layers():
        if not isinstance(top, Gimp.GroupLayer):
            continue
        for k, child in enumerate(top.get_children(), start=1):
            w, h = child.get_width(), child.get_height()
            data = child.get_buffer().get(Gegl.Rectangle.new(0, 0, w, h), 1.0,
                                          "R'G'B'A u8", Gegl.AbyssPolicy.NONE)
            with open(os.path.join(OUT, f"{case}-layer{k}.rgba"), "wb") as f:
                f.write(bytes(data))


def set_settings(url, token):
    vg_settings.save(Gimp.directory(), url, token, 60)


def run(case, img, layer, procedure="python-fu-generate-variations", **args):
    upload = os.path.join(job["debug_dir"], "upload.png")
    if os.path.exists(upload):
        os.unlink(upload)
    before = tree(img)
    proc = Gimp.get_pdb().lookup_procedure(procedure)
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [layer])
    for k, v in args.items():
        cfg.set_property(k, v)
    res = proc.run(cfg)
    status = res.index(0)
    message = res.index(1) if res.length() > 1 and status != Gimp.PDBStatusType.SUCCESS \
        else None
    r = {
        "status": status.value_nick if hasattr(status, "value_nick") else str(status),
        "message": message,
        "before": before,
        "after": tree(img),
        "layer_type": str(layer.type().value_nick),
        "image_base": str(img.get_base_type().value_nick),
    }
    if os.path.exists(upload):
        shutil.copy(upload, os.path.join(OUT, f"{case}-upload.png"))
        r["upload"] = f"{case}-upload.png"
    dump_pixels(case, img)
    results["cases"][case] = r
    return r


def case(name):
    def wrap(fn):
        try:
            fn()
        except Exception:
            results["cases"][name] = {"status": "batch-crash", "message": traceback.format_exc()}
        return fn
    return wrap


set_settings(job["url"], job["tokens"]["alice"])
results["settings_mode"] = oct(os.stat(vg_settings.settings_path(Gimp.directory())).st_mode
                               & 0o777)


@case("rgb")
def _rgb():
    img = new_image(300, 200)
    layer = add_layer(img, "photo", 300, 200, Gimp.ImageType.RGB_IMAGE, 3)
    run("rgb", img, layer, n=3, size="256x256", **{"square-mode": "selection-or-center-crop",
                                                  "scale-to-source": False})
    # Once more with the last values, as Filters > Repeat does: GIMP then stores the
    # procedure's arguments as a parasite in the image (and so in the .xcf).
    proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations")
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.WITH_LAST_VALS)
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [layer])
    results["repeat_status"] = proc.run(cfg).index(0).value_nick
    results["parasites"] = list(img.get_parasite_list())
    xcf = os.path.join(OUT, "rgb.xcf")
    Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(xcf), None)
    results["xcf"] = "rgb.xcf"


@case("rgba-offset-selection")
def _rgba():
    img = new_image(400, 300)
    add_layer(img, "background", 400, 300, Gimp.ImageType.RGB_IMAGE, 3)
    layer = add_layer(img, "sprite", 240, 160, Gimp.ImageType.RGBA_IMAGE, 4, 30, 40)
    img.select_rectangle(Gimp.ChannelOps.REPLACE, 50, 60, 200, 100)
    run("rgba-offset-selection", img, layer, n=2, size="256x256",
        **{"square-mode": "pad", "scale-to-source": True})


@case("indexed")
def _indexed():
    img = new_image(120, 90)
    layer = add_layer(img, "flat", 120, 90, Gimp.ImageType.RGB_IMAGE, 3)
    img.convert_indexed(Gimp.ConvertDitherType.NONE, Gimp.ConvertPaletteType.GENERATE, 16,
                        False, False, "")
    run("indexed", img, layer, n=2, size="512x512",
        **{"square-mode": "selection-or-center-crop", "scale-to-source": True})


@case("grey-stretch")
def _grey():
    img = new_image(64, 48, Gimp.ImageBaseType.GRAY)
    layer = add_layer(img, "grey", 64, 48, Gimp.ImageType.GRAY_IMAGE, 1)
    run("grey-stretch", img, layer, n=1, size="256x256",
        **{"square-mode": "stretch", "scale-to-source": True})


def ramps(w, h):
    """R rises left to right, G top to bottom, B is 128: built row by row, fast enough for
    a 16000 x 300 layer (keep in step with ``ramps`` in test_gimp_e2e.py)."""
    row = bytearray(w * 3)
    row[0::3] = bytes((x * 255) // max(1, w - 1) for x in range(w))
    row[2::3] = bytes((128,)) * w
    out = bytearray()
    for y in range(h):
        row[1::3] = bytes(((y * 255) // max(1, h - 1),)) * w
        out += row
    return bytes(out)


@case("wide-stretch")
def _wide():
    # A long thin layer stretched to a 256 px square: one scale straight to 256 x 256
    # (stretching it to 16000 x 16000 first took GIMP half a minute and over 1 GB).
    w, h = 16000, 300
    img = new_image(w, h)
    layer = Gimp.Layer.new(img, "banner", w, h, Gimp.ImageType.RGB_IMAGE, 100,
                           Gimp.LayerMode.NORMAL)
    img.insert_layer(layer, None, 0)
    buf = layer.get_shadow_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, w, h), "R'G'B' u8", ramps(w, h))
    buf.flush()
    layer.merge_shadow(False)
    layer.update(0, 0, w, h)
    run("wide-stretch", img, layer, n=1, size="256x256",
        **{"square-mode": "stretch", "scale-to-source": False})


@case("rgb16")
def _rgb16():
    img = Gimp.Image.new_with_precision(100, 80, Gimp.ImageBaseType.RGB,
                                        Gimp.Precision.U16_NON_LINEAR)
    img.undo_disable()
    layer = add_layer(img, "deep", 100, 80, Gimp.ImageType.RGBA_IMAGE, 4, salt=7)
    # Hidden, half transparent, in Multiply mode: the upload still has the layer's pixels.
    layer.set_visible(False)
    layer.set_opacity(40.0)
    layer.set_mode(Gimp.LayerMode.MULTIPLY)
    run("rgb16", img, layer, n=1, size="256x256",
        **{"square-mode": "selection-or-center-crop", "scale-to-source": True})
    results["cases"]["rgb16"]["precision"] = img.get_precision().value_nick


def failing_case(name, url, token, salt):
    @case(name)
    def _f():
        set_settings(url, token)
        img = new_image(300, 200)
        # Pixels no earlier case sent: a cache hit must not hide the failure.
        layer = add_layer(img, "photo", 300, 200, Gimp.ImageType.RGB_IMAGE, 3, salt=salt)
        run(name, img, layer, n=2, size="256x256")


# Issue 22: strength and seed; the same seed again (a HIT, then fresh from the backend);
# More like this on a result layer. Each run on its own copy of the same pixels.
STEER = {"n": 2, "size": "256x256", "strength": 0.4, "seed": 1234,
         "square-mode": "selection-or-center-crop", "scale-to-source": False}


def steer_case(name, **extra):
    @case(name)
    def _s():
        img = new_image(300, 200)
        layer = add_layer(img, "Dusk", 300, 200, Gimp.ImageType.RGB_IMAGE, 3, salt=55)
        run(name, img, layer, **{**STEER, **extra})
        if name == "steer":
            # More like this, on the second variation of the group just made.
            variation = img.get_layers()[0].get_children()[1]
            run("steer-more", img, variation, procedure="python-fu-generate-variations-more")
            results["cases"]["steer-more"]["tattoo_of_source"] = layer.get_tattoo()
            xcf = os.path.join(OUT, "steer.xcf")
            Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(xcf), None)
            back = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path(xcf))
            results["cases"]["steer"]["reloaded"] = tree(back)
            back.delete()


steer_case("steer")
steer_case("steer-again")
steer_case("steer-fresh", fresh=True)
steer_case("steer-other-strength", strength=0.9)


def attach_record(item, data):
    raw = json.dumps(data).encode() if not isinstance(data, bytes) else data
    item.attach_parasite(Gimp.Parasite.new("generate-variations", 1, list(raw)))


def foreign_record(tattoo, **changes):
    """A record as the plug-in writes it (see vg_steer.Record), with ``changes``."""
    return {"model": "dall-e-2", "strength": 0.4, "seed": 5, "hint": None,
            "request_id": "req_x", "first_seed": 5, "n": 2, "index": 1, "size": "256x256",
            "square_mode": "pad", "scale_to_source": True, "source_tattoo": tattoo,
            "source_name": "Dusk", "selection": None, "version": 1, **changes}


@case("more-foreign")
def _more_foreign():
    # A result layer from another image pasted here: its record's tattoo points at this
    # image's "Secret" layer, which must not be uploaded.
    img = new_image(120, 120)
    secret = add_layer(img, "Secret", 120, 120, Gimp.ImageType.RGB_IMAGE, 3, salt=66)
    pasted = add_layer(img, "Variation 1", 120, 120, Gimp.ImageType.RGB_IMAGE, 3, salt=67)
    attach_record(pasted, foreign_record(secret.get_tattoo()))
    run("more-foreign", img, pasted, procedure="python-fu-generate-variations-more")


@case("more-hostile")
def _more_hostile():
    # Wrong types that crashed More like this outside its error handling.
    img = new_image(120, 120)
    src = add_layer(img, "Dusk", 120, 120, Gimp.ImageType.RGB_IMAGE, 3, salt=68)
    bad = add_layer(img, "Variation 1", 120, 120, Gimp.ImageType.RGB_IMAGE, 3, salt=69)
    attach_record(bad, foreign_record(src.get_tattoo(), first_seed="5", n="4"))
    run("more-hostile", img, bad, procedure="python-fu-generate-variations-more")


failing_case("quota", job["url"], job["tokens"]["carol"], 101)
failing_case("bad-token", job["url"], "not-a-valid-token-at-all", 102)
failing_case("unreachable", job["dead_url"], job["tokens"]["alice"], 103)
failing_case("not-a-gateway", job["not_gateway_url"], job["tokens"]["alice"], 104)


def run_settings_procedure(url):
    """The settings procedure, non-interactively, against ``url``: (status, its text)."""
    set_settings(url, job["tokens"]["alice"])
    proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations-settings")
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
    res = proc.run(cfg)
    return res.index(0).value_nick, res.index(1) if res.length() > 1 else None


@case("settings-not-a-gateway")
def _settings_not_gateway():
    status, message = run_settings_procedure(job["not_gateway_url"])
    results["cases"]["settings-not-a-gateway"] = {"status": status, "message": message}


@case("settings-procedure")
def _settings_proc():
    status, summary = run_settings_procedure(job["url"])
    results["cases"]["settings-procedure"] = {"status": status, "summary": summary}


results["menu"] = {
    name: {"label": p.get_menu_label(), "paths": list(p.get_menu_paths())}
    for name in ("python-fu-generate-variations", "python-fu-generate-variations-more",
                 "python-fu-generate-variations-settings")
    for p in [Gimp.get_pdb().lookup_procedure(name)]
}
with open(os.path.join(OUT, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
print("E2E-BATCH-DONE", flush=True)
