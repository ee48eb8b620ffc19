"""params.yaml as frozen dataclasses, split by the stages that read them, so each DVC stage
depends on the parts that change its results (dvc.yaml): base (errors, validation), train
(training sections), defenses (the registry of baselines), evaluate (the evaluation section),
params (the file and its loading).
"""

from dwf.config.base import EXPERT_KINDS, EXPERT_NAME, MODEL_NAME, NAME, ConfigError, check_name, choice
from dwf.config.defenses import ABLATION_NAMES, DEFENSES, ROUTING_NAMES, Baselines, Defense, arch_kwargs
from dwf.config.evaluate import AUTOATTACK_VERSIONS, EvalConfig
from dwf.config.params import (DATASETS, NORMALIZATIONS, Params, Profile, expert_kind, load_params,
                               parse_params)
from dwf.config.train import (BN_MODES, PRECISIONS, ROUTER_OBJECTIVES, ADVMoEConfig, Ablation,
                              AdvTrainConfig, SoEConfig, TradesConfig, TrainConfig,
                              WideAdvTrainConfig, WideTradesConfig, ZooConfig)

__all__ = ["ABLATION_NAMES", "ADVMoEConfig", "Ablation", "AUTOATTACK_VERSIONS", "AdvTrainConfig", "BN_MODES", "Baselines",
           "ConfigError", "DATASETS", "DEFENSES", "Defense", "EXPERT_KINDS", "EXPERT_NAME", "EvalConfig", "MODEL_NAME", "NAME",
           "NORMALIZATIONS", "PRECISIONS", "Params", "Profile", "ROUTER_OBJECTIVES", "ROUTING_NAMES", "SoEConfig",
           "TradesConfig", "TrainConfig", "WideAdvTrainConfig", "WideTradesConfig", "ZooConfig",
           "arch_kwargs", "check_name", "choice", "expert_kind",
           "load_params", "parse_params"]
