"""What MLflow runs to load a StoryGPT-V model ("models from code"; see storygpt/registry.py).

This file is copied into every logged model; loading it builds an empty :class:`StoryGPTModel`,
and MLflow then calls its ``load_context`` with the version's artifacts and model_config.
"""

from mlflow.models import set_model

from storygpt.registry import StoryGPTModel

set_model(StoryGPTModel())
