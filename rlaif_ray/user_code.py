"""The user's own Python named in the config (`data.checker`, `reward.functions`): found, loaded, and shipped.

A spec is `module:function` (a module importable on the driver, or a `module.py` in the working folder: the console
script's own path does not hold the working folder, so it is added) or `path/to/file.py:function` (a file anywhere,
loaded as the module named after the file).

Shipping: the driver lists the files such specs live in (`files_to_ship`: a single module's file, a package's folder;
nothing installed in site-packages and nothing of rlaif_ray) and starts Ray with them as the job's `py_modules`
(`rlaif_ray.runtime.driver.start_ray`), so every actor on every node imports them by the same name, on the embedded
cluster and in a submitted job (where they join the job's own runtime environment). On an actor, a path spec whose
file is not on that node is imported by its module name: the shipped copy.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from typing import Callable


class UserCodeError(ValueError):
    """A spec that names no importable module or no callable in it; the message names the config field."""


def split_spec(spec: str, field: str) -> tuple[str, str]:
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name or not name.isidentifier():
        raise UserCodeError(f"{field}: {spec!r} is not 'package.module:function' or 'path/to/file.py:function'")
    return module, name


def is_path_spec(module: str) -> bool:
    return module.endswith(".py") or os.sep in module or "/" in module


def absolute_spec(spec: str) -> str:
    """A path spec with its file's absolute path (relative paths are the working folder's); others as they are."""
    module, sep, name = spec.rpartition(":")
    if sep and is_path_spec(module):
        return f"{Path(module).expanduser().resolve()}:{name}"
    return spec


def _working_folder_on_path() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # last: the working folder never shadows an installed module


def import_module_of(spec: str, field: str):
    """The module a spec names, imported (a path spec: its folder goes first on sys.path, so it imports under the
    file's name, the name its shipped copy has on the actors)."""
    module, _ = split_spec(spec, field)
    try:
        if is_path_spec(module):
            path = Path(module).expanduser()
            if not path.name.endswith(".py") or not path.stem.isidentifier():
                raise UserCodeError(f"{field}: {module!r} is not a Python file named like a module (name.py)")
            if path.is_file():
                folder = str(path.resolve().parent)
                if folder not in sys.path:
                    sys.path.insert(0, folder)
                loaded = sys.modules.get(path.stem)
                if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != path.resolve():
                    raise UserCodeError(f"{field}: {module!r} is named {path.stem!r}, like the module already "
                                        f"imported from {loaded.__file__}: rename the file")
            return importlib.import_module(path.stem)  # not on this node: the copy shipped with the job
        _working_folder_on_path()
        return importlib.import_module(module)
    except UserCodeError:
        raise
    except ImportError as err:
        where = f" (working folder {os.getcwd()})" if not is_path_spec(module) else ""
        raise UserCodeError(f"{field}: cannot import {module!r}{where}: {err}") from None
    except Exception as err:  # the module itself fails while it is imported
        raise UserCodeError(f"{field}: importing {module!r} raised {type(err).__name__}: {err}") from err


def load_callable(spec: str, field: str) -> Callable:
    """The function a spec names; errors name the field and the spec."""
    module = import_module_of(spec, field)
    name = split_spec(spec, field)[1]
    fn = getattr(module, name, None)
    if fn is None:
        raise UserCodeError(f"{field}: {module.__name__} ({getattr(module, '__file__', '?')}) has no {name!r}")
    if not callable(fn):
        raise UserCodeError(f"{field}: {spec!r} is not a function")
    return fn


def _installed(path: Path) -> bool:
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    here = Path(__file__).resolve().parent
    return path == here or here in path.parents or any(Path(r).resolve() in path.parents for r in roots)


def files_to_ship(specs: list[str], field_of: dict[str, str] | None = None) -> list[str]:
    """Files and folders the actors need to import `specs` (after the driver imported them): a single module's file,
    a package's top folder; never an installed package or rlaif_ray itself."""
    out: list[str] = []
    for spec in specs:
        module = import_module_of(spec, (field_of or {}).get(spec, "user code"))
        top = sys.modules[module.__name__.split(".")[0]]
        origin = getattr(top, "__file__", None)
        if not origin:
            continue  # a namespace package or a built-in module
        path = Path(origin).resolve()
        ship = path.parent if path.name == "__init__.py" else path
        if not _installed(ship) and str(ship) not in out:
            out.append(str(ship))
    return out
