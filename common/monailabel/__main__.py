"""Serve the collection's bundles with MONAI Label.

Usage::

    python -m common.monailabel serve --studies DIR [--bundles NAME ...] [--models-dir DIR]
        [--overrides FILE] [--host 127.0.0.1] [--port 8000]

``DIR`` is the datastore: a folder of images (PNG, JPEG, TIFF, whole-slide TIFF); saved labels go to
``DIR/labels/final``. Viewers (3D Slicer, QuPath, OHIF) connect to ``http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path

from common.monailabel.bundles import BUNDLES, REPO_ROOT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m common.monailabel", description=__doc__.split("\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the MONAI Label server")
    serve.add_argument("--studies", required=True, type=Path, help="folder of images (the datastore)")
    serve.add_argument("--bundles", nargs="+", choices=sorted(BUNDLES), help="models to serve (default: all)")
    serve.add_argument("--bundles-dir", type=Path, help="folder holding the bundles (default: bundles/)")
    serve.add_argument("--models-dir", type=Path, help="folder of <bundle>/ weight folders (default: bundles/<bundle>/models)")
    serve.add_argument("--work-dir", type=Path, help="training logs and slide outputs (default: STUDIES/.monailabel)")
    serve.add_argument("--overrides", type=Path, help='JSON {"<bundle>": {"<config id>": value}}')
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _app_conf(args: argparse.Namespace) -> dict[str, str]:
    values = {
        "bundles": ",".join(args.bundles or []),
        "bundles_dir": args.bundles_dir,
        "models_dir": args.models_dir,
        "work_dir": args.work_dir,
        "overrides": args.overrides,
    }
    return {key: str(value) for key, value in values.items() if value}


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if not args.studies.is_dir():
        raise SystemExit(f"--studies {args.studies}: not a folder")
    # MONAI Label reads its settings from the environment when first imported; its background
    # training and batch-inference processes inherit them, and PYTHONPATH lets them import `common`.
    os.environ.update(
        {
            "MONAI_LABEL_APP_DIR": str(Path(__file__).resolve().parent),
            "MONAI_LABEL_STUDIES": str(args.studies.resolve()),
            "MONAI_LABEL_APP_CONF": json.dumps(_app_conf(args)),
            "MONAI_LABEL_SERVER_PORT": str(args.port),
            "MONAI_LABEL_SESSIONS": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
    )
    import uvicorn

    from common.monailabel.server import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
