"""One typed schema for the whole system, YAML presets, dotted overrides.

A preset is data (``configs/*.yaml``, shipped inside the package too). ``--config`` takes a preset
name (``tiny``) or a path; a relative ``configs/...`` path that does not exist from the cwd is
looked up among the bundled presets, so commands work from any directory (a `ray job submit`
working dir, an installed wheel). A preset may ``extends:`` another preset (a path relative to
itself); mappings merge key by key, everything else replaces. ``--set a.b=value`` overrides
parse ``value`` as YAML. Unknown keys, wrong types and missing required paths raise
:class:`ConfigError` naming the dotted key and what was expected, nanoGPT-configurator style.

The numbers live in the presets, not here: method hyperparameters have no defaults, so a
preset that forgets one fails loudly instead of silently training something else.

Layout, imported in one direction: ``base`` (error, strict section) <- one module per area
(``data``, ``models``, ``stages``, ``systems``, ``serve``, ``evaluate``) <- ``story`` (the root
:class:`StoryConfig`) <- ``loading`` (presets, ``extends:``, ``--set``). Import from here.
"""

from storygpt.config.base import ConfigError, Section
from storygpt.config.data import DATASET_OF_FORMAT, DataConfig, Dataset, DatasetFormat, WorldConfig
from storygpt.config.evaluate import CaptionerConfig, ClassifierConfig, EvaluateConfig
from storygpt.config.loading import DEFAULT_PRESET, find_config, load_config
from storygpt.config.models import PART, ModelPaths, ModelSource, TinyZooConfig
from storygpt.config.serve import CharLDMReplicaConfig, ReplicaConfig, ServeConfig, ServeLimits
from storygpt.config.stages import (
    ActorPoolConfig,
    AlignerConfig,
    CharLDMConfig,
    MaskStageConfig,
    PrecomputeConfig,
    PreprocessConfig,
    SuperResolutionStageConfig,
)
from storygpt.config.story import StoryConfig
from storygpt.config.systems import MLflowConfig, TrainConfig

__all__ = [
    "ActorPoolConfig", "AlignerConfig", "CaptionerConfig", "CharLDMConfig", "CharLDMReplicaConfig",
    "ClassifierConfig", "ConfigError", "DATASET_OF_FORMAT", "DEFAULT_PRESET", "DataConfig", "Dataset",
    "DatasetFormat", "EvaluateConfig", "MLflowConfig", "MaskStageConfig", "ModelPaths", "ModelSource", "PART",
    "PrecomputeConfig", "PreprocessConfig", "ReplicaConfig", "Section", "ServeConfig", "ServeLimits", "StoryConfig",
    "SuperResolutionStageConfig", "TinyZooConfig", "TrainConfig", "WorldConfig", "find_config", "load_config",
]
