"""What the artist steers (issue 22): how different, which seed, a hint, more of the same.

The gateway takes three optional fields beyond OpenAI's contract (``strength`` 0..1,
``seed``: image i uses seed + i, ``prompt``: a hint) and says per model, in the
``controls`` object of ``GET /v1/models``, which of them that model's route honours. This
module decides what a run sends (only controls that are set and honoured), names the
result group after the settings, writes and reads the JSON parasite on each result layer,
and derives "More like this" (same settings, the next seeds) from it.

Standard library only and importable without GIMP: the unit tests run it directly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import vg_http
from vg_errors import SHOWN_MAX, GatewayError
from vg_prepare import SIZES, SQUARE_MODES

SEED_MAX = 2147483647
RANDOM_SEED = -1  # the ``seed`` argument's "random": the plug-in draws one per run
MODEL_DEFAULT = -1.0  # the ``strength`` argument's "the model's own default": not sent
PROMPT_MAX = 1000
N_MAX = 10  # images per request, as OpenAI's n
MODEL_MAX = 100  # a model id the plug-in would have sent
DEFAULT_MODEL = "dall-e-2"  # the gateway's route (``model`` not sent)
PARASITE = "generate-variations"  # on every result layer and group; JSON
PARASITE_VERSION = 1
CONTROL_WORDS = {"strength": "How different (strength)", "seed": "a seed",
                 "prompt": "a hint"}


class SteerError(ValueError):
    """Arguments the plug-in cannot send; the message is the sentence for the user."""


@dataclass(frozen=True)
class Controls:
    """What one gateway model honours. ``known`` is False when the gateway did not say
    (an older gateway, or ``/v1/models`` could not be read): then every control stays
    editable and is sent if set (see :func:`plan`), and ``why`` says so in its tooltip."""

    strength: bool = False
    strength_default: float | None = None
    seed: bool = False
    prompt: bool = False
    prompt_max: int = PROMPT_MAX
    known: bool = False
    why: str = ""

    def honours(self, name: str) -> bool:
        return bool(getattr(self, name))

    def editable(self, name: str) -> bool:
        """The dialog lets the artist set ``name``, and :func:`plan` sends it if set: one
        rule for both, so no value goes out that the dialog did not show."""
        return self.honours(name) or not self.known

    def tooltip(self, name: str, model: str) -> str | None:
        """Why control ``name`` is greyed out or may be refused, or None when it is
        honoured."""
        if self.honours(name):
            return None
        if not self.known:
            return (f"{self.why} It is sent if set; a gateway that cannot honour it "
                    "refuses the request before anything is charged.")
        return (f"The gateway's model '{model}' cannot use {CONTROL_WORDS[name]}: the "
                "backend behind it does not honour it, so the plug-in does not send it. "
                "Choose another model to use it.")


def controls_of(model: Mapping[str, Any] | None, model_id: str) -> Controls:
    """The ``controls`` object of one ``/v1/models`` entry, read defensively."""
    if model is None:
        return Controls(why=f"The gateway has no model '{model_id}': choose another one.")
    raw = model.get("controls")
    if not isinstance(raw, Mapping):
        return Controls(why="This gateway does not say which controls its models honour "
                            "(it is older than this plug-in): update the gateway to use "
                            "How different, seeds and hints.")
    strength = raw.get("strength")
    default = strength.get("default") if isinstance(strength, Mapping) else None
    if not isinstance(default, (int, float)) or isinstance(default, bool) \
            or not 0 <= default <= 1:
        default = None
    prompt = raw.get("prompt")
    pmax = prompt.get("max_length") if isinstance(prompt, Mapping) else None
    if not isinstance(pmax, int) or isinstance(pmax, bool) or not 0 < pmax <= PROMPT_MAX:
        pmax = PROMPT_MAX
    return Controls(strength=isinstance(strength, Mapping), strength_default=default,
                    seed=isinstance(raw.get("seed"), Mapping),
                    prompt=isinstance(prompt, Mapping), prompt_max=pmax, known=True)


def unknown(sentence: str) -> Controls:
    """Controls of a model the gateway could not be asked about."""
    return Controls(why=f"Could not ask the gateway which controls this model honours: "
                        f"{sentence}")


@dataclass(frozen=True)
class Models:
    """``GET /v1/models``: the ids in the gateway's order, and each one's controls."""

    ids: tuple[str, ...]
    controls: Mapping[str, Controls] = field(default_factory=dict)

    def of(self, model: str) -> Controls:
        wanted = model or DEFAULT_MODEL
        c = self.controls.get(wanted)
        return c if c is not None else controls_of(None, wanted)


def parse_models(data: Any) -> Models:
    items = data.get("data") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise ValueError("no data list")
    ids, controls = [], {}
    for item in items:
        if isinstance(item, Mapping) and isinstance(item.get("id"), str):
            ids.append(item["id"])
            controls[item["id"]] = controls_of(item, item["id"])
    return Models(tuple(ids), controls)


def get_models(base_url: str, token: str, timeout: float = 10.0,
               ca_file: str | None = None) -> Models:
    """``GET /v1/models`` (raises :class:`GatewayError`)."""
    data = vg_http.get_json(base_url, "/models", token, min(float(timeout), 15.0),
                            "a model list", ca_file)
    try:
        return parse_models(data)
    except ValueError as e:
        raise GatewayError(f"The gateway at {vg_http.api_base(base_url)}/models sent a "
                           f"model list GIMP cannot read ({e}).", kind="protocol") from None


def model_controls(base_url: str, token: str, model: str, timeout: float = 10.0,
                   ca_file: str | None = None) -> Controls:
    """The controls of ``model`` (``""``: the gateway's route); never raises for a
    gateway that cannot be asked: the variations call then says what is wrong."""
    try:
        return get_models(base_url, token, timeout, ca_file).of(model)
    except GatewayError as e:
        return unknown(str(e))


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Steer:
    """What one run sends beyond OpenAI's fields (None: not sent)."""

    model: str | None = None
    strength: float | None = None
    seed: int | None = None  # the first image's seed
    prompt: str | None = None

    def fields(self) -> dict[str, str]:
        """The multipart fields for ``/v1/images/variations``."""
        out: dict[str, str] = {}
        if self.model:
            out["model"] = self.model
        if self.strength is not None:
            out["strength"] = format_strength(self.strength)
        if self.seed is not None:
            out["seed"] = str(self.seed)
        if self.prompt:
            out["prompt"] = self.prompt
        return out


def format_strength(value: float) -> str:
    """``0.4`` not ``0.4000000059604645`` (GIMP keeps doubles): two decimals at most."""
    return f"{round(float(value), 2):g}"


def random_seed(n: int, rng: random.Random | None = None) -> int:
    """A seed whose n images (seed .. seed + n - 1) all stay within the gateway's range."""
    return (rng or random.SystemRandom()).randint(0, SEED_MAX - max(1, n) + 1)


def plan(controls: Controls, *, model: str, strength: float, seed: int, hint: str, n: int,
         rng: random.Random | None = None) -> Steer:
    """What to send: only controls that are set and that the model honours. A random
    seed (``RANDOM_SEED``) is drawn here, so every result's seed is known and can be
    reused. Raises :class:`SteerError` for values no gateway would take.

    When the gateway did not say what the model honours (``/v1/models`` timed out,
    failed, or the gateway is older), the controls the artist set are sent all the same:
    dropping them would charge a run made without them. A gateway that cannot honour one
    refuses the request (400, naming the parameter) before anything is charged."""
    model = model.strip()
    if model and not _RECORD_CHECKS["model"](model):
        raise SteerError(f"The model name must be 1 to {MODEL_MAX} printable characters.")
    if not controls.known:
        controls = Controls(strength=strength != MODEL_DEFAULT, seed=seed != RANDOM_SEED,
                            prompt=bool((hint or "").strip()), known=False, why=controls.why)
    if strength != MODEL_DEFAULT and not 0 <= strength <= 1:
        raise SteerError(f"How different (strength) must be between 0 and 1, not "
                         f"{strength:g}.")
    if seed != RANDOM_SEED and not 0 <= seed <= SEED_MAX:
        raise SteerError(f"The seed must be a whole number from 0 to {SEED_MAX}, or -1 for "
                         f"a random one, not {seed}.")
    # One line of printable characters, as the layer record and the group name keep it.
    hint = "".join(c for c in " ".join((hint or "").split()) if c.isprintable())
    if controls.prompt and len(hint) > controls.prompt_max:
        raise SteerError(f"The hint is {len(hint)} characters long; the gateway takes at "
                         f"most {controls.prompt_max}. Shorten it.")
    return Steer(
        model=model or None,
        strength=round(float(strength), 2)
        if controls.strength and strength != MODEL_DEFAULT else None,
        seed=(seed if seed != RANDOM_SEED else random_seed(n, rng)) if controls.seed else None,
        prompt=hint if controls.prompt and hint else None,
    )


def group_name(layer_name: str, steer: Steer) -> str:
    """"Variations of Dusk - strength 0.4, seed 1234": the settings that were sent."""
    parts = []
    if steer.model and steer.model != DEFAULT_MODEL:
        parts.append(f"model {steer.model}")
    if steer.strength is not None:
        parts.append(f"strength {format_strength(steer.strength)}")
    if steer.seed is not None:
        parts.append(f"seed {steer.seed}")
    if steer.prompt:
        short = steer.prompt if len(steer.prompt) <= 40 else steer.prompt[:39] + "…"
        parts.append(f'hint "{short}"')
    name = f"Variations of {layer_name}"
    return f"{name} - {', '.join(parts)}" if parts else name


# --------------------------------------------------------------------------- parasites


@dataclass(frozen=True)
class Record:
    """The parasite on each result layer (``index`` 1..n; 0 on the group): enough to
    read what made it and to run "More like this"."""

    model: str
    strength: float | None
    seed: int | None  # this layer's seed (the group's: the first one)
    hint: str | None
    request_id: str | None
    first_seed: int | None
    n: int
    index: int
    size: str
    square_mode: str
    scale_to_source: bool
    source_tattoo: int | None = None
    source_name: str = ""
    selection: tuple[int, int, int, int] | None = None
    version: int = PARASITE_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True).encode("utf-8")


def records(steer: Steer, *, request_id: str | None, n: int, size: str, square_mode: str,
            scale_to_source: bool, source_tattoo: int | None, source_name: str,
            selection: Sequence[int] | None) -> list[Record]:
    """The group's record (index 0) and one per result layer (index 1..n)."""
    sel = tuple(int(v) for v in selection) if selection is not None else None
    out = []
    for index in range(n + 1):
        seed = None if steer.seed is None else steer.seed + max(0, index - 1)
        out.append(Record(model=steer.model or DEFAULT_MODEL, strength=steer.strength,
                          seed=seed, hint=steer.prompt, request_id=request_id,
                          first_seed=steer.seed, n=n, index=index, size=size,
                          square_mode=square_mode, scale_to_source=scale_to_source,
                          source_tattoo=source_tattoo, source_name=source_name,
                          selection=sel))  # type: ignore[arg-type]
    return out


def read_record(data: bytes | str | None) -> Record | None:
    """A parasite's record, or None for anything that is not exactly what this plug-in
    writes. The record decides what "More like this" sends and charges, and an .xcf may
    come from anyone: every field is checked for its type and range, so a foreign record
    is refused with a sentence instead of choosing an expensive model, a huge count or
    another layer, or crashing the run on a string where a number belongs."""
    if data is None:
        return None
    try:
        raw = json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(raw, dict) or set(raw) != set(Record.__dataclass_fields__):
        return None
    if not all(ok(raw[name]) for name, ok in _RECORD_CHECKS.items()):
        return None
    if not raw["index"] <= raw["n"] or raw["version"] != PARASITE_VERSION:
        return None
    first = raw["first_seed"]  # a layer's seed is first + index - 1 (may pass SEED_MAX)
    if raw["seed"] != (None if first is None else first + max(0, raw["index"] - 1)):
        return None
    sel = raw["selection"]
    return Record(**{**raw, "selection": tuple(sel) if sel is not None else None})


def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v <= high


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _text(most: int, least: int = 0) -> Callable[[Any], bool]:
    """A string of printable characters only: no control, bidi or line-break characters,
    since it ends up in a group name, a dialog and a request."""
    return lambda v: isinstance(v, str) and least <= len(v) <= most and v.isprintable()


def _strength(v: Any) -> bool:
    return type(v) in (int, float) and 0 <= v <= 1  # NaN fails both


def _selection(v: Any) -> bool:
    return (isinstance(v, list) and len(v) == 4
            and all(type(c) is int and abs(c) <= 2 ** 30 for c in v) and v[2] > 0 < v[3])


_RECORD_CHECKS: dict[str, Callable[[Any], bool]] = {
    "model": _text(MODEL_MAX, 1),
    "strength": _optional(_strength),
    "seed": _optional(_int(0, SEED_MAX + N_MAX - 1)),  # checked against first_seed below
    "hint": _optional(_text(PROMPT_MAX)),
    "request_id": _optional(_text(SHOWN_MAX)),
    "first_seed": _optional(_int(0, SEED_MAX)),
    "n": _int(1, N_MAX),
    "index": _int(0, N_MAX),
    "size": lambda v: v in SIZES,
    "square_mode": lambda v: v in SQUARE_MODES,
    "scale_to_source": lambda v: type(v) is bool,
    "source_tattoo": _optional(_int(1, 2 ** 32 - 1)),
    "source_name": lambda v: isinstance(v, str) and len(v) <= 1000,
    "selection": _optional(_selection),
    "version": _int(PARASITE_VERSION, PARASITE_VERSION),
}


@dataclass(frozen=True)
class MoreLikeThis:
    """The arguments of a "More like this" run: the same settings, the next seeds."""

    model: str
    strength: float
    seed: int
    hint: str
    n: int
    size: str
    square_mode: str
    scale_to_source: bool


def more_like_this(record: Record) -> MoreLikeThis:
    """Same model, strength, hint, count, size and shape; seeds from first + n on (the
    group used first .. first + n - 1). A record without a seed gets a random one."""
    seed = RANDOM_SEED if record.first_seed is None else record.first_seed + record.n
    if seed > SEED_MAX:
        seed = seed % (SEED_MAX + 1)
    return MoreLikeThis(
        model="" if record.model == DEFAULT_MODEL else record.model,
        strength=MODEL_DEFAULT if record.strength is None else record.strength,
        seed=seed, hint=record.hint or "", n=record.n, size=record.size,
        square_mode=record.square_mode, scale_to_source=record.scale_to_source)

