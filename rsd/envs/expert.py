"""The scripted expert that writes the tabletop demonstrations: waypoints plus a saturated proportional law.

The RFSQ tokenizer learns 8-step chunks of these actions, so they are smooth on purpose: the xyz command is
`clip(gain * error / step, -1, 1)` toward the current waypoint (full speed far away, exponential approach
near it), horizontal motion fades in with height (lift first, then carry), and the gripper command is exactly
±1. Waypoints come from the env's state each step (the expert may read it): above the block → descend → close
→ lift → above the goal → descend → open. A missed grasp or a drop re-enters the script at the right phase.

Usage:
    env = TabletopEnv(); obs = env.reset(seed=0); expert = ScriptedExpert(env)
    obs, reward, done, info = env.step(expert.act(obs))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsd.envs.tabletop import BLOCK_HALF, XY_STEP, Z_STEP, TabletopEnv

HOVER_Z = 0.35  # travel height
GRASP_Z = 0.04  # height at which the gripper closes or opens
ALIGN = 0.03  # x, y distance to the block (or goal) within which the expert descends, closes or releases
TRAVEL = 0.1  # x, y distance beyond which the gripper lifts before moving sideways
GAIN = 0.6  # proportional gain (fraction of the error removed per step when not saturated)
NEXT_TO_GAP = 2.5 * BLOCK_HALF  # centre distance the expert places a block at for "next to"
FREE_CLEARANCE = 3.0 * BLOCK_HALF  # a side of the anchor is free when no other block's centre is this close to it (no overlap at any angle)


class ScriptedExpert:
    """Waypoint controller for `TabletopEnv`; `act(obs)` returns a float32 action `[7]`."""

    def __init__(self, env: TabletopEnv) -> None:
        self.env = env
        self._closing = False

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode (the script is deterministic: `seed` is unused; DART noise is added by the recorder)."""
        self._closing = False

    def goal(self) -> np.ndarray:
        """Where the target block should be released `[2]`: the plate's centre, or the free side of the anchor nearest
        the target block (the side it comes from, which the image shows, and still the nearest while it is carried),
        else the side with the most clearance. Choosing by clearance alone is a four-way choice the frame barely shows:
        a policy averages the sides and releases the block on the anchor (`docs/results.md`)."""
        env = self.env
        if env.anchor is None:
            return env.plate.copy()
        anchor, block = env.blocks[env.anchor], env.blocks[env.target]
        others = [b for i, b in enumerate(env.blocks) if i not in (env.target, env.anchor)]
        sides = [anchor + NEXT_TO_GAP * np.array(d) for d in ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))]
        sides = [spot for spot in sides if np.abs(spot).max() <= 0.9]
        clearance = [min((np.linalg.norm(spot - b) for b in others), default=np.inf) for spot in sides]
        free = [spot for spot, room in zip(sides, clearance, strict=True) if room >= FREE_CLEARANCE]
        if free:
            return min(free, key=lambda spot: float(np.linalg.norm(spot - block)))
        return sides[int(np.argmax(clearance))]  # anchors lie within 0.75 of the centre: two sides at least are inside 0.9

    def act(self, obs: dict[str, Any] | None = None) -> np.ndarray:
        """The next action `[7]` float32 (xyz from the waypoint law, rotation 0, gripper ±1)."""
        env = self.env
        position = env.gripper
        holding = env.held == env.target
        if env.held is not None and not holding:  # holding the wrong block: let go
            waypoint, grip = position.copy(), -1.0
        elif not holding:
            block = env.blocks[env.target]
            error = np.linalg.norm(position[:2] - block)
            if 0.0 < env.opening < 1.0 and env.held is None and self._closing:  # a started close runs to the end
                waypoint, grip = np.array([*block, GRASP_Z]), 1.0
            elif env.opening < 1.0:  # closed on nothing (a miss): reopen while climbing back
                waypoint, grip = np.array([*block, HOVER_Z]), -1.0
            elif error > ALIGN:  # travel above the block (climbing back up if low and off target)
                waypoint, grip = np.array([*block, HOVER_Z]), -1.0
            elif position[2] > GRASP_Z + 0.04:  # descend, correcting x, y on the way
                waypoint, grip = np.array([*block, GRASP_Z]), -1.0
            else:  # close
                waypoint, grip = np.array([*block, GRASP_Z]), 1.0
        else:
            goal = self.goal() - env.held_offset  # where the gripper must be for the block to reach the goal
            error = np.linalg.norm(position[:2] - goal)
            if error > ALIGN:  # lift and carry
                waypoint, grip = np.array([*goal, HOVER_Z]), 1.0
            elif position[2] > GRASP_Z + 0.04:  # lower
                waypoint, grip = np.array([*goal, GRASP_Z]), 1.0
            else:  # release
                waypoint, grip = position.copy(), -1.0
        self._closing = grip > 0 and env.held is None
        delta = waypoint - position
        action = np.zeros(7)
        action[:3] = np.clip(GAIN * delta / (XY_STEP, XY_STEP, Z_STEP), -1.0, 1.0)
        if np.linalg.norm(delta[:2]) > TRAVEL:  # far away: lift before moving sideways
            action[:2] *= np.clip((position[2] - GRASP_Z) / (0.5 * (HOVER_Z - GRASP_Z)), 0.2, 1.0)
        action[6] = grip
        return action.astype(np.float32)
