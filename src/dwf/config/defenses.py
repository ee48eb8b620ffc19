"""The registry of the systems the paper compares against (Tables 2-3): one entry per row.

Each entry says everything the rest of the package reads about a row: the settings class its
params section `<dataset>.baselines.<name>` is parsed into (config), the architecture and the
training recipe, both by name in their own registries (dwf.models.ARCHITECTURES,
dwf.defenses.RECIPES), which settings are the architecture's arguments, and its label in the
tables (report, `label`). The params' known names, `dwf train --defense`, the report's labels and the
plan's networks all read DEFENSES; adding a row is one entry here (docs/baselines.md).

It lives in config, beside the settings classes and free of torch, so that config (which
parses the settings), report and the CLI read it without importing the training code; the
training code (dwf.defenses) reads it too, in that one direction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dwf.config.base import ConfigError, choice
from dwf.config.train import (ADVMoEConfig, AdvTrainConfig, SoEConfig, TradesConfig, TrainConfig,
                              WideAdvTrainConfig, WideTradesConfig, ZooConfig)


@dataclass(frozen=True)
class Defense:
    """One row of Tables 2-3: how it is configured, built, trained and labelled."""

    label: str                      # its name in the tables and figures
    settings: type[TrainConfig]     # what params `<dataset>.baselines.<name>` is parsed into
    arch: str                       # name in dwf.models.ARCHITECTURES
    recipe: str                     # name in dwf.defenses.RECIPES: settings -> what fit runs
    arch_settings: tuple[str, ...] = ()  # settings passed to the architecture, over the profile's

    @property
    def undefended(self) -> bool:
        """Trained on clean images only (dwf.plan's robust share)."""
        return self.recipe == "benign"


def _zoo(label: str, arch: str) -> Defense:
    """A plainly trained network of models/zoo.py at its own width (settings `width`)."""
    return Defense(label, ZooConfig, arch, "benign", ("width",))


DEFENSES: dict[str, Defense] = {
    "resnet18": Defense("ResNet-18", TrainConfig, "resnet18", "benign"),
    "resnet18_fgsm_at": Defense("ResNet-18 (FGSM-AT)", AdvTrainConfig, "resnet18", "fgsm_at"),
    "resnet18_pgd_at": Defense("ResNet-18 (PGD-AT)", AdvTrainConfig, "resnet18", "pgd_at"),
    "trades": Defense("ResNet-18 (TRADES)", TradesConfig, "resnet18", "trades"),
    # DWF's fair comparison (docs/baselines.md): the recipes above given DWF's training cost
    # (more epochs) or its parameter count (a wider network); params set the epochs and width,
    # the metrics record the cost and parameters each row really has
    "pgd_at_matched_cost": Defense("PGD-AT at DWF's cost", AdvTrainConfig, "resnet18", "pgd_at"),
    "trades_matched_cost": Defense("TRADES at DWF's cost", TradesConfig, "resnet18", "trades"),
    "pgd_at_matched_params": Defense("PGD-AT at DWF's parameters", WideAdvTrainConfig, "resnet18",
                                     "pgd_at", ("width",)),
    "trades_matched_params": Defense("TRADES at DWF's parameters", WideTradesConfig, "resnet18",
                                     "trades", ("width",)),
    "soe": Defense("SoE", SoEConfig, "soe", "soe", ("n_submodels",)),
    "advmoe": Defense("ADVMoE", ADVMoEConfig, "advmoe_resnet18", "advmoe",
                      ("n_experts", "ratio", "router_width", "router_blocks")),
    # the undefended public networks of Tables 2-3 ([39]: CIFAR-10, [40]: SVHN), trained here
    "vgg19": _zoo("VGG-19", "vgg19"),
    "resnet34": _zoo("ResNet-34", "resnet34"),
    "resnet50": _zoo("ResNet-50", "resnet50"),
    "densenet121": _zoo("DenseNet-121", "densenet121"),
    "densenet169": _zoo("DenseNet-169", "densenet169"),
    "googlenet": _zoo("GoogLeNet", "googlenet"),
    "inception_v3": _zoo("Inception-V3", "inception_v3"),
    "xception": _zoo("Xception", "xception"),
    "mobilenet_v2": _zoo("MobileNet-V2", "mobilenet_v2"),
}


def arch_kwargs(name: str, base: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The architecture arguments of defense `name`.

    Args:
        base: the profile's ResNet-18 arguments (num_classes, width, mean, std, in_channels).
        cfg: the defense's settings; its `arch_settings` replace or extend `base`.
    Returns:
        keyword arguments of dwf.models.build(DEFENSES[name].arch, ...).
    """
    return {**base, **{k: getattr(cfg, k) for k in DEFENSES[name].arch_settings}}


@dataclass(frozen=True)
class Baselines:
    """A profile's settings of the systems it can train, by defense name (params `baselines:`),
    each of its registry entry's settings class."""

    by_name: dict[str, TrainConfig] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def get(self, name: str) -> TrainConfig:
        """The settings of defense `name`; ConfigError if it is unknown or the profile has none."""
        choice(name, "baselines", tuple(DEFENSES))
        if name not in self.by_name:
            raise ConfigError(f"baselines.{name}: no settings for this defense in the profile")
        return self.by_name[name]


# DWF's trained weights under other routing decisions (issue 22, ablation (a)): params
# `routings`, models `dwf_<routing>`; the decisions themselves are dwf.models.ROUTINGS (same names)
ROUTING_LABELS = {"uniform": "DWF, its experts' uniform average (no gate)",
                  "top1": "DWF, top-1 routing by its gate"}
ROUTING_NAMES = tuple(ROUTING_LABELS)

# DWF trained another way (issue 22, ablations (b) and (c)): params `ablations`, models
# `dwf_<name>` (dwf train-joint --ablation); what each changes is set per dataset in
# `<dataset>.ablations.<name>` (config.train.Ablation), these are their names in tables
ABLATION_LABELS = {"frozen_experts": "DWF, experts frozen (only its gate trained jointly)",
                   "no_pretraining": "DWF, joint training from scratch (no pretraining)",
                   "fixed_strengths": "DWF, fixed attack strengths in joint training",
                   "pgd_experts": "DWF of its four PGD experts only",
                   "five_experts": "DWF of five experts (benign, 2 FGSM, 2 PGD)"}
ABLATION_NAMES = tuple(ABLATION_LABELS)

# the models that are not rows of the registry
MODEL_LABELS = {"dwf": "DWF (ours)", "experts/benign": "ResNet-18 (benign expert)",
                **{f"dwf_{r}": text for r, text in ROUTING_LABELS.items()},
                **{f"dwf_{a}": text for a, text in ABLATION_LABELS.items()}}


def label(model: str) -> str:
    """A model's name in tables, figures and the forensics section: a baseline's registry
    label, else MODEL_LABELS, else the name."""
    if model in DEFENSES:
        return DEFENSES[model].label
    return MODEL_LABELS.get(model, model)
