"""Test hooks of Generate Variations' dialogs (used by tests/plugins/test_gimp_e2e.py).

Nothing here acts unless GIMP's environment sets GENERATE_VARIATIONS_AUTOTEST=accept-dialogs:
then the dialogs answer by themselves, so the end-to-end test drives the real interactive
path under Xvfb, and with VARIATIONS_GATEWAY_DEBUG_DIR set they record what they showed.
"""

import json
import os

import gi

gi.require_version("Gimp", "3.0")
import vg_client  # noqa: E402
from gi.repository import GLib  # noqa: E402


def active():
    """Test hook: GENERATE_VARIATIONS_AUTOTEST=accept-dialogs in GIMP's environment makes
    the dialogs answer by themselves (see ``auto_accept``)."""
    return os.environ.get("GENERATE_VARIATIONS_AUTOTEST") == "accept-dialogs"


def auto_accept(dialog, response):
    """Test hook: under ``active()`` the dialogs answer ``response`` (OK / Save / Test
    Connection) by themselves once shown, so the end-to-end test drives the real
    interactive path (and GIMP's saving of last values) under Xvfb."""
    if active():
        def answer():
            dialog.response(response)
            return False
        GLib.idle_add(answer)


def record(name, value):
    """Test hook: under ``active()`` with VARIATIONS_GATEWAY_DEBUG_DIR set, write what a
    dialog showed (``value``, JSON) for the end-to-end test to check on the host."""
    dbg = vg_client.debug_dir()
    if active() and dbg:
        os.makedirs(dbg, exist_ok=True)
        with open(os.path.join(dbg, name), "w") as f:
            json.dump(value, f)


def widget_kinds(widget):
    """GType names of ``widget`` and everything inside it (what the dialog drew)."""
    kinds = [type(widget).__gtype__.name]
    if hasattr(widget, "get_children"):
        for child in widget.get_children():
            kinds += widget_kinds(child)
    return kinds
