#!/usr/bin/env bash
# Generate every bundle's demo data, train (quick settings), evaluate and infer, then write reports/.
# Extra arguments go to scripts/demo.py (e.g. --bundles microscopy_dinocell_segmentation).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python scripts/demo.py "$@"
