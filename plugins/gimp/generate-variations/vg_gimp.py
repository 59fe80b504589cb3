"""Small GIMP glue every Generate Variations procedure uses: the failure shown to the
user, progress, and blocking network calls in a thread while the progress bar pulses."""

import threading

import gi

gi.require_version("Gimp", "3.0")
import vg_settings  # noqa: E402
from gi.repository import Gimp, GLib  # noqa: E402


class Failure(Exception):
    """A failure whose message is the sentence shown to the user."""


def fail(procedure, sentence, status=Gimp.PDBStatusType.EXECUTION_ERROR):
    return procedure.new_return_values(status, GLib.Error(sentence))


def pair(result):
    """GIMP 3 getters answer (ok, a, b) or (a, b) depending on the binding; keep (a, b)."""
    t = tuple(result)
    return t[-2], t[-1]


def load_settings():
    """The settings in force, or :class:`Failure` with the settings file's problem."""
    try:
        return vg_settings.load(Gimp.directory())
    except vg_settings.SettingsError as e:
        raise Failure(str(e)) from None


def progress(text, fraction=None):
    Gimp.progress_set_text(text)
    if fraction is not None:
        Gimp.progress_update(fraction)


def in_thread(fn, text):
    """Run ``fn`` (a blocking network call) in a thread while the progress bar pulses."""
    box = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    Gimp.progress_set_text(text)
    while t.is_alive():
        t.join(0.15)
        Gimp.progress_pulse()
    if "error" in box:
        raise box["error"]
    return box["value"]
