# Runs INSIDE a Debian root (build_root.sh), in gimp-console-3's python-fu-eval interpreter:
#   gimp-console-3 -i --batch-interpreter=python-fu-eval \
#     -b "JOB='/tmp/x/job.json'; exec(open('/tmp/x/e2e_cancel.py').read())" --quit
# One python-fu-generate-variations call against a gateway whose backend is held slow.
# The host test ends the plug-in process while the request is in flight, as GIMP's
# progress Cancel does (gimp_plug_in_progress_cancel_callback -> gimp_plug_in_close with
# kill_it: SIGKILL). This script records what the call returned and the layer tree before
# and after, for tests/plugins/test_gimp_cancel_e2e.py. GIMP's Python, stdlib + gi only.
import json
import os
import sys

import gi

gi.require_version("Gimp", "3.0")
from gi.repository import Gimp  # noqa: E402

with open(JOB) as _f:  # noqa: F821 - JOB is set by the -b command line
    job = json.load(_f)
sys.path.insert(0, job["plugin_dir"])
import vg_settings  # noqa: E402

vg_settings.save(Gimp.directory(), job["url"], job["token"], 120)


def tree(img):
    return [[x.get_name(), isinstance(x, Gimp.GroupLayer)] for x in img.get_layers()]


img = Gimp.Image.new(200, 200, Gimp.ImageBaseType.RGB)
layer = Gimp.Layer.new(img, "Dusk", 200, 200, Gimp.ImageType.RGB_IMAGE, 100,
                       Gimp.LayerMode.NORMAL)
img.insert_layer(layer, None, 0)
res = {"before": tree(img)}
proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations")
cfg = proc.create_config()
cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
cfg.set_property("image", img)
cfg.set_core_object_array("drawables", [layer])
cfg.set_property("n", 2)
cfg.set_property("size", "256x256")
r = proc.run(cfg)
status = r.index(0)
res["status"] = status.value_nick
res["message"] = r.index(1) if r.length() > 1 and status != Gimp.PDBStatusType.SUCCESS \
    else None
res["after"] = tree(img)
with open(os.path.join(job["out"], "cancel.json"), "w") as f:
    json.dump(res, f, indent=2)
print("E2E-CANCEL-DONE", flush=True)
