#!/usr/bin/env python3
"""GIMP 3 plug-in: Filters > Generate Variations.

Sends the active layer (or the selected part of it), made square, to a variations gateway
speaking OpenAI's ``POST /v1/images/variations`` and adds the results as layers of a group
"Variations of <layer>" above the source layer. The gateway URL and token are set in
Filters > Generate Variations Settings (or VARIATIONS_GATEWAY_URL / _TOKEN), never as
procedure arguments, so they never end up inside a saved .xcf.

This file is the thin GIMP glue; the logic lives in plain modules beside it:
``vg_prepare`` (geometry), ``vg_client`` (HTTP), ``vg_settings`` (settings file).
"""

import contextlib
import json
import os
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gi

gi.require_version("Gimp", "3.0")
import vg_client  # noqa: E402
import vg_prepare  # noqa: E402
import vg_settings  # noqa: E402
import vg_steer  # noqa: E402
from gi.repository import Gimp, Gio, GLib, GObject  # noqa: E402

PROC = "python-fu-generate-variations"
PROC_MORE = "python-fu-generate-variations-more"
PROC_SETTINGS = "python-fu-generate-variations-settings"
DEFAULT_N = 4
DEFAULT_SIZE = "512x512"
CHOICE_ARGS = ("size", "square-mode")  # shown as combo boxes
RESPONSE_TEST = 1


class Failure(Exception):
    """A failure whose message is the sentence shown to the user."""


# --------------------------------------------------------------------------- helpers


def _fail(procedure, sentence, status=Gimp.PDBStatusType.EXECUTION_ERROR):
    return procedure.new_return_values(status, GLib.Error(sentence))


def _pair(result):
    """GIMP 3 getters answer (ok, a, b) or (a, b) depending on the binding; keep (a, b)."""
    t = tuple(result)
    return t[-2], t[-1]


def _settings():
    try:
        return vg_settings.load(Gimp.directory())
    except vg_settings.SettingsError as e:
        raise Failure(str(e)) from None


def _progress(text, fraction=None):
    Gimp.progress_set_text(text)
    if fraction is not None:
        Gimp.progress_update(fraction)


def _in_thread(fn, text):
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


def _autotest():
    """Test hook: GENERATE_VARIATIONS_AUTOTEST=accept-dialogs in GIMP's environment makes
    the dialogs answer by themselves (see ``_auto_accept``)."""
    return os.environ.get("GENERATE_VARIATIONS_AUTOTEST") == "accept-dialogs"


def _auto_accept(dialog, response):
    """Test hook: under ``_autotest()`` the dialogs answer ``response`` (OK / Save / Test
    Connection) by themselves once shown, so the end-to-end test drives the real
    interactive path (and GIMP's saving of last values) under Xvfb."""
    if _autotest():
        def answer():
            dialog.response(response)
            return False
        GLib.idle_add(answer)


def _autotest_record(name, value):
    """Test hook: under ``_autotest()`` with VARIATIONS_GATEWAY_DEBUG_DIR set, write what a
    dialog showed (``value``, JSON) for the end-to-end test to check on the host."""
    dbg = vg_client.debug_dir()
    if _autotest() and dbg:
        os.makedirs(dbg, exist_ok=True)
        with open(os.path.join(dbg, name), "w") as f:
            json.dump(value, f)


def _widget_kinds(widget):
    """GType names of ``widget`` and everything inside it (what the dialog drew)."""
    kinds = [type(widget).__gtype__.name]
    if hasattr(widget, "get_children"):
        for child in widget.get_children():
            kinds += _widget_kinds(child)
    return kinds


# --------------------------------------------------------------------------- preparing


def _save_png(image, path):
    ok = Gimp.file_save(Gimp.RunMode.NONINTERACTIVE, image, Gio.File.new_for_path(path), None)
    if not ok:
        raise Failure(f"GIMP could not write the temporary PNG {path}.")
    with open(path, "rb") as f:
        return f.read()


def _prepare_upload(layer, plan, tmpdir):
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


# --------------------------------------------------------------------------- importing


def _attach_record(item, record):
    """The settings that made ``item`` as a persistent JSON parasite (saved in .xcf)."""
    item.attach_parasite(Gimp.Parasite.new(vg_steer.PARASITE, Gimp.PARASITE_PERSISTENT,
                                           list(record.to_json())))


def _import_results(image, layer, plan, images, scale_to_source, tmpdir, name, records):
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
            _progress(f"Importing variation {k} of {n}...", (k - 1) / n)
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
        _progress(f"Imported {n} variation{'s' if n != 1 else ''}.", 1.0)
    except BaseException:
        if group is not None:
            with contextlib.suppress(Exception):  # already failing: keep the first error
                image.remove_layer(group)
        raise
    finally:
        image.undo_group_end()
    return group


# --------------------------------------------------------------------------- procedures


def _interactive_dialog(procedure, config, settings, layer):
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    import vg_dialog
    from gi.repository import GimpUi, Gtk

    GimpUi.init(PROC)
    dialog = GimpUi.ProcedureDialog.new(procedure, config, "Generate Variations")
    # GIMP 3.2 draws a Choice with few values as radio buttons (and warns "no mnemonic for
    # property"); asking for a combo box before fill() keeps one in 3.0 and 3.2 alike.
    for name in CHOICE_ARGS:
        dialog.get_widget(name, Gtk.ComboBox.__gtype__)
    dialog.fill(["n", "size", "square-mode", "scale-to-source", "fresh"])
    note = None
    if _record_of(layer) is not None:
        note = ("This layer is a variation: Filters > Generate More Like This makes more "
                "of them with the same settings and the next seeds.")
    rows = vg_dialog.SteerRows(Gtk, GLib, config, settings, note)
    rows.frame.set_margin_top(6)
    dialog.get_content_area().pack_start(rows.frame, False, False, 0)
    who = "no token set" if not settings.token else f"token {settings.masked_token()}"
    footer = Gtk.Label(label=f"Gateway: {settings.url} ({who}).\n"
                             "Change it in Filters > Generate Variations Settings.")
    footer.set_xalign(0.0)
    footer.get_style_context().add_class("dim-label")
    footer.set_margin_top(6)
    dialog.get_content_area().pack_end(footer, False, False, 0)
    footer.show()
    if _autotest():
        dialog.show()

        def ready():
            # Test hook: record the dialog once the gateway's controls are shown, then OK.
            _autotest_record("generate-dialog.json", {"widgets": _widget_kinds(dialog),
                                                      "steer": rows.state()})
            _auto_accept(dialog, Gtk.ResponseType.OK)
        rows.on_ready.append(ready)
    ok = dialog.run()
    if ok:
        rows.store(config)
    rows.closed = True
    dialog.destroy()
    return ok


def _record_of(drawable):
    """The record Generate Variations left on ``drawable`` (a result layer or its group),
    or None."""
    for item in (drawable, drawable.get_parent()):
        if item is None:
            continue
        parasite = item.get_parasite(vg_steer.PARASITE)
        if parasite is not None:
            record = vg_steer.read_record(bytes(parasite.get_data()))
            if record is not None:
                return record
    return None


class Args:
    """One run's arguments, from the procedure's config or from a record."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @classmethod
    def of_config(cls, config):
        return cls(n=int(config.get_property("n")), size=config.get_property("size"),
                   fresh=bool(config.get_property("fresh")),
                   square_mode=config.get_property("square-mode"),
                   scale_to_source=bool(config.get_property("scale-to-source")),
                   model=config.get_property("model") or "",
                   strength=float(config.get_property("strength")),
                   seed=int(config.get_property("seed")),
                   hint=config.get_property("hint") or "")


def _one_layer(procedure, drawables):
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer) \
            or isinstance(drawables[0], Gimp.GroupLayer):
        return None, _fail(procedure, "Generate Variations works on one ordinary layer: "
                                      "select a single layer (not a group, mask or channel) "
                                      "and try again.", Gimp.PDBStatusType.CALLING_ERROR)
    return drawables[0], None


def run_generate(procedure, run_mode, image, drawables, config, data):
    layer, error = _one_layer(procedure, drawables)
    if error is not None:
        return error
    try:
        settings = _settings()
    except Failure as e:
        return _fail(procedure, str(e))

    if run_mode == Gimp.RunMode.INTERACTIVE and not _interactive_dialog(
            procedure, config, settings, layer):
        return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    args = Args.of_config(config)
    b = Gimp.Selection.bounds(image)
    selection = (b[2], b[3], b[4] - b[2], b[5] - b[3]) if bool(b[1]) else None
    rv, seed = _generate(procedure, image, layer, args, settings, selection)
    if seed is not None:
        config.set_property("last-seed", seed)  # "Reuse last seed" in the next dialog
    return rv


def run_more(procedure, run_mode, image, drawables, config, data):
    """More like this: the settings recorded on the chosen variation (or its group), the
    next seeds, the same source layer and area."""
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
        return _fail(procedure, "Select one layer made by Generate Variations (or its group) "
                                "and try again.", Gimp.PDBStatusType.CALLING_ERROR)
    record = _record_of(drawables[0])
    if record is None:
        return _fail(procedure, f"The layer '{drawables[0].get_name()}' was not made by "
                                "Generate Variations: select one of its results (or their "
                                "group), or use Filters > Generate Variations.",
                     Gimp.PDBStatusType.CALLING_ERROR)
    source = image.get_layer_by_tattoo(record.source_tattoo) \
        if record.source_tattoo is not None else None
    if source is None or isinstance(source, Gimp.GroupLayer):
        return _fail(procedure, f"The layer these variations were made from "
                                f"('{record.source_name}') is no longer in the image, so "
                                "there is nothing to make more of.")
    try:
        settings = _settings()
    except Failure as e:
        return _fail(procedure, str(e))
    more = vg_steer.more_like_this(record)
    args = Args(fresh=False, **vars(more))
    return _generate(procedure, image, source, args, settings, record.selection)[0]


def _generate(procedure, image, layer, args, settings, selection):
    """Upload, ask the gateway, import: (return values, the first seed sent or None)."""
    Gimp.progress_init(f"Generate Variations: preparing {layer.get_name()}...")
    try:
        with tempfile.TemporaryDirectory(prefix="generate-variations-") as tmpdir:
            # No token is fine for a gateway with auth mode "none"; one that wants a token
            # answers 401, which reads as "The gateway needs a token ...".
            lx, ly = _pair(layer.get_offsets())
            bounds = None if selection is None else (
                selection[0], selection[1], selection[0] + selection[2],
                selection[1] + selection[3])
            try:
                plan = vg_prepare.make_plan(lx, ly, layer.get_width(), layer.get_height(),
                                            bounds, args.square_mode, args.size)
            except vg_prepare.PrepareError as e:
                raise Failure(str(e)) from None
            _progress("Preparing the square source image...", 0.0)
            png, side = _prepare_upload(layer, plan, tmpdir)
            dbg = vg_client.debug_dir()
            if dbg:
                os.makedirs(dbg, exist_ok=True)
                with open(os.path.join(dbg, "upload.png"), "wb") as f:
                    f.write(png)
            controls = _in_thread(lambda: vg_steer.model_controls(
                settings.url, settings.token, args.model, settings.timeout,
                settings.ca_file), "Asking the gateway what the model honours...")
            try:
                steer = vg_steer.plan(controls, model=args.model, strength=args.strength,
                                      seed=args.seed, hint=args.hint, n=args.n)
            except vg_steer.SteerError as e:
                raise Failure(str(e)) from None
            _progress(f"Uploading {len(png) // 1024 + 1} KB ({side}x{side}) to "
                      f"{settings.url}...", 0.05)
            n, size = args.n, args.size
            try:
                result = _in_thread(
                    lambda: vg_client.request_variations(
                        settings.url, settings.token, png, n=n, size=size, fresh=args.fresh,
                        timeout=settings.timeout, ca_file=settings.ca_file,
                        extra=steer.fields()),
                    f"Waiting for the gateway to make {n} variation"
                    f"{'s' if n != 1 else ''} ({size})...")
            except vg_client.GatewayError as e:
                raise Failure(str(e)) from None
            records = vg_steer.records(
                steer, request_id=result.request_id, n=n, size=size,
                square_mode=args.square_mode, scale_to_source=args.scale_to_source,
                source_tattoo=layer.get_tattoo(), source_name=layer.get_name(),
                selection=selection)
            _import_results(image, layer, plan, result.images, args.scale_to_source,
                            tmpdir, vg_steer.group_name(layer.get_name(), steer), records)
    except Failure as e:
        Gimp.progress_end()
        return _fail(procedure, str(e)), None
    except Exception as e:
        Gimp.progress_end()
        return _fail(procedure, f"Generate Variations failed unexpectedly: {e}"), None
    Gimp.progress_end()
    Gimp.displays_flush()
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error()), steer.seed


def _settings_dialog(settings):
    """A plain GTK dialog: nothing typed here becomes a procedure argument, so GIMP never
    stores the token in its profile or in an .xcf. Returns the summary shown last."""
    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from gi.repository import GimpUi, Gtk

    GimpUi.init(PROC_SETTINGS)
    dialog = GimpUi.Dialog(title="Generate Variations Settings", role=PROC_SETTINGS)
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
    ca_file = Gtk.Entry(text=settings.ca_file, hexpand=True)
    ca_file.set_placeholder_text("none: the system's certificates")
    ca_file.set_tooltip_text("For an https:// gateway whose certificate comes from your "
                             "studio's own CA: that CA's certificate (a PEM file).")
    browse = Gtk.Button.new_with_mnemonic("_Browse...")
    browse.connect("clicked", lambda _b: _choose_ca_file(dialog, ca_file))
    ca_box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
    ca_box.pack_start(ca_file, True, True, 0)
    ca_box.pack_start(browse, False, False, 0)
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
    # Test Connection runs in a thread (a slow or dead gateway would freeze the dialog on
    # the GTK thread for up to 15 s); its answer comes back through GLib.idle_add, and is
    # dropped once the dialog is gone.
    state = {"summary": "", "closed": False}

    def show(text):
        if not state["closed"]:
            state["summary"] = text
            status.set_text(text)
            test_button.set_sensitive(True)
            # Test hook: Test Connection answered in the dialog, so Save now.
            _autotest_record("settings-dialog.json", {
                "tested": status.get_text(),
                "loop_ran_while_testing": state.get("loop_ran_while_testing", False)})
            _auto_accept(dialog, Gtk.ResponseType.OK)
        return False

    def loop_ran():
        # Queued before Test Connection starts: it runs ahead of the answer only when the
        # test leaves the GTK loop free (idle callbacks run in order).
        state["loop_ran_while_testing"] = not state["summary"]
        return False

    def press_test():
        GLib.idle_add(loop_ran)
        dialog.response(RESPONSE_TEST)
        return False

    if _autotest():
        # Test hook: press Test Connection first; its answer then presses Save (see show).
        GLib.idle_add(press_test)
    while True:
        response = dialog.run()
        if response == RESPONSE_TEST:
            if not test_button.get_sensitive():
                continue
            status.set_text("Testing...")
            test_button.set_sensitive(False)
            # Widgets are read here, on the GTK thread; the thread gets plain values.
            args = (url.get_text(), token.get_text(), timeout.get_value(), ca_file.get_text())
            vg_client.call_in_background(
                lambda a=args: vg_client.usage_summary(*a),
                lambda text: GLib.idle_add(show, text))
            continue
        if response == Gtk.ResponseType.OK:
            try:
                # Fields an environment variable sets show its value; never write those.
                vg_settings.save(Gimp.directory(), url.get_text(), token.get_text(),
                                 timeout.get_value(), ca_file=ca_file.get_text(),
                                 from_env=settings.from_env)
            except vg_settings.SettingsError as e:
                status.set_text(str(e))
                continue
            state["closed"] = True
            dialog.destroy()
            return True, state["summary"]
        state["closed"] = True
        dialog.destroy()
        return False, state["summary"]


def _choose_ca_file(parent, entry):
    """A file chooser for the studio CA certificate; fills ``entry`` with the path."""
    from gi.repository import Gtk

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


def _usage_summary(settings):
    """The quota summary for the settings in force, or raise GatewayError."""
    return vg_client.usage_summary(settings.url, settings.token, settings.timeout,
                                   settings.ca_file)


def run_settings(procedure, config, data):
    run_mode = config.get_property("run-mode")
    try:
        settings = _settings()
    except Failure as e:
        return _fail(procedure, str(e))
    if run_mode == Gimp.RunMode.INTERACTIVE:
        saved, _ = _settings_dialog(settings)
        if not saved:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
        try:
            settings = _settings()
            summary = _usage_summary(settings)
        except (Failure, vg_client.GatewayError) as e:
            # Saved all the same: say what is wrong without calling the save a failure.
            summary = f"Settings saved, but: {e}"
            Gimp.message(summary)
        return _with_summary(procedure, summary)
    # Non-interactive (scripts, tests): test the connection with the settings in force
    # and return what the gateway says about the user's quota.
    try:
        summary = _usage_summary(settings)
    except vg_client.GatewayError as e:
        return _fail(procedure, str(e))
    return _with_summary(procedure, summary)


def _with_summary(procedure, summary):
    rv = procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error())
    rv.remove(1)
    rv.insert(1, GObject.Value(GObject.TYPE_STRING, summary))
    return rv


class GenerateVariations(Gimp.PlugIn):
    def do_set_i18n(self, name):
        return False

    def do_query_procedures(self):
        return [PROC, PROC_MORE, PROC_SETTINGS]

    def do_create_procedure(self, name):
        if name == PROC_SETTINGS:
            p = Gimp.Procedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_settings, None)
            p.set_menu_label("Generate Variations _Settings...")
            p.add_menu_path("<Image>/Filters")
            p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.ALWAYS)
            p.set_documentation(
                "Gateway URL and token for Generate Variations",
                "Edits the gateway URL, token, timeout and studio CA file (kept in a file "
                "readable only by you in GIMP's config folder, never in images), tests the "
                "connection and shows the quota left. Non-interactively it tests the "
                "settings in force and returns the quota summary.", name)
            p.set_attribution("variations-gateway", "variations-gateway", "2025")
            p.add_enum_argument("run-mode", "Run mode", "The run mode", Gimp.RunMode,
                                Gimp.RunMode.INTERACTIVE, GObject.ParamFlags.READWRITE)
            p.add_string_return_value("summary", "Summary",
                                      "The user's quota as the gateway reports it", "",
                                      GObject.ParamFlags.READWRITE)
            return p

        if name == PROC_MORE:
            p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_more, None)
            p.set_image_types("*")
            p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
            p.set_menu_label("Generate _More Like This")
            p.add_menu_path("<Image>/Filters")
            p.set_documentation(
                "More variations with the same settings and the next seeds",
                "Run on a layer (or group) made by Generate Variations: makes as many "
                "variations again of the same source layer and area, with the same model, "
                "strength, hint, size and shape, and the seeds that follow the group's.", name)
            p.set_attribution("variations-gateway", "variations-gateway", "2025")
            return p

        p = Gimp.ImageProcedure.new(self, name, Gimp.PDBProcType.PLUGIN, run_generate, None)
        p.set_image_types("*")
        p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
        p.set_menu_label("Generate _Variations...")
        p.add_menu_path("<Image>/Filters")
        p.set_documentation(
            "Image variations from a variations gateway",
            "Sends the selected part of the active layer (or the whole layer), made square, "
            "to the team's variations gateway (OpenAI /v1/images/variations) and adds the "
            "results as layers in a group above the layer.", name)
        p.set_attribution("variations-gateway", "variations-gateway", "2025")
        p.add_int_argument("n", "_Number of variations", "How many variations (1-10)",
                           1, 10, DEFAULT_N, GObject.ParamFlags.READWRITE)
        sizes = Gimp.Choice.new()
        for i, s in enumerate(vg_prepare.SIZES):
            sizes.add(s, i, s.replace("x", " x "), "")
        p.add_choice_argument("size", "Si_ze", "Size the gateway makes", sizes,
                              DEFAULT_SIZE, GObject.ParamFlags.READWRITE)
        p.add_boolean_argument("fresh", "_Fresh results (bypass the gateway cache)",
                               "Ask for new images even when the gateway has some cached",
                               False, GObject.ParamFlags.READWRITE)
        modes = Gimp.Choice.new()
        modes.add("selection-or-center-crop", 0, "Crop to a centred square",
                  "The largest square in the middle of the selection or layer")
        modes.add("pad", 1, "Pad to a square with transparency", "Keeps everything")
        modes.add("stretch", 2, "Stretch to a square", "Distorts, then scales back")
        p.add_choice_argument("square-mode", "S_quare mode",
                              "How a non-square source is made square", modes,
                              vg_prepare.DEFAULT_SQUARE_MODE, GObject.ParamFlags.READWRITE)
        p.add_boolean_argument("scale-to-source", "Scale results back to the source _area",
                               "Scale each result back over the pixels it was made from",
                               True, GObject.ParamFlags.READWRITE)
        _add_steer_arguments(p)
        return p


def _add_steer_arguments(p):
    """Issue 22's controls: sent only when set and honoured by the model (vg_steer)."""
    rw = GObject.ParamFlags.READWRITE
    p.add_string_argument("model", "_Model", "A model the gateway lists in /v1/models; "
                          "empty: the gateway's default", "", rw)
    p.add_double_argument("strength", "How _different",
                          "How far the variations stray, 0 to 1; -1: the model's default",
                          vg_steer.MODEL_DEFAULT, 1.0, vg_steer.MODEL_DEFAULT, rw)
    p.add_int_argument("seed", "S_eed", "Seed of the first variation (the next ones use "
                       "seed + 1, ...); -1: a random one", vg_steer.RANDOM_SEED,
                       vg_steer.SEED_MAX, vg_steer.RANDOM_SEED, rw)
    p.add_string_argument("hint", "_Hint", "Optional words to steer the variations, "
                          "e.g. autumn colours", "", rw)
    # Not an argument of the call: the first seed of the last run, for "Reuse last seed".
    p.add_int_aux_argument("last-seed", "Last seed", "The first seed the last run used",
                           -1, vg_steer.SEED_MAX, -1, rw)


Gimp.main(GenerateVariations.__gtype__, sys.argv)
