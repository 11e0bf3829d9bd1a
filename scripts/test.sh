#!/usr/bin/env bash
# Run the whole test suite (creates the environment on first use). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest tests "$@"
