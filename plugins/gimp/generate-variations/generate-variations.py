#!/usr/bin/env python3
"""GIMP 3 plug-in: Filters > Generate Variations.

Sends the active layer (or the selected part of it), made square, to a variations gateway
speaking OpenAI's ``POST /v1/images/variations`` and adds the results as layers of a group
"Variations of <layer>" above the source layer. The gateway URL and token are set in
Filters > Generate Variations Settings (or VARIATIONS_GATEWAY_URL / _TOKEN), never as
procedure arguments, so they never end up inside a saved .xcf.

This file registers the procedures and runs them; the rest lives in modules beside it.
Plain Python, importable without GIMP: ``vg_prepare`` (geometry), ``vg_client`` (the
gateway calls, over ``vg_http``, ``vg_multipart``, ``vg_errors``), ``vg_steer``
(steering), ``vg_settings`` (settings file). GIMP glue: ``vg_gimp`` (failures, progress),
``vg_layers`` (pixels in and out), ``vg_dialog`` and ``vg_settings_dialog`` (the dialogs,
loaded only for interactive runs), ``vg_autotest`` (the dialogs' test hooks).
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gi

gi.require_version("Gimp", "3.0")
import vg_client  # noqa: E402
import vg_layers  # noqa: E402
import vg_prepare  # noqa: E402
import vg_steer  # noqa: E402
from gi.repository import Gimp, GLib, GObject  # noqa: E402
from vg_errors import shown  # noqa: E402
from vg_gimp import Failure, fail, in_thread, load_settings, pair, progress  # noqa: E402

PROC = "python-fu-generate-variations"
PROC_MORE = "python-fu-generate-variations-more"
PROC_SETTINGS = "python-fu-generate-variations-settings"
DEFAULT_N = 4
DEFAULT_SIZE = "512x512"


# --------------------------------------------------------------------------- procedures


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
        return None, fail(procedure, "Generate Variations works on one ordinary layer: "
                                     "select a single layer (not a group, mask or channel) "
                                     "and try again.", Gimp.PDBStatusType.CALLING_ERROR)
    return drawables[0], None


def run_generate(procedure, run_mode, image, drawables, config, data):
    layer, error = _one_layer(procedure, drawables)
    if error is not None:
        return error
    try:
        settings = load_settings()
    except Failure as e:
        return fail(procedure, str(e))

    controls = None
    if run_mode == Gimp.RunMode.INTERACTIVE:
        import vg_dialog  # GTK only for interactive runs

        note = vg_dialog.MORE_NOTE if vg_layers.record_of(layer) is not None else None
        ok, controls = vg_dialog.generate_dialog(procedure, config, settings, note)
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    args = Args.of_config(config)
    b = Gimp.Selection.bounds(image)
    selection = (b[2], b[3], b[4] - b[2], b[5] - b[3]) if bool(b[1]) else None
    rv, seed = _generate(procedure, image, layer, args, settings, selection, controls)
    if seed is not None:
        config.set_property("last-seed", seed)  # "Reuse last seed" in the next dialog
    return rv


def run_more(procedure, run_mode, image, drawables, config, data):
    """More like this: the settings recorded on the chosen variation (or its group), the
    next seeds, the same source layer and area. Interactively the Generate Variations
    dialog shows them first: the record may come from someone else's .xcf, and only the
    artist's OK spends their quota."""
    if len(drawables) != 1 or not isinstance(drawables[0], Gimp.Layer):
        return fail(procedure, "Select one layer made by Generate Variations (or its group) "
                               "and try again.", Gimp.PDBStatusType.CALLING_ERROR)
    name = shown(drawables[0].get_name())
    record, refused = vg_layers.find_record(drawables[0])
    if refused:
        return fail(procedure, f"The record on the layer '{name}' is not one the plug-in "
                               "wrote (a value is missing, of the wrong kind or out of "
                               "range), so More like this will not use it and nothing was "
                               "sent. Use Filters > Generate Variations instead.",
                    Gimp.PDBStatusType.CALLING_ERROR)
    if record is None:
        return fail(procedure, f"The layer '{name}' was not made by Generate Variations: "
                               "select one of its results (or their group), or use "
                               "Filters > Generate Variations.",
                    Gimp.PDBStatusType.CALLING_ERROR)
    source = _source_of(image, record)
    if isinstance(source, str):
        return fail(procedure, source)
    try:
        settings = load_settings()
    except Failure as e:
        return fail(procedure, str(e))
    more = vg_steer.more_like_this(record)
    for key, value in vars(more).items():  # the record's settings, the next seeds
        config.set_property(key.replace("_", "-"), value)
    config.set_property("fresh", False)
    controls = None
    if run_mode == Gimp.RunMode.INTERACTIVE:
        import vg_dialog  # GTK only for interactive runs

        note = vg_dialog.more_note(record)
        ok, controls = vg_dialog.generate_dialog(procedure, config, settings, note,
                                                 "Generate More Like This")
        if not ok:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
    return _generate(procedure, image, source, Args.of_config(config), settings,
                     record.selection, controls)[0]


def _source_of(image, record):
    """The layer the record's variations were made from, or the sentence why there is
    none. The tattoo alone is a small number any image has: the layer found must also
    carry the recorded name, so a record from another image never uploads a layer the
    artist did not pick."""
    source = image.get_layer_by_tattoo(record.source_tattoo) \
        if record.source_tattoo is not None else None
    name = shown(record.source_name)
    if source is None or isinstance(source, Gimp.GroupLayer):
        return (f"The layer these variations were made from ('{name}') is no longer in the "
                "image, so there is nothing to make more of.")
    if source.get_name() != record.source_name:
        return (f"These variations were made from a layer '{name}', but the layer they "
                f"point to in this image is '{shown(source.get_name())}' (they "
                "may come from another image, or the layer was renamed), so nothing was "
                "sent. Rename the layer back, or use Filters > Generate Variations on it.")
    return source


def _generate(procedure, image, layer, args, settings, selection, controls=None):
    """Upload, ask the gateway, import: (return values, the first seed sent or None).
    ``controls``: what the dialog showed for the model; None (a script, or the dialog's
    question unanswered) asks the gateway here."""
    Gimp.progress_init(f"Generate Variations: preparing {layer.get_name()}...")
    try:
        with tempfile.TemporaryDirectory(prefix="generate-variations-") as tmpdir:
            # No token is fine for a gateway with auth mode "none"; one that wants a token
            # answers 401, which reads as "The gateway needs a token ...".
            lx, ly = pair(layer.get_offsets())
            bounds = None if selection is None else (
                selection[0], selection[1], selection[0] + selection[2],
                selection[1] + selection[3])
            try:
                plan = vg_prepare.make_plan(lx, ly, layer.get_width(), layer.get_height(),
                                            bounds, args.square_mode, args.size)
            except vg_prepare.PrepareError as e:
                raise Failure(str(e)) from None
            progress("Preparing the square source image...", 0.0)
            png, side = vg_layers.prepare_upload(layer, plan, tmpdir)
            dbg = vg_client.debug_dir()
            if dbg:
                os.makedirs(dbg, exist_ok=True)
                with open(os.path.join(dbg, "upload.png"), "wb") as f:
                    f.write(png)
            if controls is None:
                controls = in_thread(lambda: vg_steer.model_controls(
                    settings.url, settings.token, args.model, settings.timeout,
                    settings.ca_file), "Asking the gateway what the model honours...")
            try:
                steer = vg_steer.plan(controls, model=args.model, strength=args.strength,
                                      seed=args.seed, hint=args.hint, n=args.n)
            except vg_steer.SteerError as e:
                raise Failure(str(e)) from None
            progress(f"Uploading {len(png) // 1024 + 1} KB ({side}x{side}) to "
                     f"{settings.url}...", 0.05)
            n, size = args.n, args.size
            try:
                result = in_thread(
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
            vg_layers.import_results(image, layer, plan, result.images, args.scale_to_source,
                            tmpdir, vg_steer.group_name(layer.get_name(), steer), records)
    except Failure as e:
        Gimp.progress_end()
        return fail(procedure, str(e)), None
    except Exception as e:
        Gimp.progress_end()
        return fail(procedure, f"Generate Variations failed unexpectedly: {e}"), None
    Gimp.progress_end()
    Gimp.displays_flush()
    return procedure.new_return_values(Gimp.PDBStatusType.SUCCESS, GLib.Error()), steer.seed


def _usage_summary(settings):
    """The quota summary for the settings in force, or raise GatewayError."""
    return vg_client.usage_summary(settings.url, settings.token, settings.timeout,
                                   settings.ca_file)


def run_settings(procedure, config, data):
    run_mode = config.get_property("run-mode")
    try:
        settings = load_settings()
    except Failure as e:
        return fail(procedure, str(e))
    if run_mode == Gimp.RunMode.INTERACTIVE:
        import vg_settings_dialog  # GTK only for interactive runs

        saved, _ = vg_settings_dialog.settings_dialog(settings, procedure.get_name())
        if not saved:
            return procedure.new_return_values(Gimp.PDBStatusType.CANCEL, GLib.Error())
        try:
            settings = load_settings()
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
        return fail(procedure, str(e))
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
            return _settings_procedure(self, name)
        if name == PROC_MORE:
            return _more_procedure(self, name)
        return _generate_procedure(self, name)


def _generate_procedure(plugin, name):
    """Filters > Generate Variations..."""
    p = Gimp.ImageProcedure.new(plugin, name, Gimp.PDBProcType.PLUGIN, run_generate, None)
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
    _add_run_arguments(p)
    return p


def _add_run_arguments(p):
    """The run's arguments. More like this has them too, to hold what its dialog shows,
    but takes their values from the record (aux arguments would do, but GIMP 3.0's
    add_choice_aux_argument is annotated transfer none and frees the Choice)."""
    rw = GObject.ParamFlags.READWRITE

    def add(what, *args):
        getattr(p, f"add_{what}_argument")(*args)

    add("int", "n", "_Number of variations", "How many variations (1-10)", 1,
        vg_steer.N_MAX, DEFAULT_N, rw)
    sizes = Gimp.Choice.new()
    for i, s in enumerate(vg_prepare.SIZES):
        sizes.add(s, i, s.replace("x", " x "), "")
    add("choice", "size", "Si_ze", "Size the gateway makes", sizes, DEFAULT_SIZE, rw)
    add("boolean", "fresh", "_Fresh results (bypass the gateway cache)",
        "Ask for new images even when the gateway has some cached", False, rw)
    modes = Gimp.Choice.new()
    modes.add("selection-or-center-crop", 0, "Crop to a centred square",
              "The largest square in the middle of the selection or layer")
    modes.add("pad", 1, "Pad to a square with transparency", "Keeps everything")
    modes.add("stretch", 2, "Stretch to a square", "Distorts, then scales back")
    add("choice", "square-mode", "S_quare mode", "How a non-square source is made square",
        modes, vg_prepare.DEFAULT_SQUARE_MODE, rw)
    add("boolean", "scale-to-source", "Scale results back to the source _area",
        "Scale each result back over the pixels it was made from", True, rw)
    _add_steer_arguments(p, add)


def _more_procedure(plugin, name):
    """Filters > Generate More Like This (on a result layer or its group)."""
    p = Gimp.ImageProcedure.new(plugin, name, Gimp.PDBProcType.PLUGIN, run_more, None)
    p.set_image_types("*")
    p.set_sensitivity_mask(Gimp.ProcedureSensitivityMask.DRAWABLE)
    p.set_menu_label("Generate _More Like This...")
    p.add_menu_path("<Image>/Filters")
    p.set_documentation(
        "More variations with the same settings and the next seeds",
        "Run on a layer (or group) made by Generate Variations: makes as many "
        "variations again of the same source layer and area, with the same model, "
        "strength, hint, size and shape, and the seeds that follow the group's. "
        "Interactively the settings are shown for confirmation first. The arguments "
        "beyond image and drawables are set from the layer's record.", name)
    p.set_attribution("variations-gateway", "variations-gateway", "2025")
    _add_run_arguments(p)
    return p


def _settings_procedure(plugin, name):
    """Filters > Generate Variations Settings..."""
    p = Gimp.Procedure.new(plugin, name, Gimp.PDBProcType.PLUGIN, run_settings, None)
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


def _add_steer_arguments(p, add):
    """Issue 22's controls: sent when set and honoured by the model (vg_steer)."""
    rw = GObject.ParamFlags.READWRITE
    add("string", "model", "_Model", "A model the gateway lists in /v1/models; "
        "empty: the gateway's default", "", rw)
    add("double", "strength", "How _different",
        "How far the variations stray, 0 to 1; -1: the model's default",
        vg_steer.MODEL_DEFAULT, 1.0, vg_steer.MODEL_DEFAULT, rw)
    add("int", "seed", "S_eed", "Seed of the first variation (the next ones use "
        "seed + 1, ...); -1: a random one", vg_steer.RANDOM_SEED, vg_steer.SEED_MAX,
        vg_steer.RANDOM_SEED, rw)
    add("string", "hint", "_Hint", "Optional words to steer the variations, "
        "e.g. autumn colours", "", rw)
    # Not an argument of the call: the first seed of the last run, for "Reuse last seed".
    p.add_int_aux_argument("last-seed", "Last seed", "The first seed the last run used",
                           -1, vg_steer.SEED_MAX, -1, rw)


Gimp.main(GenerateVariations.__gtype__, sys.argv)
