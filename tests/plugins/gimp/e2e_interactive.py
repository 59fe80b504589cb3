# Runs INSIDE a Debian root (build_root.sh), in gimp-3 (with its UI, on Xvfb) via python-fu-eval:
#   gimp-3 --no-splash --batch-interpreter=python-fu-eval \
#     -b "JOB='/tmp/x/job.json'; exec(open('/tmp/x/e2e_interactive.py').read())" --quit
# GIMP is started with GENERATE_VARIATIONS_AUTOTEST=accept-dialogs, so the plug-in's real
# dialogs answer Save / OK by themselves. Drives the INTERACTIVE path: the settings dialog
# rewrites the settings file the job gives (keeping its values for the keys GIMP's
# environment sets); the main dialog runs; GIMP then stores the procedure's
# arguments in the image as a parasite, and the image is saved as .xcf for the host to
# search for the token.
import json
import os

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("Gegl", "0.4")
from gi.repository import Gegl, Gimp, Gio  # noqa: E402

with open(JOB) as _f:  # noqa: F821 - JOB is set by the -b command line
    job = json.load(_f)
OUT = job["out"]
res = {}
settings_file = os.path.join(Gimp.directory(), "generate-variations.json")
with open(settings_file, "w") as f:
    json.dump(job["prior_settings"], f)

try:
    proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations-settings")
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
    r = proc.run(cfg)
    res["settings_status"] = r.index(0).value_nick
    res["settings_summary"] = r.index(1)
    res["settings_mode"] = oct(os.stat(settings_file).st_mode & 0o777)
    with open(settings_file) as f:
        res["settings_saved"] = json.load(f)

    W, H = 300, 200
    img = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
    layer = Gimp.Layer.new(img, "painting", W, H, Gimp.ImageType.RGB_IMAGE, 100,
                           Gimp.LayerMode.NORMAL)
    img.insert_layer(layer, None, 0)
    px = bytes(v for y in range(H) for x in range(W)
               for v in ((x * 255) // (W - 1), (y * 255) // (H - 1), (x * y) & 255))
    buf = layer.get_shadow_buffer()
    buf.set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B' u8", px)
    buf.flush()
    layer.merge_shadow(False)
    layer.update(0, 0, W, H)
    Gimp.Display.new(img)

    proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations")
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [layer])
    r = proc.run(cfg)
    res["status"] = r.index(0).value_nick
    res["message"] = r.index(1) if res["status"] != "success" else None
    res["layers"] = [x.get_name() for x in img.get_layers()]
    group = img.get_layers()[0]
    res["children"] = [[c.get_name(), c.get_width(), c.get_height(), list(c.get_offsets())[-2:]]
                       for c in (group.get_children() if isinstance(group, Gimp.GroupLayer)
                                 else [])]
    p = group.get_parasite("generate-variations")
    res["group_record"] = json.loads(bytes(p.get_data()).decode()) if p else None
    res["parasites"] = list(img.get_parasite_list())
    Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img,
                   Gio.File.new_for_path(os.path.join(OUT, "interactive.xcf")), None)
    res["xcf"] = "interactive.xcf"

    # More like this on the first variation: its dialog shows the record's settings
    # (the next seeds) and only OK (answered by the autotest hook) sends the request.
    proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations-more")
    cfg = proc.create_config()
    cfg.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [group.get_children()[0]])
    r = proc.run(cfg)
    res["more_status"] = r.index(0).value_nick
    res["more_message"] = r.index(1) if res["more_status"] != "success" else None
    res["more_layers"] = [x.get_name() for x in img.get_layers()]
    # The new group goes right above the source: below the first one.
    p = img.get_layers()[1].get_parasite("generate-variations")
    res["more_record"] = json.loads(bytes(p.get_data()).decode()) if p else None
except Exception:
    import traceback

    res["crash"] = traceback.format_exc()
with open(os.path.join(OUT, "interactive.json"), "w") as f:
    json.dump(res, f, indent=2)
print("E2E-INTERACTIVE-DONE", flush=True)
