"""The Generate Variations Settings dialog (GTK glue): gateway URL, token, timeout and
studio CA file, saved by ``vg_settings``, with Test Connection answered inside the dialog.

A plain GTK dialog: nothing typed here becomes a procedure argument, so GIMP never stores
the token in its profile or in an .xcf. Imported only when the dialog opens, so a
non-interactive run never loads GTK.
"""

from types import SimpleNamespace

import gi

gi.require_version("Gimp", "3.0")
gi.require_version("GimpUi", "3.0")
gi.require_version("Gtk", "3.0")
import vg_autotest  # noqa: E402
import vg_client  # noqa: E402
import vg_settings  # noqa: E402
from gi.repository import Gimp, GimpUi, GLib, Gtk  # noqa: E402

RESPONSE_TEST = 1


def settings_dialog(settings, role):
    """Run the dialog (``role``: the procedure's name). Returns (saved, the summary shown
    last)."""
    GimpUi.init(role)
    form = _build(settings, role)
    # Test Connection runs in a thread (a slow or dead gateway would freeze the dialog on
    # the GTK thread for up to 15 s); its answer comes back through GLib.idle_add, and is
    # dropped once the dialog is gone.
    state = {"summary": "", "closed": False}

    def show(text):
        if not state["closed"]:
            state["summary"] = text
            form.status.set_text(text)
            form.test_button.set_sensitive(True)
            # Test hook: Test Connection answered in the dialog, so Save now.
            vg_autotest.record("settings-dialog.json", {
                "tested": form.status.get_text(),
                "loop_ran_while_testing": state.get("loop_ran_while_testing", False)})
            vg_autotest.auto_accept(form.dialog, Gtk.ResponseType.OK)
        return False

    if vg_autotest.active():
        _autotest_press_test(form.dialog, state)
    while True:
        response = form.dialog.run()
        if response == RESPONSE_TEST:
            if form.test_button.get_sensitive():
                form.status.set_text("Testing...")
                form.test_button.set_sensitive(False)
                # Widgets are read here, on the GTK thread; the thread gets plain values.
                args = (form.url.get_text(), form.token.get_text(), form.timeout.get_value(),
                        form.ca_file.get_text())
                vg_client.call_in_background(
                    lambda a=args: vg_client.usage_summary(*a),
                    lambda text: GLib.idle_add(show, text))
            continue
        if response == Gtk.ResponseType.OK and not _save(form, settings):
            continue
        state["closed"] = True
        form.dialog.destroy()
        return response == Gtk.ResponseType.OK, state["summary"]


def _save(form, settings):
    """Write the settings file; False (the reason shown in the dialog) when it cannot."""
    try:
        # Fields an environment variable sets show its value; never write those.
        vg_settings.save(Gimp.directory(), form.url.get_text(), form.token.get_text(),
                         form.timeout.get_value(), ca_file=form.ca_file.get_text(),
                         from_env=settings.from_env)
    except vg_settings.SettingsError as e:
        form.status.set_text(str(e))
        return False
    return True


def _autotest_press_test(dialog, state):
    """Test hook: press Test Connection first; its answer then presses Save (see show)."""

    def loop_ran():
        # Queued before Test Connection starts: it runs ahead of the answer only when the
        # test leaves the GTK loop free (idle callbacks run in order).
        state["loop_ran_while_testing"] = not state["summary"]
        return False

    def press_test():
        GLib.idle_add(loop_ran)
        dialog.response(RESPONSE_TEST)
        return False

    GLib.idle_add(press_test)


def _build(settings, role):
    """The dialog and its widgets, filled from ``settings``."""
    dialog = GimpUi.Dialog(title="Generate Variations Settings", role=role)
    dialog.add_button("_Cancel", Gtk.ResponseType.CANCEL)
    test_button = dialog.add_button("_Test Connection", RESPONSE_TEST)
    dialog.add_button("_Save", Gtk.ResponseType.OK)
    grid = Gtk.Grid(row_spacing=6, column_spacing=12, border_width=12)
    dialog.get_content_area().pack_start(grid, True, True, 0)

    def row(y, text, widget, focus=None):
        label = Gtk.Label(label=text, xalign=0.0, use_underline=True)
        label.set_mnemonic_widget(focus or widget)
        grid.attach(label, 0, y, 1, 1)
        grid.attach(widget, 1, y, 1, 1)

    url = Gtk.Entry(text=settings.url, hexpand=True, width_chars=40)
    token = Gtk.Entry(text=settings.token, visibility=False, hexpand=True)
    token.set_placeholder_text("the token your gateway admin gave you")
    timeout = Gtk.SpinButton.new_with_range(1, 3600, 1)
    timeout.set_value(settings.timeout)
    ca_file, ca_box = _ca_file_row(dialog, settings)
    row(0, "Gateway _URL", url)
    row(1, "_Token", token)
    row(2, "T_imeout (seconds)", timeout)
    row(3, "Studio CA _file", ca_box, ca_file)
    for key, widget in (("url", url), ("token", token), ("timeout", timeout),
                        ("ca_file", ca_box)):
        if key in settings.from_env:
            widget.set_sensitive(False)
            widget.set_tooltip_text("Set by an environment variable, which wins over this "
                                    "dialog; Save keeps it out of the settings file.")
    status = Gtk.Label(xalign=0.0, wrap=True, max_width_chars=60, selectable=True)
    status.set_text(f"Saved in {settings.path} (readable only by you).")
    grid.attach(status, 0, 4, 2, 1)
    dialog.show_all()
    return SimpleNamespace(dialog=dialog, test_button=test_button, url=url, token=token,
                           timeout=timeout, ca_file=ca_file, status=status)


def _ca_file_row(dialog, settings):
    """The studio CA file entry with its Browse button: (entry, the box holding both)."""
    ca_file = Gtk.Entry(text=settings.ca_file, hexpand=True)
    ca_file.set_placeholder_text("none: the system's certificates")
    ca_file.set_tooltip_text("For an https:// gateway whose certificate comes from your "
                             "studio's own CA: that CA's certificate (a PEM file).")
    browse = Gtk.Button.new_with_mnemonic("_Browse...")
    browse.connect("clicked", lambda _b: _choose_ca_file(dialog, ca_file))
    ca_box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
    ca_box.pack_start(ca_file, True, True, 0)
    ca_box.pack_start(browse, False, False, 0)
    return ca_file, ca_box


def _choose_ca_file(parent, entry):
    """A file chooser for the studio CA certificate; fills ``entry`` with the path."""
    chooser = Gtk.FileChooserDialog(title="Studio CA certificate (PEM)",
                                    transient_for=parent, action=Gtk.FileChooserAction.OPEN)
    chooser.add_button("_Cancel", Gtk.ResponseType.CANCEL)
    chooser.add_button("_Open", Gtk.ResponseType.ACCEPT)
    pem = Gtk.FileFilter()
    pem.set_name("Certificates (*.pem, *.crt, *.cer)")
    for pattern in ("*.pem", "*.crt", "*.cer"):
        pem.add_pattern(pattern)
    chooser.add_filter(pem)
    everything = Gtk.FileFilter()
    everything.set_name("All files")
    everything.add_pattern("*")
    chooser.add_filter(everything)
    if chooser.run() == Gtk.ResponseType.ACCEPT and chooser.get_filename():
        entry.set_text(chooser.get_filename())
    chooser.destroy()
