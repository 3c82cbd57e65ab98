"""The environment interface the control loop drives, and the registry that builds environments and experts by name.

Every environment (the built-in tabletop world, the robosuite and LIBERO adapters) hands the policy the same
observation dict, so `rsd.envs.evaluate.evaluate` and `rsd.envs.demos.generate_demos` work with any of them.
An environment name is `tabletop`, `robosuite:<Task>` or `libero:<spec>`; its family picks the factory and the
scripted expert that records demonstrations (`ScriptedExpert`, `RobosuiteExpert`, `LiberoExpert`). Simulator adapters are imported only when asked
for (plain imports inside the factories), so the tabletop world needs nothing beyond numpy.

Usage:
    env = make_env("tabletop", image_size=64)        # or "robosuite:Lift", "libero:libero_spatial/0"
    expert = expert_factory("tabletop")(env)         # the family's scripted expert
    obs = env.reset(seed=0)
    obs, reward, done, info = env.step(expert.act(obs))  # info["success"]
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from rsd.errors import ConfigError

ENV_NAMES = ("tabletop", "robosuite:<Task>", "libero:<spec>")


class Env(Protocol):
    """What the control loop needs from an environment."""

    max_steps: int  # steps before an episode times out
    instruction: str  # the current episode's language instruction
    task_family: str  # task kind of the current episode, used to group success rates
    cameras: tuple[str, ...]  # camera names, in the order of the observation's images

    def reset(self, seed: int) -> dict[str, Any]:
        """Start the episode fixed by `seed`; return `{"image", "instruction", "proprio"}` (and `"object"`, the low-dim
        object state demonstrations record, where the env knows one)."""
        ...

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply one action `[7]`; return observation, reward, done and info (with `success`)."""
        ...

    def render(self) -> np.ndarray:
        """The current frame, uint8 `[H, W, 3]`."""
        ...

    def close(self) -> None:
        """Free the simulator, if there is one."""
        ...


class Expert(Protocol):
    """A scripted expert: `reset(seed)` at the start of an episode, then `act(obs)` each step."""

    def reset(self, seed: int | None = None) -> None:
        """Start an episode's script (`seed` reseeds any action noise)."""
        ...

    def act(self, obs: dict[str, Any]) -> np.ndarray:
        """The expert's action `[7]` for an observation."""
        ...


def _tabletop(spec: str, **kwargs: Any) -> Env:
    from rsd.envs.tabletop import TabletopEnv

    return TabletopEnv(**kwargs)


def _robosuite(spec: str, **kwargs: Any) -> Env:
    from rsd.envs.robosuite import make_robosuite_env

    return make_robosuite_env(spec, **kwargs)


def _libero(spec: str, **kwargs: Any) -> Env:
    from rsd.envs.libero import make_libero_env

    return make_libero_env(spec, **kwargs)


def _tabletop_expert(env: Any) -> Expert:
    from rsd.envs.expert import ScriptedExpert

    return ScriptedExpert(env)


def _robosuite_expert(env: Any) -> Expert:
    from rsd.envs.robosuite_expert import RobosuiteExpert

    return RobosuiteExpert(env)


def _libero_expert(env: Any) -> Expert:
    from rsd.envs.libero_expert import LiberoExpert

    return LiberoExpert(env)


ENVS: dict[str, Callable[..., Env]] = {"tabletop": _tabletop, "robosuite": _robosuite, "libero": _libero}
EXPERTS: dict[str, Callable[[Any], Expert]] = {"tabletop": _tabletop_expert, "robosuite": _robosuite_expert, "libero": _libero_expert}


def env_family(name: str) -> tuple[str, str]:
    """Split an environment name into its family and spec ("robosuite:Lift" → ("robosuite", "Lift")), else a ConfigError."""
    family, _, spec = name.partition(":")
    if name == "tabletop" or (family in ("robosuite", "libero") and spec):
        return family, spec
    close = difflib.get_close_matches(family, list(ENVS), n=1)
    hint = ""
    if close:
        hint = f" Did you mean {close[0] if close[0] == 'tabletop' else close[0] + ':' + (spec or '<name>')!r}?"
    raise ConfigError(f"env: expected one of {list(ENV_NAMES)}, got {name!r}.{hint}")


def is_env_name(name: str) -> bool:
    """True when `name` is an environment name `make_env` builds (its family is known; the simulator is not imported)."""
    try:
        env_family(name)
    except ConfigError:
        return False
    return True


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment called `name`: "tabletop", "robosuite:<Task>" or "libero:<spec>"."""
    family, spec = env_family(name)
    return ENVS[family](spec, **kwargs)


def expert_factory(name: str) -> Callable[[Any], Expert]:
    """The scripted expert of environment `name`'s family, called with the env (every family has one)."""
    family, _ = env_family(name)
    return EXPERTS[family]
