"""Configuration: where the Hydra config lives, recipe registration, schema and validation.

Nothing here imports torch: `python -m musubi_pipe --cfg job` composes and prints in well under
two seconds.
"""

from musubi_pipe.config.locate import conf_dir, recipes_dir
from musubi_pipe.config.recipes import compose, register_recipes

__all__ = ["conf_dir", "recipes_dir", "compose", "register_recipes"]
