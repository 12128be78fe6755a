"""The settings mypy's Django plugin loads: the real ones, as a development checkout has them.

Type checking needs the names and types of the settings, not a deployment's values, so `mypy .`
works in a fresh clone with no .env and nothing in the environment, where webapp/settings.py
would refuse to start without DEBUG or a SECRET_KEY. Only pyproject.toml's [tool.django-stubs]
names this module; nothing that serves requests imports it.
"""

import os

os.environ["RUNBRAKE_ENV_FILE"] = ""  # not this checkout's .env, whatever it says
os.environ["DEBUG"] = "true"  # the development defaults: no SECRET_KEY or keys needed

from webapp.settings import *  # noqa: F403
