#!/usr/bin/env bash
# Pictures of the GIMP plug-in for the README, taken from real GIMP 3.0 (Debian 13 root,
# see tests/plugins/gimp/build_root.sh) against a real gateway started here:
#
#   docs/gimp-variations.png  a source and the variations the plug-in added as layers
#   docs/gimp-dialog.png      the Filters > Generate Variations... dialog
#   docs/gimp-settings-dialog.png  Filters > Generate Variations Settings...
# (GIMP 3.0.4's canvas renders as grey stripes under Xvfb in this root, so there is no
# whole-window picture; the contact sheet shows the layers' real pixels instead.)
#
# Usage: sudo scripts/gimp-screenshot.sh [OUT_DIR]   (default: docs/). Needs root and
# debootstrap (like the e2e test); runs Xvfb inside the root. About a minute once the
# root is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT="${1:-$REPO/docs}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
mkdir -p "$OUT"

ROOT=$(bash tests/plugins/gimp/build_root.sh)
INNER=/tmp/vg-shot-$$
WS="$ROOT$INNER"
TOKEN="demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
# GIMP's usual profile path inside the root, so the dialogs show what users will see.
PROFILE_INNER=/root/.config/GIMP/3.0
PROFILE="$ROOT$PROFILE_INNER"
rm -rf --one-file-system "$PROFILE"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf --one-file-system "$WS" "$PROFILE"
  rmdir "$ROOT/root/.config/GIMP" 2>/dev/null || true
}
trap cleanup EXIT
mkdir -p "$WS/out" "$WS/gw"

# Run a command repeatedly (max N tries, 0.25 s apart) until it succeeds.
poll() {
  local n=$1; shift
  local i
  for ((i = 0; i < n; i++)); do
    if "$@"; then return 0; fi
    sleep 0.25
  done
  return 1
}

# --- the plug-in, installed by the project's installer into an isolated profile
"$PY" -c 'import sys; from pathlib import Path; from gateway import gimp_install
sys.exit(gimp_install.main([Path(sys.argv[1])], False, "linux", {}, Path.home()))' \
  "$PROFILE" >/dev/null

# --- a gateway on a free port, the demo token its only user
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
HASH=$(printf %s "$TOKEN" | sha256sum | cut -d' ' -f1)
cat >"$WS/gw/gateway.yaml" <<EOF
server: {host: 127.0.0.1, port: $PORT, public_base_url: null}
auth: {mode: tokens, admin_token_sha256: null}
users:
  artist: {token_sha256: "$HASH", quota: {images_per_day: 200, requests_per_minute: 30, max_concurrent: 2}}
state: {kind: sqlite, path: $WS/gw/state.sqlite3}
cache: {enabled: true, dir: $WS/gw/cache}
images: {dir: $WS/gw/images, url_ttl_seconds: 3600}
backends: [{name: local, kind: procedural}]
route: [local]
audit: {path: $WS/gw/audit.sqlite3}
EOF
"$PY" -m gateway serve --config "$WS/gw/gateway.yaml" --host 127.0.0.1 --port "$PORT" \
  >"$WS/gw/gateway.log" 2>&1 &
pids+=($!)
poll 120 curl -sf "http://127.0.0.1:$PORT/healthz" -o /dev/null \
  || { echo "gateway did not start:"; tail -20 "$WS/gw/gateway.log"; exit 1; } >&2

# The URL and token go into the plug-in's settings file (mode 0600), as the settings
# dialog would write them.
"$PY" -c 'import sys; sys.path.insert(0, "plugins/gimp/generate-variations"); import vg_settings
vg_settings.save(*sys.argv[1:])' "$PROFILE" "http://127.0.0.1:$PORT" "$TOKEN"
GIMP_ENV=(env -i HOME=/root LANG=C.UTF-8 PATH=/usr/bin:/bin GIMP3_DIRECTORY="$PROFILE_INNER")

# --- part 1: a painted source, three variations as layers, a contact sheet
cat >"$WS/make.py" <<'EOF'
import math, os
from gi.repository import Gegl, Gimp, Gio
OUT = os.environ.get("VG_SHOT_OUT") or "/tmp"
W, H = 480, 320

def scene():
    px = bytearray()
    for y in range(H):
        for x in range(W):
            t = y / H
            r, g, b = 255 - 90 * t, 150 - 60 * t, 90 + 100 * t          # dusk sky
            d = math.hypot(x - 330, y - 120)
            if d < 42:
                r, g, b = 255, 236, 170                                    # sun
            elif d < 90:
                k = (90 - d) / 48 * 0.5
                r, g, b = r + (255 - r) * k, g + (220 - g) * k, b + (160 - b) * k
            ridge1 = 190 + 28 * math.sin(x / 47.0) + 14 * math.sin(x / 13.0 + 1)
            ridge2 = 230 + 18 * math.sin(x / 31.0 + 2) + 9 * math.sin(x / 7.0)
            if y > ridge1:
                r, g, b = 95, 60, 110
            if y > ridge2:
                r, g, b = 45, 35, 70
            if y > 270:                                                    # lake
                s = 0.55 + 0.1 * math.sin(y * 1.7 + x / 9.0)
                r, g, b = 60 + 120 * s, 50 + 80 * s, 110 + 60 * s
            px += bytes((int(r) & 255, int(g) & 255, int(b) & 255))
    return bytes(px)

img = Gimp.Image.new(W, H, Gimp.ImageBaseType.RGB)
layer = Gimp.Layer.new(img, "Dusk", W, H, Gimp.ImageType.RGB_IMAGE, 100, Gimp.LayerMode.NORMAL)
img.insert_layer(layer, None, 0)
buf = layer.get_shadow_buffer()
buf.set(Gegl.Rectangle.new(0, 0, W, H), "R'G'B' u8", scene())
buf.flush()
layer.merge_shadow(False)
layer.update(0, 0, W, H)
proc = Gimp.get_pdb().lookup_procedure("python-fu-generate-variations")
cfg = proc.create_config()
cfg.set_property("run-mode", Gimp.RunMode.NONINTERACTIVE)
cfg.set_property("image", img)
cfg.set_core_object_array("drawables", [layer])
cfg.set_property("n", 3)
cfg.set_property("size", "512x512")
cfg.set_property("square-mode", "pad")
cfg.set_property("scale-to-source", True)
cfg.set_property("strength", 0.4)
cfg.set_property("seed", 1234)
res = proc.run(cfg)
if res.index(0) != Gimp.PDBStatusType.SUCCESS:
    raise SystemExit("generate-variations failed: %s" % res.index(1))

def export(drawable, name):
    tmp = Gimp.Image.new(drawable.get_width(), drawable.get_height(), Gimp.ImageBaseType.RGB)
    copy = Gimp.Layer.new_from_drawable(drawable, tmp)
    tmp.insert_layer(copy, None, 0)
    copy.set_offsets(0, 0)
    Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, tmp, Gio.File.new_for_path(os.path.join(OUT, name)), None)
    tmp.delete()

group = img.get_layers()[0]
export(layer, "source.png")
for k, child in enumerate(group.get_children(), start=1):
    export(child, "variation-%d.png" % k)
with open(os.path.join(OUT, "layers.txt"), "w") as f:
    for top in img.get_layers():
        f.write(top.get_name() + "\n")
        for c in (top.get_children() if isinstance(top, Gimp.GroupLayer) else []):
            f.write("  " + c.get_name() + "\n")
Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, img, Gio.File.new_for_path(os.path.join(OUT, "demo.xcf")), None)
print("MADE", flush=True)
EOF
chroot "$ROOT" "${GIMP_ENV[@]}" VG_SHOT_OUT="$INNER/out" gimp-console-3 -i \
  --batch-interpreter=python-fu-eval -b "exec(open('$INNER/make.py').read())" --quit \
  >"$WS/make.log" 2>&1 </dev/null || true
grep -q MADE "$WS/make.log" || { echo "the GIMP batch failed:"; tail -30 "$WS/make.log"; exit 1; } >&2

"$PY" - "$WS/out" "$OUT/gimp-variations.png" <<'EOF'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
src, dst = Path(sys.argv[1]), sys.argv[2]
names = ["source.png"] + sorted(p.name for p in src.glob("variation-*.png"))
tiles = [Image.open(src / n).convert("RGB") for n in names]
labels = ["Source layer \"Dusk\""] + [f"Variation {k}" for k in range(1, len(tiles))]
tw, th = tiles[0].size
pad, cap = 12, 22
tree = (src / "layers.txt").read_text().strip()
foot = 16 * (tree.count("\n") + 2)
sheet = Image.new("RGB", (2 * tw + 3 * pad, 2 * (th + cap) + 3 * pad + foot), (40, 40, 40))
d = ImageDraw.Draw(sheet)
d.multiline_text((pad, 2 * (th + cap) + 3 * pad), "GIMP layers after the run:\n" + tree,
                 fill=(200, 200, 200), spacing=4)
for i, (t, label) in enumerate(zip(tiles, labels)):
    x = pad + (i % 2) * (tw + pad)
    y = pad + (i // 2) * (th + cap + pad)
    sheet.paste(t.resize((tw, th)), (x, y + cap))
    d.text((x, y + 4), label, fill=(230, 230, 230))
sheet.save(dst, optimize=True)
print("wrote", dst, "layers:", tree.replace("\n", " | "))
EOF

# --- part 2: the dialogs, in GIMP under Xvfb, over the demo image with its group
DISPLAY_NUM=$(( 90 + $$ % 100 ))
chroot "$ROOT" Xvfb ":$DISPLAY_NUM" -screen 0 1100x720x24 -nolisten tcp \
  >"$WS/xvfb.log" 2>&1 </dev/null &
pids+=($!)
poll 80 test -S "$ROOT/tmp/.X11-unix/X$DISPLAY_NUM" || { echo "Xvfb did not start" >&2; exit 1; }
grab() { chroot "$ROOT" env DISPLAY=":$DISPLAY_NUM" xwd -silent "$@" 2>/dev/null; }

cat >"$WS/xwd2png.py" <<'EOF'
import struct, sys
from PIL import Image

def xwd(path):
    data = open(path, "rb").read()
    f = struct.unpack(">25I", data[:100])
    header, version, fmt, depth, w, h = f[:6]
    order, bpl, ncolors = f[7], f[12], f[19]
    assert version == 7 and fmt == 2 and depth == 24, f
    off = header + ncolors * 12
    raw = ("BGRX" if order == 0 else "XRGB") if bpl >= 4 * w else ("BGR" if order == 0 else "RGB")
    return Image.frombytes("RGB", (w, h), data[off:off + bpl * h], "raw", raw, bpl)

img = xwd(sys.argv[1])
img.save(sys.argv[2], optimize=True)
print("wrote", sys.argv[2], img.size)
EOF

# shot NAME PROCEDURE WINDOW-TITLE: start GIMP, open the demo image, run PROCEDURE
# interactively, grab the window titled WINDOW-TITLE once it has settled, stop GIMP.
shot() {
  local name=$1 procedure=$2 title=$3 gimp_pid
  cat >"$WS/$name.py" <<EOF
from gi.repository import Gimp, Gio
img = Gimp.file_load(Gimp.RunMode.NONINTERACTIVE, Gio.File.new_for_path("$INNER/out/demo.xcf"))
Gimp.Display.new(img)
Gimp.displays_flush()
proc = Gimp.get_pdb().lookup_procedure("$procedure")
cfg = proc.create_config()
cfg.set_property("run-mode", Gimp.RunMode.INTERACTIVE)
if "$procedure" == "python-fu-generate-variations":
    cfg.set_property("image", img)
    cfg.set_core_object_array("drawables", [img.get_layers()[-1]])
    cfg.set_property("strength", 0.4)  # as after the demo run above
proc.run(cfg)
EOF
  chroot "$ROOT" "${GIMP_ENV[@]}" DISPLAY=":$DISPLAY_NUM" gimp-3 --no-splash \
    --batch-interpreter=python-fu-eval -b "exec(open('$INNER/$name.py').read())" \
    >"$WS/$name.log" 2>&1 </dev/null &
  gimp_pid=$!
  pids+=("$gimp_pid")
  poll 400 grab -name "$title" -out "$INNER/$name-0.xwd" \
    || { echo "the $title dialog did not appear:"; tail -30 "$WS/$name.log"; exit 1; } >&2
  # Wait until drawing has settled: two identical grabs in a row.
  stable() {
    grab -name "$title" -out "$INNER/$name-1.xwd" || return 1
    if cmp -s "$WS/$name-0.xwd" "$WS/$name-1.xwd"; then return 0; fi
    mv "$WS/$name-1.xwd" "$WS/$name-0.xwd"
    return 1
  }
  poll 120 stable || echo "gimp-screenshot: $title kept changing; using the last grab" >&2
  if grep -i "mnemonic" "$WS/$name.log" >&2; then echo "fix the mnemonics above" >&2; fi
  kill "$gimp_pid" 2>/dev/null || true
  wait "$gimp_pid" 2>/dev/null || true
  "$PY" "$WS/xwd2png.py" "$WS/$name-0.xwd" "$OUT/$name.png"
}

shot gimp-dialog python-fu-generate-variations "Generate Variations"
shot gimp-settings-dialog python-fu-generate-variations-settings "Generate Variations Settings"
