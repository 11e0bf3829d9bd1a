"""Map a checkpoint's weights onto another model by prefix rules, as a command.

Multi-phase recipes start one network from another's weights: phase 2 of the angiography bundle
(Mask R-CNN) from phase 1's vessel network, or a bundle's backbone from the trunk inside a
foundation model's checkpoint. The keys rarely line up, so each source key goes through the rules
(``--drop`` prefixes removed, then the first matching ``--strip_prefix`` cut, then ``--add_prefix``
prepended) and is kept when the target model has a tensor of that name and shape. The command
prints how many target tensors were loaded, which are missing, which source tensors found no
place and which did not fit, refuses when nothing matches, and writes the matched tensors as a
plain state dict (load it with ``strict=False``: the rest keeps its initialisation)::

    python -m common.bundle.weight_surgery --checkpoint models/vessels.pt --output models/segments_init.pt \\
        --config_file <bundle>/configs/train.json <bundle>/configs/train_segments.json \\
        --strip_prefix backbone.trunk. --add_prefix backbone.vit.trunk. --drop head.

The target comes from a bundle config (the network is built under
:func:`~common.networks.timm_backbone.architecture_only`, so no weights are read) or from a
checkpoint of the target model (``--target``). Checkpoints are read with ``weights_only=True`` and
the output is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from torch import nn

from common.errors import InputDataError
from common.io.checkpoint import extract_state_dict, load_checkpoint, save_checkpoint
from common.networks.rope import rope_state_keys
from common.networks.timm_backbone import architecture_only

__all__ = ["SurgeryResult", "main", "map_keys", "target_from_config", "transplant"]

SURGERY_REMEDY = (
    "compare the printed key examples and set --strip_prefix/--add_prefix so that source names become "
    "target names, e.g. --strip_prefix backbone.trunk. --add_prefix backbone.vit.trunk."
)


@dataclass
class SurgeryResult:
    """What a transplant did: the tensors to write and the names that did not carry over."""

    loaded: dict[str, torch.Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # target tensors not provided
    unexpected: list[str] = field(default_factory=list)  # mapped source names the target lacks
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: int = 0
    derived: int = 0  # source tensors whose target is a table the model computes (RoPE), not loaded

    def summary(self) -> str:
        lines = [
            (
                f"loaded {len(self.loaded)} of {len(self.loaded) + len(self.missing)} target tensors; "
                f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
                f"shape mismatches {len(self.mismatched)}, dropped {self.dropped}, "
                f"derived (computed by the model) {self.derived}"
            )
        ]
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            if names:
                lines.append(f"  {title}, e.g. {names[:5]}")
        lines += [
            f"  shape mismatch: {k} is {src} in the checkpoint, {dst} in the target"
            for k, src, dst in self.mismatched[:5]
        ]
        return "\n".join(lines)


def map_keys(
    keys: Sequence[str], strip_prefixes: Sequence[str] = (), add_prefix: str = "", drop: Sequence[str] = ()
) -> dict[str, str]:
    """Source key -> target key under the rules; keys starting with a ``drop`` prefix are left out."""
    mapped = {}
    for key in keys:
        if any(key.startswith(prefix) for prefix in drop):
            continue
        new = next((key[len(p) :] for p in strip_prefixes if key.startswith(p)), key)
        mapped[key] = add_prefix + new
    return mapped


def transplant(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    strip_prefixes: Sequence[str] = (),
    add_prefix: str = "",
    drop: Sequence[str] = (),
    derived: Collection[str] = (),
) -> SurgeryResult:
    """Match ``source`` tensors to ``target`` names and shapes under the prefix rules.

    ``derived`` names target tensors the model computes from its configuration (rotary tables, see
    :func:`common.networks.rope.rope_state_keys`): they are neither loaded nor reported missing.
    """
    mapping = map_keys(list(source), strip_prefixes, add_prefix, drop)
    result = SurgeryResult(dropped=len(source) - len(mapping))
    target = {k: v for k, v in target.items() if k not in derived}
    for old, new in mapping.items():
        if new in derived:
            result.derived += 1
        elif new not in target:
            result.unexpected.append(new)
        elif tuple(source[old].shape) != tuple(target[new].shape):
            result.mismatched.append((new, tuple(source[old].shape), tuple(target[new].shape)))
        else:
            result.loaded[new] = source[old]
    result.missing = [k for k in target if k not in result.loaded]
    return result


def target_from_config(
    config_files: Sequence[str | os.PathLike], network_id: str = "network_def"
) -> nn.Module:
    """Build ``network_id`` from bundle configs (merged in order) without reading any weights."""
    parser = ConfigParser()
    metadata = Path(config_files[0]).parent / "metadata.json"
    if metadata.is_file():  # configs may refer to @_meta_ (class names), as `monai.bundle run` allows
        parser.read_meta(str(metadata))
    parser.read_config([str(f) for f in config_files])
    if network_id not in parser:
        raise InputDataError(
            config_files[-1], f"has no id '{network_id}'", "pass the network's id as --network_id"
        )
    with architecture_only():
        network = parser.get_parsed_content(network_id)
    if not isinstance(network, nn.Module):
        raise InputDataError(config_files[-1], f"'{network_id}' is a {type(network).__name__}, not a network")
    return network


def _state_dict(path: str | os.PathLike, key: str | None) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint(path)
    try:
        state_dict = extract_state_dict(checkpoint, key)
    except (KeyError, TypeError) as err:
        raise InputDataError(path, f"has no entry '{key}'", "check --checkpoint_key") from err
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise InputDataError(path, "does not hold a state dict (a mapping of names to tensors)")
    return dict(state_dict)


def run(args: argparse.Namespace) -> SurgeryResult:
    """Read, match, refuse an empty match, write; returns the result for callers and tests."""
    if not Path(args.checkpoint).is_file():
        raise InputDataError(args.checkpoint, "checkpoint not found")
    source = _state_dict(args.checkpoint, args.checkpoint_key)
    if args.target is not None:
        target, derived = _state_dict(args.target, None), set()
    else:
        network = target_from_config(args.config_file, args.network_id)
        target, derived = network.state_dict(), rope_state_keys(network)
    result = transplant(source, target, args.strip_prefix, args.add_prefix, args.drop, derived)
    if not result.loaded:
        raise InputDataError(
            args.checkpoint,
            f"no tensor matches the target after the prefix rules ({len(source)} in the checkpoint, e.g. "
            f"{list(source)[:3]}; {len(target)} in the target, e.g. {list(target)[:3]})",
            SURGERY_REMEDY,
        )
    save_checkpoint(result.loaded, args.output)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.bundle.weight_surgery",
        description="Map a checkpoint onto another model by prefix rules and write the tensors that fit.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="source weights")
    parser.add_argument(
        "--checkpoint_key", default=None, help="entry holding the state dict (default: detect)"
    )
    parser.add_argument("--output", required=True, type=Path, help="where to write the matched state dict")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--config_file", nargs="+", help="bundle config(s) defining the target network")
    target.add_argument("--target", type=Path, help="a checkpoint of the target model")
    parser.add_argument("--network_id", default="network_def", help="config id of the network (%(default)s)")
    parser.add_argument("--strip_prefix", action="append", default=[], help="cut this prefix (repeatable)")
    parser.add_argument("--add_prefix", default="", help="prepend this to every kept key")
    parser.add_argument("--drop", action="append", default=[], help="leave out keys starting with this")
    args = parser.parse_args(argv)
    result = run(args)
    print(result.summary())
    print(f"wrote {len(result.loaded)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
