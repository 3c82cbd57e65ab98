"""The environment interface the control loop drives, and `make_env`, which builds one from a name.

Every environment (the built-in tabletop world, the robosuite and LIBERO adapters) hands the policy the same
observation dict, so `rsd.envs.evaluate.evaluate` and `rsd.data.demos.generate_demos` work with any of them.
Simulator adapters are imported only when asked for, so the tabletop world needs nothing beyond numpy.

Usage:
    env = make_env("tabletop", image_size=64)        # or "robosuite:Lift", "libero:libero_spatial/0"
    obs = env.reset(seed=0)
    obs, reward, done, info = env.step(np.zeros(7))  # info["success"]
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Protocol

import numpy as np

from rsd.errors import ConfigError

ENV_NAMES = ("tabletop", "robosuite:<Task>", "libero:<spec>")


class Env(Protocol):
    """What the control loop needs from an environment."""

    max_steps: int  # steps before an episode times out
    instruction: str  # the current episode's language instruction
    task_family: str  # task kind of the current episode, used to group success rates

    def reset(self, seed: int) -> dict[str, Any]:
        """Start the episode fixed by `seed`; return `{"image", "instruction", "proprio"}`."""
        ...

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply one action `[7]`; return observation, reward, done and info (with `success`)."""
        ...

    def render(self) -> np.ndarray:
        """The current frame, uint8 `[H, W, 3]`."""
        ...


def _adapter(module_name: str, factory: str, env_name: str) -> Any:
    """The factory function of an optional simulator adapter module, or a ConfigError saying what is missing."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        raise ConfigError(f"env {env_name!r}: expected the adapter module {module_name} to exist, got none in this install.") from error
    if not hasattr(module, factory):
        raise ConfigError(f"env {env_name!r}: expected {module_name}.{factory}() to exist, got a module without it.")
    return getattr(module, factory)


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment called `name`: "tabletop", "robosuite:<Task>" or "libero:<spec>"."""
    if name == "tabletop":
        from rsd.envs.tabletop import TabletopEnv

        return TabletopEnv(**kwargs)
    prefix, _, rest = name.partition(":")
    if prefix == "robosuite" and rest:
        return _adapter("rsd.envs.robosuite", "make_robosuite_env", name)(rest, **kwargs)
    if prefix == "libero" and rest:
        return _adapter("rsd.envs.libero", "make_libero_env", name)(rest, **kwargs)
    close = difflib.get_close_matches(prefix, ["tabletop", "robosuite", "libero"], n=1)
    hint = ""
    if close:
        hint = f" Did you mean {close[0] if close[0] == 'tabletop' else close[0] + ':' + (rest or '<name>')!r}?"
    raise ConfigError(f"env: expected one of {list(ENV_NAMES)}, got {name!r}.{hint}")
