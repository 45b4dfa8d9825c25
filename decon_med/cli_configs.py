"""The ``configs`` sub-command of the ``decon-med`` command line: the YAML configs shipped with the package.

Example::

    decon-med configs                                  # name and description of every shipped config
    decon-med configs --paths                          # name and file of each
    decon-med configs copy finetune/folder my.yaml     # a copy to edit; then: decon-med finetune my.yaml ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decon_med.errors import DeconError


def format_listing(paths: bool = False) -> str:
    """The table ``decon-med configs`` prints."""
    from decon_med.shipped import configs_root, describe, shipped_configs

    configs = shipped_configs()
    if paths:
        width = max(len(c.name) for c in configs)
        return "\n".join(f"{c.name:{width}s}  {c.path}" for c in configs)
    width = max(len(c.name) for c in configs)
    lines = [
        f"{len(configs)} shipped configs in {configs_root()} (NAME.yaml). Any command takes a NAME, or the bare",
        "file name when only one folder holds it, in place of a config path; a file that exists wins.",
        "decon-med configs copy NAME DEST writes one to edit.",
        "",
        f"{'NAME':{width}s}  DESCRIPTION",
    ]
    lines += [f"{c.name:{width}s}  {describe(c.path)}".rstrip() for c in configs]
    return "\n".join(lines)


def copy_config(name: str, dest: str | Path, overwrite: bool = False) -> Path:
    """Write the shipped config ``name`` to ``dest`` (into it, under the config's file name, when ``dest`` is a
    folder); returns the file written.

    Raises:
        DeconError: ``name`` is not a shipped config (the message lists close names), ``dest`` exists and
            ``overwrite`` is false, or ``dest`` lies in the shipped configs folder.
    """
    from decon_med.folders import atomic_write, check_not_input
    from decon_med.shipped import close_names, configs_root, find_shipped

    config = find_shipped(name)
    if config is None:
        close = close_names(name)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise DeconError(f"{name}: not a shipped config{hint}; `decon-med configs` lists them")
    target = Path(dest)
    if target.is_dir():
        target = target / config.path.name
    check_not_input(
        target, [("shipped config", config.path), ("shipped configs folder", configs_root())], "DEST"
    )
    if target.exists() and not overwrite:
        raise DeconError(f"{target}: exists; pass --overwrite to replace it")
    if target.exists() and not target.is_file():
        raise DeconError(f"{target}: exists and is not a file")
    atomic_write(target, config.path.read_bytes())
    return target


def _cmd_configs(args: argparse.Namespace) -> int:
    if args.action == "list":
        if args.name is not None:
            raise DeconError(
                f"configs: unexpected word '{args.name}' (copy NAME DEST writes a config to edit)"
            )
        print(format_listing(paths=args.paths))
        return 0
    if args.name is None or args.dest is None:
        raise DeconError(
            "configs copy: needs NAME and DEST, e.g. decon-med configs copy finetune/folder my.yaml"
        )
    target = copy_config(args.name, args.dest, overwrite=args.overwrite)
    print(f"wrote {target}; edit it, then pass it in place of the name")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``configs`` on the sub-command parsers of ``decon-med``.

    Example:
        >>> parser = argparse.ArgumentParser(); add_commands(parser.add_subparsers(dest="command"))
    """
    p = subparsers.add_parser(
        "configs",
        help="list the shipped YAML configs (usable by name in place of a path), or copy one to edit",
        description=(
            "Without arguments, list the configs shipped with the package: NAME and a description. Every command "
            "that takes a config takes a NAME (pretrain/decon_ml), the bare file name when only one folder holds "
            "it (decon_ml, decon_ml.yaml) or the repository path (configs/pretrain/decon_ml.yaml) in place of a "
            "path; a file that exists wins. 'copy NAME DEST' writes a shipped config to DEST (a file, or a folder "
            "to write NAME's file name into) to edit."
        ),
    )
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "copy"], help="list (default) or copy"
    )
    p.add_argument("name", nargs="?", help="copy: the shipped config, e.g. finetune/folder")
    p.add_argument("dest", nargs="?", help="copy: the file (or folder) to write")
    p.add_argument("--overwrite", action="store_true", help="copy: replace an existing DEST")
    p.add_argument("--paths", action="store_true", help="list each config's file instead of its description")
    p.set_defaults(func=_cmd_configs)
