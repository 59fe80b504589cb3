"""The Generate Variations dialog (GTK glue): GIMP's procedure dialog for the plain
arguments, the steering rows below it (issue 22), and a footer naming the gateway.

Model, "How different" (strength), seed and hint are procedure arguments (scripts pass
them, GIMP remembers them), but drawn here rather than by ``ProcedureDialog.fill``: the
slider's default is the chosen model's (``controls.strength.default`` of
``GET /v1/models``), and a control that model cannot honour is greyed out with a tooltip
saying why. The model list is fetched in a thread, so the dialog opens at once; the
answer comes back through ``GLib.idle_add``. The values go into the config on OK
(:meth:`SteerRows.store`); the decisions themselves live in ``vg_steer``.

GTK is imported only when a dialog opens: a non-interactive run never loads it.
"""

import threading

import vg_autotest
import vg_steer
from vg_errors import GatewayError, shown

LOADING = "Asking the gateway which controls this model honours..."
CHOICE_ARGS = ("size", "square-mode")  # shown as combo boxes
MORE_NOTE = ("This layer is a variation: Filters > Generate More Like This makes more "
             "of them with the same settings and the next seeds.")


def more_note(record):
    """The line of the More like this dialog: what the shown settings come from."""
    seeds = "" if record.first_seed is None else f" (seeds from {record.first_seed})"
    return (f"More like this: the settings recorded with these variations{seeds}, the "
            f"next seeds, from the layer '{shown(record.source_name)}'. Nothing is sent "
            "until you press OK.")


def generate_dialog(procedure, config, settings, note=None, title="Generate Variations"):
    """Show the dialog; on OK the steering rows go into ``config``. Returns (True for OK,
    the controls the dialog showed once the gateway answered, else None), so the run does
    not ask the gateway a second time (the answer could differ from what was shown)."""
    import gi

    gi.require_version("GimpUi", "3.0")
    gi.require_version("Gtk", "3.0")
    from gi.repository import GimpUi, GLib, Gtk

    GimpUi.init(procedure.get_name())
    dialog = GimpUi.ProcedureDialog.new(procedure, config, title)
    # GIMP 3.2 draws a Choice with few values as radio buttons (and warns "no mnemonic for
    # property"); asking for a combo box before fill() keeps one in 3.0 and 3.2 alike.
    for name in CHOICE_ARGS:
        dialog.get_widget(name, Gtk.ComboBox.__gtype__)
    dialog.fill(["n", "size", "square-mode", "scale-to-source", "fresh"])
    rows = SteerRows(Gtk, GLib, config, settings, note)
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
    if vg_autotest.active():
        dialog.show()

        def ready():
            # Test hook: record the dialog once the gateway's controls are shown, then OK.
            kind = "more" if procedure.get_name().endswith("-more") else "generate"
            vg_autotest.record(f"{kind}-dialog.json", {
                "widgets": vg_autotest.widget_kinds(dialog), "steer": rows.state()})
            vg_autotest.auto_accept(dialog, Gtk.ResponseType.OK)
        rows.on_ready.append(ready)
    ok = dialog.run()
    if ok:
        rows.store(config)
    rows.closed = True
    dialog.destroy()
    return ok, rows.controls if rows.answered else None


class SteerRows:
    def __init__(self, Gtk, GLib, config, settings, note=None):
        self.Gtk, self.GLib = Gtk, GLib
        self.model = config.get_property("model") or ""
        self.strength_arg = float(config.get_property("strength"))
        self.seed_arg = int(config.get_property("seed"))
        self.last_seed = int(config.get_property("last-seed"))
        self.controls = vg_steer.unknown("no answer yet")
        self.models = None
        self.answered = False  # the gateway's model list (or its failure) arrived
        self.closed = False
        self.on_ready = []  # callbacks once the gateway's answer is shown
        self._setting = False  # the slider is moved by code, not by the artist
        self.touched = self.strength_arg != vg_steer.MODEL_DEFAULT
        self.frame = self._build(config, note)
        self._apply(vg_steer.Controls(why=LOADING))
        self._fetch(settings)

    # ------------------------------------------------------------------ widgets
    def _build(self, config, note):
        Gtk = self.Gtk
        grid = Gtk.Grid(row_spacing=6, column_spacing=12, border_width=6)

        def row(y, text, widget, focus=None):
            label = Gtk.Label(label=text, xalign=0.0, use_underline=True)
            label.set_mnemonic_widget(focus or widget)
            grid.attach(label, 0, y, 1, 1)
            grid.attach(widget, 1, y, 1, 1)
            return label

        self.model_combo = Gtk.ComboBoxText(hexpand=True)
        self.model_combo.append("", "Gateway default")
        if self.model:
            self.model_combo.append(self.model, self.model)
        self.model_combo.set_active_id(self.model)
        self.model_combo.connect("changed", self._model_changed)
        row(0, "_Model", self.model_combo)

        adj = Gtk.Adjustment(value=self._slider_start(None), lower=0.0, upper=1.0,
                             step_increment=0.05, page_increment=0.1)
        self.strength = Gtk.Scale(orientation=Gtk.Orientation.HORIZONTAL, adjustment=adj,
                                  digits=2, hexpand=True, value_pos=Gtk.PositionType.RIGHT)
        self.strength.add_mark(0.0, Gtk.PositionType.BOTTOM, "close")
        self.strength.add_mark(1.0, Gtk.PositionType.BOTTOM, "far")
        self.strength.connect("value-changed", self._strength_moved)
        self.strength_label = row(1, "How _different", self.strength)

        self.random = Gtk.CheckButton.new_with_mnemonic("_Random")
        self.random.set_active(self.seed_arg == vg_steer.RANDOM_SEED)
        self.seed = Gtk.SpinButton.new_with_range(0, vg_steer.SEED_MAX, 1)
        self.seed.set_value(max(0, self.seed_arg if self.seed_arg >= 0 else self.last_seed))
        self.reuse = Gtk.Button.new_with_mnemonic(self._reuse_text())
        self.reuse.connect("clicked", self._reuse_clicked)
        self.random.connect("toggled", lambda _b: self._seed_sensitivity())
        seed_box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        for w in (self.random, self.seed, self.reuse):
            seed_box.pack_start(w, False, False, 0)
        self.seed_box = seed_box
        self.seed_label = row(2, "S_eed", seed_box, self.seed)

        self.hint = Gtk.Entry(text=config.get_property("hint") or "", hexpand=True)
        self.hint.set_placeholder_text("optional, e.g. autumn colours")
        self.hint.set_max_length(vg_steer.PROMPT_MAX)
        self.hint_label = row(3, "_Hint", self.hint)

        self.status = Gtk.Label(xalign=0.0, wrap=True, max_width_chars=60)
        self.status.get_style_context().add_class("dim-label")
        grid.attach(self.status, 0, 4, 2, 1)
        if note:
            extra = Gtk.Label(label=note, xalign=0.0, wrap=True, max_width_chars=60)
            extra.get_style_context().add_class("dim-label")
            grid.attach(extra, 0, 5, 2, 1)
        frame = Gtk.Frame(label="Steering")
        frame.add(grid)
        frame.show_all()
        return frame

    def _reuse_text(self):
        if self.last_seed < 0:
            return "Reuse _last seed"
        return f"Reuse _last seed ({self.last_seed})"

    def _slider_start(self, controls):
        if self.strength_arg != vg_steer.MODEL_DEFAULT:
            return self.strength_arg
        if controls is not None and controls.strength_default is not None:
            return controls.strength_default
        return 0.5

    # ------------------------------------------------------------------ events
    def _strength_moved(self, _scale):
        if not self._setting:
            self.touched = True

    def _reuse_clicked(self, _button):
        if self.last_seed >= 0:
            self.seed.set_value(self.last_seed)
            self.random.set_active(False)

    def _model_changed(self, combo):
        self.model = combo.get_active_id() or ""
        if self.models is not None:
            self._apply(self.models.of(self.model))

    def _seed_sensitivity(self):
        on = self.controls.editable("seed")
        self.random.set_sensitive(on)
        self.seed.set_sensitive(on and not self.random.get_active())
        self.reuse.set_sensitive(on and self.last_seed >= 0)

    def _apply(self, controls):
        """Grey out what the model cannot honour, with the reason as tooltip (controls the
        gateway said nothing about stay editable: ``vg_steer.plan`` sends them if set);
        the slider takes the model's default unless the artist chose a strength."""
        self.controls = controls
        name = self.model or vg_steer.DEFAULT_MODEL
        for key, widgets in (("strength", (self.strength, self.strength_label)),
                             ("seed", (self.seed_box, self.seed_label)),
                             ("prompt", (self.hint, self.hint_label))):
            for w in widgets:
                w.set_sensitive(controls.editable(key))
                w.set_tooltip_text(controls.tooltip(key, name))
        self._seed_sensitivity()
        if controls.strength and not self.touched:
            self._setting = True
            self.strength.set_value(self._slider_start(controls))
            self._setting = False
        if controls.strength:
            d = controls.strength_default
            self.strength.set_tooltip_text(
                "How far the variations may stray from the source: 0 stays close, 1 goes "
                "far." + (f" This model's default: {d:g}." if d is not None else ""))
        self.hint.set_max_length(controls.prompt_max)
        self.status.set_text(controls.why if not controls.known else
                             f"Model '{name}' honours: " + (", ".join(
                                 w for k, w in (("strength", "how different"),
                                                ("seed", "seed"), ("prompt", "hint"))
                                 if controls.honours(k)) or "none of these") + ".")

    def _fetch(self, settings):
        def work():
            try:
                result = vg_steer.get_models(settings.url, settings.token, settings.timeout,
                                             settings.ca_file)
            except GatewayError as e:
                result = str(e)
            except Exception as e:  # a thread must not die with a traceback
                result = f"the model list could not be read ({type(e).__name__})."
            self.GLib.idle_add(self._deliver, result)

        threading.Thread(target=work, name="generate-variations-models", daemon=True).start()

    def _deliver(self, result):
        if self.closed:
            return False
        self.answered = True
        if isinstance(result, str):
            self._apply(vg_steer.unknown(result))
        else:
            self.models = result
            for model_id in result.ids:
                if model_id != self.model and model_id != vg_steer.DEFAULT_MODEL:
                    self.model_combo.append(model_id, model_id)
            self._apply(result.of(self.model))
        for callback in self.on_ready:
            callback()
        return False

    # ------------------------------------------------------------------ OK
    def store(self, config):
        """Write the rows into the procedure's arguments (GIMP remembers them). A strength
        the artist never moved stays "the model's default"; greyed-out controls keep their
        last values but are not sent (``vg_steer.plan`` drops them: the same
        ``Controls.editable`` rule)."""
        self.closed = True
        config.set_property("model", self.model)
        if self.controls.editable("strength") and self.touched:
            config.set_property("strength", round(self.strength.get_value(), 2))
        if self.controls.editable("seed"):
            config.set_property("seed", vg_steer.RANDOM_SEED if self.random.get_active()
                                else int(self.seed.get_value()))
        if self.controls.editable("prompt"):
            config.set_property("hint", self.hint.get_text())

    def state(self):
        """What the rows show (the end-to-end test's record)."""
        return {
            "model": self.model,
            "strength": {"sensitive": self.strength.get_sensitive(),
                         "value": round(self.strength.get_value(), 2),
                         "tooltip": self.strength.get_tooltip_text()},
            "seed": {"sensitive": self.seed_box.get_sensitive(),
                     "random": self.random.get_active(),
                     "tooltip": self.seed_box.get_tooltip_text()},
            "hint": {"sensitive": self.hint.get_sensitive(),
                     "tooltip": self.hint.get_tooltip_text()},
            "status": self.status.get_text(),
        }
