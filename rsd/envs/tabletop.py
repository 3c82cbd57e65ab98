"""A tiny pick-and-place tabletop in the spirit of LIBERO-Spatial: pure numpy, deterministic per seed, no assets.

It exists so that the whole pipeline (demos → tokenizer → policy → draft → closed-loop evaluation) runs on a
CPU in minutes without a simulator. The world is kinematic: a gripper moves in a workspace x, y ∈ [-1, 1],
height z ∈ [0, 1]. It is a parallel-jaw gripper whose open jaws are wider than a block (like a Panda's 8 cm over a
5 cm object): closing it low grasps the block that lies between the jaws (its x extent inside the open jaws, its
side overlapping the fingers by at least half), centring it between the jaws in x; opening it drops the block
where it is. Actions follow LIBERO's controller: `[dx, dy, dz, drx, dry, drz, gripper]` in [-1, 1] (rotation accepted,
unused; gripper -1 open / +1 close). The top-down render draws the gripper as a U whose size and shade grow
with height and whose fingers show the opening, so a policy can see both.

Tasks (`task_family`): "pick_place" ("pick up the red block and place it on the plate": success when the block
rests, released, inside the plate) and "next_to" ("put the red block next to the blue block": released, centres
closer than `NEXT_TO_DISTANCE`, squares not overlapping); "any" draws the family per seed.

The observation's `object` is the low-dim object state demonstrations record for training-time supervision (a
policy never reads it): the target block's centre, the goal's (the plate, or the reference block of "next_to"), and
both relative to the gripper, each `(x, y)` in workspace units.

Usage:
    env = TabletopEnv(image_size=64, task_family="any")
    obs = env.reset(seed=0)                           # {"image": uint8 [64, 64, 3], "instruction", "proprio": [8], "object": [8]}
    obs, reward, done, info = env.step(np.zeros(7))   # info["success"], info["steps"]
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsd.envs.sim_common import check_action
from rsd.errors import ConfigError, RsdError

FAMILIES = ("pick_place", "next_to")
PALETTE = {"red": (220, 50, 47), "green": (60, 170, 60), "blue": (50, 90, 220), "yellow": (235, 200, 40), "purple": (150, 70, 190)}
TABLE_RGB = (140, 110, 80)
PLATE_RGB, PLATE_RIM_RGB = (235, 235, 235), (180, 180, 180)
XY_STEP = 0.08  # workspace units per step at |action| = 1 (x, y)
Z_STEP = 0.1  # height units per step at |action| = 1
GRIP_STEP = 0.5  # change of the gripper opening (0 closed .. 1 open) per step
BLOCK_HALF = 0.08  # half side of a block
PLATE_RADIUS = 0.2
FINGER_OPEN = 0.16  # x offset of each finger's centre from the palm when fully open
FINGER_CLOSED = 0.02  # the same when fully closed on nothing
FINGER_HALF_WIDTH = 0.02  # half thickness of a finger (x)
FINGER_HALF_LENGTH = 0.06  # half length of a finger (y)
GRASP_X = FINGER_OPEN - FINGER_HALF_WIDTH - BLOCK_HALF  # |dx| at which the block still fits inside the open jaws (0.06)
GRASP_Y = FINGER_HALF_LENGTH + BLOCK_HALF / 2  # |dy| at which the fingers still cover half the block's side (0.10)
GRASP_HEIGHT = 0.15  # the gripper must be lower than this to grasp
NEXT_TO_DISTANCE = 0.25  # "next to": centres closer than this (and the squares not overlapping)
FINGER_MAX = 0.04  # finger position of a fully open gripper (proprio, Panda-like metres)
START_Z = 0.6
TEMPLATES = {
    "pick_place": "pick up the {0} block and place it on the plate",
    "next_to": "put the {0} block next to the {1} block",
}


class TabletopEnv:
    """Blocks, a plate and a kinematic gripper; `reset(seed)` fixes the layout, colours and task.

    State read by the scripted expert: `gripper [3]`, `opening`, `held` (block index or None), `held_offset [2]`
    (block centre minus gripper while held), `blocks [N, 2]`, `colors`, `plate [2]`, `target` (block to move) and
    `anchor` (reference block of "next_to", else None).
    """

    cameras = ("agentview",)  # the one top-down camera (the name LIBERO gives its main view)

    def __init__(self, image_size: int = 64, max_steps: int = 120, task_family: str = "any", num_blocks: int | None = None) -> None:
        if task_family not in (*FAMILIES, "any"):
            raise ConfigError(f"TabletopEnv.task_family: expected one of {[*FAMILIES, 'any']}, got {task_family!r}.")
        if image_size < 16:
            raise ConfigError(f"TabletopEnv.image_size: expected an int >= 16, got {image_size}.")
        if max_steps <= 0:
            raise ConfigError(f"TabletopEnv.max_steps: expected an int > 0, got {max_steps}.")
        if num_blocks is not None and not 2 <= num_blocks <= len(PALETTE):
            raise ConfigError(f"TabletopEnv.num_blocks: expected None or an int in 2..{len(PALETTE)}, got {num_blocks}.")
        self.image_size = image_size
        self.max_steps = max_steps
        self.family_setting = task_family
        self.num_blocks = num_blocks
        self.task_family = task_family
        self.instruction = ""
        centres = (np.arange(image_size) + 0.5) / image_size * 2.0 - 1.0
        self._grid_x, self._grid_y = centres[None, :], -centres[:, None]  # world x per column, y per row
        self._background: np.ndarray | None = None
        self.steps = -1

    # --- episode -------------------------------------------------------------------------------------------------
    def reset(self, seed: int) -> dict[str, Any]:
        """Lay out the episode fixed by `seed` and return the first observation."""
        rng = np.random.default_rng(seed)
        self.task_family = str(rng.choice(FAMILIES)) if self.family_setting == "any" else self.family_setting
        count = self.num_blocks or int(rng.integers(3, 5))
        self.colors = [str(c) for c in rng.choice(list(PALETTE), size=count, replace=False)]
        points: list[np.ndarray] = []  # plate first, then blocks, at least a gap apart
        while len(points) < count + 1:
            point = rng.uniform(-0.75, 0.75, size=2)
            if all(np.linalg.norm(point - q) >= (0.38 if i == 0 else 0.3) for i, q in enumerate(points)):
                points.append(point)
        self.plate = points[0]
        self.blocks = np.array(points[1:])
        self.target = 0
        self.anchor = 1 if self.task_family == "next_to" else None
        self.instruction = TEMPLATES[self.task_family].format(*self.colors[:2])
        self.gripper = np.array([*rng.uniform(-0.3, 0.3, size=2), START_Z])
        self.opening = 1.0
        self.held: int | None = None
        self.held_offset = np.zeros(2)
        self.steps = 0
        self._background = None
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, dict[str, Any]]:
        """Apply one action `[7]` (clipped to [-1, 1]); return observation, reward, done, info."""
        if self.steps < 0:
            raise RsdError("TabletopEnv.step: expected reset(seed) before step(), got a step on an unstarted episode.")
        command = np.clip(check_action(action), -1.0, 1.0)
        self.gripper = np.clip(self.gripper + command[:3] * (XY_STEP, XY_STEP, Z_STEP), (-1.0, -1.0, 0.0), (1.0, 1.0, 1.0))
        if command[6] > 0:  # close; a block is attached at the moment the fingers meet
            was_open = self.opening > 0.0
            self.opening = max(0.0, self.opening - GRIP_STEP)
            if was_open and self.opening == 0.0 and self.held is None and self.gripper[2] < GRASP_HEIGHT:
                self._grasp()
        elif command[6] < 0:  # open; a held block drops to the table where it is
            self.opening = min(1.0, self.opening + GRIP_STEP)
            if self.held is not None:
                self.held, self._background = None, None
        if self.held is not None:
            self.blocks[self.held] = self.gripper[:2] + self.held_offset
        self.steps += 1
        success = self.success()
        done = success or self.steps >= self.max_steps
        return self._observation(), float(success), done, {"success": success, "steps": self.steps}

    def _grasp(self) -> None:
        """Attach the block lying between the closing jaws, if any, centred between them in x."""
        offsets = self.blocks - self.gripper[:2]
        between = (np.abs(offsets[:, 0]) <= GRASP_X) & (np.abs(offsets[:, 1]) <= GRASP_Y)
        if between.any():
            index = int(np.flatnonzero(between)[np.abs(offsets[between, 1]).argmin()])
            self.held, self._background = index, None
            self.held_offset = np.array([0.0, offsets[index, 1]])

    def success(self) -> bool:
        """Whether the current state solves the episode's task (every block released)."""
        if self.held is not None:
            return False
        block = self.blocks[self.target]
        if self.anchor is None:
            return bool(np.linalg.norm(block - self.plate) < PLATE_RADIUS)
        offset = block - self.blocks[self.anchor]
        return bool(np.linalg.norm(offset) < NEXT_TO_DISTANCE and np.abs(offset).max() >= 2 * BLOCK_HALF)

    def proprio(self) -> np.ndarray:
        """float32 `[8]`: gripper x, y, z, rotation (3 zeros), finger positions (+f, -f)."""
        finger = FINGER_MAX * self.opening
        return np.array([*self.gripper, 0.0, 0.0, 0.0, finger, -finger], dtype=np.float32)

    def object_state(self) -> np.ndarray:
        """float32 `[8]`: target block x, y; goal x, y (plate or reference block); the same two relative to the gripper."""
        target = self.blocks[self.target]
        goal = self.plate if self.anchor is None else self.blocks[self.anchor]
        return np.array([*target, *goal, *(target - self.gripper[:2]), *(goal - self.gripper[:2])], dtype=np.float32)

    def close(self) -> None:
        """Nothing to free: the world is plain numpy."""

    def _observation(self) -> dict[str, Any]:
        return {"image": self.render(), "instruction": self.instruction, "proprio": self.proprio(), "object": self.object_state()}

    # --- rendering -----------------------------------------------------------------------------------------------
    def render(self) -> np.ndarray:
        """Top-down frame uint8 `[S, S, 3]`: table, plate, blocks, then the held block and the gripper on top."""
        if self.steps < 0:
            raise RsdError("TabletopEnv.render: expected reset(seed) first, got no episode.")
        if self._background is None:
            self._background = self._draw_background()
        image = self._background.copy()
        x, y, z = self.gripper
        scale = 1.0 + 0.6 * z  # nearer the camera looks bigger
        if self.held is not None:
            bx, by = self.blocks[self.held]
            self._rect(image, x + (bx - x) * scale, y + (by - y) * scale, BLOCK_HALF * scale, BLOCK_HALF * scale, PALETTE[self.colors[self.held]])
        shade = int(40 + 180 * z)
        colour = (shade, shade, shade)
        spread = FINGER_CLOSED + (FINGER_OPEN - FINGER_CLOSED) * self.opening
        if self.held is not None:  # the jaws rest against the held block's sides
            spread = max(spread, BLOCK_HALF + FINGER_HALF_WIDTH)
        spread *= scale
        for side in (-1.0, 1.0):  # fingers
            self._rect(image, x + side * spread, y, FINGER_HALF_WIDTH * scale, FINGER_HALF_LENGTH * scale, colour)
        self._rect(image, x, y + FINGER_HALF_LENGTH * scale, spread + FINGER_HALF_WIDTH * scale, 0.015 * scale, colour)  # palm
        return image

    def _draw_background(self) -> np.ndarray:
        """Table, plate disc and every block not held."""
        image = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        image[:] = TABLE_RGB
        d2 = (self._grid_x - self.plate[0]) ** 2 + (self._grid_y - self.plate[1]) ** 2
        image[d2 < PLATE_RADIUS**2] = PLATE_RIM_RGB
        image[d2 < (PLATE_RADIUS - 0.04) ** 2] = PLATE_RGB
        for index, (bx, by) in enumerate(self.blocks):
            if index != self.held:
                self._rect(image, bx, by, BLOCK_HALF, BLOCK_HALF, PALETTE[self.colors[index]])
        return image

    def _rect(self, image: np.ndarray, x: float, y: float, half_x: float, half_y: float, colour: tuple[int, int, int]) -> None:
        """Fill the axis-aligned rectangle centred at world (x, y), at least one pixel."""
        size = self.image_size
        c0, c1 = (int(np.clip(round((v + 1.0) * 0.5 * size), 0, size)) for v in (x - half_x, x + half_x))
        r0, r1 = (int(np.clip(round((1.0 - v) * 0.5 * size), 0, size)) for v in (y + half_y, y - half_y))
        image[r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = colour
