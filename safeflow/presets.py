"""Per-model settings: the paper's, ours for the default model, and a relative default for any model.

A :class:`ModelPreset` holds what belongs to the model — the ``layer`` to read and steer and the
default ``steerer`` (a registry name) — and, under each component's registry name, that
component's own settings (``preset.settings["polytope"]``, ``preset.settings["safeflow"]``, ...):
a small frozen dataclass that the constraint family or steerer defines in its own file. A
component declares its settings type and its values per preset in its class body
(:class:`PresetConfigured`: ``settings_type``, ``preset_settings``), which registers them into
:data:`PRESETS` when the class is created; it reads them back with
:meth:`PresetConfigured.settings_from_preset`, and a component without settings in a preset takes
its class defaults. So a new family or steerer brings its per-model settings in its own file.

Every value is either unit-free or expressed relative to what it acts on, so that a preset carries
over to models it was not tuned on (each component's settings type states its units): the
polytope's margin κ and L1 weights act on *standardised* hidden states, per training example
(the paper's entries divide the reference code's summed regularisers by :data:`REFERENCE_BATCH`);
steering depths are in units of the steering constraint set's ``safe_depth`` (the typical depth of
its safe training states), not in violation units; ``layer`` is a block index for a known model, or
``None``: :func:`default_layer` — the paper's layer 20 of 32 blocks as a fraction of the model's
depth.

The paper's entries reproduce the reference code's training (``PolytopeConstraints.fit`` with the
reference normalisation rescaled as above, its unsafe weights and facet counts) and its SafeFlow
weights; they steer with plain gradients into the polytope's boundary (SafeFlow's ``depth`` 0),
with SafeFlow as their steerer.

The SmolLM2 entry (and the relative default) steer with line steering (``steerer="line"``, depth
3), which beat SafeFlow, the projection and the peers on the validation source (the docs' results
page has the comparison). The SmolLM2 entry was chosen on an out-of-distribution validation
source (``rho-refusal-50``) that is neither trained on nor used as the test set; the study behind
it is in the docs (concepts, "Choosing the settings").
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from .errors import ConfigError
from .registry import Registered

#: The paper steers and detects at layer 20 of 32-block models.
LAYER_FRACTION = 20 / 32
#: The reference code sums its hinge terms over batches of 128; safeflow averages, so the
#: paper presets divide their regularisers by this.
REFERENCE_BATCH = 128


class _Moved:
    """A flat attribute of :class:`ModelPreset` from before the settings were split per component:
    reads ``settings[owner].name`` with a :class:`DeprecationWarning` naming that place."""

    def __init__(self, owner: str, name: str) -> None:
        self.owner, self.name = owner, name

    def __set_name__(self, cls: type, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, preset: ModelPreset | None, cls: type | None = None) -> Any:
        if preset is None:
            return self
        warnings.warn(f"ModelPreset.{self.attribute} is deprecated; read preset.settings[{self.owner!r}].{self.name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(preset.settings_of(self.owner), self.name)


@dataclass(frozen=True)
class ModelPreset:
    """One model's settings: the layer, the default steerer, and each component's own settings.

    ``settings`` maps a registry name (a constraint family's or a steerer's) to that component's
    settings, a frozen dataclass instance of its ``settings_type``. It is read-only: a mapping
    given here is copied, except a :class:`types.MappingProxyType`, which is kept as the live view
    it is (the entries of :data:`PRESETS` are such views, filled by the components' registrations).
    """

    layer: int | None  #: decoder block; None: :func:`default_layer` of the model's depth
    steerer: str = "line"  #: the default steerer (a registry name): what ``safeflow generate`` steers with
    #: registry name -> that component's settings (a dataclass instance)
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)

    # The flat fields of before the split, readable with a DeprecationWarning naming the new place.
    margin = _Moved("polytope", "margin")
    feature_l1 = _Moved("polytope", "feature_l1")
    facet_l1 = _Moved("polytope", "facet_l1")
    unsafe_weight = _Moved("polytope", "unsafe_weight")
    num_facets = _Moved("polytope", "num_facets")
    num_features = _Moved("polytope", "num_features")
    schedule = _Moved("polytope", "schedule")
    average = _Moved("polytope", "average")
    lambda_unsafe = _Moved("safeflow", "lambda_unsafe")
    lambda_safe = _Moved("safeflow", "lambda_safe")
    steer_depth = _Moved("safeflow", "depth")
    precondition = _Moved("safeflow", "precondition")
    line_depth = _Moved("line", "depth")

    def __post_init__(self) -> None:
        if not isinstance(self.settings, MappingProxyType):
            object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        for name, value in self.settings.items():
            _check_settings(name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle (and deep-copy) with a plain copy of the settings (a live view cannot be pickled)."""
        return (ModelPreset, (self.layer, self.steerer, dict(self.settings)))

    def settings_of(self, name: str) -> Any:
        """The settings of the component registered as ``name`` (:class:`AttributeError` if this
        preset holds none; a component reads its own with
        :meth:`PresetConfigured.settings_from_preset`, which falls back to its class defaults)."""
        try:
            return self.settings[name]
        except KeyError:
            raise AttributeError(f"this preset holds no settings for {name!r}; it holds "
                                 f"{', '.join(map(repr, self.settings)) or 'none'}") from None

    def fit_options(self) -> dict[str, Any]:
        """Deprecated: the polytope's training settings, now
        ``PolytopeConstraints.fit_options_from_preset(preset)``."""
        warnings.warn("ModelPreset.fit_options() is deprecated; use PolytopeConstraints.fit_options_from_preset(preset) "
                      "(the settings are preset.settings['polytope'])", DeprecationWarning, stacklevel=2)
        shape = ("num_facets", "num_features")
        return {k: v for k, v in dataclasses.asdict(self.settings_of("polytope")).items() if k not in shape}

    def to_dict(self) -> dict[str, Any]:
        """``{"layer", "steerer", "settings": {registry name: its settings as a dict}}`` (JSON values)."""
        return {"layer": self.layer, "steerer": self.steerer,
                "settings": {name: dataclasses.asdict(value) for name, value in self.settings.items()}}


def _check_settings(name: str, value: Any) -> None:
    """A component's settings must be a dataclass instance (so that presets can be saved as JSON)."""
    if not (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        raise ConfigError(f"the preset settings of {name!r} must be a dataclass instance (the component's "
                          f"settings_type), got {type(value).__name__}")


#: Each entry's layer and default steerer: the paper's three steer with SafeFlow, the default model with line steering.
_ENTRIES = {"llama-2-7b": (20, "safeflow"), "ministral-8b": (20, "safeflow"), "qwen2-1.5b": (20, "safeflow"),
            "smollm2-135m-instruct": (20, "line")}
#: The entries' component settings, by preset name; filled by :func:`register_settings`.
_SETTINGS: dict[str, dict[str, Any]] = {name: {} for name in _ENTRIES}

PRESETS: dict[str, ModelPreset] = {
    name: ModelPreset(layer=layer, steerer=steerer, settings=MappingProxyType(_SETTINGS[name]))
    for name, (layer, steerer) in _ENTRIES.items()
}
#: The preset of a model without an entry: the default model's settings (the same view, so what a
#: component registers for the default model holds here too) with the layer chosen by depth.
RELATIVE_DEFAULT = ModelPreset(layer=None, steerer=PRESETS["smollm2-135m-instruct"].steerer,
                               settings=PRESETS["smollm2-135m-instruct"].settings)
#: Names ``preset()`` accepts besides the entries of :data:`PRESETS`.
SPECIAL = ("auto", "default")


def register_settings(name: str, by_preset: Mapping[str, Any]) -> None:
    """Add the settings of the component registered as ``name`` to entries of :data:`PRESETS`:
    ``by_preset`` maps a preset name to the settings (a dataclass instance). What is registered
    for ``"smollm2-135m-instruct"`` also holds for the relative default. A preset that holds other
    settings under ``name`` already raises :class:`ConfigError` (registering the same ones again
    does nothing). :class:`PresetConfigured` calls this for a class that declares ``preset_settings``."""
    for preset_name, value in by_preset.items():
        if preset_name not in _SETTINGS:
            raise ConfigError(f"{name!r} declares settings for the unknown preset {preset_name!r}; valid: "
                              f"{', '.join(_SETTINGS)} (the relative default takes smollm2-135m-instruct's)")
        _check_settings(name, value)
        held = _SETTINGS[preset_name].get(name)
        if held is not None and held != value:
            raise ConfigError(f"the preset {preset_name!r} already holds settings for {name!r} ({held!r}); "
                              "choose another registry name for the component")
    for preset_name, value in by_preset.items():
        _SETTINGS[preset_name][name] = value


def default_layer(num_layers: int) -> int:
    """The paper's layer 20 of 32 as a fraction of ``num_layers`` decoder blocks."""
    if num_layers < 1:
        raise ConfigError(f"a model needs at least one decoder block, got {num_layers}")
    return min(num_layers - 1, round(LAYER_FRACTION * num_layers))


def match_preset(model_name: str) -> str | None:
    """The :data:`PRESETS` entry whose name appears in ``model_name`` (case and ``_``/``-``/``.``
    insensitive: ``meta-llama/Llama-2-7b-chat-hf`` → ``llama-2-7b``), or None."""
    def norm(s: str) -> str:
        return "".join(ch for ch in s.lower() if ch.isalnum())

    key = norm(model_name)
    hits = [name for name in PRESETS if norm(name) in key]
    return max(hits, key=len) if hits else None


def model_name(model: Any) -> str:
    """The name a Hugging Face model was loaded from (``config._name_or_path``), or ''."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def preset(name: str | None = "auto", model: Any = None) -> ModelPreset:
    """Resolve a preset.

    ``name``: an entry of :data:`PRESETS`; ``"default"`` — the relative default; ``"auto"`` (or
    None) — the entry matching ``model``'s name if there is one (:func:`match_preset`), else the
    relative default. The returned preset's ``layer`` may be None (see :func:`resolve_layer`).
    """
    if name in (None, "auto"):
        found = match_preset(model_name(model)) if model is not None else None
        return PRESETS[found] if found else RELATIVE_DEFAULT
    if name == "default":
        return RELATIVE_DEFAULT
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join((*SPECIAL, *PRESETS))}")
    return PRESETS[name]


def as_preset(p: ModelPreset | str | None) -> ModelPreset:
    """A :class:`ModelPreset` as given, or the one a name resolves to (:func:`preset`; None: the
    relative default)."""
    return p if isinstance(p, ModelPreset) else preset(p)


def resolve_layer(p: ModelPreset, num_layers: int) -> int:
    """The preset's layer, or :func:`default_layer` for a relative preset (or one deeper than the model)."""
    return p.layer if p.layer is not None and p.layer < num_layers else default_layer(num_layers)


class PresetConfigured(Registered):
    """A registered component that reads its own settings from a model preset (the base of
    :class:`~safeflow.constraints.ConstraintSet` and :class:`~safeflow.steerers.Steerer`).

    A component with per-model settings sets, in its class body, ``settings_type`` — a frozen
    dataclass whose fields are its settings (for a constraint family: constructor arguments and
    fit options; for a steerer: constructor arguments) — and may set ``preset_settings`` — its
    settings per preset name, registered into :data:`PRESETS` under its registry name when the
    class is created (:func:`register_settings`)::

        @dataclass(frozen=True)
        class ShrinkSettings:
            factor: float = 0.9

        class Shrink(Steerer, name="shrink"):
            settings_type = ShrinkSettings
            preset_settings = {"qwen2-1.5b": ShrinkSettings(factor=0.8)}

            def __init__(self, factor: float = 0.9) -> None: ...

    ``Steerer.create("shrink", preset="qwen2-1.5b")`` then builds ``Shrink(factor=0.8)``, and with
    any other preset ``Shrink()``.
    """

    #: The dataclass of this component's per-model settings; None: it reads nothing from a preset.
    settings_type: ClassVar[type | None] = None
    #: This component's settings per preset name (entries of :data:`PRESETS`), declared in its class
    #: body and registered when the class is created (the class must be registered under a name).
    preset_settings: ClassVar[Mapping[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "settings_type" in vars(cls) and cls.settings_type is not None:
            takes = cls.settings_targets()
            stray = [f.name for f in dataclasses.fields(cls.settings_type) if f.name not in takes]
            if stray:
                raise ConfigError(f"{cls.__qualname__}.settings_type has fields {stray} that {cls.__qualname__} does not "
                                  f"take; valid: {', '.join(takes) or '(none)'}")
        if "preset_settings" not in vars(cls):
            return
        if "registered_name" not in vars(cls) or cls.registered_name is None:
            raise ConfigError(f"{cls.__qualname__} declares preset_settings but is not registered under a name of its "
                              "own (class ...(Base, name='...')); the settings are registered under that name")
        wrong = [p for p, s in cls.preset_settings.items()
                 if cls.settings_type is None or not isinstance(s, cls.settings_type)]
        if wrong:
            raise ConfigError(f"{cls.__qualname__}.preset_settings for {', '.join(map(repr, wrong))} must be instances of "
                              f"its settings_type ({getattr(cls.settings_type, '__name__', None)})")
        register_settings(cls.registered_name, cls.preset_settings)

    @classmethod
    def settings_targets(cls) -> list[str]:
        """The names a field of ``settings_type`` may have: the constructor's keyword arguments (a
        constraint family adds its fit options)."""
        return cls.constructor_options()

    @classmethod
    def settings_from_preset(cls, preset: ModelPreset | str | None) -> Any:
        """This component's settings in a model preset (a :class:`ModelPreset` or its name, see
        :func:`preset`; None: the relative default), found under its registry name; None where the
        preset holds none or the component has no ``settings_type`` (then its class defaults apply).
        Settings of another type under its name raise :class:`ConfigError`."""
        if cls.settings_type is None or cls.registered_name is None:
            return None
        found = as_preset(preset).settings.get(cls.registered_name)
        if found is not None and not isinstance(found, cls.settings_type):
            raise ConfigError(f"the preset's settings for {cls.registered_name!r} are a {type(found).__name__}, not the "
                              f"{cls.settings_type.__name__} of {cls.__qualname__}")
        return found

    @classmethod
    def preset_fields(cls, preset: ModelPreset | str | None) -> dict[str, Any]:
        """This component's settings in ``preset`` as a dict of their fields ({} where it has none)."""
        found = cls.settings_from_preset(preset)
        return {} if found is None else {f.name: getattr(found, f.name) for f in dataclasses.fields(found)}
